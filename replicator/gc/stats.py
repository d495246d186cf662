"""``replicator stats``: what a repository stores and what it would cost to keep, per target.

Read-only, and needs nothing but the repository (no state, no config of the writer): the
collector's mark (:mod:`replicator.gc.mark`, which validates every manifest, untrusted input)
reads each manifest once, concurrently, and a :class:`_Tally` sees each one as it is read;
then one listing each of ``chunks/`` and ``packs/``. Definitions (README, "replicator stats"):

* **stored**: objects and bytes under ``chunks/``, ``packs/`` and ``snapshots/`` as listed
  (``total`` is their sum; ``config.json``, ``refs/`` and ``gc/`` are a few small control
  objects, not counted).
* **live**: the chunk objects and packs ``prune`` keeps (what a retained manifest references,
  and loose copies of packed chunks it names): after a prune, exactly the data left.
* **reclaimable**: the other chunk objects and packs, what ``prune`` would delete (once its
  grace period has passed); objects whose names the format does not make are never counted.
* **logical**: the bytes of every retained snapshot's files; **unique logical**: each distinct
  chunk once. ``dedup_ratio`` = logical / unique logical; ``compression_ratio`` = unique
  logical / the stored bytes of those chunks (a loose chunk's object, a packed chunk's stretch
  of its pack; a pack's unreferenced stretches and missing objects are not counted).
* **unique per snapshot**: the live objects only that snapshot keeps: what forgetting it
  (then pruning) would free, besides its manifest.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from replicator.config import TargetConfig
from replicator.format.manifest import Manifest
from replicator.gc.mark import Marks, mark
from replicator.gc.protocol import is_object_key
from replicator.progress import NoProgress, ProgressSink
from replicator.repository import Repository, chunk_key, pack_key
from replicator.targets import open_target
from replicator.targets.base import ObjectInfo

GIB = 1 << 30
PREFIXES = ("chunks/", "packs/", "snapshots/")
_SHARED = -1


@dataclass
class Usage:
    objects: int = 0
    bytes: int = 0


@dataclass
class SnapshotUsage:
    source: str
    snapshot: str
    files: int
    logical_bytes: int
    manifest_bytes: int
    unique_objects: int = 0
    unique_bytes: int = 0
    """Live objects no other snapshot keeps, and their stored bytes."""


@dataclass
class TargetStats:
    target: str
    url: str
    sources: int = 0
    snapshots: int = 0
    stored: dict[str, Usage] = field(default_factory=lambda: {p: Usage() for p in PREFIXES})
    total_objects: int = 0
    total_bytes: int = 0
    live_objects: int = 0
    live_bytes: int = 0
    reclaimable_objects: int = 0
    reclaimable_bytes: int = 0
    missing_objects: int = 0
    """Referenced objects the listing does not show (``replicator verify`` tells more)."""
    foreign_objects: int = 0
    """Objects under chunks/ or packs/ with names the format does not make (not counted)."""
    logical_bytes: int = 0
    unique_logical_bytes: int = 0
    unique_stored_bytes: int = 0
    dedup_ratio: float | None = None
    compression_ratio: float | None = None
    storage_usd_per_gib_month: float | None = None
    storage_usd_per_month: float | None = None
    """``total_bytes`` at the target's price; None when no price is configured."""
    reclaimable_usd_per_month: float | None = None
    per_snapshot: list[SnapshotUsage] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class _Tally:
    """Per-manifest numbers, gathered while the mark reads each manifest once. Memory: one
    entry per distinct chunk and per live object, none per (snapshot, chunk) pair."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.snapshots: list[SnapshotUsage] = []
        self.owner: dict[str, int] = {}
        """Live key -> the index of the one snapshot keeping it, or _SHARED."""
        self.chunks: dict[str, tuple[int, int | None]] = {}
        """Chunk id -> (logical length, stored length if packed; None: its loose object's)."""

    def visit(self, source: str, snapshot_id: str, manifest: Manifest, stored: int) -> None:
        index = len(self.snapshots)
        keys: set[str] = set()
        logical = 0
        for f in manifest.files:
            logical += f.size
            for cid, length in f.chunks:
                at = manifest.packed.get(cid)
                keys.add(chunk_key(cid))  # the loose object, or a packed chunk's loose copy
                if at is not None:
                    keys.add(pack_key(at[0]))
                known = self.chunks.get(cid)
                if known is None or (known[1] is None and at is not None):
                    self.chunks[cid] = (length, None if at is None else at[2])
        for key in keys:
            self.owner[key] = index if self.owner.get(key, index) == index else _SHARED
        self.snapshots.append(SnapshotUsage(source, snapshot_id, len(manifest.files), logical, stored))


async def repository_stats(
    repo: Repository,
    price: float | None = None,
    progress: ProgressSink | None = None,
    *,
    concurrency: int = 8,
) -> TargetStats:
    """The numbers of the module docstring for ``repo``; ``price`` in USD per GiB-month."""
    progress = progress or NoProgress()
    started = time.monotonic()
    tally = _Tally()
    marks = await mark(repo, progress, concurrency=concurrency, visitor=tally)
    objects: dict[str, ObjectInfo] = {}
    result = TargetStats(repo.target.name, repo.target.url, marks.sources, marks.manifests)
    result.stored["snapshots/"] = Usage(marks.manifests, marks.manifest_bytes)
    for prefix in ("chunks/", "packs/"):
        progress.begin(f"listing {prefix}", None)
        try:
            async for info in repo.target.list(prefix):
                if is_object_key(info.key):
                    objects[info.key] = info
                    result.stored[prefix].objects += 1
                    result.stored[prefix].bytes += info.size
                else:
                    result.foreign_objects += 1
                progress.advance(info.size)
        finally:
            progress.end()
    _fill(result, marks, tally, objects, price)
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _fill(
    result: TargetStats, marks: Marks, tally: _Tally, objects: dict[str, ObjectInfo], price: float | None
) -> None:
    result.total_objects = sum(u.objects for u in result.stored.values())
    result.total_bytes = sum(u.bytes for u in result.stored.values())
    superseded = marks.superseded(objects)  # repacked: prune deletes them (FORMAT.md 10.2)
    for key, info in objects.items():
        if marks.needed(key, superseded):
            result.live_objects += 1
            result.live_bytes += info.size
        else:
            result.reclaimable_objects += 1
            result.reclaimable_bytes += info.size
    result.missing_objects = len(marks.live - objects.keys() - superseded)
    for cid, (length, packed) in tally.chunks.items():
        if packed is None:
            loose = objects.get(chunk_key(cid))
            if loose is None:
                continue  # missing: neither its logical nor its stored bytes are counted
            packed = loose.size
        result.unique_logical_bytes += length
        result.unique_stored_bytes += packed
    result.logical_bytes = sum(s.logical_bytes for s in tally.snapshots)
    if result.unique_logical_bytes:
        result.dedup_ratio = result.logical_bytes / result.unique_logical_bytes
    if result.unique_stored_bytes:
        result.compression_ratio = result.unique_logical_bytes / result.unique_stored_bytes
    for key, index in tally.owner.items():
        held = objects.get(key)
        if index != _SHARED and held is not None:
            tally.snapshots[index].unique_objects += 1
            tally.snapshots[index].unique_bytes += held.size
    result.per_snapshot = sorted(tally.snapshots, key=lambda s: (s.source, s.snapshot))
    if price is not None:
        result.storage_usd_per_gib_month = price
        result.storage_usd_per_month = result.total_bytes / GIB * price
        result.reclaimable_usd_per_month = result.reclaimable_bytes / GIB * price


async def target_stats(cfg: TargetConfig, progress: ProgressSink | None = None) -> TargetStats:
    """Open the repository at ``cfg`` (RepositoryNotFoundError if there is none; nothing is
    created) and compute :func:`repository_stats` at its configured storage price."""
    target = await open_target(cfg)
    try:
        repo = await Repository.open(target)
        return await repository_stats(repo, cfg.cost.storage_usd_per_gib_month, progress)
    finally:
        await target.close()


async def run_stats(cfgs: Sequence[TargetConfig], progress: ProgressSink | None = None) -> list[TargetStats]:
    """``replicator stats``: each target in turn; the first failure ends it."""
    return [await target_stats(cfg, progress) for cfg in cfgs]
