"""Presence: keeping the state's claims about what a repository holds true.

The state store caches which chunks each repository holds (replicator.state.chunks), so that
a chunk is never sent twice. The cache is not the truth: uploads can complete without being
recorded (an unclean shutdown), a power cut can lose directory entries a POSIX target never
made durable, and people and lifecycle rules delete objects behind our back. So:

* a repository this state store never listed is listed in full before its claims are used,
  and again every ``relist_interval`` in the daemon (:meth:`Presence.relist`);
* before a manifest names chunks, claims not confirmed by this process (an upload, or a
  listing) nor within ``confirm_window`` are checked (:meth:`Presence.confirm`), and those
  found missing are forgotten, so that they are sent again from the source.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from replicator.errors import ReplicatorError
from replicator.format.manifest import PackedAt
from replicator.log import get_logger
from replicator.repository import Repository, chunk_key, pack_key
from replicator.state.chunks import ChunkIndex

log = get_logger(__name__)

CONFIRM_BY_HEAD = 64
"""Up to this many objects, unconfirmed claims are checked one HEAD each (:meth:`Presence.confirm`)."""


class Presence:
    """The claims about one target's repository (module docstring)."""

    def __init__(
        self, target: str, repo: Repository, index: ChunkIndex, concurrency: int, confirm_window: float = 0.0
    ) -> None:
        self.target = target
        self.repo = repo
        self.index = index
        self.concurrency = concurrency
        """Requests the target serves at once: how many HEADs cost as much as a listing page."""
        self.confirm_window = confirm_window

    async def relist(self) -> None:
        """Replace what the state knows of the repository's chunks with a full listing (which
        also confirms them: :meth:`confirm`)."""
        started = time.monotonic()
        self.index.begin_listing()
        count = 0
        batch: list[str] = []
        async for chunk_id, _ in self.repo.list_chunks():
            batch.append(chunk_id)
            count += 1
            if len(batch) >= 10000:
                self.index.add_listed(batch)
                batch.clear()
        self.index.add_listed(batch)
        packs = {pack_id async for pack_id, _ in self.repo.list_packs()}
        self.index.end_listing(packs)
        packed = await self._relearn_packed(packs)
        self.index.mark_listed(self.target)
        seconds = round(time.monotonic() - started, 3)
        log.info(
            "target.listed",
            target=self.target,
            chunks=count,
            packs=len(packs),
            packed=packed,
            seconds=seconds,
        )

    async def confirm(self, chunk_ids: Sequence[str]) -> list[str]:
        """Make sure every claim the state makes about these chunks holds before a manifest
        names them; return the ids found missing (forgotten, so that the caller sends them
        again).

        A claim holds when this process uploaded the chunk or saw it in a listing (or anyone
        did within ``confirm_window``). Claims inherited from an earlier process are checked:
        by a HEAD of each object (a pack once for all its chunks) when few, else by listing
        the repository's chunks and packs, whichever takes fewer requests (a listing page
        names 1,000 objects)."""
        stale = self.index.unconfirmed(chunk_ids, self.confirm_window)
        if not stale:
            return []
        loose = [c for c, at in stale.items() if at is None]
        packs: dict[str, list[str]] = {}
        for cid, at in stale.items():
            if at is not None:
                packs.setdefault(at[0], []).append(cid)
        heads = len(loose) + len(packs)
        pages = (self.index.count() + self.index.count_packs()) // 1000 + 2
        if heads > max(CONFIRM_BY_HEAD, pages * self.concurrency):
            # Only membership is checked: a full relist would also rewrite every claim and
            # read the latest manifests for pack locations, ~0.5 s per sync on S3.
            found_loose = await _among(self.repo.list_chunks(), set(loose))
            found_packs = await _among(self.repo.list_packs(), set(packs))
        else:
            infos = await asyncio.gather(
                *(self.repo.target.stat(chunk_key(c)) for c in loose),
                *(self.repo.target.stat(pack_key(p)) for p in packs),
            )
            found_loose = {c for c, info in zip(loose, infos, strict=False) if info is not None}
            found_packs = {p for p, info in zip(packs, infos[len(loose) :], strict=True) if info is not None}
        missing = [c for c in loose if c not in found_loose]
        missing += [c for p, members in packs.items() if p not in found_packs for c in members]
        gone = set(missing)
        self.index.confirm([c for c in stale if c not in gone])
        if missing:
            self.index.forget(missing)
        if missing:
            log.warning(
                "target.chunks_missing",
                target=self.target,
                missing=len(missing),
                hint="removed behind replicator's back; they are sent again from the source",
            )
        return missing

    async def _relearn_packed(self, packs: set[str]) -> int:
        """Pack locations cannot be listed: learn them from each source's latest manifest, for
        ``packs`` (those that exist). Chunks known nowhere else are packed again (a few small
        duplicates)."""
        if not packs:
            return 0
        found: list[tuple[str, PackedAt]] = []
        for source in await self.repo.list_sources():
            try:
                latest = await self.repo.latest(source)
                manifest = await self.repo.load_manifest(source, latest) if latest else None
            except ReplicatorError as exc:
                log.warning("target.manifest_unreadable", target=self.target, source=source, error=str(exc))
                continue
            if manifest is not None:
                found += [(cid, at) for cid, at in manifest.packed.items() if at[0] in packs]
        self.index.add_packed(found)
        return len(found)


async def _among(listing: AsyncIterator[tuple[str, int]], wanted: set[str]) -> set[str]:
    """Those of ``wanted`` that ``listing`` (of ids and sizes) shows."""
    return {object_id async for object_id, _ in listing if object_id in wanted}
