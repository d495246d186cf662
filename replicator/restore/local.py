"""A destination directory on the local filesystem (or NFS): how restored files are written
safely and made durable. The restore algorithm itself is :mod:`replicator.restore.core`.

Safety. Manifests come from the target and are untrusted. Besides the path checks done when a
manifest is parsed, files are written relative to directory descriptors: every directory
component is opened with ``O_NOFOLLOW | O_DIRECTORY`` (a symlink planted in the destination
is refused, not followed; this is the race-free form of checking each component with
``lstat``), each file is written to a temporary name created with ``O_EXCL`` in its final
directory, checked against the manifest digest, and only then renamed into place. Nothing is
ever written outside the destination, and a wrong byte is never visible.

Durability is made once, at the end, not per file: files are renamed into place without an
fsync, and before :func:`~replicator.restore.core.restore_snapshot` returns, one ``syncfs(2)``
on the destination's filesystem writes back every restored file's data and inode and every
new directory entry (:meth:`LocalDestination.flush`). Each write of a file restored chunk by
chunk starts writeback of its pages at once, without waiting (:class:`_LocalFile`), so the
disk works while later chunks are fetched and the flush has little left to do; no file waits
for its own writeback. Small files are left to the flush, which writes them together. Success
still means durable: a restore that reported success survives a power cut. A crash *during* a
restore may leave renamed files torn (the right name and size, wrong bytes), but that restore
never reported success, and running it again repairs them, because an existing file is
skipped only if its content hashes to the manifest digest (a matching size or mtime is never
enough). ``sync=False`` (``restore --no-sync``, and drills into a temporary scratch directory)
skips both and leaves writeback to the OS, as restic and rclone do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from replicator.errors import ReplicatorError
from replicator.format.chunks import Buffer
from replicator.format.manifest import FileEntry
from replicator.hashing import HashSpec
from replicator.paths import check_relative_path, decode_path, display_path, encode_path

Found = Literal["absent", "same", "different"]
"""What a destination holds at a file's name: nothing; exactly the entry's bytes (checked by
hashing them); or something else (other bytes, or, unless its content was asked about,
anything at all)."""


class UnsafePathError(ReplicatorError):
    """A manifest path would escape the destination or pass through a symlink."""


class ExistsError(ReplicatorError):
    """A file appeared at the name while it was being restored with ``--overwrite never``: it
    is left as it is."""


def _libc(name: str) -> Any:
    """A libc function; None where there is none (``syncfs`` and ``sync_file_range`` are
    Linux's, ``syncfs`` since glibc 2.14)."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    function = _libc("sync_file_range")
    if function is not None:
        function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)  # off64_t
    typed: Callable[[int, int, int, int], int] | None = function
    return typed


_syncfs: Callable[[int], int] | None = _libc("syncfs")
_sync_file_range = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2
"""Start writeback of the range's dirty pages and return without waiting for it."""


