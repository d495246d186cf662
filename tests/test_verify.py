"""verify: every stored chunk's corruption is caught and named; structural problems too."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from replicator.config import Config, TargetConfig
from replicator.repository import Repository, chunk_key, ref_key
from replicator.state import StateStore
from replicator.sync import run_sync
from replicator.targets import open_target
from replicator.verify import check
from replicator.verify.check import VerifyReport, verify_repository
from tests.conftest import TargetSpec, make_target_spec
from tests.helpers import PATIENCE, config_dict, make_checkpoint, stored_chunks
from tests.servers import RcloneServer

SMALL_CHUNKS = {"min_size": "16KiB", "avg_size": "64KiB", "max_size": "256KiB"}


def sync_sample(tmp_path: Path, spec: TargetSpec) -> Config:
    primary = tmp_path / "primary"
    make_checkpoint(primary, 1, hidden=192)
    config = Config.model_validate(
        config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [spec.config], chunking=SMALL_CHUNKS)
    )
    results, errors = asyncio.run(run_sync(config))
    assert not errors and results[0].ok
    return config


def verify(config: Config, **kwargs: Any) -> VerifyReport:
    async def go() -> VerifyReport:
        target = await open_target(config.targets[0])
        try:
            return await verify_repository(await Repository.open(target), **kwargs)
        finally:
            await target.close()

    return asyncio.run(go())


def repo_dir(spec: TargetSpec, rclone: RcloneServer | None) -> Path:
    """Where the target keeps its objects on disk (rclone serves a plain directory)."""
    if spec.kind == "posix":
        assert spec.path is not None
        return spec.path
    assert rclone is not None and spec.bucket is not None
    return rclone.root / spec.bucket / "replica"


@pytest.mark.parametrize("kind", ["posix", "rclone"])
def test_a_flipped_byte_in_any_stored_chunk_is_named(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    spec = make_target_spec(request, kind, tmp_path)
    config = sync_sample(tmp_path, spec)
    chunks = stored_chunks(repo_dir(spec, request.getfixturevalue("rclone") if kind == "rclone" else None))
    assert len(chunks) >= 10
    assert {c.key.split("/")[0] for c in chunks} == {"chunks", "packs"}, "loose and packed chunks"
    assert verify(config, read_data=1.0).ok
    for i, chunk in enumerate(chunks):
        pos = (i * 7919) % chunk.length  # header byte, payload, or trailer: all must be caught
        original = chunk.flip(pos)
        try:
            report = verify(config, read_data=1.0)
        finally:
            chunk.path.write_bytes(original)
        assert [p.key for p in report.problems] == [chunk.key], f"flip at byte {pos} of {chunk.key}"


def test_sampled_read_data_reads_the_requested_share(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    config = sync_sample(tmp_path, make_target_spec(request, "posix", tmp_path))
    full = verify(config, read_data=1.0)
    half = verify(config, read_data=0.5, seed=1)
    assert half.chunks_read == round(full.chunks_read * 0.5)


def test_structural_problems_are_named(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    spec = make_target_spec(request, "posix", tmp_path)
    config = sync_sample(tmp_path, spec)
    assert spec.path is not None
    victim = sorted((spec.path / "chunks").rglob("*"))[-1]
    victim.unlink()
    report = verify(config)
    assert len(report.problems) == 1
    assert report.problems[0].key == str(victim.relative_to(spec.path))
    assert "missing (needed by d/" in report.problems[0].message

    # verify tells the state store, so the next sync uploads the chunk again.
    state = StateStore.open(config.state_dir)
    repo_id = asyncio.run(_repo_id(config.targets[0]))
    assert state.chunks(repo_id).has(victim.name)
    asyncio.run(_verify_with_state(config, state))
    assert not state.chunks(repo_id).has(victim.name)
    state.close()
    results, _ = asyncio.run(run_sync(config))
    assert results[0].targets[0].uploads.chunks_sent == 1  # exactly the lost chunk, nothing else
    assert victim.exists()
    assert verify(config).ok

    (spec.path / ref_key("d")).write_text('{"snapshot": "20200101T000000.000000Z-' + "0" * 32 + '"}')
    report = verify(config)
    assert any(p.key == ref_key("d") and "missing snapshot" in p.message for p in report.problems)
    assert chunk_key("ab" * 16) == f"chunks/ab/{'ab' * 16}"


async def _repo_id(cfg: TargetConfig) -> str:
    target = await open_target(cfg)
    try:
        return (await Repository.open(target)).config.id
    finally:
        await target.close()


async def _verify_with_state(config: Config, state: StateStore) -> None:
    target = await open_target(config.targets[0])
    try:
        await verify_repository(await Repository.open(target), state=state)
    finally:
        await target.close()


@pytest.mark.parametrize("kind", ["posix", "rclone"])
def test_read_data_never_waits_for_memory_behind_chunks_read_after_the_one_it_needs(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """``--read-data`` reads ahead of the file being hashed within FILE_WINDOW_BYTES. Readers
    used to take memory in whatever order it fitted: a small chunk read later overtook a large
    one still waiting, until the window was full of chunks the hasher could not reach, and
    verify hung. Here with a window of the largest chunk plus the smallest."""
    spec = make_target_spec(request, kind, tmp_path)
    config = sync_sample(tmp_path, spec)

    async def go() -> VerifyReport:
        target = await open_target(config.targets[0])
        try:
            repo = await Repository.open(target)
            sizes = sorted([size async for _, size in repo.list_chunks()])
            assert sizes[0] < sizes[-1] // 4, "the sample needs chunks of mixed sizes"
            monkeypatch.setattr(check, "FILE_WINDOW_BYTES", sizes[-1] + sizes[0])
            checking = verify_repository(repo, read_data=1.0)
            return await asyncio.wait_for(checking, PATIENCE)
        finally:
            await target.close()

    report = asyncio.run(go())
    assert report.ok and report.chunks_read > 0, report
