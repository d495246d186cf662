"""Helper processes that read and encode batches of small local files.

Why a process: syncing 20,000 small files is per-file Python work, and in one process every
step of it (open, read, hash, compress, confirm, then the bookkeeping on the event loop)
takes turns holding one GIL. Reading and encoding in other processes lets that half run on
the other core while the event loop records and packs the previous batches: the read phase
of a 20,000-file sync measured ~2.85 s in threads and ~2.35 s with one helper (later, with
the state writes fixed, ~2.0 s with one helper and ~1.7 s with two).

Only sources whose reads are plain file system calls use them (``Source.read_in_helper``),
and only for runs with at least :data:`replicator.read.pipeline.HELPER_MIN_FILES` small files:
starting a helper costs ~0.1 s (a fresh interpreter importing :mod:`replicator.read.helper_main`
and no more), spent while the source is still being scanned
(:meth:`replicator.read.pipeline.ChunkPipeline.helper_starter`). It is started with ``spawn``,
never ``fork``: the parent has threads, and a forked child could inherit a lock some thread
held. A helper that dies is reported and the pipeline goes on reading in threads.

Each helper is reached over its own socket, read and written by the event loop itself
(protocol in :mod:`replicator.read.helper_main`). A ``ProcessPoolExecutor`` adds two threads to
the parent (one pickles and sends tasks, one receives results), and every task woke one of
them: on two busy cores the event loop then waited for the GIL ~1-2 ms per batch, often
longer than the batch took to record.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import socket
import time
from collections import deque
from collections.abc import Sequence

from replicator.errors import ReplicatorError
from replicator.read import helper_main as reader_helper
from replicator.read.encode import ChunkCoder
from replicator.read.helper_main import FRAME, Reply, Request
from replicator.sources.base import Source, SourceFile

PROCESSES = min(os.cpu_count() or 1, 4)
"""Helper processes. Even on two cores two beat one (20,000 files: read phase ~1.7 s vs ~2.0 s):
the event loop's share of the work does not fill a core, and two helpers keep it fed."""

STOP_SECONDS = 5.0
"""How long :meth:`ReaderProcess.close` waits for a helper to exit before it kills it."""


class ReaderProcessError(ReplicatorError):
    """A helper process died (killed, out of memory), was stopped, or sent a reply that could not
    be read; the batch was not read there (the pipeline reads it in threads)."""


class _Helper:
    """One helper process and the parent's end of its socket."""

    def __init__(self, context: multiprocessing.context.SpawnContext) -> None:
        self.sock, theirs = socket.socketpair()
        try:
            self.process = context.Process(
                target=reader_helper.serve, args=(theirs,), name="replicator-reader", daemon=True
            )
            self.process.start()
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()
        self.sock.setblocking(False)
        self.waiting: deque[asyncio.Future[Reply]] = deque()
        self._sending = asyncio.Lock()
        self._receiver: asyncio.Task[None] | None = None
        self.failure: str | None = None

    async def call(self, request: Request) -> Reply:
        if self.failure is not None:
            raise self._failed()
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Reply] = loop.create_future()
        self.waiting.append(reply)
        if self._receiver is None:
            self._receiver = loop.create_task(self._receive())
        frame = reader_helper.encode_frame(request)
        try:
            async with self._sending:  # frames must not interleave
                await loop.sock_sendall(self.sock, frame)
        except OSError as exc:
            self._fail(f"cannot send to it: {exc}")
        return await reply

    async def _receive(self) -> None:
        """Hand each reply, in order, to the oldest waiting call; fail them all at the end."""
        loop = asyncio.get_running_loop()
        try:
            while self.waiting:
                header = await self._exactly(loop, FRAME.size)
                result = pickle.loads(await self._exactly(loop, FRAME.unpack(header)[0]))
                reply = self.waiting.popleft()  # only now: a reply that cannot be read fails below
                if not reply.done():
                    reply.set_result(result)
        except Exception as exc:  # the helper died, or a reply could not be read: never leave a call waiting
            self._fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        finally:
            self._receiver = None

    async def _exactly(self, loop: asyncio.AbstractEventLoop, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = await loop.sock_recv_into(self.sock, view[got:])
            if not k:
                raise EOFError(f"exit code {self.process.exitcode}" if self.process.exitcode else "closed")
            got += k
        return buf

    def _fail(self, why: str) -> None:
        self.failure = self.failure or why
        while self.waiting:
            reply = self.waiting.popleft()
            if not reply.done():
                reply.set_exception(self._failed())

    def _failed(self) -> ReaderProcessError:
        return ReaderProcessError(f"reader process failed ({self.failure})", operation="read")

    def stop(self) -> None:
        """Close the parent's end: the helper sees the end of its socket and exits."""
        if self._receiver is not None:
            self._receiver.cancel()
        self._fail("stopped")  # batches still waiting are read again in threads
        self.sock.close()


class ReaderProcess:
    """:data:`PROCESSES` helper processes (one per core, at most four), started at once, so
    that their start-up runs while the caller scans or plans."""

    Error = ReaderProcessError

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes = PROCESSES
        self._helpers: list[_Helper] = []
        try:
            for _ in range(self.processes):
                self._helpers.append(_Helper(context))
        except BaseException:
            self.close(wait=False)  # the ones already started
            raise

    @property
    def pids(self) -> list[int]:
        return [h.process.pid for h in self._helpers if h.process.pid is not None]

    async def read_small_files(self, coder: ChunkCoder, source: Source, files: Sequence[SourceFile]) -> Reply:
        """:meth:`ChunkCoder.read_whole` in the least busy helper process."""
        helper = min(self._helpers, key=lambda h: len(h.waiting))
        return await helper.call((coder, source, list(files)))

    def close(self, *, wait: bool = True) -> None:
        """Stop the helpers, waiting up to STOP_SECONDS for them to exit unless ``wait`` is
        false (after one died), then kill any still running. All are told first, so that
        they exit together (closing two one after the other took ~30 ms, together ~16 ms)."""
        for helper in self._helpers:
            helper.stop()
        deadline = time.monotonic() + (STOP_SECONDS if wait else 0)
        for helper in self._helpers:
            helper.process.join(max(0.0, deadline - time.monotonic()))
            if helper.process.is_alive():
                helper.process.kill()
