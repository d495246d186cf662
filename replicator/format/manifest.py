"""Snapshot manifests: what a snapshot contains, and how they are parsed from untrusted bytes.

A manifest read from a target is untrusted input (it may be corrupt or hand-crafted):
:func:`parse_manifest` bounds its size, checks every type, refuses unsafe paths (absolute,
``..``, ``.``, empty segments, NUL, over-long names), duplicate paths and file/directory
clashes, malformed chunk ids, and sizes that disagree with the chunk list.

Names are bytes on POSIX, JSON strings are Unicode (version 3, issue 17). In memory a path is
a str in the surrogateescape convention (:mod:`replicator.paths`). In the JSON, ``path`` (and
a set's ``name``) is always valid UTF-8; a name that is not valid UTF-8 also carries
``path_b64`` (``name_b64``), the standard base64 of its exact bytes, with ``path`` holding a
display form (each invalid sequence as U+FFFD). The ``_b64`` field is the truth; it is
accepted only in its one canonical form (docs/FORMAT.md section 5.1).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticSerializationError

from replicator import __version__
from replicator.errors import RepositoryError, UnsupportedFormatError
from replicator.paths import check_relative_path, decode_path, encode_path

MANIFEST_VERSION = 3
"""Version 3 added names that are not valid UTF-8 (``path_b64``, ``name_b64``) and allows
every name POSIX allows; version 2 added ``packed`` (chunks stored inside pack objects).
Versions 1 and 2 are still read."""
READABLE_VERSIONS = (1, 2, 3)
MAX_MANIFEST_BYTES = 1 << 30
MAX_STORED_CHUNK = (16 << 20) + 64
"""A stored chunk object is its codec byte, at most 16 MiB of payload and a few record headers."""
_HEX = re.compile(r"^[0-9a-f]{32}$|^[0-9a-f]{64}$")
_TIME_FMT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime(_TIME_FMT)


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, _TIME_FMT).replace(tzinfo=UTC)


HexId = Annotated[str, Field(pattern=_HEX.pattern)]
ChunkRef = tuple[HexId, Annotated[int, Field(ge=0, le=16 << 20)]]
PackedAt = tuple[HexId, Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1, le=MAX_STORED_CHUNK)]]
"""Where a packed chunk's object is: (pack id, byte offset in the pack, stored length)."""


class _Strict(BaseModel):
    # Unknown fields are ignored so that a newer writer may add optional fields within a
    # version; anything an old reader must not ignore bumps MANIFEST_VERSION (docs/FORMAT.md).
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


