"""The read pipeline: torn reads are never recorded, memory stays bounded."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from bench.common import timed
from replicator import engine
from replicator.config import ChunkingConfig, CompressionConfig, Config, source_config
from replicator.demo import bf16
from replicator.engine import READ_ATTEMPTS
from replicator.errors import SourceError
from replicator.globs import PathFilter
from replicator.hashing import HashSpec
from replicator.read.pipeline import (
    LARGE_FILE_READERS,
    ChunkConsumer,
    ChunkPipeline,
    EncodedChunk,
    FileRecord,
)
from replicator.repository import Repository
from replicator.restore.core import restore_snapshot
from replicator.sources import PosixSource, SourceFile, open_source
from replicator.state import StateStore
from replicator.sync import run_sync
from replicator.targets import PosixTarget
from tests.helpers import config_dict, local_setup, tree_digest
from tests.servers import MotoServer


class Calls(ChunkConsumer):
    """A consumer made of a function (and, optionally, what it wants)."""

    def __init__(
        self,
        take: Callable[[EncodedChunk], Awaitable[None]],
        wants: Callable[[dict[str, str]], bool] | None = None,
    ) -> None:
        self._take, self._wants = take, wants

    def wants(self, ids: dict[str, str]) -> bool:
        return self._wants is None or self._wants(ids)

    async def take(self, chunk: EncodedChunk) -> None:
        await self._take(chunk)


class WriterDuringRead(PosixSource):
    """A real concurrent writer: appends to a file while replicator is reading it, the first
    ``times`` times it is opened."""

    def __init__(self, root: Path, victim: str, times: int) -> None:
        super().__init__("d", root, PathFilter())
        self.victim, self.times, self.opens = victim, times, 0

    def open(self, file: SourceFile) -> io.FileIO:
        handle = super().open(file)
        if file.path == self.victim:
            self.opens += 1
            if self.opens <= self.times:
                with open(self.root / file.path, "ab") as f:
                    f.write(b"more bytes from the trainer\n")
        return handle


def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, times: int) -> tuple[Config, WriterDuringRead]:
    primary, target = tmp_path / "primary", tmp_path / "target"
    primary.mkdir()
    target.mkdir()
    (primary / "stable.bin").write_bytes(os.urandom(300_000))
    (primary / "growing.log").write_bytes(os.urandom(2_000_000))
    source = WriterDuringRead(primary, "growing.log", times)
    monkeypatch.setattr(engine, "open_source", lambda cfg: source)
    config = Config.model_validate(
        config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [{"name": "t", "url": str(target)}])
    )
    return config, source


def restore_latest(config: Config, dest: Path) -> None:
    async def go() -> None:
        repo = await Repository.open(PosixTarget("t", config.targets[0].url))
        manifest = await repo.load_manifest("d", await repo.resolve("d"))
        assert (await restore_snapshot(repo, manifest, dest)).ok

    asyncio.run(go())


def test_file_changed_while_read_is_reread_not_recorded_torn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, source = setup(tmp_path, monkeypatch, times=1)
    results, _ = asyncio.run(run_sync(config))
    assert results[0].ok and results[0].files == 2
    assert source.opens == 2  # read, noticed the change, read again
    restore_latest(config, tmp_path / "dest")
    assert tree_digest(tmp_path / "dest") == tree_digest(tmp_path / "primary")


def test_file_that_keeps_changing_is_skipped_never_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, source = setup(tmp_path, monkeypatch, times=100)
    results, _ = asyncio.run(run_sync(config))
    assert source.opens == READ_ATTEMPTS
    assert not results[0].ok and "kept changing" in results[0].skipped["growing.log"]
    assert results[0].files == 1
    state = StateStore.open(config.state_dir)
    assert not state.db.execute("SELECT 1 FROM files WHERE path='growing.log'").fetchall()
    state.close()
    restore_latest(config, tmp_path / "dest")
    assert sorted(os.listdir(tmp_path / "dest")) == ["stable.bin"]


def test_pipeline_respects_its_memory_budget(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(os.urandom(24 << 20))
    source = PosixSource("d", tmp_path, PathFilter())
    budget = (5 << 20) + LARGE_FILE_READERS * 2 * (2 << 20)
    peak = limit = 0

    async def go() -> None:
        nonlocal peak, limit
        pipe = ChunkPipeline(
            ChunkingConfig(min_size=256 << 10, avg_size=512 << 10, max_size=1 << 20),
            CompressionConfig(),
            [HashSpec("xxh3-128", 1), HashSpec("blake3")],
            memory_budget=budget,
        )
        limit = pipe.budget.limit  # what is left for chunks after the reader's blocks
        assert limit == 5 << 20  # for chunks in flight; each reader's two blocks are set aside
        held: list[EncodedChunk] = []

        async def slow_sink(chunk: EncodedChunk) -> None:
            nonlocal peak
            chunk.lease.retain()  # a slow consumer keeps the chunk for a while
            held.append(chunk)
            peak = max(peak, pipe.budget.used)
            await asyncio.sleep(0.01)
            if len(held) > 2:
                held.pop(0).lease.release()

        (file,) = (await source.scan()).files
        record = await pipe.read_file(source, file, Calls(slow_sink))
        assert sum(s for _, s in record.chunks["blake3"]) == 24 << 20
        assert pipe._blocks.kept == 0  # read blocks are reused during a read, not held after
        for c in held:
            c.lease.release()
        await asyncio.sleep(0)
        assert pipe.budget.used == 0
        pipe.close()

    asyncio.run(go())
    assert 0 < peak <= limit


def test_peak_rss_stays_bounded_for_a_large_file(tmp_path: Path) -> None:
    """The issue's bound: peak RSS < 512 MiB whatever the file size (here 1 GiB of bf16)."""
    primary, _target, cfg = local_setup(tmp_path)
    rng = np.random.default_rng(0)
    with open(primary / "huge.safetensors", "wb") as f:
        for _ in range(16):
            f.write(bf16(rng, (32 << 20,)).tobytes())  # 64 MiB at a time
    _, _, peak_mib = timed([sys.executable, "-m", "replicator", "sync", "-c", str(cfg), "-q"])
    assert peak_mib < 512, f"peak RSS {peak_mib:.0f} MiB"


