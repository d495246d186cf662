"""Restore: bring back a snapshot's files, byte-identical, with their mode and mtime.

Manifests come from the target and are untrusted. Besides the path checks done when a
manifest is parsed, files are written relative to directory descriptors: every directory
component is opened with ``O_NOFOLLOW | O_DIRECTORY`` (a symlink planted in the destination
is refused, not followed), each file is written to a temporary name created with ``O_EXCL``
in its final directory, checked against the manifest digest, and only then renamed into
place. Nothing is ever written outside the destination, and a wrong byte is never visible.

Chunks are fetched in parallel (a window per file, several files at once, bounded by a byte
budget) and verified against their ids before they are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from replicator.codec import Buffer
from replicator.errors import IntegrityError, ReplicatorError
from replicator.globs import PathFilter
from replicator.manifest import FileEntry, Manifest, check_relative_path
from replicator.pipeline import ByteBudget
from replicator.progress import NoProgress, ProgressSink
from replicator.repository import Repository

log = structlog.get_logger(__name__)

FILES_IN_PARALLEL = 4
CHUNKS_IN_FLIGHT_PER_FILE = 8


class UnsafePathError(ReplicatorError):
    """A manifest path would escape the destination or pass through a symlink."""


@dataclass
class RestoreResult:
    files: int = 0
    bytes: int = 0
    skipped_existing: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def select_files(manifest: Manifest, include: Sequence[str] = ()) -> list[FileEntry]:
    if not include:
        return list(manifest.files)
    keep = PathFilter(include)
    return [f for f in manifest.files if keep(f.path)]


class LocalDestination:
    """A destination directory written through directory descriptors (see module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.root_fd)

    def _open_parent(self, path: str, create: bool) -> tuple[int, str]:
        """Return (fd of the parent directory, final name). The caller closes the fd."""
        check_relative_path(path)
        *dirs, name = path.split("/")
        fd = os.dup(self.root_fd)
        try:
            for d in dirs:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(d, 0o755, dir_fd=fd)
                try:
                    nfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafePathError(
                            f"{path}: component {d!r} is a symlink or not a directory"
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    def is_current(self, entry: FileEntry, digest: Callable[[], object]) -> bool:
        """True if a regular file with this entry's size and digest is already in place."""
        try:
            dir_fd, name = self._open_parent(entry.path, create=False)
        except (OSError, UnsafePathError):
            return False
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return False
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            if not (st.st_mode & 0o170000 == 0o100000 and st.st_size == entry.size):
                return False
            h = digest()
            while block := os.read(fd, 8 << 20):
                h.update(block)  # type: ignore[attr-defined]
            return bool(h.digest().hex() == entry.digest)  # type: ignore[attr-defined]
        finally:
            os.close(fd)

    def create_temp(self, path: str) -> tuple[int, int, str]:
        """Create an empty temporary file next to ``path``: (dir fd, file fd, temp name)."""
        dir_fd, name = self._open_parent(path, create=True)
        tmp = f".{name}.restore-{secrets.token_hex(6)}"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
            )
        except BaseException:
            os.close(dir_fd)
            raise
        return dir_fd, fd, tmp

    @staticmethod
    def commit(entry: FileEntry, dir_fd: int, fd: int, tmp: str) -> None:
        """Apply mode and mtime, make durable, and rename into place (replacing, never following,
        whatever is at the final name)."""
        name = entry.path.rsplit("/", 1)[-1]
        os.fchmod(fd, entry.mode & 0o777)  # setuid/setgid/sticky bits are never restored
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    @staticmethod
    def discard(dir_fd: int, tmp: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)


async def restore_snapshot(
    repo: Repository,
    manifest: Manifest,
    dest: Path,
    *,
    include: Sequence[str] = (),
    progress: ProgressSink | None = None,
    memory_budget: int = 256 << 20,
) -> RestoreResult:
    """Restore the selected files of ``manifest`` into the directory ``dest``."""
    progress = progress or NoProgress()
    started = time.monotonic()
    result = RestoreResult()
    files = select_files(manifest, include)
    destination = LocalDestination(dest)
    budget = ByteBudget(memory_budget)
    spec = repo.hash
    progress.begin("restoring", sum(f.size for f in files))

    async def restore_one(entry: FileEntry) -> None:
        if await asyncio.to_thread(destination.is_current, entry, spec.hasher):
            result.skipped_existing += 1
            progress.advance(entry.size)
            return
        dir_fd, fd, tmp = await asyncio.to_thread(destination.create_temp, entry.path)
        committed = False
        try:
            hasher = spec.hasher()
            window: deque[tuple[asyncio.Task[Buffer], int]] = deque()

            async def fetch(cid: str, size: int) -> Buffer:
                data = await repo.get_chunk(cid)
                if len(data) != size:
                    raise IntegrityError(f"chunk is {len(data)} bytes, manifest says {size}", key=cid)
                return data

            async def drain_one() -> None:
                task, size = window.popleft()
                try:
                    data = await task
                    hasher.update(data)
                    await asyncio.to_thread(os.write, fd, data)
                    progress.advance(size)
                finally:
                    budget.release(size)

            try:
                for cid, size in entry.chunks:
                    await budget.acquire(size)
                    window.append((asyncio.create_task(fetch(cid, size)), size))
                    if len(window) >= CHUNKS_IN_FLIGHT_PER_FILE:
                        await drain_one()
                while window:
                    await drain_one()
            finally:
                for task, size in window:
                    task.cancel()
                    budget.release(size)
            if hasher.digest().hex() != entry.digest:
                raise IntegrityError("restored bytes do not match the manifest digest", key=entry.path)
            await asyncio.to_thread(destination.commit, entry, dir_fd, fd, tmp)
            committed = True
            result.files += 1
            result.bytes += entry.size
        finally:
            os.close(fd)
            if not committed:
                destination.discard(dir_fd, tmp)
            os.close(dir_fd)

    queue: deque[FileEntry] = deque(files)

    async def worker() -> None:
        while queue:
            entry = queue.popleft()
            try:
                await restore_one(entry)
            except (ReplicatorError, OSError) as exc:
                message = str(exc) if isinstance(exc, ReplicatorError) else f"{exc.strerror or exc}"
                result.failures[entry.path] = message
                log.error("restore.failed", path=entry.path, error=message)

    try:
        await asyncio.gather(*(worker() for _ in range(FILES_IN_PARALLEL)))
    finally:
        progress.end()
        destination.close()
    result.seconds = time.monotonic() - started
    return result
