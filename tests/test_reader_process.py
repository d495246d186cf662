"""Small local files read and encoded in a helper process (replicator.read.helpers)."""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from replicator.config import ChunkingConfig, CompressionConfig, Config
from replicator.engine import Replicator
from replicator.errors import FileChangedError, SourceError
from replicator.globs import PathFilter
from replicator.hashing import HashSpec
from replicator.read import helper_main as reader_helper
from replicator.read import helpers as reader_process
from replicator.read import pipeline
from replicator.read.encode import ChunkCoder, SmallFile
from replicator.read.helpers import ReaderProcess
from replicator.sources.base import Source, SourceFile
from replicator.sources.posix import PosixSource
from tests.helpers import tree_digest
from tests.test_packs import make_config, restore, small_tree, sync


@pytest.fixture(autouse=True)
def helper_for_any_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small trees go through the helper processes too."""
    monkeypatch.setattr(pipeline, "HELPER_MIN_FILES", 1)


def posix_target_config(tmp_path: Path) -> Config:
    """tmp_path/primary (source ``d``) to a new POSIX target at tmp_path/target."""
    (tmp_path / "target").mkdir()
    return make_config(tmp_path, {"name": "t", "url": str(tmp_path / "target")})


def sync_and_restore_small_tree(tmp_path: Path, count: int) -> None:
    """``count`` small files at tmp_path/primary synced to a new POSIX target; restored from
    it, they match the primary."""
    primary = small_tree(tmp_path / "primary", count)
    config = posix_target_config(tmp_path)
    sync(config)
    restore(config, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(primary)


class Calls:
    """Counts the batches that went through the helper process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches = 0
        read = ReaderProcess.read_small_files

        async def counted(
            helper: ReaderProcess, coder: ChunkCoder, source: Source, files: Sequence[SourceFile]
        ) -> list[SmallFile | SourceError]:
            self.batches += 1
            return await read(helper, coder, source, files)

        monkeypatch.setattr(ReaderProcess, "read_small_files", counted)


def test_small_files_read_in_the_helper_restore_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls(monkeypatch)
    primary = small_tree(tmp_path / "primary", 300)
    (primary / "empty.txt").write_bytes(b"")
    (primary / "cut.bin").write_bytes(os.urandom(3 << 20))  # small (<= max_size) but cut in pieces
    config = posix_target_config(tmp_path)
    config = config.model_copy(
        update={"chunking": ChunkingConfig(min_size=64 << 10, avg_size=256 << 10, max_size=4 << 20)}
    )
    sync(config)
    assert calls.batches >= 300 // 64
    restore(config, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(primary)


def test_a_file_changed_or_deleted_before_the_helper_reads_it_is_never_recorded_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls(monkeypatch)
    primary = small_tree(tmp_path / "primary", 100)
    changed, deleted = primary / "part-1" / "rec-00001.json", primary / "part-2" / "rec-00002.json"
    expect = pipeline.ChunkPipeline.expect_small_files

    def after_scan(self: pipeline.ChunkPipeline, source: Source, count: int) -> int:
        changed.write_text("rewritten after the scan, before the read")
        deleted.unlink()
        return expect(self, source, count)

    monkeypatch.setattr(pipeline.ChunkPipeline, "expect_small_files", after_scan)
    config = posix_target_config(tmp_path)
    sync(config)
    assert calls.batches >= 1
    restore(config, tmp_path / "restored")
    restored = tmp_path / "restored"
    assert (restored / "part-1" / "rec-00001.json").read_text() == "rewritten after the scan, before the read"
    assert not (restored / "part-2" / "rec-00002.json").exists()
    assert tree_digest(restored) == tree_digest(primary)


def test_helpers_that_cannot_be_started_leave_the_reading_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[multiprocessing.process.BaseProcess] = []
    start = multiprocessing.context.SpawnProcess.start

    def second_fails(process: multiprocessing.context.SpawnProcess) -> None:
        if started:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        start(process)
        started.append(process)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", second_fails)
    sync_and_restore_small_tree(tmp_path, 100)
    assert started and not any(p.is_alive() for p in started)  # the one that started is stopped


def test_a_reply_that_cannot_be_read_fails_its_batch_not_the_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exactly = reader_process._Helper._exactly
    garbled: list[int] = []

    async def first_body_garbled(
        helper: reader_process._Helper, loop: asyncio.AbstractEventLoop, n: int
    ) -> bytearray:
        data = await exactly(helper, loop, n)
        if n != reader_helper.FRAME.size and not garbled:  # a reply's body, not its length
            garbled.append(n)
            return bytearray(b"\xff" * n)
        return data

    monkeypatch.setattr(reader_process._Helper, "_exactly", first_body_garbled)
    sync_and_restore_small_tree(tmp_path, 200)
    assert garbled


def test_helpers_start_during_a_scan_that_finds_enough_new_small_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "HELPER_MIN_FILES", 40)
    primary = small_tree(tmp_path / "primary", 60)
    config = posix_target_config(tmp_path)

    def helpers_started_by_the_scan() -> bool:
        async def go() -> bool:
            async with Replicator(config) as rep:
                assert rep.pipeline is not None
                files = (await rep.scan(config.sources[0])).files
                assert len(files) == len(list(primary.rglob("*.json")))
                await asyncio.sleep(0)  # the scanning thread hands the start to the event loop
                return rep.pipeline._helper is not None

        return asyncio.run(go())

    assert helpers_started_by_the_scan()  # 60 new files: 40 more than the 0 known
    sync(config)
    small_tree(primary, 30, start=60)
    assert not helpers_started_by_the_scan()  # 90 files, 60 known: only 30 new
    small_tree(primary, 10, start=90)
    assert helpers_started_by_the_scan()  # 100 files, 60 known: 40 new


