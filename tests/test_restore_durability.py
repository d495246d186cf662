"""Restore durability: one syncfs at the end instead of an fsync per file, skipped by --no-sync
and by drills into a temporary directory; a torn file (right size and mtime, wrong bytes) is
repaired by running the restore again."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from replicator.errors import ReplicatorError
from replicator.format.manifest import FileEntry
from replicator.repository import Repository
from replicator.restore import local as restore
from replicator.restore.core import SMALL_FILE, Destination, RestoreResult, restore_snapshot
from replicator.restore.local import LocalDestination
from replicator.targets import PosixTarget
from replicator.verify.drill import DrillReport, run_drill
from tests.conftest import cli
from tests.helpers import PATIENCE, local_setup, make_checkpoint, tree_digest


@pytest.fixture
def replicated(tmp_path: Path) -> tuple[Path, Path]:
    """(primary, target): two checkpoint directories replicated as source ``d``."""
    primary, target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 1)
    make_checkpoint(primary, 2)
    res = cli("sync", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    return primary, target


class FakeSyncfs:
    """Stands in for libc's syncfs: records the inode of the directory each call is made on,
    and what the destination held at that moment."""

    def __init__(self, dest: Path | None = None, result: int = 0) -> None:
        self.dest, self.result = dest, result
        self.inodes: list[int] = []
        self.seen: list[dict[str, tuple[str, int, int]]] = []

    def __call__(self, fd: int) -> int:
        self.inodes.append(os.fstat(fd).st_ino)
        if self.dest is not None:
            self.seen.append(tree_digest(self.dest))
        if self.result:
            ctypes.set_errno(errno.EIO)
        return self.result


def fake_syncfs(monkeypatch: pytest.MonkeyPatch, dest: Path | None = None, result: int = 0) -> FakeSyncfs:
    """Put a :class:`FakeSyncfs` in the place of libc's syncfs."""
    syncfs = FakeSyncfs(dest, result)
    monkeypatch.setattr(restore, "_syncfs", syncfs)
    return syncfs


def counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[tuple[Any, ...]]:
    """Replace ``module.name`` by a wrapper that records each call's arguments and calls through."""
    calls: list[tuple[Any, ...]] = []
    real: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def restore_into(target: Path, dest: Path, *, sync: bool = True, other_device: bool = False) -> RestoreResult:
    """Restore the latest snapshot of ``d`` in this process (so that monkeypatches apply).
    ``other_device``: every file looks as if created on a filesystem mounted below ``dest``."""

    async def go() -> RestoreResult:
        t = PosixTarget("t", target)
        local: LocalDestination | None = None
        try:
            repo = await Repository.open(t)
            manifest = await repo.load_manifest("d", await repo.resolve("d", None))
            out: Path | Destination = dest
            if other_device:
                out = local = LocalDestination(dest, repo.hash)
                local._root_dev = -1
            return await restore_snapshot(repo, manifest, out, sync=sync)
        finally:
            if local is not None:
                await local.close()
            await t.close()

    return asyncio.run(go())


def latest_files(target: Path) -> list[FileEntry]:
    async def go() -> list[FileEntry]:
        t = PosixTarget("t", target)
        try:
            repo = await Repository.open(t)
            return list((await repo.load_manifest("d", await repo.resolve("d", None))).files)
        finally:
            await t.close()

    return asyncio.run(go())


