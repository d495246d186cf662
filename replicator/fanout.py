"""Fan-out: one upload queue per target, each with its own concurrency and failure state.

Every encoded chunk is offered to every target's :class:`Uploader`. A chunk the target is
known to hold (state store), or is already uploading, is skipped — across files, snapshots
and sources. Others are queued; the bounded queue is the backpressure that keeps memory
within the pipeline's byte budget. A target whose uploads fail for good is marked failed
and drops further work at once, so it never holds up the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from replicator.errors import TargetError
from replicator.pipeline import EncodedChunk, Lease
from replicator.repository import Repository
from replicator.state import StateStore

log = structlog.get_logger(__name__)


@dataclass
class UploadStats:
    chunks_sent: int = 0
    bytes_new: int = 0
    """Original bytes of chunks this target did not have."""
    bytes_sent: int = 0
    """Encoded bytes actually uploaded."""
    chunks_dedup: int = 0
    bytes_dedup: int = 0
    """Original bytes not sent because the target already had (or was receiving) them."""


class Uploader:
    def __init__(self, name: str, repo: Repository, state: StateStore, concurrency: int) -> None:
        self.name = name
        self.repo = repo
        self.state = state
        self.key = repo.hash.key
        self.concurrency = concurrency
        self.stats = UploadStats()
        self.failed: TargetError | None = None
        self._queue: asyncio.Queue[tuple[str, bytes, int, Lease]] = asyncio.Queue(maxsize=2 * concurrency)
        self._inflight: dict[str, asyncio.Event] = {}
        self._workers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Prime the presence cache (a full listing the first time this repository is seen)
        and start the upload workers."""
        repo_id = self.repo.config.id
        if not self.state.repo_listed(repo_id):
            batch: list[str] = []
            async for chunk_id, _ in self.repo.list_chunks():
                batch.append(chunk_id)
                if len(batch) >= 10000:
                    self.state.add_chunks(repo_id, batch)
                    batch.clear()
            self.state.add_chunks(repo_id, batch)
            self.state.mark_repo_listed(repo_id, self.name)
            log.info("target.listed", target=self.name, chunks=self.state.count_chunks(repo_id))
        self._workers = [
            asyncio.create_task(self._work(), name=f"upload-{self.name}-{i}") for i in range(self.concurrency)
        ]

    def has(self, chunk_id: str) -> bool:
        return self.state.has_chunk(self.repo.config.id, chunk_id)

    def has_all(self, chunk_ids: Iterable[str]) -> bool:
        return all(self.has(c) for c in chunk_ids)

    async def offer(self, chunk: EncodedChunk) -> None:
        if self.failed is not None:
            return
        cid = chunk.ids[self.key]
        if cid in self._inflight or self.has(cid):
            self.stats.chunks_dedup += 1
            self.stats.bytes_dedup += chunk.size
            return
        self._inflight[cid] = asyncio.Event()
        chunk.lease.retain()
        await self._queue.put((cid, chunk.stored, chunk.size, chunk.lease))

    async def _work(self) -> None:
        while True:
            cid, stored, size, lease = await self._queue.get()
            try:
                if self.failed is None:
                    await self.repo.put_chunk(cid, stored)
                    self.state.add_chunks(self.repo.config.id, (cid,))
                    self.stats.chunks_sent += 1
                    self.stats.bytes_new += size
                    self.stats.bytes_sent += len(stored)
            except TargetError as exc:
                if self.failed is None:
                    log.error("target.failed", target=self.name, error=str(exc))
                self.failed = self.failed or exc
            finally:
                lease.release()
                self._inflight.pop(cid).set()
                self._queue.task_done()

    async def wait_for(self, chunk_ids: Iterable[str]) -> None:
        """Return once every chunk in ``chunk_ids`` is durable on the target; raise the target's
        error if it failed, or if a chunk was never offered."""
        ids = set(chunk_ids)
        for cid in ids:
            event = self._inflight.get(cid)
            if event is not None:
                await event.wait()
        if self.failed is not None:
            raise self.failed
        missing = [c for c in ids if not self.has(c)]
        if missing:
            raise TargetError(
                f"{len(missing)} chunks were never uploaded (first: {missing[0]})", target=self.name
            )

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while not self._queue.empty():
            *_, lease = self._queue.get_nowait()
            lease.release()
        self.state.commit()
