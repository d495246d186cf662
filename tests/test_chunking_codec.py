"""Chunking and the chunk codec."""

from __future__ import annotations

import contextlib
import io
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zstandard

from replicator.config import ChunkingConfig, CompressionConfig
from replicator.demo import bf16
from replicator.errors import IntegrityError
from replicator.format.chunks import (
    GROUPED,
    MAX_CHUNK_SIZE,
    RAW,
    ZSTD,
    Buffer,
    ChunkEncoder,
    decode,
    join_streams,
    split_streams,
)
from replicator.hashing import HashSpec
from replicator.read.chunking import BlockPool, iter_chunks

SMALL = ChunkingConfig(min_size=4096, avg_size=16384, max_size=65536)


def test_chunks_reassemble_and_respect_bounds() -> None:
    data = os.urandom(2 << 20)
    chunks = [bytes(c) for c in iter_chunks(io.BytesIO(data), SMALL)]
    assert b"".join(chunks) == data
    assert all(len(c) <= SMALL.max_size for c in chunks)
    assert all(len(c) >= SMALL.min_size for c in chunks[:-1])


def test_boundaries_are_content_defined() -> None:
    """An insertion near the start changes only the chunks around it (the point of CDC)."""
    data = os.urandom(4 << 20)
    before = {bytes(c) for c in iter_chunks(io.BytesIO(data), SMALL)}
    after = [bytes(c) for c in iter_chunks(io.BytesIO(data[:1000] + b"inserted!" + data[1000:]), SMALL)]
    shared = sum(1 for c in after if c in before)
    assert shared >= len(after) - 3


def test_chunking_is_deterministic_across_read_sizes() -> None:
    data = os.urandom(1 << 20)

    class Trickle(io.RawIOBase):
        """Returns short reads, as pipes and network streams do."""

        def __init__(self) -> None:
            self.buf = io.BytesIO(data)

        def readinto(self, b: memoryview) -> int:  # type: ignore[override]
            chunk = self.buf.read(min(len(b), 777))
            b[: len(chunk)] = chunk
            return len(chunk)

    trickle = Trickle()
    assert [bytes(c) for c in iter_chunks(trickle, SMALL)] == [
        bytes(c) for c in iter_chunks(io.BytesIO(data), SMALL)
    ]


def fp32(count: int) -> bytes:
    return np.random.default_rng(count).normal(0, 0.02, count).astype(np.float32).tobytes()


@pytest.mark.parametrize(
    ("name", "make", "codec"),
    [
        ("bf16", lambda: bf16(np.random.default_rng(1), (1 << 20,)).tobytes(), GROUPED),
        ("text", lambda: b"".join(b"line %d of a log file\n" % i for i in range(100000)), ZSTD),
        ("random", lambda: os.urandom(1 << 20), RAW),
        ("zeros", lambda: bytes(1 << 20), ZSTD),
        ("tiny", lambda: b"abc", RAW),
        ("odd-length bf16", lambda: bf16(np.random.default_rng(2), (300001,)).tobytes()[1:], GROUPED),
        ("fp32", lambda: fp32(1 << 18), GROUPED),
        ("fp32 with a 3-byte tail", lambda: fp32(1 << 18)[:-1], GROUPED),
        ("small fp32 with a tail", lambda: fp32(5000)[:-2], GROUPED),
    ],
)
def test_codec_roundtrip_and_choice(name: str, make: object, codec: int) -> None:
    data = make()  # type: ignore[operator]
    stored = ChunkEncoder(level=3).encode(data)
    assert stored[0] == codec, name
    # The self-check covers only the zstd frames: round trips like these cover the rest.
    assert decode(stored) == data
    assert len(stored) <= len(data) + 1


@pytest.mark.parametrize("size", [0, 1, 7, 4097, (16 << 10) - 1, 16 << 10, (64 << 10) + 3])
@pytest.mark.parametrize("width", range(2, 9))
def test_streams_are_strided_slices_on_both_paths(size: int, width: int) -> None:
    """split/join slice bytes below codec._SMALL and use numpy above: the same streams."""
    data = os.urandom(size)
    streams: list[Buffer] = [data[i::width] for i in range(width)]
    assert [bytes(s) for s in split_streams(data, width)] == streams
    assert bytes(join_streams(streams, width)) == data
    assert bytes(join_streams([memoryview(s) for s in streams], width)) == data


def test_bf16_grouping_beats_plain_zstd() -> None:
    data = bf16(np.random.default_rng(3), (2 << 20,)).tobytes()
    grouped = len(ChunkEncoder(level=3).encode(data))
    plain = len(ChunkEncoder(level=3, float_grouping=False).encode(data))
    assert grouped < 0.9 * plain


