"""Repacking sparse packs (``replicator prune --repack-below``, docs/FORMAT.md 10.2): a pack
whose referenced share fell under the threshold has its live chunks copied out as loose chunk
objects, is then *superseded* and deleted like an unreferenced object, while every retained
snapshot keeps reading (the readers fall back to the loose copies) -- crash-safe, with
concurrent writers, and never on the strength of a chunk that fails its id check."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from replicator.config import load_config
from replicator.config import target_config as parse_target
from replicator.engine import Replicator
from replicator.errors import TargetError
from replicator.gc.prune import PruneOptions, PruneResult, prune_target
from replicator.repository import Repository, chunk_key, pack_key
from replicator.targets import open_target
from tests.conftest import TargetSpec, cli, make_target_spec, write_config
from tests.faults import MemoryTargets
from tests.helpers import config_dict, run_reference_reader, tree_digest
from tests.servers import RcloneServer
from tests.test_prune import (
    FAST_RETRY,
    KILL_TRIALS,
    SMALL_CHUNKS,
    build_unpublished,
    kill_a_prune,
    latest_snapshot,
    prune_cli,
    repo_args,
    retained_snapshots,
    run,
    stored_objects,
    target_config,
    verify_clean,
)


class Shrinking:
    """A dataset of many small files (every one packed) synced with ``keep_last: 2``: a big
    first step, then steps that delete most files and add a few, so the first step's packs end
    up sparse."""

    def __init__(self, tmp_path: Path, spec: TargetSpec, name: str = "d") -> None:
        self.tmp_path, self.spec, self.name = tmp_path, spec, name
        self.primary = tmp_path / f"primary-{name}"
        self.primary.mkdir()
        self.rng = random.Random(name)
        source = {"name": name, "url": str(self.primary), "keep_last": 2, "max_delete": "100%"}
        data = config_dict(tmp_path / f"state-{name}", [source], [spec.config], chunking=SMALL_CHUNKS)
        self.cfg = write_config(tmp_path / f"{name}.yaml", data)
        self.trees: dict[str, dict[str, tuple[str, int, int]]] = {}
        self.serial = 0

    def add(self, count: int) -> None:
        for _ in range(count):
            self.serial += 1
            size = self.rng.randrange(2000, 6000)
            (self.primary / f"f-{self.serial:05d}.bin").write_bytes(self.rng.randbytes(size))

    def keep_only(self, share: float) -> None:
        files = sorted(self.primary.glob("f-*"))
        for f in self.rng.sample(files, len(files) - round(len(files) * share)):
            f.unlink()

    def sync(self) -> None:
        res = cli("sync", "-c", str(self.cfg), "-q")
        assert res.returncode == 0, res.stderr
        self.trees[self.latest()] = tree_digest(self.primary)

    def build(self, first: int = 400) -> None:
        """Step 1: ``first`` files; step 2: 15 % of them left, 20 new; step 3: 10 new."""
        self.add(first)
        self.sync()
        self.keep_only(0.15)
        self.add(20)
        self.sync()
        self.add(10)
        self.sync()

    def latest(self) -> str:
        return latest_snapshot(self.spec, self.name)

    def retained(self) -> list[str]:
        return retained_snapshots(self.spec, self.name)

    def root(self) -> Path:
        """The repository as a directory (rclone serves one), for the reference reader."""
        if self.spec.path is not None:
            return self.spec.path
        assert isinstance(self.spec.server, RcloneServer) and self.spec.bucket is not None
        return self.spec.server.root / self.spec.bucket / "replica"

    def check_restores(self, *, reference: bool = True) -> None:
        """Every retained snapshot restores byte-identically, with ``replicator restore`` and
        with tools/restore_reference.py."""
        ids = self.retained()
        assert ids
        for sid in ids:
            dest = self.tmp_path / f"restore-{self.name}-{sid[:22]}"
            res = cli("restore", *repo_args(self.spec), "-s", self.name, "--snapshot", sid, str(dest))
            assert res.returncode == 0, res.stderr
            assert tree_digest(dest) == self.trees[sid]
            if reference:
                ref = self.tmp_path / f"reference-{self.name}-{sid[:22]}"
                out = run_reference_reader(self.root(), self.name, sid, ref, cwd=self.tmp_path)
                assert out.returncode == 0, out.stderr
                assert tree_digest(ref) == self.trees[sid]
                subprocess.run(["rm", "-rf", str(ref)], check=True)
            subprocess.run(["rm", "-rf", str(dest)], check=True)


async def pack_usage(spec: TargetSpec) -> dict[str, tuple[int, int, set[str]]]:
    """Per stored pack: (its size, the stored bytes of the distinct chunks the manifests locate
    in it, those chunk ids), read with the repository's reader, not the collector's code."""
    target = await open_target(target_config(spec))
    try:
        repo = await Repository.open(target)
        sizes = {pack_key(p): n async for p, n in repo.list_packs()}
        ranges: dict[str, dict[str, int]] = {}
        for source in await repo.list_sources():
            for sid in await repo.list_snapshots(source):
                m = await repo.load_manifest(source, sid)
                for cid, (pack, _, length) in m.packed.items():
                    ranges.setdefault(pack_key(pack), {})[cid] = length
        return {
            key: (size, sum(ranges.get(key, {}).values()), set(ranges.get(key, {})))
            for key, size in sizes.items()
        }
    finally:
        await target.close()


def sparse_packs(spec: TargetSpec, below: float = 0.5) -> dict[str, tuple[int, int, set[str]]]:
    usage = run(lambda: pack_usage(spec))
    return {k: u for k, u in usage.items() if u[1] and u[1] / u[0] < below}


@pytest.mark.parametrize("kind", ["posix", "rclone"])
def test_prune_supersedes_sparse_packs_and_every_snapshot_still_restores(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    spec = make_target_spec(request, kind, tmp_path)
    data = Shrinking(tmp_path, spec)
    data.build()
    tcfg = target_config(spec)
    before = run(lambda: stored_objects(tcfg))
    sparse = sparse_packs(spec)
    assert len(data.retained()) == 2 and len(sparse) == 1, sparse
    (pack,) = sparse
    pack_size, live, chunks = sparse[pack]
    assert live < 0.3 * pack_size  # ~15 % of the first step's files are still referenced

    off = prune_cli(spec, "--repack-below", "0")  # 0 disables repacking
    assert (off.repacked_packs, off.planned_objects) == (0, 0)
    assert run(lambda: stored_objects(tcfg)) == before

    dry = prune_cli(spec, "--dry-run")  # counts, writes nothing
    assert (dry.repacked_packs, dry.repacked_chunks, dry.repacked_bytes) == (1, len(chunks), live)
    assert run(lambda: stored_objects(tcfg)) == before

    first = prune_cli(spec)  # copies the live chunks out, plans the superseded pack
    assert (first.repacked_packs, first.repacked_chunks, first.repacked_bytes) == (1, len(chunks), live)
    assert first.repack_damaged == 0 and first.deleted_objects == 0
    assert first.planned_objects == 1 and first.planned_bytes == pack_size
    copied = run(lambda: stored_objects(tcfg))
    assert set(copied) == set(before) | {chunk_key(c) for c in chunks}
    assert all(copied[chunk_key(c)] > 0 for c in chunks)
    verify_clean(spec)

    second = prune_cli(spec)  # deletes it: readers now use the loose copies
    assert (second.deleted_objects, second.deleted_bytes) == (1, pack_size)
    assert second.repacked_packs == 0 and second.missing == 0 and second.garbage_objects == 0
    after = run(lambda: stored_objects(tcfg))
    assert pack not in after
    assert sum(after.values()) == sum(before.values()) - pack_size + live
    assert second.referenced_bytes == second.live_bytes == sum(after.values())
    verify_clean(spec)
    data.check_restores()

    third = prune_cli(spec)
    assert (third.repacked_packs, third.planned_objects, third.deleted_objects, third.missing) == (0, 0, 0, 0)
    text = cli("prune", *repo_args(spec), "--grace", "0", "--dry-run")
    assert text.returncode == 0 and "repacked: 0 sparse packs" in text.stdout, text.stdout


def test_repack_below_is_checked_and_documented(tmp_path: Path) -> None:
    helptext = cli("prune", "--help")
    assert "--repack-below" in helptext.stdout and "0.5" in helptext.stdout
    spec = make_target_spec_posix(tmp_path)
    for bad in ("1.5", "-1", "half", "120%"):
        res = cli("prune", *repo_args(spec), "--repack-below", bad)
        assert res.returncode == 2 and "--repack-below" in res.stderr, res.stderr


def make_target_spec_posix(tmp_path: Path) -> TargetSpec:
    path = tmp_path / "target"
    path.mkdir()
    return TargetSpec("posix", {"name": "t1", "url": str(path)}, path=path)


def test_a_damaged_live_range_is_reported_and_its_pack_never_deleted(tmp_path: Path) -> None:
    spec = make_target_spec_posix(tmp_path)
    data = Shrinking(tmp_path, spec)
    data.build()
    ((pack, (_, live, chunks)),) = sparse_packs(spec).items()
    assert spec.path is not None
    victim = sorted(chunks)[0]

    async def damage() -> tuple[int, int]:
        target = await open_target(target_config(spec))
        try:
            repo = await Repository.open(target)
            for sid in await repo.list_snapshots("d"):
                at = (await repo.load_manifest("d", sid)).packed.get(victim)
                if at is not None:
                    break
            assert at is not None and pack_key(at[0]) == pack
            raw = bytearray(await target.get(pack))
            raw[at[1] + at[2] // 2] ^= 0xFF  # raw codec (random bytes): decodes, fails the id check
            await target.put(pack, bytes(raw))
            return at[1], at[2]
        finally:
            await target.close()

    offset, length = run(damage)
    first = prune_cli(spec)
    assert first.repack_damaged == 1 and first.repacked_packs == 0
    assert first.repacked_chunks == len(chunks) - 1 and first.repacked_bytes == live - length
    assert any(f"{pack}@{offset}" in n and victim in n for n in first.notes), first.notes
    assert first.planned_objects == 0
    second = prune_cli(spec)
    assert second.deleted_objects == 0 and second.repack_damaged == 1
    assert pack in run(lambda: stored_objects(target_config(spec)))
    text = cli("prune", *repo_args(spec), "--grace", "0")
    assert "1 damaged chunk" in text.stdout and f"{pack}@{offset}" in text.stdout, text.stdout

    # verify names the damage; --repair sends the chunk again (loose) from the primary, after
    # which the pack is superseded and goes.
    res = cli("verify", "-c", str(data.cfg), "--read-data")
    assert res.returncode != 0 and f"{pack}@{offset}" in res.stdout + res.stderr
    res = cli("verify", "-c", str(data.cfg), "--read-data", "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert prune_cli(spec).planned_objects == 1
    assert prune_cli(spec).deleted_objects == 1
    assert pack not in run(lambda: stored_objects(target_config(spec)))
    verify_clean(spec)
    data.check_restores()


def test_a_repack_that_fails_midway_leaves_everything_readable_and_the_next_run_finishes(
    tmp_path: Path,
) -> None:
    spec = make_target_spec_posix(tmp_path)
    data = Shrinking(tmp_path, spec)
    data.build()
    ((pack, (_, _, chunks)),) = sparse_packs(spec).items()
    assert len(chunks) > 10
    assert spec.path is not None
    with MemoryTargets() as fakes:
        fake = fakes.wrap("f", str(spec.path))
        for digit in "89abcdef":  # the copies of about half the chunks never land
            fake.plan.fail("put", prefix=f"chunks/{digit}", times=None)
        tcfg = parse_target({"name": "f", "url": "faulty://f", "retry": FAST_RETRY})
        with pytest.raises(TargetError):
            run(lambda: prune_target(tcfg, PruneOptions(grace=0)))
    stored = run(lambda: stored_objects(target_config(spec)))
    assert pack in stored and 0 < sum(chunk_key(c) in stored for c in chunks) < len(chunks)
    verify_clean(spec)
    data.check_restores(reference=False)
    first = prune_cli(spec)
    assert first.repacked_packs == 1 and first.repacked_chunks < len(chunks)  # the copies made stay
    assert prune_cli(spec).deleted_objects == 1
    verify_clean(spec)
    data.check_restores()


def test_kill_9_during_repack_and_prune_leaves_every_snapshot_restorable(tmp_path: Path) -> None:
    spec = make_target_spec_posix(tmp_path)
    data = Shrinking(tmp_path, spec)
    data.build(first=800)
    rng = random.Random(19)
    for trial in range(KILL_TRIALS):
        if trial:  # a fresh sparse pack: many files, then most of them deleted, and the
            # snapshot that held them all falls out of keep_last: 2
            data.add(800)
            data.sync()
            data.keep_only(0.1)
            data.sync()
            data.add(5)
            data.sync()
        assert sparse_packs(spec)
        # Two runs (repack + plan, then delete), each killed anywhere from start-up to its end;
        # the lock of a killed run is taken over by the next (its pid is gone).
        for _ in range(2):
            kill_a_prune(spec, rng)
            verify_clean(spec)
        data.check_restores(reference=False)
    for _ in range(2):
        prune_cli(spec)
    assert not sparse_packs(spec)
    last = prune_cli(spec)
    assert (last.missing, last.planned_objects, last.repacked_packs) == (0, 0, 0)
    verify_clean(spec)
    data.check_restores()


@pytest.mark.parametrize("kind", ["posix", "rclone"])
def test_a_writer_that_deduplicated_against_a_superseded_pack_uploads_again(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    """A writer builds a snapshot whose unchanged files it knows to be in a sparse pack; two
    prunes repack and delete that pack; the writer learns it from the deletion record, forgets
    every chunk located in the pack, and uploads them again before its manifest names them."""
    spec = make_target_spec(request, kind, tmp_path)
    data = Shrinking(tmp_path, spec)
    data.build()
    ((pack, (_, _, chunks)),) = sparse_packs(spec).items()
    data.add(3)
    config = load_config(data.cfg)
    tcfg = target_config(spec)

    async def go() -> tuple[list[PruneResult], str, dict[str, Any]]:
        async with Replicator(config) as rep:
            await rep.attach_all()
            candidate = await build_unpublished(rep, config)
            t = rep.open_targets[0]
            ids = list(candidate.chunk_ids(t.repo.hash))
            # Confirmed now, so the publish does not check them again: only the deletion record
            # can tell this writer that the pack went.
            await t.uploader.presence.confirm(ids)
            before = t.uploader.stored(ids)
            assert {c for c, at in before.items() if at is not None and pack_key(at[0]) == pack} == chunks
            prunes = [await prune_target(tcfg, PruneOptions(grace=0)) for _ in range(2)]
            result = await rep.publish(t, config.sources[0], candidate)
            assert result.status == "published", result.error
            assert result.snapshot is not None
            after = t.uploader.chunks.stored(ids)
            return prunes, result.snapshot, after

    prunes, snapshot, index = run(go)
    # (The writer's unpublished pack of the new files goes too: nothing referenced it yet.)
    assert prunes[0].repacked_packs == 1 and prunes[1].deleted_objects >= 1
    assert pack not in run(lambda: stored_objects(tcfg))
    # The chunk index holds no location in the deleted pack, and the new manifest names none.
    assert not [c for c, at in index.items() if at is not None and pack_key(at[0]) == pack]

    async def named_packs() -> set[str]:
        target = await open_target(tcfg)
        try:
            m = await (await Repository.open(target)).load_manifest("d", snapshot)
            return {pack_key(at[0]) for at in m.packed.values()}
        finally:
            await target.close()

    named = run(named_packs)
    assert pack not in named and named <= set(run(lambda: stored_objects(tcfg)))
    data.trees[snapshot] = tree_digest(data.primary)
    assert prune_cli(spec).missing == 0
    verify_clean(spec)
    data.check_restores()
