"""Garbage collection (``replicator prune``, replicator.gc): deletes exactly what no manifest
references, never on doubtful evidence, never what a concurrent writer is about to name, and
survives ``kill -9`` at any point. Against real stores: POSIX and ``rclone serve s3``."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bench.bench_gc_torture import Options as TortureOptions
from bench.bench_gc_torture import summary, torture
from replicator.config import Config, TargetConfig, load_config
from replicator.config import target_config as parse_target
from replicator.engine import Replicator, SourceResult
from replicator.errors import RepositoryError, TargetError
from replicator.gc.protocol import DELETING, LOCK_KEY, PLANS, RECORDS, Heartbeat, list_gc, server_now
from replicator.gc.prune import PruneOptions, PruneResult, prune_target
from replicator.repository import Repository, chunk_key, pack_key, snapshot_key
from replicator.targets import open_target
from replicator.targets.base import ObjectInfo
from replicator.targets.posix import PosixTarget
from tests.conftest import TargetSpec, cli, make_target_spec, write_config
from tests.faults import MemoryTargets
from tests.helpers import config_dict, tree_digest
from tests.servers import RcloneServer

T = TypeVar("T")
FAST_RETRY = {"initial": "50ms", "max": "200ms", "give_up_after": "2s", "command_give_up_after": "2s"}
SMALL_CHUNKS = {"min_size": "16KiB", "avg_size": "64KiB", "max_size": "256KiB"}
KILL_TRIALS = int(os.environ.get("PRUNE_KILL_TRIALS", "3"))
"""How many ``kill -9`` trials the crash test runs (more: ``PRUNE_KILL_TRIALS=50``)."""


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def go() -> T:
        return await coro_fn()

    return asyncio.run(go())


def repo_args(spec: TargetSpec) -> list[str]:
    args = ["--repo", str(spec.config["url"])]
    if spec.server is not None:
        args += ["--endpoint-url", spec.server.endpoint]
    return args


def target_config(spec: TargetSpec) -> TargetConfig:
    return parse_target({**spec.config, "retry": FAST_RETRY})


def latest_snapshot(spec: TargetSpec, source: str) -> str:
    async def go() -> str:
        target = await open_target(target_config(spec))
        try:
            latest = await (await Repository.open(target)).latest(source)
            assert latest is not None
            return latest
        finally:
            await target.close()

    return run(go)


def retained_snapshots(spec: TargetSpec, source: str) -> list[str]:
    async def go() -> list[str]:
        target = await open_target(target_config(spec))
        try:
            return await (await Repository.open(target)).list_snapshots(source)
        finally:
            await target.close()

    return run(go)


async def stored_objects(tcfg: TargetConfig) -> dict[str, int]:
    """Every chunk object and pack on the target, with its size."""
    target = await open_target(tcfg)
    try:
        return {i.key: i.size for p in ("chunks/", "packs/") async for i in target.list(p)}
    finally:
        await target.close()


async def referenced(tcfg: TargetConfig) -> tuple[set[str], set[str]]:
    """(required, loose copies): the objects the manifests name, read with the repository's
    reader, not the collector's marking code."""
    target = await open_target(tcfg)
    try:
        repo = await Repository.open(target)
        required: set[str] = set()
        copies: set[str] = set()
        for source in await repo.list_sources():
            for sid in await repo.list_snapshots(source):
                m = await repo.load_manifest(source, sid)
                for f in m.files:
                    for cid, _ in f.chunks:
                        if cid in m.packed:
                            required.add(pack_key(m.packed[cid][0]))
                            copies.add(chunk_key(cid))
                        else:
                            required.add(chunk_key(cid))
        return required, copies
    finally:
        await target.close()