def test_chunks_no_target_wants_are_hashed_but_not_encoded(tmp_path: Path) -> None:
    """A new checkpoint step is mostly unchanged layers: those chunks are only hashed."""
    (tmp_path / "big.bin").write_bytes(os.urandom(8 << 20))
    source = PosixSource("d", tmp_path, PathFilter())
    chunking = ChunkingConfig(min_size=256 << 10, avg_size=512 << 10, max_size=1 << 20)
    spec = HashSpec("xxh3-128", 1)

    async def go() -> None:
        pipe = ChunkPipeline(chunking, CompressionConfig(), [spec])
        (file,) = (await source.scan()).files
        got: list[EncodedChunk] = []

        async def sink(chunk: EncodedChunk) -> None:
            got.append(chunk)

        every = await pipe.read_file(source, file, Calls(sink))
        assert all(c.stored is not None for c in got)
        first = [c.ids[spec.key] for c in got]
        wanted_ids = set(first[::3])  # "the targets lack every third chunk"
        got.clear()
        again = await pipe.read_file(source, file, Calls(sink, lambda ids: ids[spec.key] in wanted_ids))
        assert again == every  # same record whatever was encoded
        assert [c.ids[spec.key] for c in got] == first
        assert {c.ids[spec.key] for c in got if c.stored is not None} == wanted_ids
        pipe.close()

    asyncio.run(go())


def test_a_target_attached_during_a_read_does_not_tear_the_record(tmp_path: Path) -> None:
    """A target attached while files are being read (the daemon opens targets beside the
    source workers) adds a hash spec mid-read: every record must carry either all of a spec
    (digest and chunk list) or none of it, never the ids of part of the file (found by the
    fault harness: a record without a digest for the new spec crashed the state store)."""
    (tmp_path / "big.bin").write_bytes(os.urandom(4 << 20))
    for i in range(3):
        (tmp_path / f"small-{i}.txt").write_text(f"small {i}")
    source = PosixSource("d", tmp_path, PathFilter())
    chunking = ChunkingConfig(min_size=256 << 10, avg_size=512 << 10, max_size=1 << 20)
    first, late = HashSpec("xxh3-128", 1), HashSpec("xxh3-128", 2)

    async def go() -> None:
        pipe = ChunkPipeline(chunking, CompressionConfig(), [first])
        files = {f.path: f for f in (await source.scan()).files}

        async def sink(chunk: EncodedChunk) -> None:
            pipe.add_spec(late)  # the late target opens while this file is being read

        records: list[FileRecord | SourceError] = [
            await pipe.read_file(source, files["big.bin"], Calls(sink))
        ]
        pipe.coder = type(pipe.coder)(chunking, CompressionConfig(), [first])  # drop it again
        small = [files[f"small-{i}.txt"] for i in range(3)]
        records += await pipe.read_small_files(source, small, Calls(sink))
        for rec in records:
            assert isinstance(rec, FileRecord)
            assert set(rec.digests) == set(rec.chunks) == {first.key}, rec.path
        pipe.close()

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["posix", "moto"])
def test_a_scan_reports_each_selected_file_as_it_finds_it(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    bodies = {"a.txt": b"a", "sub/b.bin": b"bb", "sub/deeper/c.json": b"{}", "skip.tmp": b"x"}
    if kind == "posix":
        url, extra = str(tmp_path / "primary"), {}
        for key, body in bodies.items():
            (tmp_path / "primary" / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "primary" / key).write_bytes(body)
    else:
        server: MotoServer = request.getfixturevalue("moto")
        bucket = server.new_bucket()
        for key, body in bodies.items():
            server.client().put_object(Bucket=bucket, Key=f"data/{key}", Body=body)
        url, extra = f"s3://{bucket}/data", {"endpoint_url": server.endpoint}
    source = open_source(source_config({"name": "d", "url": url, "exclude": ["*.tmp"], **extra}))
    found: list[SourceFile] = []
    files = asyncio.run(source.scan(found.append)).files
    assert [f.path for f in files] == ["a.txt", "sub/b.bin", "sub/deeper/c.json"]
    assert sorted(found, key=lambda f: f.path) == files
