"""Repacking: copy the live chunks of sparse packs out as loose chunk objects
(docs/FORMAT.md 10.2, "superseded packs").

A pack's id and the manifests that name it cannot change (FORMAT.md 4.1), so a sparse pack is
not rewritten: each chunk the manifests still locate in it is read (ranged GETs, or the whole
pack when most of it is needed), checked against its id, and written as the loose object
``chunks/<aa>/<id>`` -- exactly the pack's bytes for it, one complete chunk object. Readers
fall back to that copy when the pack is gone, so once every referenced chunk has one the pack
is *superseded* and the collector plans it like an unreferenced object. Copies are
content-addressed: a writer storing the same chunk meanwhile is harmless, and a run killed
half way leaves copies that the next run counts and does not write again.

A chunk whose range fails its id check is not copied and is reported; its pack is then not
superseded, and so never deleted (``verify --repair`` can send that chunk again; the next
prune then finishes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from replicator.errors import IntegrityError, NotFoundError
from replicator.gc.mark import Marks
from replicator.log import get_logger
from replicator.progress import ProgressSink
from replicator.repository import Repository, chunk_key
from replicator.targets.base import ObjectInfo

log = get_logger(__name__)

DEFAULT_REPACK_BELOW = 0.5
"""A pack is repacked when the manifests reference less than this share of its bytes."""
WHOLE_PACK_SHARE = 0.5
"""Read a sparse pack whole (one GET) when at least this share of it is to be copied."""
READ_GAP = 256 << 10
"""Chunks to copy closer than this are fetched with one ranged GET (the gap is dropped)."""
PACKS_AT_ONCE = 4
"""Sparse packs read at once: at most this many packs' bytes (~16 MiB each) in memory."""
MAX_NOTES = 20


@dataclass
class RepackOutcome:
    packs: int = 0
    """Sparse packs whose every referenced chunk now has a loose copy (superseded by this run)."""
    chunks: int = 0
    bytes: int = 0
    """Loose copies written (with ``dry_run``: to write) and their stored bytes."""
    damaged: int = 0
    """Referenced chunks of sparse packs that failed their id check: not copied, pack kept."""
    superseded: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


_Chunk = tuple[str, int, int]
"""A chunk to copy: id, offset in its pack, stored length."""


def sparse(
    marks: Marks, listed: Mapping[str, ObjectInfo], superseded: set[str], below: float
) -> dict[str, list[_Chunk]]:
    """The listed, not yet superseded packs whose referenced bytes are under ``below`` of
    their size, each with the chunks still lacking a loose copy, in pack order."""
    out: dict[str, list[_Chunk]] = {}
    for key, chunks in marks.packed.items():
        info = listed.get(key)
        if key in superseded or info is None or info.size <= 0:
            continue
        if sum(length for _, length in chunks.values()) >= below * info.size:
            continue
        todo = [
            (cid, offset, length)
            for cid, (offset, length) in chunks.items()
            if not _copied(listed.get(chunk_key(cid)))
        ]
        out[key] = sorted(todo, key=lambda c: c[1])
    return out


def _copied(info: ObjectInfo | None) -> bool:
    return info is not None and info.size > 0


async def repack(
    repo: Repository,
    marks: Marks,
    listed: dict[str, ObjectInfo],
    superseded: set[str],
    below: float,
    *,
    dry_run: bool,
    concurrency: int,
    progress: ProgressSink,
) -> RepackOutcome:
    """Copy out the live chunks of every sparse pack (see module docstring). Each copy written
    is added to ``listed`` (so the caller's view of the repository stays true); with
    ``dry_run`` nothing is read or written, only counted, and every sparse pack is taken as
    superseded."""
    todo = sparse(marks, listed, superseded, below)
    out = RepackOutcome()
    if not todo:
        return out
    if dry_run:
        out.superseded = set(todo)
        out.packs = len(todo)
        out.chunks = sum(len(c) for c in todo.values())
        out.bytes = sum(n for c in todo.values() for _, _, n in c)
        return out
    packs = asyncio.Semaphore(PACKS_AT_ONCE)
    puts = asyncio.Semaphore(concurrency)
    progress.begin("copying live chunks out of sparse packs", sum(n for c in todo.values() for *_, n in c))

    async def one(key: str, chunks: list[_Chunk]) -> None:
        async with packs:
            whole = sum(n for *_, n in chunks) >= WHOLE_PACK_SHARE * listed[key].size
            left = 0
            for group in [chunks] if whole else _stretches(chunks):
                left += await _copy(repo, key, group, whole, listed, out, puts, progress)
            if left == 0:
                out.superseded.add(key)
                out.packs += 1

    try:
        await asyncio.gather(*(one(k, c) for k, c in todo.items()))
    finally:
        progress.end()
    await repo.target.flush()  # the copies are durable before a plan names their packs
    if out.packs or out.damaged:
        log.info("gc.repacked", packs=out.packs, chunks=out.chunks, bytes=out.bytes, damaged=out.damaged)
    return out


def _stretches(chunks: list[_Chunk]) -> list[list[_Chunk]]:
    """Chunks in pack order, grouped so that each group is one ranged GET."""
    groups: list[list[_Chunk]] = []
    for chunk in chunks:
        last = groups[-1][-1] if groups else None
        if last is not None and chunk[1] - (last[1] + last[2]) <= READ_GAP:
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    return groups


async def _copy(
    repo: Repository,
    key: str,
    group: list[_Chunk],
    whole: bool,
    listed: dict[str, ObjectInfo],
    out: RepackOutcome,
    puts: asyncio.Semaphore,
    progress: ProgressSink,
) -> int:
    """Read one stretch of ``key`` (or all of it), check each chunk, write the good ones as
    loose objects. Returns how many were not copied: those found damaged, or all of them if
    the pack vanished (another collector deleted it; this run then supersedes nothing)."""
    start = 0 if whole else group[0][1]
    try:
        if whole:
            data = await repo.target.get(key)
        else:
            end = group[-1][1] + group[-1][2]
            data = await repo.target.get(key, offset=start, length=end - start)
    except NotFoundError:
        out.notes.append(f"{key} disappeared while it was repacked (another prune deleted it?)")
        return len(group)

    async def put(cid: str, stored: bytes) -> None:
        async with puts:
            await repo.put_chunk(cid, stored)
        listed[chunk_key(cid)] = ObjectInfo(chunk_key(cid), len(stored))
        out.chunks += 1
        out.bytes += len(stored)
        progress.advance(len(stored))

    writes = []
    damaged = 0
    for cid, offset, length in group:
        stored = bytes(data[offset - start : offset - start + length])
        try:
            if len(stored) != length:
                raise IntegrityError(f"the pack ends {length - len(stored)} bytes short of this chunk")
            repo.decode_chunk(cid, stored, (key.rsplit("/", 1)[1], offset, length))
        except IntegrityError as exc:
            damaged += 1
            out.damaged += 1
            log.warning("gc.repack_damaged", key=f"{key}@{offset}", chunk=cid, error=exc.message)
            if len(out.notes) < MAX_NOTES:
                out.notes.append(
                    f"{key}@{offset}: chunk {cid} is damaged ({exc.message}); not copied, the pack "
                    "is kept (run `replicator verify --read-data --repair`)"
                )
            continue
        writes.append(put(cid, stored))
    await asyncio.gather(*writes)
    return damaged
