"""Chunk object encoding: how a chunk's bytes are stored (docs/FORMAT.md, "Chunk objects").

A stored chunk is one codec byte followed by its payload:

* ``0x00`` raw: the chunk's bytes as they are;
* ``0x01`` zstd: one zstd frame;
* ``0x02`` grouped: byte-grouped streams for arrays of fixed-width numbers. Byte 1 is the
  width ``w`` (2..8); then ``w`` stream records, each ``codec u8 (0 raw, 1 zstd) | length
  u32 LE | bytes``. Stream ``i`` holds bytes ``i, i+w, i+2w, ...`` of the chunk.

Why grouping: bf16 weights compress ~1.28x with plain zstd because every second byte is
near-random mantissa; their sign/exponent bytes alone compress ~2.9x (ZipNN, Hershcovitch
et al. 2024, reports the same effect). The sign/exponent stream has few distinct values and
almost no long repeats, so it is coded with a parameter set that leans on entropy coding
(min match 7, tiny hash table): as small as level 1 and ~3x faster.

The encoder probes samples of each chunk with each candidate and keeps the smallest; data
that does not compress is stored raw without compressing it whole.

Self-check (restic#4523: a compressor bug must never store an object that does not decode to
its input): unless disabled, the encoder decompresses every zstd frame it stores and compares
it byte for byte with the bytes it compressed (the whole chunk, or one stream). The rest of
the object is raw bytes, headers and the stream split, plain code covered by round-trip tests,
so re-joining the streams and re-hashing the chunk would add cost but no coverage.
"""

from __future__ import annotations

import struct
import threading

import zstandard

from replicator.errors import IntegrityError

RAW, ZSTD, GROUPED = 0, 1, 2
Buffer = bytes | memoryview
"""Chunk bytes travel as zero-copy views where possible; both support len(), hashing, writing."""

MAX_CHUNK_SIZE = 16 << 20
"""Largest chunk the format allows (FastCDC's max_size ceiling)."""

_SAMPLE = 32 << 10
_MIN_GAIN = 0.97  # keep an encoding only if it saves at least 3 %
_GROUP_WIDTHS = (2, 4)
_STREAM_HEADER = struct.Struct("<BI")

_ENTROPY_PARAMS = zstandard.ZstdCompressionParameters(
    window_log=17,
    hash_log=6,
    chain_log=6,
    search_log=1,
    min_match=7,
    target_length=0,
    strategy=zstandard.STRATEGY_FAST,
)


