"""A target on a POSIX filesystem (local disk, NFS, a mounted volume).

Atomicity: every object is written to a hidden temporary file in its final directory,
fsynced, then renamed into place (or hard-linked, for create-if-absent). The directories
that received new names are fsynced by :meth:`PosixTarget.flush` (once per directory, not
once per object: for many small chunks that halves the fsyncs), which the repository calls
before writing anything that refers to earlier objects. Temporary names start with ``.`` and are
never listed; ones left by a crash are removed when older than an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from replicator.errors import (
    AlreadyExistsError,
    NotFoundError,
    PermanentTargetError,
    TargetError,
    TransientTargetError,
)
from replicator.targets.base import ObjectInfo, check_key

T = TypeVar("T")
_STALE_TMP_SECONDS = 3600
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


class PosixTarget:
    def __init__(self, name: str, root: str | Path, concurrency: int = 8) -> None:
        self.name = name
        self.root = Path(root)
        self.url = str(self.root)
        self._dirs_made: set[Path] = set()
        self._unsynced_dirs: set[Path] = set()
        # Its own threads, as many as requests may be in flight: the default executor is
        # shared with everything else and smaller.
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"posix-{name}")

    # -- helpers -------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def _run(self, op: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except TargetError:
            raise
        except FileNotFoundError as exc:
            raise NotFoundError("no such object", target=self.name, operation=op, key=key) from exc
        except OSError as exc:
            cls = PermanentTargetError if exc.errno in _PERMANENT_ERRNOS else TransientTargetError
            raise cls(
                exc.strerror or str(exc),
                target=self.name,
                operation=op,
                key=key,
                hint=f"check that {self.root} exists and is writable"
                if cls is PermanentTargetError
                else None,
            ) from exc

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._dirs_made:
            return
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            with contextlib.suppress(FileExistsError):
                m.mkdir()
            _fsync_dir(m.parent)
        self._dirs_made.add(directory)

    # -- protocol ------------------------------------------------------------------------

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        path = self._path(key)

        def write() -> None:
            if not self.root.is_dir():
                raise PermanentTargetError(
                    "target directory does not exist",
                    target=self.name,
                    operation="put",
                    key=key,
                    hint=f"create {self.root} or fix the target url",
                )
            self._ensure_dir(path.parent)
            tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(6)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                with os.fdopen(fd, "wb", closefd=True) as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if if_absent:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        raise AlreadyExistsError(
                            "object exists", target=self.name, operation="put", key=key
                        ) from None
                    finally:
                        os.unlink(tmp)
                else:
                    os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._unsynced_dirs.add(path.parent)

        await self._run("put", key, write)

    async def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)

        def read() -> bytes:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)

        return await self._run("get", key, read)

    async def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)

        def st() -> ObjectInfo | None:
            try:
                st = path.stat()
                return ObjectInfo(key, st.st_size, st.st_mtime)
            except FileNotFoundError:
                if not self.root.is_dir():
                    raise PermanentTargetError(
                        "target directory does not exist", target=self.name, operation="stat", key=key
                    ) from None
                return None

        return await self._run("stat", key, st)

    async def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        def scan() -> list[ObjectInfo]:
            if not self.root.is_dir():
                raise PermanentTargetError(
                    "target directory does not exist", target=self.name, operation="list", key=prefix
                )
            base_dir = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
            start = self.root / base_dir if base_dir else self.root
            out: list[ObjectInfo] = []
            now = time.time()
            for dirpath, dirnames, filenames in os.walk(start, onerror=_raise):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel_dir = os.path.relpath(dirpath, self.root)
                for fn in filenames:
                    full = os.path.join(dirpath, fn)
                    if fn.startswith("."):
                        _remove_stale_tmp(full, now)
                        continue
                    key = fn if rel_dir == "." else f"{rel_dir}/{fn}".replace(os.sep, "/")
                    if key.startswith(prefix) and (start_after is None or key > start_after):
                        try:
                            st = os.stat(full)
                            out.append(ObjectInfo(key, st.st_size, st.st_mtime))
                        except FileNotFoundError:
                            continue  # deleted while listing
            out.sort(key=lambda o: o.key.encode())
            return out

        for item in await self._run("list", prefix, scan):
            yield item

    async def delete(self, key: str) -> None:
        path = self._path(key)

        def rm() -> None:
            try:
                path.unlink()
            except FileNotFoundError:
                return
            _fsync_dir(path.parent)

        await self._run("delete", key, rm)

    async def flush(self) -> None:
        def sync() -> None:
            while self._unsynced_dirs:
                _fsync_dir(self._unsynced_dirs.pop())

        await self._run("flush", "", sync)

    async def close(self) -> None:
        self._pool.shutdown(wait=False)
        return


def _raise(exc: OSError) -> None:
    if isinstance(exc, FileNotFoundError):
        return  # a directory vanished between listing and descending: nothing below it
    raise exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # some filesystems cannot fsync dirs
            raise
    finally:
        os.close(fd)


def _remove_stale_tmp(path: str, now: float) -> None:
    if ".tmp-" not in path:
        return
    with contextlib.suppress(OSError):
        if now - os.stat(path).st_mtime > _STALE_TMP_SECONDS:
            os.unlink(path)
