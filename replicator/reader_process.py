"""Helper processes that read and encode batches of small local files.

Why a process: syncing 20,000 small files is per-file Python work, and in one process every
step of it (open, read, hash, compress, confirm, then the bookkeeping on the event loop)
takes turns holding one GIL. Reading and encoding in other processes lets that half run on
the other core while the event loop records and packs the previous batches: the read phase
of a 20,000-file sync measured ~2.85 s in threads and ~2.35 s with one helper (later, with
the state writes fixed, ~2.0 s with one helper and ~1.7 s with two).

Only sources whose reads are plain file system calls use them (``Source.read_in_helper``),
and only for runs with at least :data:`replicator.pipeline.HELPER_MIN_FILES` small files:
starting a helper costs ~0.1 s (a fresh interpreter importing :mod:`replicator.reader_helper`
and no more), spent while the source is still being scanned
(:meth:`replicator.pipeline.ChunkPipeline.helper_starter`). It is started with ``spawn``,
never ``fork``: the parent has threads, and a forked child could inherit a lock some thread
held. A helper that dies is reported and the pipeline goes on reading in threads.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from replicator import reader_helper
from replicator.coder import ChunkCoder, SmallFile
from replicator.errors import ReplicatorError, SourceError
from replicator.sources.base import Source, SourceFile

PROCESSES = min(os.cpu_count() or 1, 4)
"""Helper processes. Even on two cores two beat one (20,000 files: read phase ~1.7 s vs ~2.0 s):
the event loop's share of the work does not fill a core, and two helpers keep it fed."""


class ReaderProcessError(ReplicatorError):
    """The helper process died (killed, out of memory); the batch was not read."""


class ReaderProcess:
    """A pool of :data:`PROCESSES` helper processes (one per core, at most four)."""

    Error = ReaderProcessError

    def __init__(self) -> None:
        self.processes = PROCESSES
        self._pool = ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=reader_helper.start,
            initargs=(os.getpid(),),
        )
        # The pool spawns a process per task while none is idle: start them all now, so that
        # their start-up (~0.25 s of imports) runs while the caller scans or plans.
        for _ in range(self.processes):
            self._pool.submit(reader_helper.ready)

    async def read_small_files(
        self, coder: ChunkCoder, source: Source, files: Sequence[SourceFile]
    ) -> list[SmallFile | SourceError]:
        """:meth:`ChunkCoder.read_whole` in the helper process."""
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, reader_helper.read_whole, coder, source, list(files)
            )
        except BrokenProcessPool as exc:
            raise ReaderProcessError(f"reader process died ({exc})", operation="read") from None

    def close(self, *, wait: bool = True) -> None:
        """Stop the helpers; ``wait=False`` after one died (joining a broken pool can hang)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
