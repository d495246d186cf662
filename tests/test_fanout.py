"""The upload queues, in process, against an in-memory target with injected faults: nothing
ever waits on a dead or buggy target (issue 18)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from replicator import presence
from replicator.config import ChunkingConfig, CompressionConfig, target_config
from replicator.fanout import Uploader
from replicator.format.manifest import PackedAt
from replicator.hashing import HashSpec
from replicator.memory import ByteBudget, Lease
from replicator.read.pipeline import EncodedChunk
from replicator.repository import Repository, chunk_key, pack_key
from replicator.retry import RetryPolicy
from replicator.state import StateStore
from replicator.targets import open_target
from tests.faults import FakeTarget, MemoryTargets, Op
from tests.helpers import PATIENCE


def chunk(spec: HashSpec, data: bytes, budget: ByteBudget) -> EncodedChunk:
    """An "encoded" chunk: codec byte 0 (stored as is) and the data."""
    return EncodedChunk(
        {spec.key: spec.digest(data).hex()}, len(data), b"\x00" + data, Lease(budget, len(data))
    )


def healthy(up: Uploader) -> bool:
    return up.healthy and up.health.ok


@asynccontextmanager
async def uploader(fake: FakeTarget, tmp_path: Path, **kwargs: float) -> AsyncIterator[Uploader]:
    """An Uploader on ``fake`` whose requests retry for ever (the daemon's case)."""
    cfg = target_config(fake.config(retry={"initial": "10ms", "max": "50ms"}))
    target = await open_target(cfg, policy=RetryPolicy(initial=0.01, max=0.05, give_up_after=None))
    repo = await Repository.open_or_create(
        target, algorithm="xxh3-128", chunking=ChunkingConfig(), compression=CompressionConfig()
    )
    state = StateStore.open(tmp_path / "state")
    up = Uploader(fake.name, repo, state, 2, **kwargs)  # type: ignore[arg-type]
    await up.start()
    try:
        yield up
    finally:
        await up.close()
        await target.close()
        state.close()


def test_settle_never_waits_for_a_pack_opened_after_it_began(
    tmp_path: Path, memory_targets: MemoryTargets
) -> None:
    """A publish waits (settle) for its chunks; meanwhile another offer puts one of them into
    a new pack. The publisher hung there with every upload worker idle (issue 18): settle
    must seal that pack too."""
    fake = memory_targets.add("m")

    async def go() -> None:
        async with uploader(fake, tmp_path) as up:
            spec, budget = up.repo.hash, ByteBudget(64 << 20)
            big = chunk(spec, b"B" * (2 << 20), budget)  # a loose object
            small = chunk(spec, b"small", budget)  # packed
            gate = fake.plan.hang("put", prefix="chunks/")
            await up.offer(big)
            await gate.wait_entered()
            ids = [big.ids[spec.key], small.ids[spec.key]]
            settling = asyncio.create_task(up.settle(ids))
            await asyncio.sleep(0.05)  # settle has sealed what was open and waits for `big`
            await up.offer(small)  # a new pack, opened after settle began
            gate.release()
            await asyncio.wait_for(settling, PATIENCE)
            assert set(up.stored(ids)) == set(ids)

    asyncio.run(go())


def test_a_target_that_keeps_failing_drops_its_uploads_in_flight(
    tmp_path: Path, memory_targets: MemoryTargets
) -> None:
    """Requests retried for ever (the daemon) against a target in a 503 storm: after the
    failing grace the uploader turns unhealthy and cancels what is in flight, so a publish
    waiting for those chunks returns at once instead of waiting out the retries."""
    fake = memory_targets.add("m")

    async def go() -> None:
        async with uploader(fake, tmp_path, failing_grace=0.2) as up:
            spec, budget = up.repo.hash, ByteBudget(64 << 20)
            storm = fake.plan.storm("put")
            big = chunk(spec, b"C" * (2 << 20), budget)
            await up.offer(big)
            await asyncio.wait_for(up.settle([big.ids[spec.key]]), PATIENCE)
            assert not up.stored([big.ids[spec.key]])
            assert up.error is not None and not up.health.ok
            assert up.stats.chunks_dropped >= 1
            storm.cancel()
            up.mark_healthy()  # a probe answered
            assert healthy(up)
            again = chunk(spec, b"C" * (2 << 20), budget)
            await up.offer(again)
            await asyncio.wait_for(up.settle([again.ids[spec.key]]), PATIENCE)
            assert up.stored([again.ids[spec.key]])

    asyncio.run(go())


def test_a_bug_while_uploading_turns_the_target_unhealthy_never_stalls(
    tmp_path: Path, memory_targets: MemoryTargets
) -> None:
    """An unexpected exception (a bug in a backend or the state store) in an upload worker is
    logged and counted; the worker lives on, and the chunk is not claimed stored."""
    fake = memory_targets.add("m")

    async def go() -> None:
        async with uploader(fake, tmp_path) as up:
            spec, budget = up.repo.hash, ByteBudget(64 << 20)
            fake.plan.fail("put", error=RuntimeError, prefix="chunks/", message="a bug")
            first = chunk(spec, b"D" * (2 << 20), budget)
            await up.offer(first)
            await asyncio.wait_for(up.settle([first.ids[spec.key]]), PATIENCE)
            assert not up.stored([first.ids[spec.key]])
            assert up.error is not None and "internal error" in up.error.message
            up.mark_healthy()
            second = chunk(spec, b"E" * (2 << 20), budget)
            await up.offer(second)  # the workers still run
            await asyncio.wait_for(up.settle([second.ids[spec.key]]), PATIENCE)
            assert up.stored([second.ids[spec.key]])

    asyncio.run(go())


def test_two_repositories_listed_at_once_keep_each_others_chunks(
    tmp_path: Path, memory_targets: MemoryTargets
) -> None:
    """Targets are opened at once, and each lists its repository when the state does not know
    it (a new state directory, an unclean shutdown). One listing paused between its chunks
    and its packs while the other ran whole must still find every chunk it listed: the
    listings must not share their scratch table."""
    first, second = memory_targets.add("m1"), memory_targets.add("m2")
    state = StateStore.open(tmp_path / "state")

    async def open_repo(fake: FakeTarget) -> tuple[Repository, list[str]]:
        cfg = target_config(fake.config())
        target = await open_target(cfg, policy=RetryPolicy(give_up_after=None))
        repo = await Repository.open_or_create(
            target, algorithm="xxh3-128", chunking=ChunkingConfig(), compression=CompressionConfig()
        )
        ids = [repo.hash.digest(fake.name.encode() + bytes([i])).hex() for i in range(3)]
        for cid in ids:
            await repo.put_chunk(cid, b"\x00stored")
        return repo, ids

    async def go() -> None:
        (repo1, ids1), (repo2, ids2) = await open_repo(first), await open_repo(second)
        gate = first.plan.hang("list", prefix="packs/")
        up1, up2 = Uploader("m1", repo1, state, 2), Uploader("m2", repo2, state, 2)
        starting = asyncio.create_task(up1.start())
        await gate.wait_entered()  # m1 listed its chunks and waits for its packs
        await up2.start()
        gate.release()
        await asyncio.wait_for(starting, PATIENCE)
        try:
            assert set(up1.stored(ids1)) == set(ids1)
            assert set(up2.stored(ids2)) == set(ids2)
        finally:
            for up in (up1, up2):
                await up.close()
                await up.repo.target.close()

    try:
        asyncio.run(go())
    finally:
        state.close()


@pytest.mark.parametrize("by", ["head", "listing", "head-racing-a-listing"])
def test_inherited_claims_are_confirmed_and_the_lost_ones_forgotten(
    tmp_path: Path, memory_targets: MemoryTargets, monkeypatch: pytest.MonkeyPatch, by: str
) -> None:
    """Claims an earlier process left in the state store are checked before a manifest names
    them, by a HEAD per object, or, when a listing takes fewer requests, by a listing and HEADs
    at once (a listing is slow on some servers), the first answer kept: loose chunks and packs
    lost behind our back are reported missing and forgotten (so they are sent again); the rest
    are confirmed, and a second check asks the target nothing. The slower way is cancelled:
    here it hangs until the test ends."""
    monkeypatch.setattr(presence, "CONFIRM_BY_HEAD", 10_000 if by == "head" else 0)
    fake = memory_targets.add("m")

    async def go() -> None:
        cfg = target_config(fake.config())
        target = await open_target(cfg, policy=RetryPolicy(give_up_after=None))
        repo = await Repository.open_or_create(
            target, algorithm="xxh3-128", chunking=ChunkingConfig(), compression=CompressionConfig()
        )
        loose = [repo.hash.digest(bytes([i])).hex() for i in range(30)]
        for cid in loose:
            await repo.put_chunk(cid, b"\x00stored")
        packs: dict[str, list[str]] = {}
        claims: list[tuple[str, PackedAt]] = []
        for p in range(2):
            members = [repo.hash.digest(bytes([100 + 2 * p + i])).hex() for i in range(2)]
            pack_id = await repo.put_pack(b"\x00ab\x00cd")
            packs[pack_id] = members
            claims += [(cid, (pack_id, 3 * i, 3)) for i, cid in enumerate(members)]
        earlier = StateStore.open(tmp_path / "state")
        earlier.chunks(repo.config.id).add_loose(loose)
        earlier.chunks(repo.config.id).add_packed(claims)
        earlier.close()
        lost_pack = next(iter(packs))
        for key in [chunk_key(c) for c in loose[:3]] + [pack_key(lost_pack)]:
            await target.delete(key)

        state = StateStore.open(tmp_path / "state")
        try:
            index = state.chunks(repo.config.id)
            checker = presence.Presence("m", repo, index, concurrency=1)
            everything = loose + [c for members in packs.values() for c in members]
            fake.plan.calls.clear()
            slower: dict[str, Op] = {"listing": "stat", "head-racing-a-listing": "list"}
            hung = fake.plan.hang(slower[by]) if by in slower else None
            missing = await checker.confirm(everything)
            assert sorted(missing) == sorted(loose[:3] + packs[lost_pack])
            answered = {call.op for call in fake.plan.calls if call.outcome == "ok"}
            assert answered == ({"list"} if by == "listing" else {"stat"}), answered
            if hung is not None:
                assert {c.outcome for c in fake.plan.calls if c.op == slower[by]} == {"cancelled"}
                hung.release()
            assert not any(index.has(c) for c in missing)
            assert all(index.has(c) for c in everything if c not in missing)
            fake.plan.calls.clear()
            assert await checker.confirm([c for c in everything if c not in missing]) == []
            assert fake.plan.calls == [], "confirmed claims are not checked again"
        finally:
            state.close()
            await target.close()

    asyncio.run(go())
