"""The repository: the open, documented layout replicator keeps on every target (docs/FORMAT.md).

    config.json                          what this repository is (format version, hash + seed, ...)
    chunks/<2 hex>/<id>                  write-once, content-addressed chunk objects
    packs/<2 hex>/<pack id>              small chunk objects, concatenated (one write for many)
    snapshots/<source>/<snapshot-id>.json.zst   snapshot manifests
    refs/<source>/latest                 the newest complete snapshot of a source
    gc/...                               garbage collection's coordination (replicator.gc)

Write order is the consistency protocol: chunks, then the manifest, then the ref. Readers go
the other way. So a crash at any moment leaves refs pointing only at complete snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import re
import secrets
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from replicator import __version__
from replicator.config import NAME_RE, ChunkingConfig, CompressionConfig, TargetConfig
from replicator.errors import (
    AlreadyExistsError,
    IntegrityError,
    NotFoundError,
    PermanentTargetError,
    ReplicatorError,
    RepositoryError,
    UnsupportedFormatError,
)
from replicator.format.chunks import Buffer, decode
from replicator.format.manifest import (
    Manifest,
    PackedAt,
    encode_manifest,
    format_time,
    now_utc,
    parse_manifest,
)
from replicator.hashing import HashSpec
from replicator.targets.base import Target

FORMAT_VERSION = 1
"""What a new repository's ``config.json`` says: readers of 1 keep reading what we create."""
GC_VERSION = 2
"""Version 2: writers follow the garbage-collection protocol (docs/FORMAT.md section 10).
``replicator prune`` upgrades a repository to it, so that writers which do not know the
protocol refuse the repository instead of racing the collector."""
PARTS_VERSION = 3
"""Version 3: objects under ``parts/`` (several instances, one source: FORMAT.md §11) are roots
of the garbage collector's mark. Raised when an instance first writes a part, so that
collectors which do not read parts refuse the repository instead of deleting their chunks."""
READ_VERSIONS = (1, 2, 3)
CONFIG_KEY = "config.json"
MAX_SMALL_OBJECT = 1 << 20  # config and refs are tiny; anything bigger is not ours
_SNAPSHOT_ID = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)-([0-9a-f]{32}|[0-9a-f]{64})$")
_ID_TIME = "%Y%m%dT%H%M%S.%fZ"
_READ_GAP = 256 << 10
"""Packed chunks closer than this are read with one ranged GET (the gap is read and dropped)."""
_READ_SPAN = 16 << 20
"""Longest stretch of a pack read at once (a pack's size: bounded memory)."""


DECODE_IN_THREAD = 256 << 10
"""Stored chunks at least this large are decoded in a decoding thread (:meth:`Repository._decoded`);
smaller ones cost less to decode than the hop to a thread."""


@functools.cache
def _decoders() -> ThreadPoolExecutor:
    """The process's decoding threads, one per core."""
    return ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="decode")


class RepositoryNotFoundError(RepositoryError):
    """There is no repository at the target (no config object)."""