def test_float_grouping_can_be_disabled() -> None:
    data = bf16(np.random.default_rng(4), (1 << 20,)).tobytes()
    assert ChunkEncoder(float_grouping=False).encode(data)[0] in (RAW, ZSTD)


@pytest.mark.parametrize(
    "stored",
    [
        b"",
        b"\x07abc",
        bytes([ZSTD]) + b"not a zstd frame",
        bytes([GROUPED, 1]),
        bytes([GROUPED, 2, 0, 5, 0, 0, 0]) + b"ab",
        bytes([GROUPED, 2, 5, 1, 0, 0, 0]) + b"a" + bytes([0, 1, 0, 0, 0]) + b"b",  # unknown stream codec
        bytes([GROUPED, 2, 0, 1, 0, 0, 0]) + b"a" + bytes([0, 1, 0, 0, 0]) + b"b" + b"trailing",
        bytes([GROUPED, 2, 0, 3, 0, 0, 0]) + b"abc" + bytes([0, 1, 0, 0, 0]) + b"x",  # inconsistent lengths
    ],
)
def test_decode_rejects_malformed(stored: bytes) -> None:
    with pytest.raises(IntegrityError):
        decode(stored)


def test_decode_bounds_decompression_bombs() -> None:
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(MAX_CHUNK_SIZE + 1))
    with pytest.raises(IntegrityError, match="more than"):
        decode(bytes([ZSTD]) + no_size)
    with_size = zstandard.ZstdCompressor().compress(bytes(MAX_CHUNK_SIZE + 1))
    with pytest.raises(IntegrityError, match="declares"):
        decode(bytes([ZSTD]) + with_size)


class Corrupting:
    """A compressor with a bug: valid zstd frames of bytes that differ from its input."""

    def __init__(self, mutate: Callable[[bytes], bytes]) -> None:
        self.real = zstandard.ZstdCompressor(level=1)
        self.mutate = mutate

    def compress(self, data: Buffer) -> bytes:
        return self.real.compress(self.mutate(bytes(data)))


def flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def text_chunk() -> bytes:
    return b"".join(b"line %d of a log file\n" % i for i in range(100000))


def bf16_chunk() -> bytes:
    return bf16(np.random.default_rng(6), (1 << 20,)).tobytes()


