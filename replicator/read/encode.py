"""The per-chunk CPU work of the read pipeline: hash, encode, self-check; and reading small
files whole.

Kept apart from :mod:`replicator.read.pipeline` (asyncio, the config models) because it also runs
in the small-file helper processes, which import only this, the codec and the source: a
helper then starts in ~0.1 s rather than ~0.25 s (:mod:`replicator.read.helper_main`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from replicator.errors import SourceError
from replicator.format.chunks import Buffer, ChunkEncoder
from replicator.hashing import HashSpec
from replicator.read.chunking import ChunkSizes, iter_chunks

if TYPE_CHECKING:
    from replicator.config import ChunkingConfig, CompressionConfig
    from replicator.sources.base import Source, SourceFile


class EncoderSettings(NamedTuple):
    """:class:`~replicator.format.chunks.ChunkEncoder`'s arguments (from ``compression`` in the config)."""

    level: int
    float_grouping: bool
    verify: bool


SmallFile = tuple[list[tuple[int, dict[str, str], bytes]], dict[str, str]]
"""A small file read whole and encoded: per chunk (length, ids per hash spec, stored form),
and the file's digest per hash spec."""


class ChunkCoder:
    """The per-chunk CPU work (hash, encode, self-check) and reading small files whole. It owns
    no threads or event loop, so it runs in worker threads or, pickled, in a helper process
    (:mod:`replicator.read.helper_main`); its zstd compressors are per thread and not sent."""

    def __init__(
        self, chunking: ChunkingConfig, compression: CompressionConfig, specs: Sequence[HashSpec]
    ) -> None:
        self.sizes = ChunkSizes(chunking.min_size, chunking.avg_size, chunking.max_size)
        self.settings = EncoderSettings(compression.level, compression.float_grouping, compression.verify)
        self.specs = tuple(specs)
        self.encoder = ChunkEncoder(*self.settings)

    # Sent as plain values: unpickling the config models would import pydantic in the helper.
    def __getstate__(self) -> tuple[ChunkSizes, EncoderSettings, tuple[HashSpec, ...]]:
        return self.sizes, self.settings, self.specs

    def __setstate__(self, state: tuple[ChunkSizes, EncoderSettings, tuple[HashSpec, ...]]) -> None:
        self.sizes, self.settings, self.specs = state
        self.encoder = ChunkEncoder(*self.settings)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChunkCoder) and self.__getstate__() == other.__getstate__()

    __hash__ = None  # type: ignore[assignment]

    def ids(self, data: Buffer) -> dict[str, str]:
        return {spec.key: spec.digest(data).hex() for spec in self.specs}

    def encode(self, data: Buffer, ids: dict[str, str] | None = None) -> tuple[dict[str, str], bytes]:
        ids = ids if ids is not None else self.ids(data)
        return ids, self.encoder.encode(data)

    def read_whole(self, source: Source, files: Sequence[SourceFile]) -> list[SmallFile | SourceError]:
        """Read each file whole, then encode its chunks; per file the result, or why it was not
        read (a FileChangedError, or another SourceError)."""
        out: list[SmallFile | SourceError] = []
        for file in files:
            try:
                pieces = self._slurp(source, file)
            except SourceError as exc:
                out.append(exc)
                continue
            except OSError as exc:
                out.append(
                    SourceError(f"read failed: {exc.strerror or exc}", operation="read", key=file.path)
                )
                continue
            chunks = [(len(p), *self.encode(p)) for p in pieces]
            # A file of one chunk has that chunk's id as its digest (same function, same seed).
            out.append((chunks, dict(chunks[0][1]) if len(chunks) == 1 else self._digests(pieces)))
        return out

    def _slurp(self, source: Source, file: SourceFile) -> list[memoryview]:
        handle = source.open(file)
        try:
            pieces = list(iter_chunks(handle, self.sizes, file.size))
            source.confirm(file, handle)
        finally:
            handle.close()
        return pieces

    def _digests(self, pieces: list[memoryview]) -> dict[str, str]:
        out = {}
        for spec in self.specs:
            hasher = spec.hasher()
            for piece in pieces:
                hasher.update(piece)
            out[spec.key] = hasher.digest().hex()
        return out
