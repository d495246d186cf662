"""The storage target protocol: a flat store of immutable-by-convention objects.

Every backend implements these five operations and nothing else; multi-step algorithms
(the repository, sync, verify) are plain functions over the protocol.

Keys are relative, ``/``-separated paths whose segments use ``[A-Za-z0-9._-]``, do not start
with ``.`` and are never ``..`` (see :func:`check_key`). Backends may rely on that.

Error contract for every operation: :class:`~replicator.errors.NotFoundError` only when the
backend positively reports that the object does not exist;
:class:`~replicator.errors.TransientTargetError` (or its subclass
``TargetUnreachableError``) when retrying may help; :class:`~replicator.errors.PermanentTargetError`
when it cannot (credentials, missing bucket, permissions). Nothing else escapes.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float | None = None
    """When the object was last written, in Unix seconds by the *storage's* clock (POSIX
    ``st_mtime``, S3 ``LastModified``); None if the backend does not say. Garbage collection
    compares these with each other, never with the local clock (replicator.gc)."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a well-formed object key, else raise ValueError."""
    parts = key.split("/")
    if not key or any(not _SEGMENT.match(p) for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


@runtime_checkable
class Target(Protocol):
    """What the repository needs from a storage backend."""

    name: str
    """The configured target name (used in errors, logs and metrics)."""
    url: str
    """Where it is, for humans: a directory or ``s3://bucket/prefix``."""

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Store ``data`` under ``key`` atomically: readers see the old object, or the whole new
        one, never a prefix. Idempotent when repeated with the same bytes. With ``if_absent``,
        raise AlreadyExistsError if the key exists; backends that cannot enforce this
        atomically (some S3-compatible servers) degrade to last-writer-wins, which callers
        must tolerate."""
        ...

    async def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes, or ``length`` bytes from ``offset``. Raises NotFoundError."""
        ...

    async def stat(self, key: str) -> ObjectInfo | None:
        """Return the object's size, or None if it positively does not exist."""
        ...

    def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix``, in ascending byte order of keys,
        beginning after ``start_after``. Raises (never ends early) if the listing fails: a
        short listing must not look like an empty repository."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; deleting a missing object is not an error."""
        ...

    async def flush(self) -> None:
        """Make every ``put`` that has returned durable across a power cut. A put is atomic
        when it returns but may be durable only after ``flush`` (POSIX: directory entries are
        fsynced here, in one batch). Writers flush before writing an object that refers to
        earlier ones (the write-order protocol, docs/FORMAT.md section 7)."""
        ...

    async def close(self) -> None:
        """Release connections. The target must not be used afterwards."""
        ...