_decoding = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor: making one per chunk cost 22 µs against 3.5 µs for the
    decompression of a 2 KiB chunk itself (measured), which small-file restores paid per file."""
    d: zstandard.ZstdDecompressor | None = getattr(_decoding, "zstd", None)
    if d is None:
        d = _decoding.zstd = zstandard.ZstdDecompressor()
    return d


class ChunkEncoder:
    """Encodes chunks; one instance is shared by worker threads (compressors are per thread).

    With ``verify``, every stored zstd frame is decompressed and compared with its input first
    (see the module docstring); a mismatch raises IntegrityError."""

    def __init__(self, level: int = 3, float_grouping: bool = True, verify: bool = True) -> None:
        self.level = level
        self.widths = _GROUP_WIDTHS if float_grouping else ()
        self.verify = verify
        self._local = threading.local()

    def _compressors(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdCompressor]:
        pair = getattr(self._local, "pair", None)
        if pair is None:
            pair = (
                zstandard.ZstdCompressor(level=self.level),
                zstandard.ZstdCompressor(compression_params=_ENTROPY_PARAMS),
            )
            self._local.pair = pair
        return pair

    def _checked(self, frame: bytes, original: Buffer) -> bytes:
        """``frame``, once it is known to decompress to exactly ``original`` (if verifying)."""
        if not self.verify:
            return frame
        try:
            back = _decompressor().decompress(frame)
        except zstandard.ZstdError:
            back = None
        # bytes.startswith compares with memcmp; bytes == memoryview would fall back to
        # memoryview's item-by-item comparison (~30x slower, measured).
        if back is None or len(back) != len(original) or not back.startswith(original):
            raise IntegrityError("encoded chunk does not decode to its input", operation="encode")
        return frame

    def encode(self, data: Buffer) -> bytes:
        """Return the stored form of ``data`` (never larger than ``len(data) + 1``)."""
        n = len(data)
        if n > MAX_CHUNK_SIZE:
            raise ValueError(f"chunk of {n} bytes exceeds the format's {MAX_CHUNK_SIZE}")
        if n < 256:
            return bytes([RAW]) + data
        width, out, squeeze = self._choose(data)
        if width == 0:
            return bytes([RAW]) + data
        if width == 1:
            out = out or self._compressors()[0].compress(data)
            if len(out) < n * _MIN_GAIN:
                return bytes([ZSTD]) + self._checked(out, data)
            return bytes([RAW]) + data
        return self._grouped(data, width, squeeze) or bytes([RAW]) + data

    def _choose(self, data: Buffer) -> tuple[int, bytes, list[bool]]:
        """0 = raw, 1 = plain zstd, w >= 2 = grouped by width w; decided on samples. Also
        returns the plain zstd frame of the whole chunk when the sample was the whole chunk
        (small chunks: saves compressing them twice), else b""; and for grouping, which
        streams shrank in the sample (the others are stored raw without trying)."""
        n = len(data)
        whole = n <= 3 * _SAMPLE
        if whole:
            sample = data
        else:
            mid = (n // 2) & ~7
            end = (n - _SAMPLE) & ~7
            sample = b"".join((data[:_SAMPLE], data[mid : mid + _SAMPLE], data[end : end + _SAMPLE]))
        plain, entropy = self._compressors()
        best_width, best = 0, len(sample) * _MIN_GAIN
        frame = plain.compress(sample)
        size = len(frame)
        if size < best:
            best_width, best = 1, size
        if not whole:
            frame = b""
        if size < len(sample) // 2:
            # Highly compressible (text, zeros, repeated records): plain zstd's long matches win,
            # and float tensors never get here (their plain ratio is ~1.1-1.3x).
            return best_width, frame, []
        # Chunks below _SMALL are small files (JSON, configs, tokenizer files); a tensor that
        # small gains a few hundred bytes at most from grouping, and probing cost ~20 % of the
        # CPU of syncing 20,000 small files.
        squeeze: list[bool] = []
        for w in self.widths if n >= _SMALL else ():
            streams = split_streams(sample, w)
            sizes = [len(entropy.compress(s)) for s in streams]
            if sum(sizes) < best * _MIN_GAIN:  # grouping must clearly beat plain zstd
                best_width, best = w, sum(sizes)
                squeeze = [z < len(s) for z, s in zip(sizes, streams, strict=True)]
        return best_width, frame, squeeze

    def _grouped(self, data: Buffer, width: int, squeeze: list[bool]) -> bytes:
        """The grouped form of ``data``, or b"" if it would not save enough to be kept.

        Streams that did not shrink in the sample are stored raw without compressing them:
        for near-random bytes (bf16 mantissas) zstd spends a histogram and a copy for nothing.
        On the benchmark's 1 GiB no stream that failed in its sample shrank as a whole."""
        entropy = self._compressors()[1]
        parts: list[Buffer] = [bytes([GROUPED, width])]
        frames: list[tuple[bytes, Buffer]] = []
        for stream, worth_trying in zip(split_streams(data, width), squeeze, strict=True):
            packed = entropy.compress(stream) if worth_trying else b""
            if worth_trying and len(packed) < len(stream):
                parts += [_STREAM_HEADER.pack(ZSTD, len(packed)), packed]
                frames.append((packed, stream))
            else:
                parts += [_STREAM_HEADER.pack(RAW, len(stream)), stream]
        if sum(len(p) for p in parts) >= len(data) * _MIN_GAIN:
            return b""
        for packed, stream in frames:  # only frames that will be stored are worth checking
            self._checked(packed, stream)
        return b"".join(parts)


_WORD = {2: "<u2", 4: "<u4", 8: "<u8"}
"""numpy dtypes of the widths that are split as little-endian words."""

_SMALL = 16 << 10
"""Below this many bytes, streams are split and joined by slicing bytes, without numpy: as fast
or faster at these sizes (measured), and a process syncing small files then never pays the
~70 ms of importing numpy."""


