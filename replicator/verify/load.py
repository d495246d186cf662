"""``verify --restore-drill --load``: which restored files form a loadable checkpoint, load each
with PyTorch (:mod:`.torch_loaders`, imported only here and only then), and the verdict per
checkpoint set.

A checkpoint is a directory holding a DCP ``.metadata`` (format ``dcp``), a directory holding a
``*.safetensors.index.json`` (``safetensors-sharded``: the index and its shards), a
``*.safetensors`` file in a directory without an index (``safetensors``), or a ``torch.save``
file (``torch``: ``.pt``, ``.pth``, ``.ckpt``; ``.bin`` in zip form). Results are grouped by
checkpoint set (the top-level directory of a checkpoint source); a checkpoint outside any set
is a group of its own, named by its path. Checkpoints load one after another, so the memory a
load needs is that of one checkpoint's bounded load (see :mod:`.torch_loaders`).

Without PyTorch (or with one that fails to import) every checkpoint is ``skipped``, with the
import error as the reason: nothing claims a load that did not happen.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicator.paths import check_relative_path
from replicator.verify.formats import JSON_LIMIT, TORCH_SUFFIXES, FormatProblem

INDEX_SUFFIX = ".safetensors.index.json"


@dataclass
class CheckpointLoad:
    path: str
    """The checkpoint's directory (dcp, safetensors-sharded: its index file's directory) or file."""
    format: str
    """dcp, safetensors-sharded, safetensors or torch."""
    status: str = "loaded"
    """loaded, failed or skipped (PyTorch cannot be imported)."""
    tensors: int = 0
    objects: int = 0
    """Non-tensor entries loaded (DCP's byte items)."""
    bytes: int = 0
    """Tensor data bytes loaded."""
    reason: str | None = None
    """Why it failed or was skipped: one line naming the file or tensor at fault."""
    note: str | None = None
    """What was checked but not loaded (e.g. safetensors dtypes torch has no type for)."""
    index: str | None = field(default=None, repr=False)
    """safetensors-sharded: the index file."""


@dataclass
class SetLoad:
    """The loads of one checkpoint set: loaded if every checkpoint in it loaded."""

    set: str
    status: str
    tensors: int
    objects: int
    bytes: int
    reason: str | None
    """The first failed (else skipped) checkpoint: ``path (format): why``."""
    checkpoints: list[CheckpointLoad]


def torch_unavailable() -> str | None:
    """Why the loaders cannot run here (PyTorch missing or failing to import), or None."""
    try:
        from replicator.verify import torch_loaders  # noqa: F401 - the import is the check
    except Exception as exc:  # a broken install fails with OSError, RuntimeError, ...
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    return None


def find_checkpoints(root: Path, files: Mapping[str, int]) -> list[CheckpointLoad]:
    """The checkpoints among the restored ``files`` (path -> size) under ``root``."""
    found: list[CheckpointLoad] = []
    by_dir: dict[str, list[str]] = {}
    for path in files:
        directory, _, _ = path.rpartition("/")
        by_dir.setdefault(directory, []).append(path.rsplit("/", 1)[-1])
    for directory, names in sorted(by_dir.items()):
        prefix = f"{directory}/" if directory else ""
        shown = directory or "."
        if ".metadata" in names:
            found.append(CheckpointLoad(shown, "dcp"))
        indexes = sorted(n for n in names if n.endswith(INDEX_SUFFIX))
        found += [CheckpointLoad(shown, "safetensors-sharded", index=prefix + n) for n in indexes]
        for name in sorted(names):
            lower = name.lower()
            if lower.endswith(".safetensors") and not indexes:
                found.append(CheckpointLoad(prefix + name, "safetensors"))
            elif lower.endswith(TORCH_SUFFIXES) and _is_torch_file(root / (prefix + name)):
                found.append(CheckpointLoad(prefix + name, "torch"))
    return found


def _is_torch_file(path: Path) -> bool:
    """Zip archives, and (but for .bin, a common name for anything) legacy torch pickles."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError:
        return True  # the load says why it cannot be read
    return magic == b"PK\x03\x04" or (magic[:1] == b"\x80" and not path.name.lower().endswith(".bin"))


def load_checkpoints(
    root: Path, files: Mapping[str, int], sets: Collection[str], unrestored: Collection[str]
) -> list[SetLoad]:
    """Load every checkpoint restored under ``root`` (``files``: the snapshot's paths with their
    sizes; ``sets``: its checkpoint sets; ``unrestored``: paths that did not restore)."""
    found = find_checkpoints(root, files)
    why = torch_unavailable()
    for ck in found:
        if why is not None:
            ck.status, ck.reason = "skipped", f"not loaded: PyTorch cannot be imported ({why})"
            continue
        try:
            _load(root, files, unrestored, ck)
        except FormatProblem as exc:
            ck.status, ck.reason = "failed", str(exc)
        except OSError as exc:
            ck.status, ck.reason = "failed", f"cannot read the restored files: {exc.strerror or exc}"
    return _by_set(found, sets)


def _load(root: Path, files: Mapping[str, int], unrestored: Collection[str], ck: CheckpointLoad) -> None:
    from replicator.verify import torch_loaders as tl

    directory = "" if ck.path == "." else ck.path
    if ck.format in ("dcp", "safetensors-sharded"):
        members = [p for p in files if p.rpartition("/")[0] == directory]
    else:
        members = [ck.path]
    bad = sorted(p for p in members if p in unrestored)
    if bad:
        raise FormatProblem(f"{bad[0]} did not restore (see the digest failures)")
    if ck.format == "dcp":
        loaded = tl.load_dcp(root, directory, files)
    elif ck.format == "safetensors-sharded":
        assert ck.index is not None
        loaded = tl.load_safetensors(root, _shards_of(root, ck.index, files))
    elif ck.format == "safetensors":
        loaded = tl.load_safetensors(root, {ck.path: set()})
    else:
        loaded = tl.torch_load(root / ck.path)
    ck.tensors, ck.objects, ck.bytes, ck.note = loaded.tensors, loaded.objects, loaded.bytes, loaded.note


def _shards_of(root: Path, index: str, files: Mapping[str, int]) -> dict[str, set[str]]:
    """shard path -> the tensor names the index maps to it; every shard must be restored."""
    if files[index] > JSON_LIMIT:
        raise FormatProblem(f"{index} is larger than 64 MiB: not parsed")
    try:
        doc: Any = json.loads((root / index).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatProblem(f"{index} is not valid JSON ({exc})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatProblem(f"{index} has no weight_map mapping tensor names to shard files")
    base = index.rpartition("/")[0]
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        try:
            check_relative_path(shard)
        except ValueError as exc:
            raise FormatProblem(f"{index} maps {name!r} to an unsafe path ({exc})") from None
        full = f"{base}/{shard}" if base else shard
        if full not in files:
            raise FormatProblem(f"{index} maps {name!r} to {full}, which is not in the snapshot")
        shards.setdefault(full, set()).add(name)
    return shards


def _by_set(found: list[CheckpointLoad], sets: Collection[str]) -> list[SetLoad]:
    groups: dict[str, list[CheckpointLoad]] = {}
    for ck in found:
        top = ck.path.split("/", 1)[0]
        groups.setdefault(top if top in sets else ck.path, []).append(ck)
    out = []
    for name, members in sorted(groups.items()):
        failed = [c for c in members if c.status == "failed"] or [c for c in members if c.status == "skipped"]
        first = failed[0] if failed else None
        out.append(
            SetLoad(
                set=name,
                status=first.status if first else "loaded",
                tensors=sum(c.tensors for c in members),
                objects=sum(c.objects for c in members),
                bytes=sum(c.bytes for c in members),
                reason=f"{first.path} ({first.format}): {first.reason}" if first else None,
                checkpoints=members,
            )
        )
    return out