@dataclass(frozen=True)
class RepoConfig:
    """The parsed ``config.json``."""

    id: str
    created: str
    hash: HashSpec
    chunking: ChunkingConfig
    compression_level: int
    float_grouping: bool
    version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        doc = {
            "format": "replicator-repository",
            "version": self.version,
            "id": self.id,
            "created": self.created,
            "writer": f"replicator/{__version__}",
            "hash": {"algorithm": self.hash.algorithm, "seed": f"{self.hash.seed:016x}"},
            "chunker": {
                "algorithm": "fastcdc-2020",
                "min_size": self.chunking.min_size,
                "avg_size": self.chunking.avg_size,
                "max_size": self.chunking.max_size,
                "normalized_chunking": 1,
                "gear_seed": 0,
            },
            "compression": {
                "algorithm": "zstd",
                "level": self.compression_level,
                "float_grouping": self.float_grouping,
            },
        }
        return json.dumps(doc, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> RepoConfig:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RepositoryError(f"config object is not valid JSON ({exc})", key=CONFIG_KEY) from None
        if not isinstance(doc, dict) or doc.get("format") != "replicator-repository":
            raise RepositoryError("not a replicator repository config", key=CONFIG_KEY)
        version = doc.get("version")
        if type(version) is not int or version not in READ_VERSIONS:
            raise UnsupportedFormatError(
                f"repository format version {version!r} is not supported "
                f"(this build reads {', '.join(map(str, READ_VERSIONS))})",
                key=CONFIG_KEY,
                hint="upgrade replicator",
            )
        try:
            h, c, z = doc["hash"], doc["chunker"], doc["compression"]
            spec = HashSpec(h["algorithm"], int(h["seed"], 16))
            return cls(
                id=str(doc["id"]),
                created=str(doc["created"]),
                hash=spec,
                chunking=ChunkingConfig(
                    min_size=c["min_size"], avg_size=c["avg_size"], max_size=c["max_size"]
                ),
                compression_level=int(z["level"]),
                float_grouping=bool(z.get("float_grouping", False)),
                version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RepositoryError(f"config object is malformed ({exc})", key=CONFIG_KEY) from None


def chunk_key(chunk_id: str) -> str:
    return f"chunks/{chunk_id[:2]}/{chunk_id}"


def pack_key(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


def stored_key(chunk_id: str, at: PackedAt | None) -> str:
    """Where a chunk's object is, for messages: its own key, or ``packs/..@offset``."""
    return chunk_key(chunk_id) if at is None else f"{pack_key(at[0])}@{at[1]}"


def snapshot_key(source: str, snapshot_id: str) -> str:
    return f"snapshots/{source}/{snapshot_id}.json.zst"


def ref_key(source: str) -> str:
    return f"refs/{source}/latest"


def snapshot_time(snapshot_id: str) -> datetime:
    m = _SNAPSHOT_ID.match(snapshot_id)
    if not m:
        raise ValueError(f"not a snapshot id: {snapshot_id!r}")
    return datetime.strptime(m.group(1), _ID_TIME).replace(tzinfo=UTC)


def is_snapshot_id(text: str) -> bool:
    return bool(_SNAPSHOT_ID.match(text))


class Repository:
    """Typed access to one target's repository. Cheap to construct; holds no open state."""

    def __init__(self, target: Target, config: RepoConfig) -> None:
        self.target = target
        self.config = config
        self.hash = config.hash

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    async def open(cls, target: Target) -> Repository:
        """Open an existing repository; RepositoryNotFoundError if there is none."""
        try:
            raw = await target.get(CONFIG_KEY)
        except NotFoundError:
            raise RepositoryNotFoundError(
                f"no replicator repository at {target.url}",
                hint="check the url, or run `replicator sync` to create one",
            ) from None
        if len(raw) > MAX_SMALL_OBJECT:
            raise RepositoryError("config object is too large", key=CONFIG_KEY)
        return cls(target, RepoConfig.from_json(raw))

    @classmethod
    async def open_or_create(
        cls,
        target: Target,
        *,
        algorithm: str,
        chunking: ChunkingConfig,
        compression: CompressionConfig,
        creator: str | None = None,
    ) -> Repository:
        """Open the repository at ``target``, creating it with these parameters if absent.
        ``creator``: another process creates it (a shared source's assembler, named here); if
        there is none yet, RepositoryNotFoundError says whom this one waits for."""
        try:
            return await cls.open(target)
        except RepositoryNotFoundError as exc:
            if creator is not None:
                raise RepositoryNotFoundError(
                    f"no replicator repository at {target.url} yet: {creator} creates it",
                    hint="this instance attaches once it exists (instances that start at once on a "
                    "server ignoring If-None-Match would each create one with their own hash seed)",
                ) from exc
        config = RepoConfig(
            id=str(uuid.uuid4()),
            created=format_time(now_utc()),
            hash=HashSpec(algorithm, secrets.randbits(64) if algorithm == "xxh3-128" else 0),  # type: ignore[arg-type]
            chunking=chunking,
            compression_level=compression.level,
            float_grouping=compression.float_grouping,
        )
        with contextlib.suppress(AlreadyExistsError):  # another writer created it first: use theirs
            await target.put(CONFIG_KEY, config.to_json(), if_absent=True)
            await target.flush()
        # Read back: on servers without conditional writes, the last writer wins; everyone
        # then agrees on whatever is stored.
        return await cls.open(target)

    async def upgrade_for_gc(self) -> bool:
        """Raise ``config.json`` to GC_VERSION (everything else unchanged); False if it already
        is. Writers that predate the protocol then refuse the repository."""
        return await self._upgrade(GC_VERSION)

    async def upgrade_for_parts(self) -> bool:
        """Raise ``config.json`` to PARTS_VERSION before the first part is written."""
        return await self._upgrade(PARTS_VERSION)

    async def _upgrade(self, version: int) -> bool:
        if self.config.version >= version:
            return False
        current = await Repository.open(self.target)  # never lower what another process raised
        self._check_same(current.config)  # never adopt another config: our chunks use our seed
        if current.config.version >= version:
            self.config = current.config
            return False
        config = dataclasses.replace(current.config, version=version)
        await self.target.put(CONFIG_KEY, config.to_json())
        await self.target.flush()
        self.config = config
        return True

    async def check_unchanged(self) -> None:
        """Raise PermanentTargetError if ``config.json`` is no longer the one this process opened.

        Servers that ignore conditional writes (``rclone serve s3``) let several writers that
        start on an empty prefix at once each create the repository; the last one's config
        wins, and a writer that read back its own before that hashed its chunks with a seed
        the repository no longer has. A manifest or part it wrote would name chunks no reader
        can check, so nothing is published until it is restarted (its cache is per repository
        id: it then starts over on the repository as it is)."""
        self._check_same((await Repository.open(self.target)).config)

    def _check_same(self, current: RepoConfig) -> None:
        if current.id != self.config.id:
            raise PermanentTargetError(
                f"config.json changed since this process opened the repository (id {self.config.id} "
                f"is now {current.id}): another writer created it at the same time on a "
                "server without conditional writes",
                target=self.target.name,
                key=CONFIG_KEY,
                hint="restart this process; nothing it uploaded since is published. Start one writer "
                "first on a new repository",
            )

    # -- chunks -----------------------------------------------------------------------------

    async def put_chunk(self, chunk_id: str, stored: bytes) -> None:
        await self.target.put(chunk_key(chunk_id), stored)

    async def put_pack(self, stored: bytes) -> str:
        """Store chunk objects concatenated as one pack; return its id (the hash of its bytes)."""
        pack_id = self.hash.digest(stored).hex()
        await self.target.put(pack_key(pack_id), stored)
        return pack_id

    async def get_chunk(self, chunk_id: str, at: PackedAt | None = None) -> Buffer:
        """The chunk's original bytes, decoded and re-hashed; IntegrityError if they disagree.
        ``at``: where in a pack the chunk is (the manifest's ``packed``); None: a loose object.
        A packed chunk whose pack is missing or damaged is read from its loose copy, if
        there is one (a repair writes those: docs/FORMAT.md 4.1)."""
        if at is None:
            return await self._decoded(chunk_id, await self.target.get(chunk_key(chunk_id)))
        pack_id, offset, length = at
        try:
            stored = await self.target.get(pack_key(pack_id), offset=offset, length=length)
            return self._from_pack(chunk_id, stored, at)
        except (NotFoundError, IntegrityError) as exc:
            return await self._loose_copy(chunk_id, exc)

    async def _loose_or(self, chunk_id: str, failure: ReplicatorError) -> Buffer | ReplicatorError:
        try:
            return await self._loose_copy(chunk_id, failure)
        except (NotFoundError, IntegrityError) as exc:
            return exc

    async def _loose_copy(self, chunk_id: str, failure: ReplicatorError) -> Buffer:
        """A packed chunk's loose copy, or the pack's ``failure`` if there is none."""
        try:
            stored = await self.target.get(chunk_key(chunk_id))
        except NotFoundError:
            raise failure from None
        return await self._decoded(chunk_id, stored)

    async def _decoded(self, chunk_id: str, stored: bytes) -> Buffer:
        """:meth:`decode_chunk` of a loose chunk; a large one in a decoding thread, so that
        restores and verifies decode (zstd, numpy and XXH3 release the GIL) on every core while
        the event loop goes on fetching and writing. It was the restore's bottleneck: one
        thread busy throughout, half of it re-interleaving byte streams (py-spy)."""
        if len(stored) < DECODE_IN_THREAD:
            return self.decode_chunk(chunk_id, stored)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_decoders(), self.decode_chunk, chunk_id, stored)

    def _from_pack(self, chunk_id: str, stored: bytes, at: PackedAt) -> Buffer:
        """Decode a chunk read from a pack (a ranged read may come back short)."""
        if len(stored) != at[2]:
            raise IntegrityError(
                f"pack ends {at[2] - len(stored)} bytes short of this chunk", key=stored_key(chunk_id, at)
            )
        return self.decode_chunk(chunk_id, stored, at)

    async def get_chunks(
        self, refs: Sequence[tuple[str, PackedAt | None]]
    ) -> dict[str, Buffer | ReplicatorError]:
        """Many chunks at once (restoring small files): chunks packed near each other are read
        with one ranged GET per stretch of a pack instead of one per chunk (restic reads its
        packs the same way). Per chunk its bytes, decoded and re-hashed, or why not (a missing
        object: NotFoundError; bad bytes: IntegrityError). Other target errors are raised."""
        out: dict[str, Buffer | ReplicatorError] = {}
        by_pack: dict[str, list[tuple[int, int, str]]] = {}
        loose: list[str] = []
        for cid, at in dict(refs).items():
            if at is None:
                loose.append(cid)
            else:
                by_pack.setdefault(at[0], []).append((at[1], at[2], cid))

        async def one(cid: str) -> None:
            try:
                out[cid] = await self.get_chunk(cid)
            except (NotFoundError, IntegrityError) as exc:
                out[cid] = exc

        async def stretch(pack_id: str, members: list[tuple[int, int, str]]) -> None:
            start = members[0][0]
            length = max(offset + size for offset, size, _ in members) - start
            try:
                stored = await self.target.get(pack_key(pack_id), offset=start, length=length)
            except NotFoundError as exc:
                for _, _, cid in members:
                    out[cid] = await self._loose_or(cid, exc)
                return
            for offset, size, cid in members:
                try:
                    out[cid] = self._from_pack(
                        cid, stored[offset - start : offset - start + size], (pack_id, offset, size)
                    )
                except IntegrityError as exc:
                    out[cid] = await self._loose_or(cid, exc)

        jobs = [one(cid) for cid in loose]
        for pack_id, members in by_pack.items():
            members.sort()
            group = [members[0]]
            end = members[0][0] + members[0][1]
            for m in members[1:]:
                if m[0] - end <= _READ_GAP and m[0] + m[1] - group[0][0] <= _READ_SPAN:
                    group.append(m)
                    end = max(end, m[0] + m[1])
                else:
                    jobs.append(stretch(pack_id, group))
                    group, end = [m], m[0] + m[1]
            jobs.append(stretch(pack_id, group))
        await asyncio.gather(*jobs)
        return out

    def decode_chunk(self, chunk_id: str, stored: bytes, at: PackedAt | None = None) -> Buffer:
        try:
            data = decode(stored)
        except IntegrityError as exc:
            raise IntegrityError(exc.message, key=stored_key(chunk_id, at)) from None
        if self.hash.digest(data).hex() != chunk_id:
            raise IntegrityError("content does not match its id", key=stored_key(chunk_id, at))
        return data

    async def list_chunks(self) -> AsyncGenerator[tuple[str, int]]:
        """Yield (id, stored size) of every loose chunk object; foreign keys are skipped."""
        async for item in self._list_ids("chunks/"):
            yield item

    async def list_packs(self) -> AsyncGenerator[tuple[str, int]]:
        """Yield (id, size) of every pack object; foreign keys are skipped."""
        async for item in self._list_ids("packs/"):
            yield item

    async def _list_ids(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        width = 2 * self.hash.digest_size
        async for info in self.target.list(prefix):
            parts = info.key.split("/")
            if len(parts) == 3 and len(parts[2]) == width and parts[1] == parts[2][:2]:
                try:
                    self.hash.parse_hex(parts[2])
                except ValueError:
                    continue
                yield parts[2], info.size

    # -- snapshots and refs -----------------------------------------------------------------

    def new_snapshot_id(self, manifest: Manifest, stored: bytes) -> str:
        stamp = manifest.created_at.strftime(_ID_TIME)
        return f"{stamp}-{self.hash.digest(stored).hex()}"

    async def put_snapshot(self, manifest: Manifest, stored: bytes | None = None) -> str:
        """Store a manifest; return its snapshot id. Its chunks must already be stored.
        ``stored``: the manifest already encoded (:func:`encode_manifest`)."""
        stored = encode_manifest(manifest) if stored is None else stored
        snapshot_id = self.new_snapshot_id(manifest, stored)
        await self.target.flush()  # the chunks are durable before anything names them
        await self.target.put(snapshot_key(manifest.source, snapshot_id), stored)
        return snapshot_id

    async def set_latest(self, source: str, snapshot_id: str) -> None:
        body = {"snapshot": snapshot_id, "updated": format_time(now_utc())}
        await self.target.flush()  # the manifest is durable before the ref names it
        await self.target.put(ref_key(source), json.dumps(body).encode() + b"\n")
        await self.target.flush()

    async def publish(self, manifest: Manifest, stored: bytes | None = None) -> str:
        """Manifest, then ref: the snapshot becomes the source's latest only once complete."""
        snapshot_id = await self.put_snapshot(manifest, stored)
        await self.set_latest(manifest.source, snapshot_id)
        return snapshot_id

    async def latest(self, source: str) -> str | None:
        """The snapshot id the source's ref points at, or None if there is no ref."""
        try:
            raw = await self.target.get(ref_key(source))
        except NotFoundError:
            return None
        try:
            doc: Any = json.loads(raw) if len(raw) <= MAX_SMALL_OBJECT else None
            snapshot_id = doc["snapshot"]
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError):
            raise RepositoryError("ref is malformed", key=ref_key(source)) from None
        if not isinstance(snapshot_id, str) or not is_snapshot_id(snapshot_id):
            raise RepositoryError("ref does not hold a snapshot id", key=ref_key(source))
        return snapshot_id

    async def list_sources(self) -> list[str]:
        names: set[str] = set()
        for prefix in ("refs/", "snapshots/"):
            async for info in self.target.list(prefix):
                parts = info.key.split("/")
                if len(parts) == 3 and NAME_RE.match(parts[1]):
                    names.add(parts[1])
        return sorted(names)

    async def list_snapshots(self, source: str) -> list[str]:
        """Snapshot ids of a source, oldest first."""
        ids = []
        async for info in self.target.list(f"snapshots/{source}/"):
            name = info.key.rsplit("/", 1)[-1]
            if name.endswith(".json.zst") and is_snapshot_id(name[: -len(".json.zst")]):
                ids.append(name[: -len(".json.zst")])
        return sorted(ids)

    async def load_manifest(self, source: str, snapshot_id: str) -> Manifest:
        """Fetch, authenticate (digest in the id) and parse a manifest."""
        key = snapshot_key(source, snapshot_id)
        stored = await self.target.get(key)
        digest = snapshot_id.rsplit("-", 1)[1]
        if self.hash.digest(stored).hex() != digest:
            raise IntegrityError("manifest does not match the digest in its snapshot id", key=key)
        manifest = parse_manifest(stored, where=key)
        if manifest.source != source:
            raise RepositoryError(f"manifest belongs to source {manifest.source!r}", key=key)
        return manifest

    async def resolve(self, source: str, snapshot: str | None = "latest") -> str:
        """Turn ``latest``/None or an id (or a unique id prefix) into a snapshot id."""
        if snapshot in (None, "latest"):
            latest = await self.latest(source)
            if latest is None:
                raise RepositoryError(f"source {source!r} has no snapshot in {self.target.url}")
            return latest
        assert snapshot is not None
        if is_snapshot_id(snapshot):
            return snapshot
        matches = [s for s in await self.list_snapshots(source) if s.startswith(snapshot)]
        if len(matches) != 1:
            what = "no snapshot" if not matches else f"{len(matches)} snapshots"
            raise RepositoryError(f"{what} of source {source!r} match {snapshot!r}")
        return matches[0]

    async def delete_snapshot(self, source: str, snapshot_id: str) -> None:
        await self.target.delete(snapshot_key(source, snapshot_id))


@contextlib.asynccontextmanager
async def open_repository(target: TargetConfig) -> AsyncIterator[Repository]:
    """The repository on the target ``target`` describes, opened through the usual wrappers
    (:func:`replicator.targets.open_target`); the target is closed on the way out."""
    from replicator.targets import open_target  # its wrappers bring metrics: not every user's

    opened = await open_target(target)
    try:
        yield await Repository.open(opened)
    finally:
        await opened.close()


@dataclass
class SnapshotRow:
    """One snapshot, as ``replicator snapshots`` lists it."""

    source: str
    snapshot: str
    created: str
    kind: str
    files: int
    bytes: int
    latest: bool
    """The source's ref points at it."""
    sets: list[str] = field(default_factory=list)
    """Its checkpoint sets."""


async def snapshot_rows(target: TargetConfig, source: str | None = None) -> list[SnapshotRow]:
    """The snapshots of ``source`` (default: every source) in ``target``'s repository, source
    by source, oldest first. Every manifest is loaded (and so authenticated)."""
    rows = []
    async with open_repository(target) as repo:
        for name in [source] if source else await repo.list_sources():
            latest = await repo.latest(name)
            for sid in await repo.list_snapshots(name):
                m = await repo.load_manifest(name, sid)
                sets = [s.name for s in m.sets]
                rows.append(
                    SnapshotRow(
                        name, sid, m.created, m.kind, len(m.files), m.total_bytes, sid == latest, sets
                    )
                )
    return rows