def split_streams(data: Buffer, width: int) -> list[Buffer]:
    """Stream i = data[i::width], as buffers.

    For widths 2, 4 and 8 the data is viewed as little-endian words and byte i is
    ``word >> 8i`` truncated to a byte: contiguous vector passes, 3.5x faster than a strided
    transpose (which remains the path for other widths)."""
    n = len(data)
    if n < _SMALL:
        raw = bytes(data)
        return [raw[i::width] for i in range(width)]
    import numpy as np  # see _SMALL

    count = n // width
    extra = n - count * width  # the first `extra` streams get one more byte
    src = np.frombuffer(data, dtype=np.uint8)
    words = src[: count * width].view(_WORD[width]) if width in _WORD else None
    streams: list[Buffer] = []
    for i in range(width):
        row = np.empty(count + (i < extra), dtype=np.uint8)
        if words is not None:
            # Shifted straight into the byte row (the unsafe cast truncates to the low byte), no
            # word-sized temporary per stream: splitting the benchmark's chunks ~15 % faster.
            np.right_shift(words, 8 * i, out=row[:count], casting="unsafe")
        else:
            row[:count] = src[i : count * width : width]
        if i < extra:
            row[count] = src[count * width + i]
        streams.append(row.data)
    return streams


def join_streams(streams: list[Buffer], width: int) -> Buffer:
    """Inverse of :func:`split_streams` (stream lengths already checked)."""
    n = sum(len(s) for s in streams)
    if n < _SMALL:
        joined = bytearray(n)
        for i, stream in enumerate(streams):
            joined[i::width] = stream
        return memoryview(joined)
    import numpy as np  # see _SMALL

    count = n // width
    out = np.empty(n, dtype=np.uint8)
    rows = [np.frombuffer(s, dtype=np.uint8) for s in streams]
    if width in _WORD:
        words = out[: count * width].view(_WORD[width])
        words[...] = rows[width - 1][:count]
        for i in range(width - 2, -1, -1):
            words <<= 8
            words |= rows[i][:count]
    else:
        for i, row in enumerate(rows):
            out[i : count * width : width] = row[:count]
    for i in range(n - count * width):
        out[count * width + i] = rows[i][count]
    return out.data


def _inflate(frame: bytes | memoryview, limit: int, what: str) -> bytes:
    # A stored object is untrusted: never allocate more than `limit`, whatever the header says.
    try:
        declared = zstandard.frame_content_size(frame)
        if 0 <= declared <= limit:
            # One-shot decompression into the declared size; zstd fails if the data disagrees.
            return _decompressor().decompress(frame)
        if declared > limit:
            raise IntegrityError(f"{what}: declares {declared} bytes, more than {limit}")
        out = _decompressor().stream_reader(frame, read_across_frames=False).read(limit + 1)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: zstd frame is corrupt ({exc})") from None
    if len(out) > limit:
        raise IntegrityError(f"{what}: decompresses to more than {limit} bytes")
    return out


def decode(stored: bytes) -> Buffer:
    """Inverse of :meth:`ChunkEncoder.encode`; raises IntegrityError on malformed input."""
    if not stored:
        raise IntegrityError("empty chunk object")
    codec = stored[0]
    if codec == RAW:
        if len(stored) - 1 > MAX_CHUNK_SIZE:
            raise IntegrityError("raw chunk larger than the format allows")
        return memoryview(stored)[1:]
    if codec == ZSTD:
        return _inflate(memoryview(stored)[1:], MAX_CHUNK_SIZE, "zstd chunk")
    if codec == GROUPED:
        return _ungroup(stored)
    raise IntegrityError(f"unknown chunk codec byte 0x{codec:02x}")


def _ungroup(stored: bytes) -> Buffer:
    if len(stored) < 2 or not 2 <= stored[1] <= 8:
        raise IntegrityError("grouped chunk: bad width")
    width, pos = stored[1], 2
    view = memoryview(stored)
    streams: list[Buffer] = []
    for i in range(width):
        if pos + _STREAM_HEADER.size > len(stored):
            raise IntegrityError(f"grouped chunk: stream {i} header truncated")
        codec, length = _STREAM_HEADER.unpack_from(stored, pos)
        pos += _STREAM_HEADER.size
        if pos + length > len(stored):
            raise IntegrityError(f"grouped chunk: stream {i} truncated")
        body = view[pos : pos + length]
        pos += length
        if codec == RAW:
            streams.append(body)
        elif codec == ZSTD:
            streams.append(_inflate(body, MAX_CHUNK_SIZE // width + 1, f"grouped chunk stream {i}"))
        else:
            raise IntegrityError(f"grouped chunk: stream {i} has unknown codec {codec}")
    if pos != len(stored):
        raise IntegrityError("grouped chunk: trailing bytes")
    n = sum(len(s) for s in streams)
    if n > MAX_CHUNK_SIZE or any(len(s) != (n - i + width - 1) // width for i, s in enumerate(streams)):
        raise IntegrityError("grouped chunk: stream lengths are inconsistent")
    return join_streams(streams, width)
