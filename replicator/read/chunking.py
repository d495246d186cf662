"""Content-defined chunking with FastCDC (Xia et al., 2020) via pyfastcdc.

Chunk boundaries depend only on content, so an insertion early in a file moves only the
chunks around it and the rest deduplicate.

Reading is streaming and zero-copy: the file is read in blocks of ``2 * max_size`` into a
fresh buffer (the read releases the GIL), cut with pyfastcdc's ``cut_buf`` (GIL released),
and chunks are handed out as memoryviews into that block. A cut is only made where at least
``max_size`` bytes follow the chunk start (or at end of file), so boundaries are exactly those
of a one-pass stream cutter. The unfinished tail is re-read at the start of the next block
(seekable files: the kernel copies it, not Python) or carried over by copying (streams).
Memory per file is two blocks. Blocks are numpy buffers (not zeroed before the read); blocks
of small files are plain bytearrays, so that a tree of small files never imports numpy.
Full-size blocks can come from a :class:`BlockPool`, which reuses a block once no chunk of it
is alive: a fresh block's pages are zeroed by the kernel on first touch (~6 % of a sync's CPU).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, NamedTuple

from pyfastcdc import FastCDC

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from replicator.config import ChunkingConfig
    from replicator.sources.base import Readable

NORMALIZED_CHUNKING: Literal[1] = 1
"""FastCDC's NC level (paper section 3.5); recorded in each repository's config."""


class ChunkSizes(NamedTuple):
    """FastCDC's size bounds as plain values (``chunking`` in the config is a pydantic model,
    which the small-file helper processes do without)."""

    min_size: int
    avg_size: int
    max_size: int


_SMALL_BLOCK = 64 << 10
"""Up to this size a block is a bytearray: zeroing it costs under a microsecond (measured)."""


def _new_block(size: int) -> memoryview:
    """A fresh writable buffer of ``size`` bytes for the next read."""
    if size <= _SMALL_BLOCK:
        return memoryview(bytearray(size))
    import numpy as np  # ~70 ms to import, worth it only when a block is big enough to matter

    # np.empty, unlike bytearray, does not zero the block first: the read overwrites it.
    return np.empty(size, dtype=np.uint8).data


class BlockPool:
    """Read blocks of one size, reused once nothing refers to them.

    A block is handed out as the memoryview of a fresh numpy view of a pooled base array.
    Every chunk is a memoryview slice of it, and every buffer taken from those (numpy,
    zstd, hashing, in any thread) holds a reference, so the view array dies exactly when
    the last user of the block's bytes is gone; a finalizer then puts the base back. The
    numpy view itself never leaves this class: numpy slices of it would refer to the base
    directly and could outlive it. Appends and pops of the free list are atomic under the
    GIL, so readers and encoder threads need no lock (racing returns may keep a block or
    two more than ``keep``).

    At most ``keep`` free blocks are kept, and only between a reader's :meth:`enter` and
    the last :meth:`leave`, so an idle daemon does not hold them."""

    def __init__(self, size: int, keep: int) -> None:
        self.size, self.keep = size, keep
        self._free: list[npt.NDArray[np.uint8]] = []
        self._readers = 0

    def take(self) -> memoryview:
        """A writable block of :attr:`size` bytes (contents undefined)."""
        try:
            base = self._free.pop()
        except IndexError:
            import numpy as np

            base = np.empty(self.size, dtype=np.uint8)
        view = base[:]
        weakref.finalize(view, self._give_back, base)
        return view.data

    @property
    def kept(self) -> int:
        """Free blocks held now."""
        return len(self._free)

    def _give_back(self, base: npt.NDArray[np.uint8]) -> None:
        if self._readers and len(self._free) < self.keep:
            self._free.append(base)

    def enter(self) -> None:
        """A reader starts using the pool."""
        self._readers += 1

    def leave(self) -> None:
        """A reader is done; the last one out frees the kept blocks."""
        self._readers -= 1
        if not self._readers:
            self._free.clear()


def fill(stream: Readable, view: memoryview) -> int:
    """Read until ``view`` is full or the stream ends; return the bytes read."""
    filled = 0
    while filled < len(view):
        n = stream.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def iter_chunks(
    stream: Readable,
    params: ChunkingConfig | ChunkSizes,
    size_hint: int | None = None,
    blocks: BlockPool | None = None,
) -> Iterator[memoryview]:
    """Yield the chunks of ``stream`` in order, as read-only views that stay valid.

    ``size_hint`` (the expected length) sizes the first block, so a small file costs memory
    in proportion to its size; a stream longer than the hint is still read to its end.
    Blocks of ``blocks.size`` bytes come from ``blocks`` when given (unless they are small
    enough to be bytearrays)."""
    if size_hint is not None and size_hint < params.min_size and stream.seekable():
        # FastCDC never cuts below min_size, so a file this small is one chunk: no cutter, no
        # block (for 20,000 small files, setting those up was a third of the read cost).
        buf = bytearray(size_hint + 1)
        filled = fill(stream, memoryview(buf))
        if filled <= size_hint:
            if filled:
                yield memoryview(buf)[:filled].toreadonly()
            return
        stream.seek(0)  # it grew: cut it like any other file
    cdc = FastCDC(
        params.avg_size,
        min_size=params.min_size,
        max_size=params.max_size,
        normalized_chunking=NORMALIZED_CHUNKING,
    )
    seekable = stream.seekable()
    block_size = 2 * params.max_size
    offset = 0  # file offset of the block's first byte
    carry: memoryview | None = None
    size = block_size if size_hint is None else min(block_size, size_hint + 1)
    while True:
        if blocks is not None and size == blocks.size > _SMALL_BLOCK:
            view = blocks.take()
        else:
            view = _new_block(size)
        start = 0
        if carry is not None:
            if seekable:
                stream.seek(offset)
            else:
                view[: len(carry)] = carry
                start = len(carry)
        filled = start + fill(stream, view[start:])
        eof = filled < size
        size = block_size
        data = view[:filled].toreadonly()
        consumed = filled
        for chunk in cdc.cut_buf(data):
            if not eof and filled - chunk.offset < params.max_size:
                consumed = chunk.offset  # may have been cut short: cut it again with more data
                break
            yield data[chunk.offset : chunk.offset + chunk.length]
        if eof:
            return
        carry = data[consumed:]
        offset += consumed
