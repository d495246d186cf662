"""Read once, chunk once, encode once: turn a source file into encoded chunks.

For each file, one I/O thread reads and cuts it (FastCDC, GIL released) and feeds the
whole-file digests in order; a pool of CPU threads hashes each chunk for every hash spec
the targets need (ids differ per repository seed) and encodes it (codec probe + zstd, GIL
released); unless disabled, the encoder checks that every zstd frame it stores decompresses
to exactly the bytes it compressed (restic#4523: a compressor can corrupt data). Encoded
chunks are handed, in file order, to a :class:`ChunkConsumer` (the fan-out to targets).

Memory is bounded by :class:`ByteBudget`: a chunk's bytes are reserved before it is encoded
and released only when every target it was offered to has uploaded or dropped it.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from replicator.config import ChunkingConfig, CompressionConfig
from replicator.errors import SourceError
from replicator.format.chunks import Buffer
from replicator.format.manifest import FileEntry
from replicator.hashing import Hasher, HashSpec
from replicator.log import get_logger
from replicator.memory import ByteBudget, Lease
from replicator.read.chunking import BlockPool, iter_chunks
from replicator.read.encode import ChunkCoder, SmallFile
from replicator.sources.base import Readable, Source, SourceFile

R = TypeVar("R")

if TYPE_CHECKING:
    from replicator.read.helpers import ReaderProcess

log = get_logger(__name__)

HELPER_MIN_FILES = 4096
"""Runs with fewer small files than this read them in threads: a helper process costs ~0.1 s of
CPU to start and saves ~30 us per file (:mod:`replicator.read.helpers`). Re-measured with
the cheaper helpers (a fresh sync of N of the benchmark's JSON files, 3 runs each): threads
0.23-0.24 s and helpers 0.35-0.37 s for 1,000 files, 0.35-0.38 s and 0.42-0.46 s for 2,000,
both 0.58-0.63 s for 4,000."""

LARGE_FILE_READERS = 2
"""Large files read at once. Reading, cutting and hashing take ~1.2 CPU-s per GiB in one thread:
with one reader that thread was the critical path whenever little needs encoding (a new
checkpoint step that changed a tenth of its layers: two readers measured ~15 % faster).
Each reader holds two blocks (4 x max_size) in memory, set aside from the budget."""


@dataclass
class EncodedChunk:
    ids: dict[str, str]
    """Hex chunk id per hash spec key."""
    size: int
    """Length of the original bytes."""
    stored: bytes | None
    """The encoded chunk object (codec byte + payload); None when no target wanted the chunk
    as it was hashed, so it was never encoded (see :meth:`ChunkPipeline.read_file`)."""
    lease: Lease = field(repr=False)


@dataclass(frozen=True)
class FileRecord:
    """A file as read: its metadata plus digest and chunk list for each hash spec."""

    path: str
    size: int
    mtime_ns: int
    mode: int
    signature: str
    digests: dict[str, str]
    chunks: dict[str, tuple[tuple[str, int], ...]]

    def covers(self, specs: Sequence[HashSpec]) -> bool:
        return all(s.key in self.chunks for s in specs)

    def entry(self, spec: HashSpec) -> FileEntry:
        # Not validated again: sources only describe safe paths, and the chunk sizes add up by
        # construction (pydantic's validators were ~40 % of writing a 20,000-file manifest).
        return FileEntry.model_construct(
            path=self.path,
            size=self.size,
            mode=self.mode,
            mtime_ns=self.mtime_ns,
            digest=self.digests[spec.key],
            chunks=self.chunks[spec.key],
        )


class ChunkConsumer:
    """Where the read stage hands its chunks: the fan-out to every target's upload queue in a
    sync (:class:`replicator.fanout.FanOut`), a count of what would be sent in ``plan``, the
    uploads of ``verify --repair``. All three methods are called on the event loop.

    Contract: for a batch of small files, :meth:`expect` gets every chunk's ids before the
    first chunk reaches :meth:`take`; for each chunk of a large file, :meth:`wants` is asked
    once its ids are known, and a chunk nobody wants is not compressed (it reaches
    :meth:`take` with ``stored=None``); :meth:`take` gets every chunk of a file, in order,
    and may keep it past its return by retaining its lease."""

    def wants(self, ids: dict[str, str]) -> bool:
        """Does anyone still need the chunk with these ids (one per hash spec)?"""
        return True

    def expect(self, ids: list[dict[str, str]]) -> None:
        """These chunks follow (a chance to look them all up at once)."""

    async def take(self, chunk: EncodedChunk) -> None:
        raise NotImplementedError


class ChunkPipeline:
    """Shared by all files of a run; owns the I/O and CPU thread pools."""

    def __init__(
        self,
        chunking: ChunkingConfig,
        compression: CompressionConfig,
        specs: Sequence[HashSpec] = (),
        *,
        memory_budget: int = 256 << 20,
        cpu_workers: int | None = None,
        io_workers: int = 4,
    ) -> None:
        self.chunking, self.compression = chunking, compression
        self.coder = ChunkCoder(chunking, compression, list(dict.fromkeys(specs)))
        self.cpu_workers = cpu_workers or os.cpu_count() or 2
        self._cpu = ThreadPoolExecutor(self.cpu_workers, thread_name_prefix="encode")
        self._io = ThreadPoolExecutor(io_workers, thread_name_prefix="read")
        self._closed = False
        # The budget covers all file data in memory: the large-file reader's two blocks are
        # set aside from it, the rest bounds chunks between reading and their last upload.
        reserved = LARGE_FILE_READERS * 2 * (2 * chunking.max_size)
        self.budget = ByteBudget(max(memory_budget - reserved, 4 * chunking.max_size))
        self._large_file = asyncio.Semaphore(LARGE_FILE_READERS)
        # As many free blocks as the readers hold at once: reusing them saves the kernel
        # zeroing fresh pages, and they are within the memory set aside above.
        self._blocks = BlockPool(2 * chunking.max_size, keep=LARGE_FILE_READERS * 2)
        self._helper: ReaderProcess | None = None

    @property
    def specs(self) -> tuple[HashSpec, ...]:
        return self.coder.specs

    def add_spec(self, spec: HashSpec) -> None:
        """Also compute ids for ``spec`` (a target attached later); files read before lack them."""
        if spec not in self.specs:
            self.coder = ChunkCoder(self.chunking, self.compression, (*self.specs, spec))

    def _start_helpers(self, source: Source) -> None:
        if self._helper is None and source.read_in_helper:
            from replicator.read.helpers import ReaderProcess

            try:
                self._helper = ReaderProcess()
            except OSError as exc:  # out of processes or file descriptors: threads still work
                log.warning("reader_process.unavailable", error=str(exc), hint="reading in threads")

    def helper_starter(self, source: Source, known: Callable[[], int]) -> Callable[[SourceFile], None] | None:
        """A ``found`` callback for :meth:`Source.scan` of ``source``, whose files the state
        knows ``known()`` of (asked only when helpers could start): once the scan has found
        HELPER_MIN_FILES more small files than that, at least that many are new, so they will
        be read in the helper processes (see :meth:`expect_small_files`). It starts them at
        once, so that their start-up (~0.1 s of imports each, :mod:`replicator.read.helper_main`)
        overlaps the rest of the scan instead of delaying the first reads. None if there is
        nothing to start."""
        if self._helper is not None or not source.read_in_helper:
            return None
        loop = asyncio.get_running_loop()
        to_go = HELPER_MIN_FILES + known()

        def found(file: SourceFile) -> None:  # in the scanning thread
            nonlocal to_go
            if to_go > 0 and self.is_small(file):
                to_go -= 1
                if to_go == 0:
                    loop.call_soon_threadsafe(self._start_helpers, source)

        return found

    def expect_small_files(self, source: Source, count: int) -> int:
        """About to read ``count`` small files from ``source``: start the helper processes if
        they pay off (see :mod:`replicator.read.helpers`). Returns how many files or batches
        to read at once: two per helper process (one being read while the other's result is
        recorded), else what the source asks for."""
        if count >= HELPER_MIN_FILES:
            self._start_helpers(source)
        if self._helper is not None and source.read_in_helper:
            return 2 * self._helper.processes
        return source.read_concurrency

    def _run(self, executor: ThreadPoolExecutor, fn: Callable[..., R], *args: Any) -> asyncio.Future[R]:
        """``fn(*args)`` on ``executor``. Once :meth:`close` has run (a Ctrl-C ends the pass
        while reads are in flight: asyncio.run cancels the remaining tasks only after the
        engine closed the pipeline), the read is cancelled instead of failing with "cannot
        schedule new futures after shutdown", which surfaced as a traceback (issue 22)."""
        if self._closed:
            raise asyncio.CancelledError
        return asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def close(self) -> None:
        self._closed = True  # set first: close() runs on the loop's thread, as every _run does
        self._cpu.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True, cancel_futures=True)
        if self._helper is not None:
            self._helper.close()

    async def read_file(self, source: Source, file: SourceFile, consumer: ChunkConsumer) -> FileRecord:
        """Read ``file`` once, passing each encoded chunk to ``consumer`` in order.

        A chunk of a large file that the consumer does not want (the bulk of a new checkpoint
        step that changed a few layers) is hashed but not compressed. A small file is encoded
        whole in one CPU hop.

        Raises FileChangedError if the file changed during the read (chunks already passed to
        the consumer are valid content-addressed objects; only the record is withheld)."""
        if self.is_small(file):
            (result,) = await self.read_small_files(source, [file], consumer)
            if isinstance(result, SourceError):
                raise result
            return result
        async with self._large_file:
            self._blocks.enter()
            try:
                return await self._read_file(source, file, consumer)
            finally:
                self._blocks.leave()

    def is_small(self, file: SourceFile) -> bool:
        """Read whole in one piece (see :meth:`read_small_files`) rather than streamed."""
        return file.size <= self.chunking.max_size

    async def read_small_files(
        self,
        source: Source,
        files: Sequence[SourceFile],
        consumer: ChunkConsumer,
    ) -> list[FileRecord | SourceError]:
        """Read a batch of small files in one I/O hop, encode them in one CPU hop, then pass
        their chunks to ``consumer`` file by file (after :meth:`ChunkConsumer.expect`). For
        datasets of many small files the per-file thread round trips, not the bytes, are what
        costs; batching them made 20,000 small files ~2x faster. Returns, per file, its record
        or why it was not read (a FileChangedError, or another SourceError)."""
        total = sum(f.size for f in files)
        coder = self.coder  # the same specs for the whole batch, even if a target attaches meanwhile
        await self.budget.acquire(total)
        lease = Lease(self.budget, total)
        try:
            read = await self._read_small(coder, source, files)
            consumer.expect([ids for got in read if isinstance(got, tuple) for _, ids, _ in got[0]])
            results: list[FileRecord | SourceError] = []
            for file, got in zip(files, read, strict=True):
                if not isinstance(got, tuple):
                    results.append(got)
                    continue
                chunks, digests = got
                lists: dict[str, list[tuple[str, int]]] = {s.key: [] for s in coder.specs}
                for size, ids, stored in chunks:
                    for key, cid in ids.items():
                        lists[key].append((cid, size))
                    lease.retain()
                    try:
                        await consumer.take(EncodedChunk(ids, size, stored, lease))
                    finally:
                        lease.release()
                results.append(self._record(file, digests, lists))
        finally:
            lease.release()
        return results

    async def _read_small(
        self, coder: ChunkCoder, source: Source, files: Sequence[SourceFile]
    ) -> list[SmallFile | SourceError]:
        helper = self._helper
        if helper is not None and source.read_in_helper:
            try:
                return await helper.read_small_files(coder, source, files)
            except helper.Error as exc:
                log.warning("reader_process.failed", error=str(exc))
                helper.close(wait=False)
                if self._helper is helper:
                    self._helper = None  # read in threads from now on
        return await self._run(self._io, coder.read_whole, source, files)

    @staticmethod
    def _record(
        file: SourceFile, digests: dict[str, str], lists: dict[str, list[tuple[str, int]]]
    ) -> FileRecord:
        return FileRecord(
            path=file.path,
            size=file.size,
            mtime_ns=file.mtime_ns,
            mode=file.mode,
            signature=file.signature,
            digests=digests,
            chunks={k: tuple(v) for k, v in lists.items()},
        )

    async def _process(
        self, coder: ChunkCoder, data: Buffer, consumer: ChunkConsumer
    ) -> tuple[dict[str, str], bytes | None]:
        ids = await self._run(self._cpu, coder.ids, data)
        if not consumer.wants(ids):
            return ids, None
        return await self._run(self._cpu, coder.encode, data, ids)

    async def _read_file(self, source: Source, file: SourceFile, consumer: ChunkConsumer) -> FileRecord:
        # One set of hash specs for the whole file, even if a target attaches meanwhile (its
        # chunk ids would otherwise cover only part of the file, and its digest none of it).
        coder = self.coder
        handle: Readable = await self._run(self._io, source.open, file)
        hashers: dict[str, Hasher] = {s.key: s.hasher() for s in coder.specs}
        lists: dict[str, list[tuple[str, int]]] = {s.key: [] for s in coder.specs}
        chunks = iter_chunks(handle, self.chunking, file.size, self._blocks)

        def next_chunk() -> memoryview | None:
            data = next(chunks, None)
            if data is not None:
                for h in hashers.values():
                    h.update(data)
            return data

        window: deque[tuple[asyncio.Future[tuple[dict[str, str], bytes | None]], Lease, int]] = deque()

        async def emit() -> bool:
            """Hand the oldest chunk in flight on; False if there is none."""
            if not window:
                return False
            fut, lease, size = window.popleft()
            try:
                ids, stored = await fut
                for key, cid in ids.items():
                    lists[key].append((cid, size))
                await consumer.take(EncodedChunk(ids, size, stored, lease))
            finally:
                lease.release()  # the producer's own reference
            return True

        try:
            while True:
                data = await self._run(self._io, next_chunk)
                if data is None:
                    break
                # Hand finished chunks on before waiting for memory: the window itself may be
                # what fills the budget, and only consumers downstream can free it.
                await self.budget.acquire_or_free(len(data), emit)
                lease = Lease(self.budget, len(data))
                window.append((asyncio.ensure_future(self._process(coder, data, consumer)), lease, len(data)))
                del data
                if len(window) > self.cpu_workers:
                    await emit()
            while window:
                await emit()
            await self._run(self._io, source.confirm, file, handle)
        finally:
            for fut, lease, _ in window:  # an error left work in flight: reclaim its memory
                fut.cancel()
                lease.release()
            if self._closed:  # interrupted: close it here, the readers are gone
                handle.close()
            else:
                await self._run(self._io, handle.close)
        return self._record(file, {k: h.digest().hex() for k, h in hashers.items()}, lists)
