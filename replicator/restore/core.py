"""Restore: bring back a snapshot's files, byte-identical, with their mode and mtime.

The algorithm, over any destination: select the files (``include`` globs), skip those the
destination already holds exactly (and, with ``overwrite="never"``, those whose name holds
anything else: :data:`Overwrite`), fetch the chunks of the others in parallel (a window per
file, several files at once, bounded by a byte budget), verify every chunk against its id and
every file against its digest before it becomes visible, and make the whole durable once at
the end. Files of one small chunk are restored in batches: one check of what is current, one
fetch (nearby packed chunks in one read), one write.

A destination is a small protocol (:class:`Destination`): a local directory
(:mod:`replicator.restore.local`, which also says how paths are kept inside it and how a
restore is made durable), or plain objects in a bucket (:mod:`replicator.restore.s3`).
Manifests come from the target and are untrusted: every destination checks each path again.

A file whose chunk is missing or corrupt fails alone; a target that cannot be reached (or
refuses us) stops the whole restore: every further file would fail the same way, slowly.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from replicator.errors import IntegrityError, NotFoundError, ReplicatorError, RepositoryError, TargetError
from replicator.format.chunks import Buffer
from replicator.format.manifest import FileEntry, Manifest
from replicator.globs import PathFilter
from replicator.log import get_logger
from replicator.memory import ByteBudget
from replicator.progress import NoProgress, ProgressSink
from replicator.repository import Repository, snapshot_time
from replicator.restore.local import ExistsError, Found, LocalDestination

log = get_logger(__name__)

FILES_IN_PARALLEL = 4
CHUNKS_IN_FLIGHT_PER_FILE = 8
SMALL_FILE = 1 << 20
SMALL_BATCH = 64
"""Files of at most one chunk and SMALL_FILE bytes are restored SMALL_BATCH at a time."""


Overwrite = Literal["always", "if-changed", "never"]
"""What a restore does with a file the destination already has at a name it restores
(``restore --overwrite``): ``if-changed`` (the default) replaces it unless its bytes already
hash to the snapshot's digest; ``always`` writes every file again, even one that is already
identical (fixing its mode and mtime too); ``never`` leaves anything already there untouched
and reports it. A name that holds nothing is written in every mode."""


@dataclass
class RestoreResult:
    files: int = 0
    """Files restored (with ``dry_run``: that would be), new or replacing what was there."""
    bytes: int = 0
    skipped_existing: int = 0
    """Files left alone because the destination already holds their exact bytes."""
    skipped_bytes: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    replaced: list[str] = field(default_factory=list)
    """Of ``files``, those whose name held something else before (it is gone)."""
    kept: list[str] = field(default_factory=list)
    """With ``overwrite="never"``: names holding something else, left untouched (not restored)."""
    created: list[str] = field(default_factory=list)
    """With ``dry_run`` only: of ``files``, the names that hold nothing yet."""
    dry_run: bool = False
    """Nothing was written or fetched: the counts and lists say what a restore would do."""

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def bytes_per_second(self) -> float:
        """Restore throughput: bytes fetched, checked and written per second of wall time
        (files skipped as already correct are not counted)."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def select_files(manifest: Manifest, include: Sequence[str] = ()) -> list[FileEntry]:
    if not include:
        return list(manifest.files)
    keep = PathFilter(include)
    return [f for f in manifest.files if keep(f.path)]


async def snapshot_at(repo: Repository, source: str, when: datetime) -> str:
    """The newest snapshot of ``source`` taken at or before ``when`` (ids sort by time)."""
    ids = [sid for sid in await repo.list_snapshots(source) if snapshot_time(sid) <= when]
    if not ids:
        raise RepositoryError(
            f"source {source!r} has no snapshot at or before {when:%Y-%m-%dT%H:%M:%SZ} in {repo.target.url}"
        )
    return ids[-1]


class FileWriter(Protocol):
    """One file being restored. Nothing is visible at the destination before :meth:`commit`."""

    async def write(self, data: Buffer) -> None: ...

    async def commit(self) -> None:
        """Make the file appear, whole, under its final name (its digest was already checked)."""
        ...

    async def discard(self) -> None:
        """Drop whatever was written; the destination is as it was."""
        ...


