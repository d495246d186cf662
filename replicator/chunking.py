"""Content-defined chunking with FastCDC (Xia et al., 2020) via pyfastcdc.

Chunk boundaries depend only on content, so an insertion early in a file moves only the
chunks around it and the rest deduplicate. Reading is streaming: pyfastcdc keeps a buffer of
twice ``max_size`` and cuts with the GIL released; each chunk is copied out before the next
cut, so memory per file being read is bounded by ~3 x ``max_size``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Literal

from pyfastcdc import FastCDC

from replicator.config import ChunkingConfig

NORMALIZED_CHUNKING: Literal[1] = 1
"""FastCDC's NC level (paper section 3.5); recorded in each repository's config."""


def iter_chunks(stream: BinaryIO, params: ChunkingConfig) -> Iterator[bytes]:
    """Yield the chunks of ``stream`` in order, each as an independent ``bytes`` object."""
    cdc = FastCDC(
        params.avg_size,
        min_size=params.min_size,
        max_size=params.max_size,
        normalized_chunking=NORMALIZED_CHUNKING,
    )
    for chunk in cdc.cut_stream(stream):
        yield bytes(chunk.data)  # the view is only valid until the next cut