def sync_filesystem(fd: int) -> None:
    """Write back everything dirty on the filesystem holding ``fd`` (data, inodes, directory
    entries) and wait for it: ``syncfs(2)``, or ``sync(2)`` where syncfs is unavailable (which
    flushes every filesystem, and on some systems only schedules the writes).

    Since Linux 5.8 syncfs reports a writeback error (EIO, ENOSPC) that happened on the
    filesystem after ``fd`` was opened; it is raised as OSError."""
    if _syncfs is None:
        os.sync()
    elif _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class LocalDestination:
    """A destination directory written through directory descriptors (see module docstring)."""

    def __init__(self, root: Path, spec: HashSpec, *, write_behind: bool = True, create: bool = True) -> None:
        """``write_behind``: start writing each file's pages to disk as they are written (see
        :class:`_LocalFile`), for a restore that will be flushed. ``create=False`` (a dry run):
        never create ``root``; a missing ``root`` holds nothing, and nothing may be written."""
        self.root = root
        self.url = str(root)
        self.spec = spec
        self.write_behind = write_behind
        self.root_fd = self._root_dev = -1
        try:
            if create:
                root.mkdir(parents=True, exist_ok=True)
            elif not root.exists():
                self._other_filesystem = False
                return  # nothing there yet (a dry run): every file is absent
            # Opened before anything is written, so that syncfs on it reports every writeback
            # error of this restore.
            self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:  # a file where the directory should be, no permission, ...
            raise ReplicatorError(
                exc.strerror or str(exc), operation="open destination directory", key=self.url
            ) from exc
        self._root_dev = os.fstat(self.root_fd).st_dev
        # Set when a file is created on another device than the root (a filesystem mounted
        # below it), which syncfs on the root's filesystem may not reach.
        self._other_filesystem = False

    async def flush(self) -> None:
        """One ``syncfs(2)`` on the destination's filesystem, in a thread. It covers the
        directories that received new names too (their entries are metadata of the same
        filesystem), so no directory is fsynced separately. If a file landed on another device
        (a filesystem mounted below the root), ``sync(2)`` instead, which covers every one."""

        def flush() -> None:
            if self._other_filesystem:
                os.sync()
            else:
                sync_filesystem(self.root_fd)

        try:
            await asyncio.to_thread(flush)
        except OSError as exc:
            raise ReplicatorError(
                f"restored files may not be on disk: {exc.strerror or exc}",
                operation="sync",
                key=self.url,
                hint="check the disk, then run the restore again: it re-checks every file",
            ) from exc

    async def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)

    def cannot_hold(self, path: str) -> str | None:
        return None  # POSIX takes any safe relative path: names are bytes, written as they are

    def _open_parent(self, path: str, create: bool, opened: dict[str, int] | None = None) -> tuple[int, str]:
        """Return (fd of the parent directory, final name). The caller closes the fd.
        ``opened``: parent directories already opened in this batch of files (by path; the
        caller closes them), reused instead of walking the path again."""
        check_relative_path(path)
        parent, _, name = path.rpartition("/")
        if opened is not None and parent in opened:
            if opened[parent] < 0:
                raise FileNotFoundError(errno.ENOENT, "no such directory", parent)
            return os.dup(opened[parent]), name
        try:
            fd, name = self._walk(path, create)
        except FileNotFoundError:
            if opened is not None and parent:
                opened[parent] = -1  # a fresh destination: its directories are not there yet
            raise
        if opened is not None and parent:
            opened[parent] = os.dup(fd)
        return fd, name

    def _walk(self, path: str, create: bool) -> tuple[int, str]:
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
            if create and os.fstat(fd).st_dev != self._root_dev:
                self._other_filesystem = True  # files go where this directory's filesystem is
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    def open_regular(self, path: str) -> int:
        """Open an existing regular file for reading without following any symlink on the way;
        OSError or UnsafePathError otherwise. The caller closes the fd."""
        dir_fd, name = self._open_parent(path, create=False)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        if os.fstat(fd).st_mode & 0o170000 != 0o100000:
            os.close(fd)
            raise UnsafePathError(f"{path}: not a regular file")
        return fd

    def _examine(self, entry: FileEntry, content: bool, opened: dict[str, int] | None = None) -> Found:
        # Always hash to call a file "same": a file torn by a crash before the flush has the
        # right name, size and mtime; only its bytes tell, and re-running the restore must
        # repair it.
        if self.root_fd < 0:
            return "absent"
        try:
            dir_fd, name = self._open_parent(entry.path, create=False, opened=opened)
        except FileNotFoundError:
            return "absent"
        except (OSError, UnsafePathError):
            return "different"  # a symlink or a file where a directory belongs: writing fails alone
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return "absent"
        finally:
            os.close(dir_fd)
        if not content or st.st_mode & 0o170000 != 0o100000 or st.st_size != entry.size:
            return "different"
        try:
            fd = self.open_regular(entry.path)
        except (OSError, UnsafePathError):
            return "different"
        try:
            h = self.spec.hasher()
            while block := os.read(fd, 8 << 20):
                h.update(block)
            return "same" if h.digest().hex() == entry.digest else "different"
        finally:
            os.close(fd)

    async def examine(self, entry: FileEntry, content: bool = True) -> Found:
        return await asyncio.to_thread(self._examine, entry, content)

    def _create_temp(self, path: str, opened: dict[str, int] | None = None) -> tuple[int, int, str]:
        """Create an empty temporary file next to ``path``: (dir fd, file fd, temp name)."""
        dir_fd, name = self._open_parent(path, create=True, opened=opened)
        tmp = temporary_name(name, "restore")
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
            )
        except BaseException:
            os.close(dir_fd)
            raise
        return dir_fd, fd, tmp

    async def create(self, entry: FileEntry, replace: bool = True) -> _LocalFile:
        dir_fd, fd, tmp = await asyncio.to_thread(self._create_temp, entry.path)
        return _LocalFile(entry, dir_fd, fd, tmp, self.write_behind, replace)

    # Small files: one thread hop per batch, not four per file (20,000 small files spent most
    # of their restore handing the GIL between threads), and each parent directory opened
    # once per batch, not walked again for every file in it.

    async def examine_many(self, entries: Sequence[FileEntry], content: bool = True) -> list[Found]:
        def examine() -> list[Found]:
            with _batch() as opened:
                return [self._examine(e, content, opened) for e in entries]

        return await asyncio.to_thread(examine)

    async def write_whole(
        self, files: Sequence[tuple[FileEntry, Buffer]], replace: bool = True
    ) -> list[Exception | None]:
        def write() -> list[Exception | None]:
            with _batch() as opened:
                return [self._write_whole(entry, data, replace, opened) for entry, data in files]

        return await asyncio.to_thread(write)

    def _write_whole(
        self, entry: FileEntry, data: Buffer, replace: bool, opened: dict[str, int]
    ) -> Exception | None:
        try:
            dir_fd, fd, tmp = self._create_temp(entry.path, opened)
        except (OSError, ReplicatorError) as exc:
            return exc
        # No write-behind for a small file: starting writeback per file turns one flush of
        # many files into thousands of small writes (it doubled the system time of 20,000
        # files); the final flush writes them together.
        file = _LocalFile(entry, dir_fd, fd, tmp, False, replace)
        try:
            file.write_now(data)
            file.commit_now()
        except (OSError, ExistsError) as exc:
            file.discard_now()
            return exc
        file.close()
        return None


