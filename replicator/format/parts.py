"""Parts and members: what each of several instances contributes to one source (docs/FORMAT.md §11).

When several replicator instances contribute the files of one checkpoint source (one per
node, or N sharing one directory), each writes, per checkpoint set, a *part*: the manifest
entries of its own files of that set, and what the set's self-describing files say it needs
(``needs``). One instance, the assembler, publishes a set once a part from every instance is
in. Each instance also keeps a *member* object alive: which sets it sees, which it declared,
which it holds back and why. Both are parsed here from untrusted bytes, like manifests.

    parts/<source>/<instance>/<set-key>.json.zst   a part (set-key: 32 hex digits of the set name)
    parts/<source>/<instance>/member.json.zst      the instance's member object
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import zstandard
from pydantic import Field, ValidationError, model_validator

from replicator.errors import RepositoryError, UnsupportedFormatError
from replicator.format.manifest import (
    FileEntry,
    HexId,
    PackedAt,
    SetInfo,
    _Strict,
    _wire_entry,
    _wire_set,
    first_error,
    inflate_untrusted,
    parse_time,
)
from replicator.hashing import HashSpec
from replicator.paths import check_relative_path, encode_path

PARTS_VERSION = 1
MEMBER_NAME = "member.json.zst"
_SET_KEY = re.compile(r"^[0-9a-f]{32}\.json\.zst$")
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def set_key(name: str) -> str:
    """The object name of a set's part: a hash of the set name's bytes (names may be any bytes)."""
    return HashSpec("blake3").digest(encode_path(name))[:16].hex() + ".json.zst"


def part_key(source: str, instance: str, set_name: str) -> str:
    return f"parts/{source}/{instance}/{set_key(set_name)}"


def member_key(source: str, instance: str) -> str:
    return f"parts/{source}/{instance}/{MEMBER_NAME}"


def parse_key(key: str) -> tuple[str, str, bool] | None:
    """(source, instance, is_member) of a key under ``parts/``; None if it is not one of ours."""
    pieces = key.split("/")
    if len(pieces) != 4 or pieces[0] != "parts" or not _INSTANCE.match(pieces[2]):
        return None
    if pieces[3] == MEMBER_NAME:
        return pieces[1], pieces[2], True
    if _SET_KEY.match(pieces[3]):
        return pieces[1], pieces[2], False
    return None


class _Contribution(_Strict):
    repository: str
    """The id of the repository config (``config.json``) the writer hashed its chunks for: a
    part written for a config that was since replaced never completes a set."""
    source: str
    instance: str = Field(pattern=_INSTANCE.pattern)
    instances: int = Field(ge=1, le=1024)
    """How many instances the writer was configured with: the assembler refuses to mix counts."""
    index: int | None = Field(default=None, ge=0)
    """The writer's number when it splits a shared directory (``split``), else None."""
    created: str

    @model_validator(mode="after")
    def _created_ok(self) -> _Contribution:
        parse_time(self.created)
        return self


class Part(_Contribution):
    format: Literal["replicator-part"] = "replicator-part"
    version: int = PARTS_VERSION
    set: SetInfo
    """The set, with this instance's share of its files and bytes."""
    files: tuple[FileEntry, ...]
    packed: dict[HexId, PackedAt] = Field(default_factory=dict)
    needs: dict[str, int] = Field(default_factory=dict)
    """Path in the source -> the size it must at least have: what a self-describing file of
    this part (DCP ``.metadata``, ``*.safetensors.index.json``) says the set holds."""

    @model_validator(mode="after")
    def _inside(self) -> Part:
        prefix = self.set.name + "/"
        for f in self.files:
            if not f.path.startswith(prefix):
                raise ValueError(f"{f.path!r} is not in set {self.set.name!r}")
        for path, size in self.needs.items():
            check_relative_path(path)
            if not path.startswith(prefix) or type(size) is not int or size < 0:
                raise ValueError(f"needs {path!r}: not a path of set {self.set.name!r} with a size")
        return self


class MemberSet(SetInfo):
    """A set as one instance sees it: its share, and whether it declared its part."""

    declared: bool
    reason: str | None = None
    """Why the instance holds its part back (not quiet yet, unreadable...)."""


class Member(_Contribution):
    format: Literal["replicator-member"] = "replicator-member"
    version: int = PARTS_VERSION
    sets: tuple[MemberSet, ...] = ()


def encode(doc: Part | Member) -> bytes:
    """zstd-compressed JSON; names that are not UTF-8 carry their ``_b64`` form (FORMAT §5.1)."""
    if isinstance(doc, Part):
        wire: Part | Member = doc.model_copy(
            update={"set": _wire_set(doc.set), "files": tuple(map(_wire_entry, doc.files))}
        )
    else:
        wire = doc.model_copy(update={"sets": tuple(_wire_set(s) for s in doc.sets)})
    body = wire.model_dump_json(exclude_none=True).encode()
    return zstandard.ZstdCompressor(level=1).compress(body)


def parse_part(stored: bytes, *, where: str) -> Part:
    doc = _parse(Part, stored, where)
    assert isinstance(doc, Part)
    return doc


def parse_member(stored: bytes, *, where: str) -> Member:
    doc = _parse(Member, stored, where)
    assert isinstance(doc, Member)
    return doc


def _parse(model: type[Part] | type[Member], stored: bytes, where: str) -> Part | Member:
    body = inflate_untrusted(stored, where=where)
    try:
        head: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"not valid JSON ({exc})", key=where) from None
    expected = model.model_fields["format"].default
    if not isinstance(head, dict) or head.get("format") != expected:
        raise RepositoryError(f"not a {expected} object", key=where)
    if head.get("version") != PARTS_VERSION:
        raise UnsupportedFormatError(
            f"{expected} version {head.get('version')!r} is not supported (this build reads {PARTS_VERSION})",
            key=where,
            hint="upgrade replicator",
        )
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RepositoryError(f"invalid {expected}: {first_error(exc)}", key=where) from None
