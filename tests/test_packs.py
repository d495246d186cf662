"""Pack objects: small chunks are stored many to an object (docs/FORMAT.md, section 4.1)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from replicator import fanout
from replicator.config import Config
from replicator.repository import Repository
from replicator.restore import core as restore_module
from replicator.restore.core import restore_snapshot
from replicator.state import StateStore
from replicator.sync import run_sync
from replicator.targets import open_target
from replicator.targets.posix import PosixTarget
from replicator.verify.check import VerifyReport, verify_repository
from tests.conftest import TargetSpec
from tests.helpers import config_dict, stored_chunks, tree_digest


def small_tree(root: Path, count: int, start: int = 0) -> Path:
    for i in range(start, start + count):
        d = root / f"part-{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rec-{i:05d}.json").write_text(json.dumps({"id": i, "tokens": list(range(i % 97))}))
    return root


def make_config(tmp_path: Path, target: dict[str, Any]) -> Config:
    return Config.model_validate(
        config_dict(tmp_path, [{"name": "d", "url": str(tmp_path / "primary")}], [target])
    )


def sync(config: Config) -> fanout.UploadStats:
    results, errors = asyncio.run(run_sync(config))
    assert not errors and results[0].ok, results
    return results[0].targets[0].uploads


async def _with_repo(config: Config, work: Any) -> Any:
    target = await open_target(config.targets[0])
    try:
        return await work(await Repository.open(target))
    finally:
        await target.close()


def verify(config: Config, state: StateStore | None = None) -> VerifyReport:
    report = asyncio.run(_with_repo(config, lambda repo: verify_repository(repo, read_data=1.0, state=state)))
    assert isinstance(report, VerifyReport)
    return report


def restore(config: Config, dest: Path) -> None:
    async def go(repo: Repository) -> None:
        manifest = await repo.load_manifest("d", await repo.resolve("d"))
        result = await restore_snapshot(repo, manifest, dest)
        assert result.ok, result.failures

    asyncio.run(_with_repo(config, go))


def replicate_small_files(tmp_path: Path, count: int) -> Config:
    """``count`` small files at tmp_path/primary, synced to a POSIX target at tmp_path/target."""
    small_tree(tmp_path / "primary", count)
    (tmp_path / "target").mkdir()
    config = make_config(tmp_path, {"name": "t", "url": str(tmp_path / "target")})
    sync(config)
    return config


def packs_of(root: Path) -> list[Path]:
    return sorted(p for p in (root / "packs").rglob("*") if p.is_file())


def test_small_files_travel_in_one_pack_and_restore_from_it(tmp_path: Path, target_spec: TargetSpec) -> None:
    small_tree(tmp_path / "primary", 300)
    config = make_config(tmp_path, target_spec.config)
    stats = sync(config)
    assert stats.chunks_sent == 300
    report = verify(config)
    assert report.ok, report.problems
    assert (report.chunks_stored, report.packs_stored, report.chunks_read) == (0, 1, 300)
    restore(config, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(tmp_path / "primary")


def test_packs_are_sealed_at_pack_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout, "PACK_SIZE", 4096)
    config = replicate_small_files(tmp_path, 300)
    packs = packs_of(tmp_path / "target")
    assert len(packs) > 5
    assert all(p.stat().st_size < 4096 + 1024 for p in packs), "sealed once full, not later"
    assert verify(config).ok
    restore(config, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(tmp_path / "primary")


def test_a_lost_pack_is_named_then_sent_again(tmp_path: Path) -> None:
    config = replicate_small_files(tmp_path, 50)
    (pack,) = packs_of(tmp_path / "target")
    pack.unlink()
    state = StateStore.open(config.state_dir)
    report = verify(config, state)
    state.close()
    assert len(report.problems) == 50
    assert all(p.key.startswith(f"packs/{pack.parent.name}/{pack.name}@") for p in report.problems)
    assert all(p.message.startswith("pack is missing (needed by d/") for p in report.problems)

    assert sync(config).chunks_sent == 50  # verify told the state store: all of them again
    assert verify(config).ok


def test_a_truncated_pack_names_the_chunks_past_its_end(tmp_path: Path) -> None:
    config = replicate_small_files(tmp_path, 50)
    (pack,) = packs_of(tmp_path / "target")
    size = pack.stat().st_size
    with open(pack, "r+b") as f:
        f.truncate(size - 1)
    report = verify(config)
    (problem,) = report.problems
    assert f"pack is {size - 1} bytes, chunk ends at {size}" in problem.message


def test_pack_locations_are_relearned_when_the_state_is_lost(tmp_path: Path) -> None:
    config = replicate_small_files(tmp_path, 100)
    shutil.rmtree(config.state_dir)  # e.g. an emptyDir after a pod restart
    small_tree(tmp_path / "primary", 1, start=100)
    assert sync(config).chunks_sent == 1, "the 100 packed chunks were found in the latest manifest"
    assert len(packs_of(tmp_path / "target")) == 2
    assert verify(config).ok
    restore(config, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(tmp_path / "primary")


def test_a_listing_replaces_what_the_state_knew_of_a_repositorys_chunks(tmp_path: Path) -> None:
    """After an unclean shutdown: loose chunks the listing lacks, and packed chunks whose pack
    it lacks, are forgotten (a power cut took them); the rest is kept, so nothing is re-sent."""
    state = StateStore.open(tmp_path / "state")
    a, b, c, d = (f"{i:032x}" for i in range(1, 5))
    kept_pack, lost_pack = "ab" * 16, "cd" * 16
    r, other = state.chunks("r"), state.chunks("other")
    r.add_loose([a, b])
    r.add_packed([(c, (kept_pack, 0, 10)), (d, (lost_pack, 0, 10))])
    other.add_loose([b])
    state.commit()
    r.begin_listing()
    r.add_listed([a])
    r.end_listing({kept_pack})
    assert r.stored([a, b, c, d]) == {a: None, c: (kept_pack, 0, 10)}
    assert not r.has(b) and not r.has(d)
    assert other.stored([b]) == {b: None}, "other repositories are untouched"
    state.close()


def test_small_files_restore_with_one_read_per_stretch_of_a_pack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = replicate_small_files(tmp_path, 300)
    reads: list[str] = []
    get = PosixTarget.get

    async def counted(self: PosixTarget, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        reads.append(key)
        return await get(self, key, offset=offset, length=length)

    monkeypatch.setattr(PosixTarget, "get", counted)
    restore(config, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(tmp_path / "primary")
    pack_reads = [k for k in reads if k.startswith("packs/")]
    assert 0 < len(pack_reads) <= -(-300 // restore_module.SMALL_BATCH), "one read per batch, not per file"


def test_a_corrupt_packed_chunk_fails_only_its_file(tmp_path: Path) -> None:
    config = replicate_small_files(tmp_path, 100)
    victim = stored_chunks(tmp_path / "target")[0]
    victim.flip(victim.length // 2)

    async def go(repo: Repository) -> Any:
        manifest = await repo.load_manifest("d", await repo.resolve("d"))
        return await restore_snapshot(repo, manifest, tmp_path / "restored")

    result = asyncio.run(_with_repo(config, go))
    ((path, message),) = result.failures.items()
    assert victim.key in message
    restored, original = tree_digest(tmp_path / "restored"), tree_digest(tmp_path / "primary")
    assert path not in restored and len(restored) == 99
    assert all(original[p] == digest for p, digest in restored.items())
    assert not list((tmp_path / "restored").rglob(".*restore-*")), "temporary files are cleaned up"