@pytest.mark.parametrize(
    ("make", "codec"),
    [(text_chunk, ZSTD), (lambda: text_chunk()[:50_000], ZSTD), (bf16_chunk, GROUPED)],
)
@pytest.mark.parametrize(
    "mutate",
    [flip_last, lambda b: b[:-1], lambda b: b + b"x"],
    ids=["flipped-byte", "shorter", "longer"],
)
def test_self_check_catches_a_compressor_bug(
    make: Callable[[], bytes], codec: int, mutate: Callable[[bytes], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """restic#4523: an object that would not decode to its input is never returned."""
    data = make()
    assert ChunkEncoder().encode(data)[0] == codec  # the path under test
    # Both compressors (whole chunks, grouped streams) have the bug, probes included.
    bug = (Corrupting(mutate), Corrupting(mutate))
    monkeypatch.setattr(ChunkEncoder, "_compressors", lambda self: bug)
    with pytest.raises(IntegrityError, match="does not decode to its input"):
        ChunkEncoder().encode(data)
    # Without the check the bad object goes through: proof that the check is what caught it.
    stored = ChunkEncoder(verify=False).encode(data)
    assert stored[0] == codec
    with contextlib.suppress(IntegrityError):  # a stream of the wrong length: caught too late
        assert bytes(decode(stored)) != data


def test_self_check_rejects_a_frame_that_does_not_decompress(monkeypatch: pytest.MonkeyPatch) -> None:
    bug = Corrupting(lambda b: b)
    bug.compress = lambda data: b"\x28\xb5\x2f\xfd" + bytes(len(data) // 10)  # type: ignore[method-assign]
    monkeypatch.setattr(ChunkEncoder, "_compressors", lambda self: (bug, bug))
    with pytest.raises(IntegrityError, match="does not decode to its input"):
        ChunkEncoder().encode(text_chunk())


def test_pipeline_coder_honours_verify_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from replicator.read.encode import ChunkCoder

    bug = (Corrupting(flip_last), Corrupting(flip_last))
    monkeypatch.setattr(ChunkEncoder, "_compressors", lambda self: bug)
    for verify in (True, False):
        coder = ChunkCoder(SMALL, CompressionConfig(verify=verify), [HashSpec("xxh3-128")])
        if verify:
            with pytest.raises(IntegrityError, match="does not decode to its input"):
                coder.encode(bf16_chunk())
        else:
            assert coder.encode(bf16_chunk())[1][0] == GROUPED


def test_streams_that_do_not_shrink_in_the_sample_are_not_compressed(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 mantissa bytes are near-random: only the sign/exponent stream is worth compressing."""
    data = bf16_chunk()
    compressed: list[int] = []

    class Recording:
        real = zstandard.ZstdCompressor(level=1)

        def compress(self, chunk: Buffer) -> bytes:
            compressed.append(len(chunk))
            return self.real.compress(chunk)

    pair = (Recording(), Recording())
    monkeypatch.setattr(ChunkEncoder, "_compressors", lambda self: pair)
    stored = ChunkEncoder().encode(data)
    assert stored[:2] == bytes([GROUPED, 2])
    assert compressed.count(len(data) // 2) == 1  # one stream of the whole chunk, not both
    low = struct.unpack_from("<BI", stored, 2)
    assert low == (RAW, len(data) // 2)
    assert struct.unpack_from("<B", stored, 2 + 5 + low[1]) == (ZSTD,)
    assert decode(stored) == data


def test_encoder_refuses_oversized_chunks() -> None:
    with pytest.raises(ValueError):
        ChunkEncoder().encode(bytes(MAX_CHUNK_SIZE + 1))


@pytest.mark.parametrize("size", [0, 1, 4095, 65536, 131072, 131073, 3 << 20])
@pytest.mark.parametrize("seekable", [True, False])
def test_block_reader_matches_a_one_pass_stream_cutter(size: int, seekable: bool) -> None:
    """Our zero-copy block reader must cut exactly where pyfastcdc's stream cutter does."""
    from pyfastcdc import FastCDC

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    data = data[: size // 2] + bytes(size - size // 2)  # random then zeros: natural and forced cuts
    reference = [
        bytes(c.data)
        for c in FastCDC(SMALL.avg_size, min_size=SMALL.min_size, max_size=SMALL.max_size).cut_stream(
            io.BytesIO(data)
        )
    ]

    class Stream(io.BytesIO):
        def seekable(self) -> bool:
            return seekable

    ours = [bytes(c) for c in iter_chunks(Stream(data), SMALL)]
    assert ours == reference


@pytest.mark.parametrize("size", [0, 3000, 300_000])
@pytest.mark.parametrize("hint", [0, 100, 2999, 3000, 3001, 200_000, 10**9])
def test_size_hint_never_changes_the_chunks(size: int, hint: int) -> None:
    """A wrong hint (the file grew or shrank since it was scanned) only changes memory use;
    below min_size the reader takes a shortcut that must agree with the cutter."""
    data = np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8).tobytes()
    expected = [bytes(c) for c in iter_chunks(io.BytesIO(data), SMALL)]
    assert [bytes(c) for c in iter_chunks(io.BytesIO(data), SMALL, size_hint=hint)] == expected
    assert b"".join(expected) == data


def address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def test_block_pool_reuses_a_block_only_when_no_chunk_of_it_is_alive() -> None:
    pool = BlockPool(1 << 20, keep=2)
    pool.enter()
    block = pool.take()
    first = address(block)
    chunk = block[10:20].toreadonly()
    del block
    assert address(pool.take()) != first  # the chunk still refers to the first block
    as_array = np.frombuffer(chunk, dtype=np.uint8)[2:]  # numpy views keep it alive too
    del chunk
    assert address(pool.take()) != first
    del as_array
    assert address(pool.take()) == first


def test_block_pool_keeps_few_blocks_and_none_when_idle() -> None:
    pool = BlockPool(1 << 20, keep=1)
    pool.enter()
    blocks = [pool.take() for _ in range(3)]
    addresses = {address(b) for b in blocks}
    del blocks
    assert pool.kept == 1
    assert address(pool.take()) in addresses
    kept = pool.take()
    pool.leave()
    del kept
    assert pool.kept == 0  # no reader left: nothing is held


@pytest.mark.parametrize("seekable", [True, False])
def test_pooled_blocks_never_change_chunks_handed_out(seekable: bool) -> None:
    """Chunks are released in other threads, out of order, while the reader reuses blocks:
    every chunk must still hold its bytes when it is used."""
    data = np.random.default_rng(7).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    expected = [bytes(c) for c in iter_chunks(io.BytesIO(data), SMALL)]

    class Stream(io.BytesIO):
        def seekable(self) -> bool:
            return seekable

    pool = BlockPool(2 * SMALL.max_size, keep=2)
    pool.enter()
    with ThreadPoolExecutor(4) as workers:
        for _ in range(3):  # the later rounds start with blocks in the pool
            chunks = iter_chunks(Stream(data), SMALL, len(data), pool)
            got = list(workers.map(bytes, chunks))
            assert got == expected
            kept = list(iter_chunks(Stream(data), SMALL, len(data), pool))  # all alive at once
            assert [bytes(c) for c in kept] == expected
    assert pool.kept <= 2