def _true_name(shown: str, b64: str) -> str:
    """The name a ``_b64`` field stands for, as a surrogateescape str; ValueError unless the
    pair is in its one canonical form: standard base64 with padding, of bytes that are not
    valid UTF-8 (a valid name has no ``_b64``), whose display form is ``shown``."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{b64!r} is not base64") from None
    if base64.b64encode(raw).decode("ascii") != b64:
        raise ValueError(f"{b64!r} is not canonical base64")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        raise ValueError(f"{b64!r} is valid UTF-8: the name belongs in the plain field alone")
    if raw.decode("utf-8", "replace") != shown:
        raise ValueError(f"{shown!r} is not the display form of the name in the base64 field")
    return decode_path(raw)


def wire_name(name: str) -> tuple[str, str | None]:
    """(display form, base64 of the exact bytes) of a name that is not valid UTF-8; (name,
    None) for one that is."""
    if name.isascii():
        return name, None
    raw = encode_path(name)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), base64.b64encode(raw).decode("ascii")
    return name, None


class FileEntry(_Strict):
    path: str
    """The true name (surrogateescape str). In JSON, its display form when ``path_b64`` is set."""
    path_b64: str | None = Field(default=None, repr=False)
    """Wire form only: read by validation into ``path``, then None; set on the copies
    :func:`manifest_json` writes for names that need it."""
    size: int = Field(ge=0)
    mode: int = Field(ge=0, le=0o7777)
    mtime_ns: int
    digest: str = Field(pattern=_HEX.pattern)
    chunks: tuple[ChunkRef, ...]

    @model_validator(mode="after")
    def _check(self) -> FileEntry:
        # One Python call per entry for all of it (the path check used to be a second one):
        # on a 20,000-file manifest each per-entry call counts.
        if self.path_b64 is not None:
            object.__setattr__(self, "path", _true_name(self.path, self.path_b64))
            object.__setattr__(self, "path_b64", None)
        check_relative_path(self.path)
        chunks = self.chunks
        if (chunks[0][1] if len(chunks) == 1 else sum(size for _, size in chunks)) != self.size:
            raise ValueError(f"{self.path!r}: chunk sizes do not add up to the file size")
        return self


class SetInfo(_Strict):
    """A checkpoint set (top-level directory) included in the snapshot, complete by construction."""

    name: str
    """The true name, like :attr:`FileEntry.path`."""
    name_b64: str | None = Field(default=None, repr=False)
    """Wire form only, like :attr:`FileEntry.path_b64`."""
    files: int = Field(ge=0)
    bytes: int = Field(ge=0)
    newest_mtime_ns: int
    """Modification time of the newest file in the set: when the writer last touched it."""

    @model_validator(mode="after")
    def _check(self) -> SetInfo:
        if self.name_b64 is not None:
            object.__setattr__(self, "name", _true_name(self.name, self.name_b64))
            object.__setattr__(self, "name_b64", None)
        check_relative_path(self.name)
        if "/" in self.name:
            raise ValueError(f"set name {self.name!r} is not a top-level name")
        return self


class Manifest(_Strict):
    format: Literal["replicator-snapshot"] = "replicator-snapshot"
    version: int = MANIFEST_VERSION
    source: str
    kind: Literal["checkpoint", "dataset", "embedding"]
    created: str
    writer: str = f"replicator/{__version__}"
    files: tuple[FileEntry, ...]
    sets: tuple[SetInfo, ...] = ()
    packed: dict[HexId, PackedAt] = Field(default_factory=dict)
    """Chunk id -> location, for chunks stored inside a pack object; others are loose objects."""

    @field_validator("created")
    @classmethod
    def _created(cls, v: str) -> str:
        parse_time(v)
        return v

    @model_validator(mode="after")
    def _tree(self) -> Manifest:
        return self.check_tree()

    def check_tree(self) -> Manifest:
        """No duplicate paths, and no path that is both a file and a directory."""
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("duplicate file paths")
        dirs: set[str] = set()
        for p in paths:
            i = p.find("/")
            while i != -1:
                dirs.add(p[:i])
                i = p.find("/", i + 1)
        clash = dirs.intersection(paths)
        if clash:
            raise ValueError(f"{sorted(clash)[0]!r} is both a file and a directory")
        return self

    @property
    def created_at(self) -> datetime:
        return parse_time(self.created)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def chunk_ids(self) -> set[str]:
        return {cid for f in self.files for cid, _ in f.chunks}


MANIFEST_ZSTD_LEVEL = 1
"""A manifest is mostly hex ids, which no level compresses: on a 20,000-file manifest (5.4 MB
of JSON) level 1 took 16 ms for 1.22 MB, level 3 36 ms for 1.31 MB, level 6 73 ms for 1.31 MB.
Readers accept any level."""


def manifest_json(manifest: Manifest, *, include: set[str] | None = None) -> bytes:
    """The manifest as UTF-8 JSON (only the fields in ``include``, if given).

    pydantic writes it in one call (~16 ms for 20,000 files) and refuses a str that is not
    valid Unicode: that is how a name that is not valid UTF-8 is found, at no cost to the
    usual manifest. Only then are the entries that need it replaced by copies carrying their
    display form and ``_b64`` field, and the whole written in one call again (the cost grows
    with the number of such names, not of files). ``exclude_none``: ``_b64`` fields are None
    in memory and appear only where set."""
    try:
        return manifest.model_dump_json(include=include, exclude_none=True).encode()
    except PydanticSerializationError:
        files = tuple(map(_wire_entry, manifest.files))
        sets = tuple(map(_wire_set, manifest.sets))
        if files == manifest.files and sets == manifest.sets:
            raise  # not a name: a bug, never to be written around
        wire = manifest.model_copy(update={"files": files, "sets": sets})
        return wire.model_dump_json(include=include, exclude_none=True).encode()


def _wire_entry(entry: FileEntry) -> FileEntry:
    shown, b64 = wire_name(entry.path)
    return entry if b64 is None else entry.model_copy(update={"path": shown, "path_b64": b64})


def _wire_set(info: SetInfo) -> SetInfo:
    shown, b64 = wire_name(info.name)
    return info if b64 is None else info.model_copy(update={"name": shown, "name_b64": b64})


def encode_manifest(manifest: Manifest) -> bytes:
    """The stored form: zstd-compressed UTF-8 JSON."""
    return zstandard.ZstdCompressor(level=MANIFEST_ZSTD_LEVEL).compress(manifest_json(manifest))


def inflate_untrusted(stored: bytes, *, where: str, what: str = "") -> bytes:
    """The body of an untrusted zstd-compressed JSON object (a manifest, a part), never
    decompressed past MAX_MANIFEST_BYTES; RepositoryError naming ``where`` (and ``what``)."""
    prefix = f"{what} " if what else ""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=False)
        body: bytes = reader.read(MAX_MANIFEST_BYTES + 1)
    except zstandard.ZstdError as exc:
        raise RepositoryError(f"{prefix}is not valid zstd ({exc})", key=where) from None
    if len(body) > MAX_MANIFEST_BYTES:
        raise RepositoryError(f"{prefix}exceeds 1 GiB", key=where)
    return body


def first_error(exc: ValidationError) -> str:
    """``field.path: message`` of a validation error's first problem, for one-line errors."""
    first = exc.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def parse_manifest(stored: bytes, *, where: str) -> Manifest:
    """Decode and validate an untrusted stored manifest; errors name ``where``."""
    body = inflate_untrusted(stored, where=where, what="manifest")
    try:
        manifest = Manifest.model_validate_json(body)
    except ValidationError as exc:
        _check_header(body, where)  # a clearer message for foreign or newer objects
        raise RepositoryError(f"invalid manifest: {first_error(exc)}", key=where) from None
    if manifest.version not in READABLE_VERSIONS:
        _check_header(body, where)
    return manifest


def _check_header(body: bytes, where: str) -> None:
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"manifest is not valid JSON ({exc})", key=where) from None
    if not isinstance(data, dict) or data.get("format") != "replicator-snapshot":
        raise RepositoryError("not a replicator snapshot manifest", key=where)
    if data.get("version") not in READABLE_VERSIONS:
        raise UnsupportedFormatError(
            f"manifest version {data.get('version')!r} is not supported "
            f"(this build reads {', '.join(map(str, READABLE_VERSIONS))})",
            key=where,
            hint="upgrade replicator",
        )


def now_utc() -> datetime:
    return datetime.now(UTC)