class _LocalFile:
    """A file being restored under a temporary name.

    With ``write_behind``, each write also starts writeback of the pages it dirtied, without
    waiting (``sync_file_range``, Linux only): the disk then works while later chunks are
    fetched and decoded, and the final flush has little left to do. Without it, a restore
    smaller than the kernel's background-writeback threshold (10 % of memory by default) would
    stay entirely in the page cache until the flush, and then wait for all of it at once."""

    def __init__(
        self, entry: FileEntry, dir_fd: int, fd: int, tmp: str, write_behind: bool, replace: bool = True
    ) -> None:
        self.entry, self.dir_fd, self.fd, self.tmp = entry, dir_fd, fd, tmp
        self.replace = replace
        self.start_writeback = _sync_file_range if write_behind else None
        self.written = 0

    async def write(self, data: Buffer) -> None:
        await asyncio.to_thread(self.write_now, data)

    def write_now(self, data: Buffer) -> None:
        view = memoryview(data)
        while view:  # os.write may write less than asked (a full disk, a signal)
            view = view[os.write(self.fd, view) :]
        if self.start_writeback is not None and len(data):
            # Only a hint (durability comes from the flush): its result is ignored, and a
            # writeback error shows in the final flush.
            self.start_writeback(self.fd, self.written, len(data), SYNC_FILE_RANGE_WRITE)
        self.written += len(data)

    def commit_now(self) -> None:
        # Mode and mtime first, then the rename, which replaces (never follows) whatever is at
        # the final name. No fsync: the destination's flush makes every file durable at once.
        name = self.entry.path.rsplit("/", 1)[-1]
        os.fchmod(self.fd, self.entry.mode & 0o777)  # setuid/setgid/sticky bits are never restored
        os.utime(self.fd, ns=(self.entry.mtime_ns, self.entry.mtime_ns))
        if self.replace:
            os.rename(self.tmp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            return
        # Never replace: a hard link fails if the name exists, even if it appeared after the
        # restore looked (a rename would silently replace it). Where hard links are not
        # supported, check and rename (a file appearing in between is then replaced).
        appeared = f"{display_path(self.entry.path)} appeared during the restore: left as it is"
        try:
            os.link(self.tmp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise ExistsError(appeared) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                raise
            if _exists(name, self.dir_fd):
                raise ExistsError(appeared) from None
            os.rename(self.tmp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            return
        os.unlink(self.tmp, dir_fd=self.dir_fd)

    async def commit(self) -> None:
        await asyncio.to_thread(self.commit_now)
        self.close()

    async def discard(self) -> None:
        self.discard_now()

    def discard_now(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp, dir_fd=self.dir_fd)
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            os.close(self.dir_fd)
            self.fd = -1


@contextlib.contextmanager
def _batch() -> Iterator[dict[str, int]]:
    """Directory fds opened for one batch of small files (-1: found missing), closed when it
    ends."""
    opened: dict[str, int] = {}
    try:
        yield opened
    finally:
        for fd in opened.values():
            if fd >= 0:
                os.close(fd)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def temporary_name(name: str, tag: str) -> str:
    """``.<name>.<tag>-<random>``, next to ``name``: hidden, recognisable, unique. The name is
    cut (by bytes) so that the whole stays within 255 bytes: a 255-byte name is legal."""
    suffix = f".{tag}-{secrets.token_hex(6)}"
    room = 255 - 1 - len(suffix)
    raw = encode_path(name)
    return "." + (name if len(raw) <= room else decode_path(raw[:room])) + suffix