class History:
    """A dataset source synced step by step (``replicator sync``) with retention: each step
    replaces some big files (loose chunks) and small ones (packs), so the manifests retention
    deletes leave unreferenced chunks and packs behind."""

    def __init__(self, tmp_path: Path, spec: TargetSpec, name: str = "d", keep_last: int = 2) -> None:
        self.spec = spec
        self.name = name
        self.primary = tmp_path / f"primary-{name}"
        self.primary.mkdir()
        self.rng = random.Random(name)
        source = {"name": name, "url": str(self.primary), "keep_last": keep_last, "max_delete": "100%"}
        data = config_dict(tmp_path / f"state-{name}", [source], [spec.config], chunking=SMALL_CHUNKS)
        self.cfg = write_config(tmp_path / f"{name}.yaml", data)
        self.trees: dict[str, dict[str, tuple[str, int, int]]] = {}
        """Snapshot id -> the primary's files it was taken of."""
        self.step = 0

    def change(self) -> None:
        self.step += 1
        for old in sorted(self.primary.glob("big-*"))[:-1]:
            old.unlink()
        (self.primary / f"big-{self.step:03d}.bin").write_bytes(self.rng.randbytes(300_000))
        for i in range(6):  # every step: the packs of old steps become wholly unreferenced
            (self.primary / f"small-{i}.txt").write_bytes(self.rng.randbytes(3000 + self.step))

    def sync(self) -> subprocess.CompletedProcess[str]:
        res = cli("sync", "-c", str(self.cfg), "-q")
        if res.returncode == 0:
            latest = self.latest()
            self.trees[latest] = tree_digest(self.primary)
        return res

    def advance(self) -> None:
        self.change()
        res = self.sync()
        assert res.returncode == 0, res.stderr

    def latest(self) -> str:
        return latest_snapshot(self.spec, self.name)

    def retained(self) -> list[str]:
        return retained_snapshots(self.spec, self.name)

    def check_restores(self, tmp_path: Path) -> None:
        """Every retained snapshot restores byte-identical to the files it was taken of."""
        ids = self.retained()
        assert ids
        for sid in ids:
            dest = tmp_path / f"restore-{self.name}-{sid[:22]}"
            res = cli("restore", *repo_args(self.spec), "-s", self.name, "--snapshot", sid, str(dest))
            assert res.returncode == 0, res.stderr
            assert tree_digest(dest) == self.trees[sid]
            shutil.rmtree(dest)


NO_REPACK = ("--repack-below", "0")


def kill_a_prune(spec: TargetSpec, rng: random.Random) -> bool:
    """Run ``prune --grace 0`` and SIGKILL it anywhere from interpreter start-up to the end of
    its deletions (0.2-1.5 s in); True if it was still running when killed."""
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).parent.parent))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "replicator", "prune", *repo_args(spec), "--grace", "0", "-q"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(rng.uniform(0.2, 1.5))
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def prune_cli(spec: TargetSpec, *extra: str) -> PruneResult:
    res = cli("prune", *repo_args(spec), "--grace", "0", "--json", *extra)
    assert res.returncode == 0, res.stderr
    (doc,) = json.loads(res.stdout)
    return PruneResult(**doc)


def verify_clean(spec: TargetSpec) -> None:
    res = cli("verify", *repo_args(spec), "--read-data")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("kind", ["posix", "rclone"])
