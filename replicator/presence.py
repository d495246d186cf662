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
from collections.abc import AsyncGenerator, Coroutine, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

from replicator.errors import ReplicatorError
from replicator.format.manifest import PackedAt
from replicator.log import get_logger
from replicator.repository import Repository, chunk_key, pack_key
from replicator.state.chunks import ChunkIndex

log = get_logger(__name__)

_T = TypeVar("_T")

CONFIRM_BY_HEAD = 512
"""Up to this many objects, unconfirmed claims are checked one HEAD each (:meth:`Presence._present`):
at most 64 round trips at the default concurrency of 8 (~1 s at 15 ms each), and no listing,
which some servers pay for in CPU beside the requests (on ``rclone serve s3`` an increment of
216 stale claims took 2.62-2.70 s by HEADs, 2.80-2.95 s racing a listing, 3.09-3.28 s by a
listing alone: docs/PERFORMANCE.md)."""


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
        did within ``confirm_window``). Claims inherited from an earlier process are checked
        (:meth:`_present`)."""
        stale = self.index.unconfirmed(chunk_ids, self.confirm_window)
        if not stale:
            return []
        loose = [c for c, at in stale.items() if at is None]
        packs: dict[str, list[str]] = {}
        for cid, at in stale.items():
            if at is not None:
                packs.setdefault(at[0], []).append(cid)
        found_loose, found_packs = await self._present(loose, list(packs))
        missing = [c for c in loose if c not in found_loose]
        missing += [c for p, members in packs.items() if p not in found_packs for c in members]
        gone = set(missing)
        self.index.confirm([c for c in stale if c not in gone])
        if missing:
            self.index.forget(missing)
            log.warning(
                "target.chunks_missing",
                target=self.target,
                missing=len(missing),
                hint="removed behind replicator's back; they are sent again from the source",
            )
        return missing

    async def _present(self, loose: list[str], packs: list[str]) -> tuple[set[str], set[str]]:
        """Which of these loose chunks and packs the repository holds: by a HEAD of each when
        they are few (``CONFIRM_BY_HEAD``) or take no more requests than listing the repository
        (a page names 1,000 objects; ``concurrency`` HEADs cost one round trip), else by both
        at once, the first answer kept.

        Why both: what a listing costs depends on the server, not on its request count. AWS
        answers a page from its index; a server that keeps objects as files walks a directory
        per key prefix and may read the objects for their ETags (``rclone serve s3``: ~1.1
        CPU-s of its own to list 241 chunks it had just stored). The loser is cancelled, so the
        extra requests are at most what it sent meanwhile."""
        heads = len(loose) + len(packs)
        pages = (self.index.count() + self.index.count_packs()) // 1000 + 2
        if heads <= max(CONFIRM_BY_HEAD, pages * self.concurrency):
            return await self._by_head(loose, packs)
        return await _first_answer(self._by_listing(loose, packs), self._by_head(loose, packs))

    async def _by_head(self, loose: list[str], packs: list[str]) -> tuple[set[str], set[str]]:
        infos = await asyncio.gather(
            *(self.repo.target.stat(chunk_key(c)) for c in loose),
            *(self.repo.target.stat(pack_key(p)) for p in packs),
        )
        found_loose = {c for c, info in zip(loose, infos, strict=False) if info is not None}
        found_packs = {p for p, info in zip(packs, infos[len(loose) :], strict=True) if info is not None}
        return found_loose, found_packs

    async def _by_listing(self, loose: list[str], packs: list[str]) -> tuple[set[str], set[str]]:
        # Only membership is checked: a full relist would also rewrite every claim and read
        # the latest manifests for pack locations, ~0.5 s per sync on S3.
        found_loose = await _among(self.repo.list_chunks(), set(loose))
        return found_loose, await _among(self.repo.list_packs(), set(packs))

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


async def _among(listing: AsyncGenerator[tuple[str, int]], wanted: set[str]) -> set[str]:
    """Those of ``wanted`` that ``listing`` (of ids and sizes) shows."""
    async with aclosing(listing):  # closed here, also when cancelled part-way
        return {object_id async for object_id, _ in listing if object_id in wanted}


async def _first_answer(*ways: Coroutine[Any, Any, _T]) -> _T:
    """The result of whichever of ``ways`` succeeds first (the others are cancelled); if all
    fail, the first failure."""
    pending = {asyncio.ensure_future(way) for way in ways}
    failures: list[BaseException] = []
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is None:
                    return task.result()
                failures.append(error)
        raise failures[0]
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