class Destination(Protocol):
    """Where restored files go."""

    url: str

    def cannot_hold(self, path: str) -> str | None:
        """Why this destination cannot hold a file named ``path`` (a safe relative path), or
        None if it can. Such a file fails alone, by name, before anything is fetched."""
        ...

    async def examine(self, entry: FileEntry, content: bool = True) -> Found:
        """What the destination holds at this entry's name: ``same`` only if it is exactly the
        entry's bytes; with ``content=False``, anything there is ``different`` (not read)."""
        ...

    async def create(self, entry: FileEntry, replace: bool = True) -> FileWriter:
        """``replace=False``: the commit must not replace a file that appeared meanwhile
        (it raises ExistsError), where the destination can tell."""
        ...

    async def examine_many(self, entries: Sequence[FileEntry], content: bool = True) -> list[Found]:
        """:meth:`examine` for many small files at once."""
        ...

    async def write_whole(
        self, files: Sequence[tuple[FileEntry, Buffer]], replace: bool = True
    ) -> list[Exception | None]:
        """Restore many small files, each as :meth:`create`, ``write`` and ``commit`` would
        (their digests are already checked); per file None, or the OSError or ReplicatorError
        that failed it (nothing of it is visible then)."""
        ...

    async def flush(self) -> None:
        """Make every committed file durable across a power cut. :func:`restore_snapshot`
        calls it once, after the last file and before it returns (unless ``sync=False``)."""
        ...

    async def close(self) -> None: ...


def _sized(data: Buffer, chunk_id: str, size: int) -> Buffer:
    """``data``, once it has the length the manifest gives its chunk."""
    if len(data) != size:
        raise IntegrityError(f"chunk is {len(data)} bytes, manifest says {size}", key=chunk_id)
    return data


def _check_digest(digest: str, entry: FileEntry) -> None:
    if digest != entry.digest:
        raise IntegrityError("restored bytes do not match the manifest digest", key=entry.path)


async def restore_snapshot(
    repo: Repository,
    manifest: Manifest,
    dest: Path | Destination,
    *,
    include: Sequence[str] = (),
    progress: ProgressSink | None = None,
    memory_budget: int = 256 << 20,
    sync: bool = True,
    overwrite: Overwrite = "if-changed",
    dry_run: bool = False,
) -> RestoreResult:
    """Restore the selected files of ``manifest`` into the directory (or destination) ``dest``.

    ``overwrite``: what to do with names the destination already holds (:data:`Overwrite`).
    ``dry_run``: only look: nothing is fetched or written (a missing directory is not even
    created); the result says what would be restored, replaced, left alone and kept.

    Per-file problems (a missing or corrupt chunk, an unsafe path) are collected in the result;
    a :class:`TargetError` other than not-found ends the restore (files already restored stay:
    running it again skips them). With ``sync`` (the default) the files restored are durable
    when this returns (:meth:`Destination.flush`, counted in ``seconds``); without it, writeback
    is left to the OS (see :mod:`replicator.restore.local` for what that gives up)."""
    progress = progress or NoProgress()
    started = time.monotonic()
    files = select_files(manifest, include)
    destination = (
        LocalDestination(dest, repo.hash, write_behind=sync, create=not dry_run)
        if isinstance(dest, Path)
        else dest
    )
    run = _Restore(repo, manifest, destination, progress, ByteBudget(memory_budget), overwrite, dry_run)
    progress.begin("checking" if dry_run else "restoring", sum(f.size for f in files))
    queue = run.plan(files)
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(FILES_IN_PARALLEL):
                group.create_task(run.worker(queue))
        if sync and not dry_run:
            # Also after per-file failures: the files reported as restored must be on disk.
            await destination.flush()
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    finally:
        progress.end()
        if isinstance(dest, Path):
            await destination.close()
    run.result.seconds = time.monotonic() - started
    return run.result


Work = FileEntry | list[FileEntry]
"""A file restored chunk by chunk, or a batch of small files restored together."""