def test_prune_deletes_exactly_what_retention_left_unreferenced(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    spec = make_target_spec(request, kind, tmp_path)
    history = History(tmp_path, spec)
    for _ in range(4):
        history.advance()
    tcfg = target_config(spec)
    before = run(lambda: stored_objects(tcfg))
    required, copies = run(lambda: referenced(tcfg))
    garbage = {k for k in before if k not in required and k not in copies}
    assert len(history.retained()) == 2
    assert any(k.startswith("chunks/") for k in garbage) and any(k.startswith("packs/") for k in garbage)

    # Exactly the unreferenced objects: no repacking here (History leaves a pack referenced only
    # by a big file's tail, which would be superseded; tests/test_repack.py covers that).
    first = prune_cli(spec, *NO_REPACK)  # phase 1: plans, deletes nothing
    assert (first.deleted_objects, first.planned_objects) == (0, len(garbage))
    assert first.garbage_bytes == sum(before[k] for k in garbage)
    assert first.live_objects == len(before) - len(garbage)
    assert first.manifests == 2 and first.missing == 0
    assert run(lambda: stored_objects(tcfg)) == before

    dry = prune_cli(spec, "--dry-run", *NO_REPACK)  # what the next run will do, without doing it
    assert dry.dry_run and dry.deleted_objects == len(garbage)
    assert dry.deleted_bytes == sum(before[k] for k in garbage)
    assert run(lambda: stored_objects(tcfg)) == before

    second = prune_cli(spec, *NO_REPACK)  # phase 2: deletes exactly the garbage
    assert (second.deleted_objects, second.deleted_bytes) == (dry.deleted_objects, dry.deleted_bytes)
    assert second.live_bytes == dry.live_bytes and second.garbage_objects == 0
    assert (
        (second.planned_objects, second.waiting_plans) == (dry.planned_objects, dry.waiting_plans) == (0, 0)
    )
    after = run(lambda: stored_objects(tcfg))
    assert set(after) == set(before) - garbage
    verify_clean(spec)
    history.check_restores(tmp_path)

    third = prune_cli(spec, *NO_REPACK)  # nothing left to do
    assert (third.deleted_objects, third.planned_objects) == (0, 0)
    # The repository now says writers must follow the protocol: version 2.
    config = run(lambda: _get(tcfg, "config.json"))
    assert json.loads(config)["version"] == 2


async def _get(tcfg: TargetConfig, key: str) -> bytes:
    target = await open_target(tcfg)
    try:
        return await target.get(key)
    finally:
        await target.close()


def test_text_output_and_refusals_exit_non_zero_with_one_line(tmp_path: Path) -> None:
    spec = TargetSpec("posix", {"name": "t1", "url": str(tmp_path / "t")}, path=tmp_path / "t")
    (tmp_path / "t").mkdir()
    history = History(tmp_path, spec)
    for _ in range(3):
        history.advance()
    text = cli("prune", "-c", str(history.cfg), "--grace", "0")
    assert text.returncode == 0, text.stderr
    assert "planned:" in text.stdout and "reference" in text.stdout
    before = run(lambda: stored_objects(target_config(spec)))

    # A manifest that cannot be decoded: refuse to sweep at all.
    assert spec.path is not None
    victim = spec.path / snapshot_key("d", history.retained()[0])
    good = victim.read_bytes()
    victim.write_bytes(b"\x28\xb5\x2f\xfd garbage")
    res = cli("prune", "-c", str(history.cfg), "--grace", "0")
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "cannot read a manifest" in res.stderr
    assert run(lambda: stored_objects(target_config(spec))) == before
    victim.write_bytes(good)

    # No manifest at all while chunks exist (a listing that came back empty): refuse.
    hidden = tmp_path / "hidden"
    shutil.move(spec.path / "snapshots", hidden)
    shutil.move(spec.path / "refs", tmp_path / "hidden-refs")
    res = cli("prune", *repo_args(spec), "--grace", "0")
    assert res.returncode == 1 and "no snapshot manifest found" in res.stderr
    assert run(lambda: stored_objects(target_config(spec))) == before

    res = cli("prune", *repo_args(spec), "--grace", "soon")
    assert res.returncode == 2 and "--grace" in res.stderr


@pytest.mark.parametrize("prefix", ["chunks/", "packs/", "snapshots/", "refs/"])
def test_a_listing_that_fails_midway_deletes_nothing(tmp_path: Path, prefix: str) -> None:
    spec = TargetSpec("posix", {"name": "t1", "url": str(tmp_path / "t")}, path=tmp_path / "t")
    (tmp_path / "t").mkdir()
    history = History(tmp_path, spec)
    for _ in range(3):
        history.advance()
    assert prune_cli(spec).planned_objects > 0  # a plan is due: the next run would delete
    before = run(lambda: stored_objects(target_config(spec)))
    with MemoryTargets() as fakes:
        fake = fakes.wrap("f", str(spec.path))
        fake.plan.fail("list", prefix=prefix, times=None, after=1)
        tcfg = parse_target({"name": "f", "url": "faulty://f", "retry": FAST_RETRY})
        with pytest.raises(TargetError) as err:
            run(lambda: prune_target(tcfg, PruneOptions(grace=0)))
        assert "list" in str(err.value) and "\n" not in str(err.value)
    assert run(lambda: stored_objects(target_config(spec))) == before
    gc = run(lambda: _list_gc(target_config(spec)))
    assert gc[0] and not gc[1]  # the plan waits; no deletion record was written
    verify_clean(spec)


async def _list_gc(tcfg: TargetConfig) -> tuple[list[str], list[str], list[str]]:
    target = await open_target(tcfg)
    try:
        gc = await list_gc(target)
        return sorted(gc.plans), sorted(gc.records), sorted(gc.writers)
    finally:
        await target.close()


# -- the writer's rule -----------------------------------------------------------------------


async def build_unpublished(rep: Replicator, config: Config) -> Any:
    """Read the source and upload its new chunks (sync's first step), without publishing."""
    cfg = config.sources[0]
    listing = await rep.scan(cfg)
    candidate = await rep.build_candidate(cfg, listing.files, SourceResult(cfg.name))
    t = rep.open_targets[0]
    await t.uploader.settle(candidate.chunk_ids(t.repo.hash))
    return candidate


@pytest.mark.parametrize("kind", ["posix", "rclone"])
@pytest.mark.parametrize("prunes_before_publish", [1, 2])
def test_a_writer_keeps_chunks_it_uploaded_before_a_prune(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str, prunes_before_publish: int
) -> None:
    """A writer uploads chunks, then a prune plans them as garbage (1) or plans and deletes
    them (2: nothing referenced them yet), then the writer publishes: with 1 the manifest
    exists before phase 2 re-marks, so they stay; with 2 the writer learns of the deletion
    from the record and sends them again before its manifest names them."""
    spec = make_target_spec(request, kind, tmp_path)
    history = History(tmp_path, spec)
    history.advance()
    history.change()
    config = load_config(history.cfg)
    tcfg = target_config(spec)

    async def go() -> tuple[list[PruneResult], PruneResult, str]:
        async with Replicator(config) as rep:
            await rep.attach_all()
            candidate = await build_unpublished(rep, config)
            t = rep.open_targets[0]
            new = {chunk_key(c) for c in candidate.chunk_ids(t.repo.hash)} & set(await stored_objects(tcfg))
            assert new, "the writer uploaded chunks no manifest names yet"
            prunes = [await prune_target(tcfg, PruneOptions(grace=0)) for _ in range(prunes_before_publish)]
            result = await rep.publish(t, config.sources[0], candidate)
            assert result.status == "published", result.error
            assert result.snapshot is not None
            after = await prune_target(tcfg, PruneOptions(grace=0))
            return prunes, after, result.snapshot

    prunes, after, snapshot = run(go)
    assert prunes[0].planned_objects > 0
    if prunes_before_publish == 2:
        assert prunes[1].deleted_objects > 0  # the writer's unpublished chunks went
    assert after.missing == 0
    history.trees[snapshot] = tree_digest(history.primary)
    verify_clean(spec)
    history.check_restores(tmp_path)


def test_deletion_waits_for_a_writer_in_its_window_and_a_writer_waits_for_deletion(
    tmp_path: Path,
) -> None:
    spec = TargetSpec("posix", {"name": "t1", "url": str(tmp_path / "t")}, path=tmp_path / "t")
    (tmp_path / "t").mkdir()
    history = History(tmp_path, spec)
    for _ in range(3):
        history.advance()
    tcfg = target_config(spec)
    assert prune_cli(spec).planned_objects > 0
    before = run(lambda: stored_objects(tcfg))
    config = load_config(history.cfg)

    async def writer_inside_window() -> PruneResult:
        async with Replicator(config) as rep:
            await rep.attach_all()
            async with rep.open_targets[0].uploader.window():
                return await prune_target(tcfg, PruneOptions(grace=0))

    deferred = run(writer_inside_window)
    assert deferred.deferred and deferred.deleted_objects == 0
    assert deferred.planned_objects == 0 and deferred.waiting_plans == 1  # the due plan waits, not copied
    assert run(lambda: stored_objects(tcfg)) == before
    assert run(lambda: _list_gc(tcfg))[2] == []  # the writer's intent is gone with its window

    async def writer_meets_deleting_flag() -> tuple[bool, bool]:
        target = await open_target(tcfg)
        flag = Heartbeat(target, f"{DELETING}20260101T000000Z-0123456789abcdef", "collector", 900)
        await flag.write()
        try:
            async with Replicator(config) as rep:
                await rep.attach_all()
                entering = asyncio.create_task(rep.open_targets[0].uploader.window().__aenter__())
                await asyncio.sleep(1.0)
                blocked = not entering.done()
                await flag.stop()  # the collector finished deleting
                window = await asyncio.wait_for(entering, 30)
                await window.__aexit__(None, None, None)
                return blocked, window.waited > 0
        finally:
            await target.close()

    blocked, waited = run(writer_meets_deleting_flag)
    assert blocked and waited
    second = prune_cli(spec)
    assert second.deleted_objects > 0
    verify_clean(spec)


def test_writers_and_a_looping_prune_never_leave_a_dangling_reference(
    tmp_path: Path, rclone: RcloneServer
) -> None:
    """The short form of bench/bench_gc_torture.py: three ``replicator sync`` processes (one
    with a source of its own, two taking turns on another from separate state directories)
    write changing data into one repository on rclone while ``replicator prune --grace 0``
    loops and one more prune is killed midway; every snapshot any of them published restores
    byte-identically after its round, and at the end ``verify --read-data``, the reference
    reader and an independent count find nothing missing."""
    options = TortureOptions(writers=1, shared_writers=2, rounds=2, prunes=1, kill_every=2, keep_last=2)
    report = torture(options, rclone, tmp_path / "torture", [sys.executable, "-m", "replicator"])
    assert report.ok(), summary(report, tmp_path)
    # 1 first sync + 3 writers x 2 rounds, every one of them restored after its round.
    assert report.snapshots_published == report.snapshots_verified == 7
    assert report.prunes_killed == 1 and report.prune_runs >= 2 + 2
    assert report.deleted_objects > 0, "the collectors never deleted anything"
    assert report.dangling_references == 0 and report.reference_restores == 2


def test_kill_9_at_any_point_of_a_prune_leaves_every_snapshot_restorable(tmp_path: Path) -> None:
    spec = TargetSpec("posix", {"name": "t1", "url": str(tmp_path / "t")}, path=tmp_path / "t")
    (tmp_path / "t").mkdir()
    history = History(tmp_path, spec, keep_last=1)
    history.advance()
    rng = random.Random(9)
    killed_with_work_left = 0
    for _ in range(KILL_TRIALS):
        for _ in range(2):
            history.advance()
        assert prune_cli(spec).planned_objects > 0
        killed_with_work_left += kill_a_prune(spec, rng)
        verify_clean(spec)  # whatever the kill left, the snapshots are whole
        history.check_restores(tmp_path)
    for _ in range(2):  # the lock of the killed process is taken over (its pid is gone)
        prune_cli(spec)
    tcfg = target_config(spec)
    required, copies = run(lambda: referenced(tcfg))
    assert set(run(lambda: stored_objects(tcfg))) <= required | copies
    plans, _, writers = run(lambda: _list_gc(tcfg))
    assert plans == [] and writers == []
    assert spec.path is not None
    assert not list((spec.path / PLANS).glob("*")) and not (spec.path / "gc" / "lock").exists()
    assert list((spec.path / RECORDS).glob("*.json"))
    verify_clean(spec)
    history.check_restores(tmp_path)


def test_a_live_lock_of_another_prune_is_refused_and_a_dead_ones_taken_over(tmp_path: Path) -> None:
    spec = TargetSpec("posix", {"name": "t1", "url": str(tmp_path / "t")}, path=tmp_path / "t")
    (tmp_path / "t").mkdir()
    history = History(tmp_path, spec)
    for _ in range(2):
        history.advance()
    tcfg = target_config(spec)

    async def hold_lock(body: bytes | None = None) -> None:
        target = await open_target(tcfg)
        try:
            lock = Heartbeat(target, LOCK_KEY, "collector", 900)  # held by this (live) process
            await target.put(LOCK_KEY, body or lock.body)
        finally:
            await target.close()

    run(hold_lock)
    res = cli("prune", *repo_args(spec), "--grace", "0")
    assert res.returncode == 1 and "another prune holds gc/lock" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # A holder on this host whose process is gone: taken over at once.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    body = json.dumps(
        {"role": "collector", "host": socket.gethostname(), "pid": int(dead.stdout), "token": "x"}
    )
    run(lambda: hold_lock(body.encode()))
    assert prune_cli(spec).manifests == 2
    assert spec.path is not None and not (spec.path / LOCK_KEY).exists()


class _LaggingListings(PosixTarget):
    """A store whose listings miss objects under ``gc/`` for the first ``lag`` listings."""

    def __init__(self, root: Path, lag: int) -> None:
        super().__init__("lagging", root)
        self.lag = lag

    async def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        hide, self.lag = self.lag > 0, self.lag - 1
        async for info in super().list(prefix, start_after=start_after):
            if not (hide and info.key.startswith("gc/")):
                yield info


def test_the_store_clock_looks_again_when_a_listing_misses_a_fresh_write(tmp_path: Path) -> None:
    """bench_gc_torture saw one prune fail with "the target reports no modification times"
    when a listing right after the PUT missed the object: it now looks again, and a store
    whose listings keep missing it is named for what it is."""

    async def go(lag: int) -> float:
        target = _LaggingListings(tmp_path, lag)
        await target.put("gc/deleted/x.probe", b"")
        return await server_now(target, "gc/deleted/x.probe")

    assert run(lambda: go(1)) > 0
    with pytest.raises(RepositoryError, match="does not show the object just written"):
        run(lambda: go(10))
