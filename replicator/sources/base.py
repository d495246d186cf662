"""The source protocol: where the primary's files come from (a POSIX directory or an S3 prefix).

A source lists its files with a change-detection *signature* (POSIX: size, mtime, ctime and
inode; S3: ETag and size) and opens them for streaming reads inside a worker thread. After a
read, :meth:`Source.confirm` proves that what was read is the version that was scanned; a file
that changed meanwhile raises :class:`~replicator.errors.FileChangedError` and is read again
later, never recorded torn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Readable(Protocol):
    """What a source hands the chunker: a binary stream read with ``readinto``."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...
    def seekable(self) -> bool: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class SourceFile:
    path: str
    """Relative POSIX path below the source root (or prefix)."""
    size: int
    mtime_ns: int
    mode: int
    signature: str
    """Changes whenever the content may have changed."""


@dataclass
class Listing:
    """What a scan found: the selected regular files, and what it could not look at.

    ``unreadable`` names directories that could not be listed and files that could not be
    examined: their contents are *unknown* this time, not deleted, so whatever an earlier
    snapshot holds below them is carried forward (replicator.reconcile). ``ignored`` names
    entries replicator does not copy by design (symbolic links, FIFOs, sockets, devices):
    reported, and never an error."""

    files: list[SourceFile] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    """Path -> why it could not be examined."""
    ignored: dict[str, str] = field(default_factory=dict)
    """Path -> why it is not replicated."""


class Source(Protocol):
    name: str
    url: str
    read_concurrency: int
    """How many files (or batches of small files) to read at once. Reads from an object store
    wait on the network and gain from overlap; local reads are CPU work that contends for the
    GIL, where more than two at once only adds thread hand-offs."""
    read_in_helper: bool
    """Whether :meth:`open` and :meth:`confirm` work in another process (plain file system
    calls on a pickled copy of the source), so that many small files may be read and encoded
    in a helper process (:mod:`replicator.read.helpers`)."""

    async def scan(self, found: Callable[[SourceFile], None] | None = None) -> Listing:
        """Every selected (include/exclude) regular file, sorted by path, and what could not be
        examined. Raises SourceError if the source itself cannot be listed: an unreadable
        source is not an empty one. A problem below the root never raises: it is reported in
        the listing, and the rest of the scan goes on.

        ``found`` is called with each file as the scan finds it, from the scanning thread (so
        that work can start before a long scan ends)."""
        ...

    async def scan_below(self, path: str) -> Listing:
        """The same for ``path`` (a file) or what is below it (a directory); empty if it does
        not exist. Used to refresh the daemon's index from change events."""
        ...

    async def stat(self, path: str) -> SourceFile | None:
        """The current description of one file, or None if it no longer exists (or is no
        longer a selected regular file)."""
        ...

    def open(self, file: SourceFile) -> Readable:
        """Open for a sequential read (called in a worker thread). Raises SourceError."""
        ...

    def confirm(self, file: SourceFile, handle: Readable) -> None:
        """After reading ``handle`` to its end, raise FileChangedError unless the bytes read are
        exactly the version described by ``file`` (called in the worker thread)."""
        ...

    async def close(self) -> None: ...
