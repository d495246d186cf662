"""Fan-out: one upload queue per target, each with its own concurrency and health.

Every encoded chunk is offered to every target's :class:`Uploader`. A chunk the target is
known to hold (state store), or is already uploading, is skipped — across files, snapshots
and sources. Others are queued; the bounded queue is the backpressure that keeps memory
within the pipeline's byte budget.

A slow or dead target must never stall the others. An uploader turns *unhealthy* when an
upload fails for good, when its target has been failing for a few seconds, or when its queue
stays full for ``stall_timeout``; it then drops its queue and every further offer, and the
target's publisher catches up later by reading the missing chunks again from the source. In
one-shot commands the publisher reports the failure instead.

Under a budget, each chunk is admitted (or deferred) by its source's priority before it is
queued and again before it is sent (replicator.budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from replicator import metrics
from replicator.budget import PRIORITY, BudgetExceededError
from replicator.config import Priority
from replicator.errors import TargetError
from replicator.log import get_logger
from replicator.pipeline import EncodedChunk, Lease
from replicator.repository import Repository
from replicator.state import StateStore
from replicator.targets import RetryingTarget, unwrap

log = get_logger(__name__)

Admission = Callable[[Priority, int], bool]
"""May a chunk of this priority and this many encoded bytes be sent now? (the budget)"""

FAILING_GRACE = 5.0
"""Seconds a target may keep failing requests before offers to it are dropped."""


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
    chunks_dropped: int = 0
    """Chunks not queued because the target was unhealthy (sent later by catch-up)."""
    chunks_deferred: int = 0
    bytes_deferred: int = 0
    """Chunks (and their encoded bytes) held back by the budget (sent when it allows)."""


class Uploader:
    def __init__(
        self,
        name: str,
        repo: Repository,
        state: StateStore,
        concurrency: int,
        *,
        admit: Admission | None = None,
        stall_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.repo = repo
        self.state = state
        self.key = repo.hash.key
        self.concurrency = concurrency
        self.admit = admit
        """The budget's say (replicator.budget); None: no budget."""
        self.stall_timeout = stall_timeout
        self.stats = UploadStats()
        self.error: TargetError | None = None
        """Why the target is unhealthy; None while it is healthy."""
        self._retrying = unwrap(repo.target, RetryingTarget)
        self._queue: asyncio.Queue[tuple[str, bytes, int, Lease, Priority]] = asyncio.Queue(
            maxsize=2 * concurrency
        )
        self._inflight: dict[str, asyncio.Event] = {}
        self._workers: list[asyncio.Task[None]] = []

    async def start(self, *, relist: bool = False) -> None:
        """Prime the presence cache and start the upload workers.

        The cache is filled from a full listing of the repository's chunks the first time this
        state store sees the repository, and again when ``relist`` (after an unclean shutdown,
        uploads may have completed without being recorded)."""
        repo_id = self.repo.config.id
        if relist or not self.state.repo_listed(repo_id):
            count = 0
            batch: list[str] = []
            async for chunk_id, _ in self.repo.list_chunks():
                batch.append(chunk_id)
                count += 1
                if len(batch) >= 10000:
                    self.state.add_chunks(repo_id, batch)
                    batch.clear()
            self.state.add_chunks(repo_id, batch)
            self.state.mark_repo_listed(repo_id, self.name)
            log.info("target.listed", target=self.name, chunks=count)
        self._workers = [
            asyncio.create_task(self._work(), name=f"upload-{self.name}-{i}") for i in range(self.concurrency)
        ]
        metrics.TARGET_UP.labels(self.name).set(1)

    # -- health -------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        if self.error is not None:
            return False
        since = self._retrying.failing_since if self._retrying else None
        return since is None or time.monotonic() - since < FAILING_GRACE

    def mark_unhealthy(self, error: TargetError) -> None:
        if self.error is None:
            log.warning("target.unhealthy", target=self.name, error=str(error))
        self.error = error
        metrics.TARGET_UP.labels(self.name).set(0)
        while not self._queue.empty():  # give the memory back; catch-up re-reads these later
            cid, _, _, lease, _ = self._queue.get_nowait()
            lease.release()
            self._inflight.pop(cid).set()
            self._queue.task_done()
            self.stats.chunks_dropped += 1

    def mark_healthy(self) -> None:
        if self.error is not None:
            log.info("target.healthy", target=self.name)
        self.error = None
        if self._retrying is not None:
            self._retrying.failing_since = None  # the caller just reached the target
        metrics.TARGET_UP.labels(self.name).set(1)

    # -- uploading ----------------------------------------------------------------------------

    def has(self, chunk_id: str) -> bool:
        return self.state.has_chunk(self.repo.config.id, chunk_id)

    def wants(self, chunk_id: str) -> bool:
        """Would :meth:`offer` upload this chunk now?"""
        return self.healthy and chunk_id not in self._inflight and not self.has(chunk_id)

    def has_all(self, chunk_ids: Iterable[str]) -> bool:
        return all(self.has(c) for c in chunk_ids)

    def _deferred(self, nbytes: int) -> None:
        self.stats.chunks_deferred += 1
        self.stats.bytes_deferred += nbytes

    async def offer(self, chunk: EncodedChunk, priority: Priority = "critical") -> None:
        if not self.healthy:
            self.stats.chunks_dropped += 1
            return
        cid = chunk.ids[self.key]
        if cid in self._inflight or self.has(cid):
            self.stats.chunks_dedup += 1
            self.stats.bytes_dedup += chunk.size
            metrics.DEDUP_BYTES.labels(self.name).inc(chunk.size)
            return
        if chunk.stored is None:
            # Not encoded: no target wanted it when it was hashed, and since then an upload of
            # it failed. The snapshot's publish finds it missing and re-reads the file.
            self.stats.chunks_dropped += 1
            return
        if self.admit is not None and not self.admit(priority, len(chunk.stored)):
            self._deferred(len(chunk.stored))
            return
        self._inflight[cid] = asyncio.Event()
        chunk.lease.retain()
        item = (cid, chunk.stored, chunk.size, chunk.lease, priority)
        try:
            await asyncio.wait_for(self._queue.put(item), self.stall_timeout)
        except TimeoutError:
            chunk.lease.release()
            self._inflight.pop(cid).set()
            self.stats.chunks_dropped += 1
            self.mark_unhealthy(
                TargetError(f"upload queue stalled for {self.stall_timeout:g}s", target=self.name)
            )

    async def _work(self) -> None:
        while True:
            cid, stored, size, lease, priority = await self._queue.get()
            try:
                if self.error is not None:
                    pass  # an unhealthy target's queue is dropped, not sent
                else:
                    PRIORITY.set(priority)  # the budget decides at the request (Budget.charge)
                    await self.repo.put_chunk(cid, stored)
                    # Batched commits: after a crash the next start re-lists the target anyway.
                    self.state.add_chunks(self.repo.config.id, (cid,))
                    self.stats.chunks_sent += 1
                    metrics.CHUNKS_SENT.labels(self.name).inc()
                    self.stats.bytes_new += size
                    self.stats.bytes_sent += len(stored)
            except BudgetExceededError:
                self._deferred(len(stored))  # the budget ran out while it waited in the queue
            except TargetError as exc:
                if self.error is None:
                    log.error("target.upload_failed", target=self.name, error=str(exc))
                self.mark_unhealthy(exc)
            finally:
                lease.release()
                event = self._inflight.pop(cid, None)
                if event is not None:
                    event.set()
                self._queue.task_done()

    async def settle(self, chunk_ids: Iterable[str]) -> None:
        """Wait until none of ``chunk_ids`` is queued or being uploaded."""
        for cid in set(chunk_ids):
            event = self._inflight.get(cid)
            if event is not None:
                await event.wait()

    def missing(self, chunk_ids: Iterable[str]) -> list[str]:
        return [c for c in dict.fromkeys(chunk_ids) if not self.has(c)]

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while not self._queue.empty():
            _, _, _, lease, _ = self._queue.get_nowait()
            lease.release()
        with contextlib.suppress(Exception):
            self.state.commit()