def test_errors_cross_the_process_boundary_with_their_context(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    source = PosixSource("d", tmp_path, PathFilter())
    (present,) = asyncio.run(source.scan()).files
    gone = SourceFile("gone.txt", 1, present.mtime_ns, 0o644, "1:0:0:0")
    coder = ChunkCoder(ChunkingConfig(), CompressionConfig(), [HashSpec("xxh3-128", 7)])

    async def go() -> list[SmallFile | SourceError]:
        helper = ReaderProcess()
        try:
            return await helper.read_small_files(coder, source, [present, gone])
        finally:
            helper.close()

    ok, missing = asyncio.run(go())
    assert ok == coder.read_whole(source, [present])[0]
    assert isinstance(missing, FileChangedError)
    assert (missing.operation, missing.key) == ("read", "gone.txt")


def test_a_dead_helper_is_reported_and_reading_goes_on_in_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = ReaderProcess.read_small_files
    killed: list[int] = []

    async def kill_first(
        helper: ReaderProcess, coder: ChunkCoder, source: Source, files: Sequence[SourceFile]
    ) -> list[SmallFile | SourceError]:
        if not killed:  # the first batch starts the process; kill it before it answers
            task = asyncio.ensure_future(read(helper, coder, source, files))
            pid = helper.pids[0]  # one dies: reading goes on in threads
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return await task
        return await read(helper, coder, source, files)

    monkeypatch.setattr(ReaderProcess, "read_small_files", kill_first)
    sync_and_restore_small_tree(tmp_path, 200)
    assert killed


LEAN_HELPER_SCRIPT = """
import pickle, sys
from replicator.read import helper_main as reader_helper
coder, source = pickle.loads(sys.stdin.buffer.read())
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "yaml", "structlog", "numpy"))
print(" ".join(heavy + [m for m in ("replicator.config", "replicator.format.manifest") if m in sys.modules]))
"""


def test_a_helper_process_imports_neither_pydantic_nor_the_config(tmp_path: Path) -> None:
    """What a helper unpickles (coder, source) must not pull in the heavy modules of the
    parent: they would double its start-up (~0.1 s -> ~0.25 s, spent while the parent scans)."""
    coder = ChunkCoder(ChunkingConfig(), CompressionConfig(), [HashSpec("xxh3-128", 7)])
    source = PosixSource("d", tmp_path, PathFilter(["**"], ["*.tmp"]))
    proc = subprocess.run(
        [sys.executable, "-c", LEAN_HELPER_SCRIPT],
        input=pickle.dumps((coder, source)),
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == []


ORPHAN_SCRIPT = """
import asyncio, os, signal, sys
from pathlib import Path
from replicator.config import ChunkingConfig, CompressionConfig, Config
from replicator.globs import PathFilter
from replicator.read.encode import ChunkCoder
from replicator.read.helpers import ReaderProcess
from replicator.sources.posix import PosixSource

async def main():
    source = PosixSource("d", Path(sys.argv[1]), PathFilter())
    helper = ReaderProcess()
    coder = ChunkCoder(ChunkingConfig(), CompressionConfig(), [])
    await helper.read_small_files(coder, source, (await source.scan()).files)
    print(" ".join(map(str, helper.pids)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no chance to stop the pool

asyncio.run(main())
"""


def test_helpers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    proc = subprocess.run(
        [sys.executable, "-c", ORPHAN_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60
    )  # returns once every holder of its stdout, the helpers too, has exited
    pids = [int(p) for p in proc.stdout.split()]
    assert proc.returncode == -signal.SIGKILL and pids, proc.stderr
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in pids), "helpers outlived their parent"