def test_default_restore_syncs_the_filesystem_once_after_the_last_file_and_fsyncs_no_file(
    tmp_path: Path, replicated: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, target = replicated
    dest = tmp_path / "dest"
    syncfs = fake_syncfs(monkeypatch, dest)
    fsyncs = counting(monkeypatch, os, "fsync")

    res = restore_into(target, dest)
    assert res.ok and res.files == 8
    assert syncfs.inodes == [dest.stat().st_ino], "one syncfs, on the destination root"
    assert syncfs.seen == [tree_digest(primary)], "called after every file was in place"
    assert fsyncs == [], "no per-file fsync"


def test_sync_false_leaves_writeback_to_the_os(
    tmp_path: Path, replicated: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, target = replicated
    dest = tmp_path / "dest"
    syncfs = fake_syncfs(monkeypatch, dest)
    sync = counting(monkeypatch, os, "sync")

    assert restore_into(target, dest, sync=False).ok
    assert syncfs.inodes == [] and sync == []
    assert tree_digest(dest) == tree_digest(primary)


def test_each_write_of_a_large_file_starts_writeback_at_once_unless_the_restore_is_not_flushed(
    tmp_path: Path, replicated: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files restored chunk by chunk start writeback with every write; small files (restored
    in batches) are left to the final flush, which writes them together."""
    primary, target = replicated
    (primary / "big.bin").write_bytes(os.urandom(3 * SMALL_FILE))
    res = cli("sync", "-c", str(tmp_path / "r.yaml"))
    assert res.returncode == 0, res.stderr
    ranges = counting(monkeypatch, restore, "_sync_file_range")
    assert restore_into(target, tmp_path / "a").ok
    files = latest_files(target)
    large = [f.size for f in files if len(f.chunks) > 1 or f.size > SMALL_FILE]
    assert large and len(large) < len(files), "the fixture needs large and small files"
    # Every byte of every large file, each range right after it was written.
    assert {flags for *_, flags in ranges} == {restore.SYNC_FILE_RANGE_WRITE}
    assert [offset for _, offset, _, _ in ranges].count(0) == len(large)
    assert sum(n for _, _, n, _ in ranges) == sum(large)

    ranges.clear()
    assert restore_into(target, tmp_path / "b", sync=False).ok
    assert ranges == []


def test_without_syncfs_or_across_a_mount_the_flush_is_sync(
    tmp_path: Path, replicated: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, target = replicated
    sync = counting(monkeypatch, os, "sync")
    monkeypatch.setattr(restore, "_syncfs", None)  # not Linux
    assert restore_into(target, tmp_path / "a").ok
    assert len(sync) == 1

    # A file created on another device than the root (a filesystem mounted below it) is out of
    # reach of syncfs on the root: sync(2) covers it.
    syncfs = fake_syncfs(monkeypatch)
    assert restore_into(target, tmp_path / "b", other_device=True).ok
    assert len(sync) == 2 and syncfs.inodes == []
    assert tree_digest(tmp_path / "b") == tree_digest(primary)


def test_a_failed_flush_fails_the_restore(
    tmp_path: Path, replicated: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, target = replicated
    fake_syncfs(monkeypatch, result=-1)
    with pytest.raises(ReplicatorError, match="may not be on disk: Input/output error"):
        restore_into(target, tmp_path / "dest")


def test_a_torn_file_of_the_right_size_and_mtime_is_rewritten_by_a_rerun(
    tmp_path: Path, replicated: tuple[Path, Path]
) -> None:
    primary, target = replicated
    dest = tmp_path / "dest"
    assert restore_into(target, dest).ok
    # What a power cut before the flush can leave: the new name, size, mode and mtime, but
    # blocks never written (zeros on ext4/xfs).
    torn = dest / "step-000002" / "model-00001-of-00002.safetensors"
    st = torn.stat()
    data = bytearray(torn.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    torn.write_bytes(bytes(data))
    os.utime(torn, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert torn.stat().st_size == st.st_size and tree_digest(dest) != tree_digest(primary)

    again = restore_into(target, dest)
    assert again.ok and (again.files, again.skipped_existing) == (1, 7)
    assert tree_digest(dest) == tree_digest(primary)


# Runs the real CLI in a child process, counting the calls to syncfs.
COUNT_SYNCFS = """
import atexit, sys
from replicator.restore import local as restore
from replicator.cli import app
calls = []
real = restore._syncfs
def syncfs(fd):
    calls.append(fd)
    return real(fd) if real else 0
restore._syncfs = syncfs
atexit.register(lambda: print(f"syncfs calls: {len(calls)}", file=sys.stderr))
app(sys.argv[1:], prog_name="replicator")
"""


def test_restore_cli_syncs_once_and_not_with_no_sync(tmp_path: Path, replicated: tuple[Path, Path]) -> None:
    primary, target = replicated
    for flags, calls in (([], 1), (["--no-sync"], 0)):
        dest = tmp_path / f"dest{len(flags)}"
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                COUNT_SYNCFS,
                "restore",
                "--repo",
                str(target),
                "-s",
                "d",
                *flags,
                str(dest),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        assert f"syncfs calls: {calls}" in res.stderr, (flags, res.stderr)
        assert "restored 8 files" in res.stdout
        assert tree_digest(dest) == tree_digest(primary)


def test_drill_flushes_a_kept_scratch_but_not_a_temporary_one(
    tmp_path: Path, replicated: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, target = replicated
    syncfs = fake_syncfs(monkeypatch)

    def drill(scratch: Path | None) -> DrillReport:
        async def go() -> DrillReport:
            t = PosixTarget("t", target)
            try:
                return await run_drill(await Repository.open(t), scratch=scratch)
            finally:
                await t.close()

        return asyncio.run(go())

    assert drill(None).ok
    assert syncfs.inodes == [], "files about to be deleted need not be durable"
    scratch = tmp_path / "scratch"
    report = drill(scratch)
    assert report.ok and report.sources[0].restored_files == 8
    assert syncfs.inodes == [(scratch / "t" / "d").stat().st_ino]


@pytest.mark.parametrize("budget_chunks", [16, 5])
def test_a_restore_never_waits_for_memory_while_holding_chunks_it_has_not_written(
    tmp_path: Path, budget_chunks: int
) -> None:
    """Zero-padded tensors cut at the largest chunk size, restored side by side: each file keeps
    up to CHUNKS_IN_FLIGHT_PER_FILE (8) chunks in flight, so FILES_IN_PARALLEL (4) files of
    16 MiB chunks want twice the default budget of 256 MiB. Here at 1/256 of that scale (64
    KiB chunks, a budget of 16 of them), and with a budget smaller than one file's window (5
    chunks), where the old code hung every time: a file that found the budget spent waited for
    it while holding chunks it had not written; once every file did, nothing was ever freed."""
    primary, target, cfg = local_setup(tmp_path)
    chunking = {"min_size": 4096, "avg_size": 16384, "max_size": 65536}
    cfg.write_text(cfg.read_text() + f"chunking: {chunking}\n")
    for i in range(8):
        (primary / f"shard-{i}.bin").write_bytes(bytes(16 * 65536))
    assert cli("sync", "-c", str(cfg)).returncode == 0

    async def go() -> RestoreResult:
        t = PosixTarget("t", target)
        try:
            repo = await Repository.open(t)
            manifest = await repo.load_manifest("d", await repo.resolve("d", None))
            assert all(len(f.chunks) == 16 for f in manifest.files)
            budget = budget_chunks * 65536
            restoring = restore_snapshot(repo, manifest, tmp_path / "dest", memory_budget=budget)
            return await asyncio.wait_for(restoring, PATIENCE)
        finally:
            await t.close()

    assert asyncio.run(go()).ok
    assert tree_digest(tmp_path / "dest") == tree_digest(primary)
