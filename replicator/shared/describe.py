"""What a self-describing checkpoint says its set holds: the ``needs`` of a part.

A torch.distributed.checkpoint ``.metadata`` names every storage file and the byte ranges it
uses; a ``*.safetensors.index.json`` names every shard. Whichever instance holds such a file
reads it from its own source and puts the list in its part, so the assembler can tell a set
whose last shard is missing or still short from a complete one, whoever holds the shards.
"""

from __future__ import annotations

import io
import json
from typing import Any, TypeGuard

from replicator.paths import check_relative_path
from replicator.verify.formats import PICKLE_LIMIT, FormatProblem, Inert, load_inert

DESCRIBES = (".metadata", ".safetensors.index.json")
"""Names (suffixes) of the files that describe their set."""
MAX_DESCRIPTION = PICKLE_LIMIT


def describes(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name == ".metadata" or name.endswith(".safetensors.index.json")


def needs(path: str, data: bytes) -> dict[str, int]:
    """Path (next to ``path``) -> the size it must have at least. FormatProblem if the file does
    not parse: a describing file that is torn or foreign holds the set back."""
    base = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
    if path.rsplit("/", 1)[-1] == ".metadata":
        return {_join(base, rel): end for rel, end in _dcp(data).items()}
    return {_join(base, shard): 1 for shard in _safetensors_index(data)}


def _dcp(data: bytes) -> dict[str, int]:
    if not data:
        raise FormatProblem(".metadata is empty: torch.distributed.checkpoint writes it last")
    meta = load_inert(io.BytesIO(data))
    if not isinstance(meta, Inert) or not meta.qualname.endswith(".Metadata"):
        raise FormatProblem("not a torch.distributed.checkpoint Metadata object")
    storage = meta.fields().get("storage_data")
    if not isinstance(storage, dict) or not storage:
        raise FormatProblem("metadata names no storage files")
    out: dict[str, int] = {}
    for info in storage.values():
        item = info.fields() if isinstance(info, Inert) else {}
        rel, offset, length = item.get("relative_path"), item.get("offset"), item.get("length")
        if not isinstance(rel, str) or not _count(offset) or not _count(length):
            raise FormatProblem("a storage entry lacks relative_path, offset or length")
        out[rel] = max(out.get(rel, 0), offset + length)
    return out


def _safetensors_index(data: bytes) -> set[str]:
    try:
        doc: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatProblem(f"not valid JSON ({exc})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatProblem("no weight_map object mapping tensor names to shard files")
    return set(weight_map.values())


def _count(v: object) -> TypeGuard[int]:
    return type(v) is int and v >= 0


def _join(base: str, rel: str) -> str:
    try:
        check_relative_path(rel)
    except ValueError as exc:
        raise FormatProblem(f"refers to an unsafe path: {exc}") from None
    return base + rel
