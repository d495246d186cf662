"""Snapshot manifests: what a snapshot contains, and how they are parsed from untrusted bytes.

A manifest read from a target is untrusted input (it may be corrupt or hand-crafted):
:func:`parse_manifest` bounds its size, checks every type, refuses unsafe paths (absolute,
``..``, ``.``, empty segments, backslashes, NUL, control characters), duplicate paths and
file/directory clashes, malformed chunk ids, and sizes that disagree with the chunk list.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from replicator import __version__
from replicator.errors import RepositoryError, UnsupportedFormatError
from replicator.paths import check_relative_path

MANIFEST_VERSION = 2
"""Version 2 added ``packed`` (chunks stored inside pack objects); version 1 is still read."""
READABLE_VERSIONS = (1, 2)
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


class FileEntry(_Strict):
    path: str
    size: int = Field(ge=0)
    mode: int = Field(ge=0, le=0o7777)
    mtime_ns: int
    digest: str = Field(pattern=_HEX.pattern)
    chunks: tuple[ChunkRef, ...]

    _path = field_validator("path")(check_relative_path)

    @model_validator(mode="after")
    def _sizes_agree(self) -> FileEntry:
        if sum(size for _, size in self.chunks) != self.size:
            raise ValueError(f"{self.path}: chunk sizes do not add up to the file size")
        return self


class SetInfo(_Strict):
    """A checkpoint set (top-level directory) included in the snapshot, complete by construction."""

    name: str
    files: int = Field(ge=0)
    bytes: int = Field(ge=0)
    newest_mtime_ns: int
    """Modification time of the newest file in the set: when the writer last touched it."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        check_relative_path(v)
        if "/" in v:
            raise ValueError(f"set name {v!r} is not a top-level name")
        return v


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


def encode_manifest(manifest: Manifest) -> bytes:
    """The stored form: zstd-compressed UTF-8 JSON."""
    return zstandard.ZstdCompressor(level=MANIFEST_ZSTD_LEVEL).compress(manifest.model_dump_json().encode())


def parse_manifest(stored: bytes, *, where: str) -> Manifest:
    """Decode and validate an untrusted stored manifest; errors name ``where``."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=False)
        body = reader.read(MAX_MANIFEST_BYTES + 1)
    except zstandard.ZstdError as exc:
        raise RepositoryError(f"manifest is not valid zstd ({exc})", key=where) from None
    if len(body) > MAX_MANIFEST_BYTES:
        raise RepositoryError("manifest exceeds 1 GiB", key=where)
    try:
        manifest = Manifest.model_validate_json(body)
    except ValidationError as exc:
        _check_header(body, where)  # a clearer message for foreign or newer objects
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise RepositoryError(f"invalid manifest: {loc}: {first['msg']}", key=where) from None
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
