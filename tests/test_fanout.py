"""The upload queues, in process, against an in-memory target with injected faults: nothing
ever waits on a dead or buggy target (issue 18)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from replicator.config import ChunkingConfig, CompressionConfig, target_config
from replicator.fanout import Uploader
from replicator.hashing import HashSpec
from replicator.memory import ByteBudget, Lease
from replicator.read.pipeline import EncodedChunk
from replicator.repository import Repository
from replicator.retry import RetryPolicy
from replicator.state import StateStore
from replicator.targets import open_target
from tests.faults import FakeTarget, MemoryTargets

PATIENCE = 60.0
"""Deadline for what must happen at once: generous on a loaded machine, never a bound."""


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
