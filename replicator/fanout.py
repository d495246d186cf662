"""Fan-out: one upload queue per target, each with its own concurrency and health.

Every encoded chunk is offered to every target's :class:`Uploader`. A chunk the target is
known to hold (state store), or is already uploading, is skipped — across files, snapshots
and sources. Others are queued; the bounded queue is the backpressure that keeps memory
within the pipeline's byte budget.

A slow or dead target must never stall the others. An uploader turns *unhealthy* when an
upload fails for good, when its target has been failing for ``failing_grace`` seconds, or when
its queue stays full for ``stall_timeout``; it then drops its queue, the uploads in flight and
every further offer, so that nothing waits on a dead target (a publish waiting for its chunks
returns at once), and the target's publisher catches up later by reading the missing chunks
again from the source. In one-shot commands the publisher reports the failure instead.

An unexpected exception while uploading (a bug) is logged with its traceback, counted
(``replicator_task_failures_total``) and turns the target unhealthy like a failure: the
worker goes on, and the publisher's catch-up redoes the work.

Small chunks (whole small files, the tails of large ones) are not sent one object each: they
are appended to an open *pack* that is sealed and sent as one object when it reaches
``PACK_SIZE`` or when a publish waits for its chunks (:meth:`Uploader.settle`). For a dataset
of many small files this turns one create + fsync (or PUT) per file into one per 16 MiB
(docs/FORMAT.md, pack objects). The state store remembers where each packed chunk is, and
the publisher writes those locations into the manifest.

Under a budget, each chunk is checked by its source's priority before it is queued, and
admitted (its cost reserved) right before it is sent (replicator.budget); what the budget
defers is counted and sent later, when the publisher finds it missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from replicator import metrics
from replicator.budget import TargetBudget
from replicator.config import ChunkingConfig, Priority
from replicator.errors import TargetError
from replicator.format.manifest import PackedAt
from replicator.gc.protocol import PublishWindow, WriterGcState
from replicator.log import get_logger
from replicator.memory import Lease
from replicator.presence import Presence
from replicator.progress import NoProgress, ProgressSink
from replicator.read.pipeline import ChunkConsumer, EncodedChunk
from replicator.repository import Repository
from replicator.state import StateStore
from replicator.targets import RetryingTarget, TargetHealth, unwrap

log = get_logger(__name__)


FAILING_GRACE = 5.0
"""Seconds a target may keep failing requests before its uploads are dropped (the daemon)."""
PACK_BELOW = 1 << 20
"""Chunks whose original size is below this and below the chunker's ``min_size`` go into packs:
FastCDC cuts no chunk that small except a whole small file or the tail of a file."""
PACK_SIZE = 16 << 20
"""A pack is sealed and sent once its stored bytes reach this (restic's default pack size)."""


@dataclass
class _Upload:
    """One object to send: a loose chunk, or a pack of several (filled while open)."""

    chunks: list[tuple[str, int, int]]
    """(chunk id, original size, offset in ``data``) of each chunk it carries."""
    data: bytes | bytearray
    leases: list[Lease]
    priority: Priority
    packed: bool
    done: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once it is sent or dropped (one event for all its chunks: see Uploader._inflight)."""

    def release(self) -> None:
        for lease in self.leases:
            lease.release()
        self.leases.clear()


def pack_below(chunking: ChunkingConfig) -> int:
    """Chunks smaller than this are sent in packs (see PACK_BELOW)."""
    return min(PACK_BELOW, chunking.min_size)


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
        budget: TargetBudget | None = None,
        stall_timeout: float = 10.0,
        failing_grace: float = FAILING_GRACE,
        confirm_window: float = 0.0,
    ) -> None:
        self.name = name
        self.repo = repo
        self.state = state
        self.chunks = state.chunks(repo.config.id)
        """What the repository is known to hold."""
        self.presence = Presence(name, repo, self.chunks, concurrency, confirm_window)
        """Keeps those claims true: listings, confirmation before a publish."""
        self.key = repo.hash.key
        self.concurrency = concurrency
        self.budget = budget
        """The budget's say (replicator.budget); None: no budget."""
        self.stall_timeout = stall_timeout
        self.failing_grace = failing_grace
        self.stats = UploadStats()
        self.error: TargetError | None = None
        """Why the target is unhealthy; None while it is healthy."""
        retrying = unwrap(repo.target, RetryingTarget)
        self.health = retrying.health if retrying is not None else TargetHealth(name)
        self.health.listeners.append(self._health_changed)
        self._grace_timer: asyncio.TimerHandle | None = None
        self._sends: set[asyncio.Task[None]] = set()
        """Uploads in flight, cancelled when the target turns unhealthy."""
        self._queue: asyncio.Queue[_Upload] = asyncio.Queue(maxsize=2 * concurrency)
        self._packs: dict[Priority, _Upload] = {}
        """Packs being filled, one per priority (the budget charges a request at one priority)."""
        self._inflight: dict[str, asyncio.Event] = {}
        self.pack_below = pack_below(repo.config.chunking)
        self._workers: list[asyncio.Task[None]] = []
        self.gc = WriterGcState()
        """What this process knows of the repository's garbage collector (replicator.gc)."""

    async def start(self, *, relist: bool = False) -> None:
        """Prime the presence cache and start the upload workers.

        The cache is filled from a full listing of the repository's chunks the first time this
        state store sees the repository, and again when ``relist``. After an unclean shutdown,
        uploads may have completed without being recorded; and after a power cut the state may
        name chunks whose directory entries never became durable on a POSIX target (they are
        fsynced before a manifest names them, not before the state records them). So the
        listing replaces what the state knew: chunks it does not show are forgotten, and sent
        again if needed."""
        if relist or not self.chunks.listed:
            await self.presence.relist()
        self._workers = [
            asyncio.create_task(self._work(), name=f"upload-{self.name}-{i}") for i in range(self.concurrency)
        ]
        if self.health.ok:
            metrics.TARGET_UP.labels(self.name).set(1)

    def forget_objects(self, keys: Iterable[str]) -> None:
        """A collector deletes (or deleted) these chunk and pack objects: stop claiming them,
        so that a publish that needs them uploads them again (docs/FORMAT.md 10.3)."""
        chunks: list[str] = []
        packs: list[str] = []
        for key in keys:
            kind, _, object_id = key.split("/")
            (chunks if kind == "chunks" else packs).append(object_id)
        if chunks:
            self.chunks.forget(chunks)
        if packs:
            self.chunks.forget_packs(packs)
        log.info("target.gc_forgot", target=self.name, chunks=len(chunks), packs=len(packs))

    def window(self) -> PublishWindow:
        """The writer's side of the garbage-collection protocol around a manifest write."""
        return PublishWindow(self.repo.target, self.gc, self.forget_objects, self.presence.relist)

    # -- health -------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        if self.error is not None:
            return False
        since = self.health.failing_since
        return since is None or time.monotonic() - since < self.failing_grace

    def _health_changed(self, ok: bool) -> None:
        """The target started failing (``ok`` False): give it ``failing_grace`` to recover
        before its uploads are dropped."""
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if not ok:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing is uploading
                loop = asyncio.get_running_loop()
                self._grace_timer = loop.call_later(self.failing_grace, self._grace_expired)

    def _grace_expired(self) -> None:
        self._grace_timer = None
        error = self.health.last_error
        if not self.health.ok and error is not None:
            self.mark_unhealthy(error)

    def mark_unhealthy(self, error: TargetError) -> None:
        if self.error is None:
            log.warning("target.unhealthy", target=self.name, error=str(error))
        self.error = error
        self.health.failed(error)
        # Give the memory back and let nobody wait for these; catch-up re-reads them later.
        dropped = [*self._packs.values()]
        self._packs.clear()
        while not self._queue.empty():
            dropped.append(self._queue.get_nowait())
            self._queue.task_done()
        for item in dropped:
            self._finish(item)
            self.stats.chunks_dropped += len(item.chunks)
        for send in self._sends:
            send.cancel()  # its worker finishes the item (Uploader._work)

    def mark_healthy(self) -> None:
        """The caller just reached the target (a probe): uploads are accepted again."""
        if self.error is not None:
            log.info("target.healthy", target=self.name)
        self.error = None
        self.health.succeeded()

    # -- uploading ----------------------------------------------------------------------------

    def prefetch(self, chunk_ids: Sequence[str]) -> None:
        """Look these ids up in one batch before they are offered (ChunkIndex.prefetch)."""
        self.chunks.prefetch(chunk_ids)

    def has(self, chunk_id: str) -> bool:
        return self.chunks.has(chunk_id)

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
        if self.budget is not None and not self.budget.allows(priority, len(chunk.stored)):
            self._deferred(len(chunk.stored))
            return
        if chunk.size < self.pack_below:
            # Copied into the pack: the chunk's lease is not kept (text packs compress well, so
            # a pack could otherwise pin far more than PACK_SIZE of original bytes).
            pack = self._packs.setdefault(priority, _Upload([], bytearray(), [], priority, packed=True))
            assert isinstance(pack.data, bytearray)
            self._inflight[cid] = pack.done
            pack.chunks.append((cid, chunk.size, len(pack.data)))
            pack.data += chunk.stored
            if len(pack.data) >= PACK_SIZE:
                await self._seal(priority)
            return
        chunk.lease.retain()
        item = _Upload([(cid, chunk.size, 0)], chunk.stored, [chunk.lease], priority, packed=False)
        self._inflight[cid] = item.done
        await self._enqueue(item)

    async def _seal(self, priority: Priority) -> None:
        pack = self._packs.pop(priority, None)
        if pack is not None:
            await self._enqueue(pack)

    async def _enqueue(self, item: _Upload) -> None:
        try:
            await asyncio.wait_for(self._queue.put(item), self.stall_timeout)
        except TimeoutError:
            self._finish(item)
            self.stats.chunks_dropped += len(item.chunks)
            self.mark_unhealthy(
                TargetError(f"upload queue stalled for {self.stall_timeout:g}s", target=self.name)
            )

    async def _work(self) -> None:
        current = asyncio.current_task()
        while True:
            if current is not None and current.cancelling():
                # close() cancelled this worker while it awaited a send, and the send ended
                # otherwise than cancelled (a cancel lands in the task awaited; a send that
                # turns it into a TargetError hides it): without this, the worker waited on
                # the queue forever, and a Ctrl-C'd sync hung (issue 22).
                raise asyncio.CancelledError
            item = await self._queue.get()
            try:
                if self.error is None:  # an unhealthy target's queue is dropped, not sent
                    await self._send_admitted(item)
            except TargetError as exc:
                if self.error is None:
                    log.error("target.upload_failed", target=self.name, error=str(exc))
                self.mark_unhealthy(exc)
            except Exception as exc:  # a bug: never a silent stall (module docstring)
                log.error("target.upload_crashed", target=self.name, error=repr(exc), exc_info=exc)
                metrics.TASK_FAILURES.labels(f"upload-{self.name}").inc()
                self.mark_unhealthy(TargetError(f"internal error while uploading: {exc!r}", target=self.name))
            finally:
                self._finish(item)
                self._queue.task_done()

    async def _send_admitted(self, item: _Upload) -> None:
        """Send ``item`` if the budget admits it (else it is deferred), as a task of its own,
        which :meth:`mark_unhealthy` may cancel."""
        reservation = None
        if self.budget is not None:
            reservation = self.budget.reserve(item.priority, len(item.data))
            if reservation is None:
                self._deferred(len(item.data))  # the budget ran out while it waited in the queue
                return
        send = asyncio.create_task(self._send(item))
        self._sends.add(send)
        try:
            await send
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the worker itself is being stopped
            self.stats.chunks_dropped += len(item.chunks)  # dropped by mark_unhealthy
        finally:
            self._sends.discard(send)
            if reservation is not None:
                reservation.release()

    def _finish(self, item: _Upload) -> None:
        """Sent or dropped: free its memory and wake whoever waits for its chunks."""
        item.release()
        for cid, _, _ in item.chunks:
            if self._inflight.get(cid) is item.done:  # not a later upload of the same chunk
                del self._inflight[cid]
        item.done.set()

    async def _send(self, item: _Upload) -> None:
        # Batched commits: after a crash the next start re-lists the target anyway.
        if item.packed:
            data = bytes(item.data)
            pack_id = await self.repo.put_pack(data)
            ends = [offset for _, _, offset in item.chunks[1:]] + [len(data)]
            self.chunks.add_packed(
                [
                    (cid, (pack_id, offset, end - offset))
                    for (cid, _, offset), end in zip(item.chunks, ends, strict=True)
                ],
            )
        else:
            cid = item.chunks[0][0]
            await self.repo.put_chunk(cid, bytes(item.data))
            self.chunks.add_loose((cid,))
        self.stats.chunks_sent += len(item.chunks)
        metrics.CHUNKS_SENT.labels(self.name).inc(len(item.chunks))
        self.stats.bytes_new += sum(size for _, size, _ in item.chunks)
        self.stats.bytes_sent += len(item.data)

    async def settle(self, chunk_ids: Iterable[str]) -> None:
        """Wait until none of ``chunk_ids`` is queued or being uploaded (sealing open packs).

        Offers go on while this waits, and may put one of these chunks into a pack opened
        after the first sealing (another source's candidate dedups against it, or a catch-up
        re-offers it): so seal and wait again until none is in flight, or this would wait for
        a pack nothing seals (issue 18: a publisher hung with every upload worker idle)."""
        ids = set(chunk_ids)
        while True:
            for priority in list(self._packs):
                await self._seal(priority)
            waiting = {self._inflight[c] for c in ids if c in self._inflight}
            if not waiting:
                return
            for event in waiting:
                await event.wait()

    def stored(self, chunk_ids: Iterable[str]) -> dict[str, PackedAt | None]:
        """The stored ones of these chunks, and where: a pack location, or None (loose)."""
        return self.chunks.stored(chunk_ids)

    def missing(self, chunk_ids: Iterable[str]) -> list[str]:
        ids = list(dict.fromkeys(chunk_ids))
        stored = self.stored(ids)
        return [c for c in ids if c not in stored]

    async def close(self) -> None:
        self.health.listeners.remove(self._health_changed)
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for pack in self._packs.values():
            pack.release()
        self._packs.clear()
        while not self._queue.empty():
            self._queue.get_nowait().release()
        with contextlib.suppress(Exception):
            self.state.commit()


class FanOut(ChunkConsumer):
    """The read stage's consumer in a sync or a daemon round: each chunk goes to every one of
    ``uploaders`` (each keeps what its target lacks), at its source's ``priority``.

    ``pace``: awaited with each chunk's size before it is offered (catch-up's bandwidth cap);
    ``progress``: advanced by each chunk's size."""

    def __init__(
        self,
        uploaders: Sequence[Uploader],
        priority: Priority,
        *,
        progress: ProgressSink | None = None,
        pace: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.uploaders = list(uploaders)
        self.priority = priority
        self.progress = progress or NoProgress()
        self.pace = pace

    def wants(self, ids: dict[str, str]) -> bool:
        return any(u.wants(ids[u.key]) for u in self.uploaders)

    def expect(self, ids: list[dict[str, str]]) -> None:
        for u in self.uploaders:
            u.prefetch([i[u.key] for i in ids])

    async def take(self, chunk: EncodedChunk) -> None:
        self.progress.advance(chunk.size)
        if self.pace is not None:
            await self.pace(chunk.size)
        for u in self.uploaders:
            await u.offer(chunk, self.priority)