class _Restore:
    """One run of :func:`restore_snapshot`: what its workers share (the destination, the byte
    budget, the result) and the steps each of them takes."""

    def __init__(
        self,
        repo: Repository,
        manifest: Manifest,
        destination: Destination,
        progress: ProgressSink,
        budget: ByteBudget,
        overwrite: Overwrite = "if-changed",
        dry_run: bool = False,
    ) -> None:
        self.repo, self.manifest, self.destination = repo, manifest, destination
        self.progress, self.budget = progress, budget
        self.overwrite, self.dry_run = overwrite, dry_run
        self.result = RestoreResult(dry_run=dry_run)

    def plan(self, files: Sequence[FileEntry]) -> deque[Work]:
        """The work, in order: files of several chunks one by one, then the small ones in
        batches of SMALL_BATCH. A name the destination cannot hold fails here, alone."""
        queue: deque[Work] = deque()
        small: list[FileEntry] = []
        for f in files:
            why = self.destination.cannot_hold(f.path)
            if why is not None:
                self.result.failures[f.path] = why
                log.error("restore.unsupported_name", path=f.path, error=why)
                self.progress.advance(f.size)
                continue
            (small if len(f.chunks) <= 1 and f.size <= SMALL_FILE else queue).append(f)
        queue.extend(small[i : i + SMALL_BATCH] for i in range(0, len(small), SMALL_BATCH))
        return queue

    async def worker(self, queue: deque[Work]) -> None:
        while queue:
            work = queue.popleft()
            if isinstance(work, list):
                await self.restore_small(work)
                continue
            try:
                await self.restore_one(work)
            except (ReplicatorError, OSError) as exc:
                self.fail(work, exc)

    def decide(self, entry: FileEntry, found: Found) -> bool:
        """Whether to write ``entry``, given what its name holds; a file not written is
        counted here (up to date, or kept), and so is every file of a dry run."""
        if found == "same" and self.overwrite != "always":
            self.result.skipped_existing += 1
            self.result.skipped_bytes += entry.size
        elif found != "absent" and self.overwrite == "never":
            self.result.kept.append(entry.path)
        elif not self.dry_run:
            return True
        else:
            self.restored(entry, found)
        self.progress.advance(entry.size)
        return False

    def restored(self, entry: FileEntry, found: Found) -> None:
        self.result.files += 1
        self.result.bytes += entry.size
        if found != "absent":
            self.result.replaced.append(entry.path)
        elif self.dry_run:
            self.result.created.append(entry.path)

    def fail(self, entry: FileEntry, exc: Exception) -> None:
        """Record why ``entry`` failed; re-raise what would fail every other file too."""
        if isinstance(exc, ExistsError):  # overwrite="never", and a file appeared meanwhile
            self.result.kept.append(entry.path)
            return
        if isinstance(exc, TargetError) and not isinstance(exc, NotFoundError):
            raise exc  # unreachable or refused: every other file would fail the same way
        message = str(exc) if isinstance(exc, ReplicatorError) else f"{getattr(exc, 'strerror', '') or exc}"
        self.result.failures[entry.path] = message
        log.error("restore.failed", path=entry.path, error=message)

    async def restore_one(self, entry: FileEntry) -> None:
        """One file, chunk by chunk, under a temporary name until its digest is checked."""
        found = await self.destination.examine(entry, content=self.overwrite != "always")
        if not self.decide(entry, found):
            return
        writer = await self.destination.create(entry, replace=self.overwrite != "never")
        committed = False
        try:
            _check_digest(await self._write_chunks(entry, writer), entry)
            await writer.commit()
            committed = True
            self.restored(entry, found)
        finally:
            if not committed:
                await writer.discard()

    async def _write_chunks(self, entry: FileEntry, writer: FileWriter) -> str:
        """Fetch ``entry``'s chunks, CHUNKS_IN_FLIGHT_PER_FILE ahead within the byte budget,
        and write them in order; returns the hex digest of the bytes written."""
        hasher = self.repo.hash.hasher()
        window: deque[tuple[asyncio.Task[Buffer], int]] = deque()

        async def drain_one() -> bool:
            """Write the oldest chunk in flight; False if there is none."""
            if not window:
                return False
            task, size = window.popleft()
            try:
                data = await task
                hasher.update(data)
                await writer.write(data)
                self.progress.advance(size)
            finally:
                self.budget.release(size)
            return True

        try:
            for cid, size in entry.chunks:
                # Never wait for memory while holding some: write what is in flight first.
                await self.budget.acquire_or_free(size, drain_one)
                window.append((asyncio.create_task(self._fetch(cid, size)), size))
                if len(window) >= CHUNKS_IN_FLIGHT_PER_FILE:
                    await drain_one()
            while window:
                await drain_one()
        finally:
            for task, size in window:
                task.cancel()
                self.budget.release(size)
        return hasher.digest().hex()

    async def _fetch(self, cid: str, size: int) -> Buffer:
        return _sized(await self.repo.get_chunk(cid, self.manifest.packed.get(cid)), cid, size)

    async def restore_small(self, entries: list[FileEntry]) -> None:
        """Files of at most one chunk, in one batch: one check of what is current, one fetch
        (nearby packed chunks in one read), one write; each file still fails alone."""
        total = sum(e.size for e in entries)
        await self.budget.acquire(total)
        try:
            todo: list[FileEntry] = []
            found: dict[str, Found] = {}
            content = self.overwrite != "always"
            for entry, there in zip(
                entries, await self.destination.examine_many(entries, content), strict=True
            ):
                found[entry.path] = there
                if self.decide(entry, there):
                    todo.append(entry)
            if not todo:
                return
            packed = self.manifest.packed
            got = await self.repo.get_chunks([(c, packed.get(c)) for e in todo for c, _ in e.chunks])
            ready: list[tuple[FileEntry, Buffer]] = []
            for entry in todo:
                data = got[entry.chunks[0][0]] if entry.chunks else b""
                try:
                    if isinstance(data, ReplicatorError):
                        raise data
                    if entry.chunks:
                        _sized(data, *entry.chunks[0])
                    _check_digest(self.repo.hash.digest(data).hex(), entry)
                except ReplicatorError as exc:
                    self.fail(entry, exc)
                else:
                    ready.append((entry, data))
            replace = self.overwrite != "never"
            written = await self.destination.write_whole(ready, replace)
            for (entry, _), error in zip(ready, written, strict=True):
                if error is not None:
                    self.fail(entry, error)
                else:
                    self.restored(entry, found[entry.path])
                self.progress.advance(entry.size)
        finally:
            self.budget.release(total)
