"""The fault harness itself (tests/faults.py): each fault does what its contract says, through
the production wrapper stack, and the proxy's modes look to our S3 target like the failures
they stand for. Nothing here asserts how long anything took: waits are on conditions."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from replicator.config import ChunkingConfig, CompressionConfig, TargetConfig, parse_config, target_config
from replicator.errors import (
    ConfigError,
    IntegrityError,
    NotFoundError,
    PermanentTargetError,
    TargetUnreachableError,
    TransientTargetError,
)
from replicator.format.chunks import ChunkEncoder
from replicator.repository import Repository
from replicator.sync import run_sync
from replicator.targets import (
    RetryingTarget,
    Target,
    backend_of,
    open_backend,
    open_target,
    register_backend,
    unregister_backend,
    unwrap,
)
from tests.conftest import cli, write_config
from tests.daemon_helpers import latest_manifest, wait_until
from tests.faults import (
    Call,
    FakeClock,
    FaultPlan,
    FaultProxy,
    FaultyTarget,
    MemoryStore,
    MemoryTarget,
    MemoryTargets,
    ProxyFactory,
)
from tests.servers import MotoServer, RcloneServer, S3Server, free_port

T = TypeVar("T")
FAST_RETRY = {"initial": 0.01, "max": 0.05, "give_up_after": 0.5}


async def with_target(cfg: dict[str, Any], fn: Callable[[Target], Awaitable[T]]) -> T:
    """Open ``cfg`` through the full production stack, run ``fn``, close."""
    target = await open_target(target_config(cfg))
    try:
        return await fn(target)
    finally:
        await target.close()


def run_with(cfg: dict[str, Any], fn: Callable[[Target], Awaitable[T]]) -> T:
    return asyncio.run(with_target(cfg, fn))


async def until(predicate: Callable[[], bool], patience: float = 60.0) -> None:
    """Await a condition the code under test makes true (a generous deadline, never a bound)."""
    deadline = asyncio.get_running_loop().time() + patience
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {patience}s")


def fast(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**cfg, "retry": FAST_RETRY}


# --- the backend registry ------------------------------------------------------------------


def test_registry_keeps_builtin_urls_and_their_errors(tmp_path: Path) -> None:
    async def go() -> None:
        for url in ("ftp://host/x", "S3://bucket/x", "/data/odd://name", "memory://m"):
            with pytest.raises(ConfigError) as info:
                target_config({"name": "t", "url": url})
            assert str(info.value) == (
                f"target: url: unsupported url (use a directory or s3://bucket/prefix) (got {url!r})"
            )
            with pytest.raises(ConfigError) as info:  # a config built in code
                await open_backend(TargetConfig(name="t", url=url))
            assert str(info.value) == (
                f"target t: unsupported url {url!r} (use a directory or s3://bucket/prefix)"
            )
        with pytest.raises(ConfigError, match="invalid bucket name"):
            target_config({"name": "t", "url": "s3://B/x"})
        with pytest.raises(TypeError, match="needs a PosixTargetConfig"):  # a bug, not a config error
            await open_backend(TargetConfig(name="t", url=str(tmp_path)))
        for url in (str(tmp_path), f"file://{tmp_path}"):
            posix = await open_backend(target_config({"name": "t", "url": url}))
            assert posix.url == str(tmp_path)
            await posix.close()

    asyncio.run(go())
    for scheme in ("s3", "file", "Bad", "two words"):
        with pytest.raises(ValueError):
            register_backend(scheme, open_backend)
    with pytest.raises(ValueError):
        unregister_backend("s3")


def test_memory_urls_validate_and_open_only_while_registered(tmp_path: Path) -> None:
    data = {"targets": [{"name": "m", "url": "memory://m"}], "state_dir": "state"}
    with pytest.raises(ConfigError, match=r"targets\[0\]\.url: unsupported url"):
        parse_config(data, tmp_path, "test")
    with MemoryTargets() as fakes:
        cfg = parse_config(data, tmp_path, "test")
        assert cfg.targets[0].url == "memory://m"  # not taken for a relative path
        fakes.add("m")
        target = asyncio.run(open_backend(cfg.targets[0]))
        assert isinstance(target, FaultyTarget) and isinstance(target.inner, MemoryTarget)
        with pytest.raises(PermanentTargetError, match="no memory target named 'other'"):
            asyncio.run(open_backend(target_config({"name": "o", "url": "memory://other"})))
        with pytest.raises(ConfigError, match="endpoint_url: does not apply to a memory:// target"):
            target_config({"name": "o", "url": "memory://m", "endpoint_url": "http://x"})
        faulty = target_config({"name": "f", "url": "faulty://f", "endpoint_url": "http://x"})
        assert faulty.url == "faulty://f"  # faulty:// takes S3 settings (for an s3:// url it wraps)
        with pytest.raises(ValueError):
            MemoryTargets().__enter__()  # one registry at a time: a leak would be caught here
    with pytest.raises(ConfigError, match="unsupported url"):
        asyncio.run(open_backend(cfg.targets[0]))


def test_memory_store_outlives_connections_and_crash_loses_unflushed(
    memory_targets: MemoryTargets,
) -> None:
    fake = memory_targets.add("m")

    async def write(t: Target) -> None:
        await t.put("a", b"1")
        await t.flush()
        await t.put("b", b"2")
        await t.put("a", b"changed")
        await t.delete("a")

    async def read(t: Target) -> list[tuple[str, bytes]]:
        return [(o.key, await t.get(o.key)) async for o in t.list("")]

    run_with(fake.config(), write)
    assert run_with(fake.config(), read) == [("b", b"2")]
    assert fake.store is not None
    fake.store.crash()  # a power cut: only the flushed state survives
    assert run_with(fake.config(), read) == [("a", b"1")]
    assert len(fake.opened) == 3


def test_memory_target_used_after_close_is_a_loud_bug() -> None:
    target = MemoryTarget("m")

    async def go() -> None:
        await target.close()
        await target.get("x")

    with pytest.raises(RuntimeError, match="after close"):
        asyncio.run(go())


def test_memory_target_without_conditional_writes_is_last_writer_wins() -> None:
    async def go() -> bytes:
        t = MemoryTarget("m", MemoryStore(conditional_writes=False))
        await t.put("config.json", b"one", if_absent=True)
        await t.put("config.json", b"two", if_absent=True)
        return await t.get("config.json")

    assert asyncio.run(go()) == b"two"


# --- FaultyTarget through open_target --------------------------------------------------------


def test_fail_twice_then_succeed_is_absorbed_by_retry(memory_targets: MemoryTargets) -> None:
    fake = memory_targets.add("m")
    fake.plan.fail("put", times=2)

    async def go(t: Target) -> bytes:
        await t.put("chunks/aa/1", b"data")
        retrying = unwrap(t, RetryingTarget)
        assert retrying is not None and retrying.health.ok
        return await t.get("chunks/aa/1")

    assert run_with(fast(fake.config()), go) == b"data"
    assert fake.plan.calls_to("put") == [
        Call("put", "chunks/aa/1", "fail", "TransientTargetError"),
        Call("put", "chunks/aa/1", "fail", "TransientTargetError"),
        Call("put", "chunks/aa/1", None, "ok"),
    ]


@pytest.mark.parametrize(
    ("error", "attempts"),
    [(PermanentTargetError, "one"), (NotFoundError, "one"), (TargetUnreachableError, "several")],
)
def test_injected_errors_keep_their_kind_through_the_stack(
    memory_targets: MemoryTargets, error: type[Exception], attempts: str
) -> None:
    fake = memory_targets.add("m")
    fake.plan.fail("get", times=None, error=error)

    async def go(t: Target) -> bytes:
        await t.put("obj", b"x")
        return await t.get("obj")

    with pytest.raises(error) as info:
        run_with(fast(fake.config()), go)
    assert "m" in str(info.value) and "obj" in str(info.value)
    gets = fake.plan.outcomes("get")
    assert set(gets) == {error.__name__}
    # Retry stops at once on permanent errors and NotFound; retries transient ones.
    assert (len(gets) == 1) if attempts == "one" else (len(gets) > 1)
    if error is TargetUnreachableError:
        assert info.value.exit_code == 3  # type: ignore[attr-defined]


def test_prefix_limits_a_fault_and_storm_lasts_until_cleared(memory_targets: MemoryTargets) -> None:
    fake = memory_targets.add("m")
    fake.plan.fail("put", times=None, prefix="chunks/", error=PermanentTargetError)

    async def go(t: Target) -> None:
        await t.put("snapshots/s/1", b"ok")
        with pytest.raises(PermanentTargetError):
            await t.put("chunks/aa/1", b"no")
        fake.plan.clear()
        storm = fake.plan.storm()
        task = asyncio.create_task(t.put("chunks/aa/1", b"later"))
        await until(lambda: len(fake.plan.calls_to("put", "chunks/")) >= 5)  # retried through the storm
        assert not task.done()
        storm.cancel()
        await task

    run_with({**fake.config(), "retry": {"initial": 0.01, "max": 0.02, "give_up_after": None}}, go)
    assert fake.store is not None and fake.store.objects["chunks/aa/1"] == b"later"
    outcomes = fake.plan.outcomes("put", "chunks/")
    assert outcomes[0] == "PermanentTargetError" and outcomes[-1] == "ok"
    assert set(outcomes[1:-1]) == {"TransientTargetError"}


def test_hang_blocks_until_released_while_other_calls_proceed(memory_targets: MemoryTargets) -> None:
    fake = memory_targets.add("m")
    gate = fake.plan.hang("put", prefix="refs/")

    async def go(t: Target) -> None:
        hung = asyncio.create_task(t.put("refs/src/latest", b"snap"))
        await gate.wait_entered()
        for i in range(20):  # the hung call holds one concurrency slot, not the target
            await t.put(f"chunks/aa/{i}", b"x")
        assert not hung.done() and gate.waiting == 1
        assert fake.plan.calls_to("put", "refs/")[0].outcome == "pending"
        gate.release()
        await hung
        await t.put("refs/src/latest", b"next")  # a released gate stays open

    run_with(fake.config(), go)
    assert fake.plan.calls_to("put", "refs/") == [
        Call("put", "refs/src/latest", "hang", "ok"),
        Call("put", "refs/src/latest", None, "ok"),
    ]
    assert fake.store is not None and fake.store.objects["refs/src/latest"] == b"next"


def test_hang_then_error_and_cancellation_are_recorded(memory_targets: MemoryTargets) -> None:
    fake = memory_targets.add("m")
    gate = fake.plan.hang("get", then=PermanentTargetError, times=1)
    stuck = fake.plan.hang("stat")

    async def go(t: Target) -> None:
        get = asyncio.create_task(t.get("obj"))
        stat = asyncio.create_task(t.stat("obj"))
        await gate.wait_entered()
        await stuck.wait_entered()
        gate.release()
        with pytest.raises(PermanentTargetError):
            await get
        stat.cancel()  # as the daemon's shutdown does
        with pytest.raises(asyncio.CancelledError):
            await stat

    run_with(fake.config(), go)
    assert fake.plan.calls == [
        Call("get", "obj", "hang", "PermanentTargetError"),
        Call("stat", "obj", "hang", "cancelled"),
    ]


def test_hang_released_from_another_thread(memory_targets: MemoryTargets) -> None:
    """A synchronous test drives a loop in another thread and releases the hang from its own."""
    import threading

    fake = memory_targets.add("m")
    gate = fake.plan.hang("put")
    result: list[BaseException | None] = []

    def worker() -> None:
        try:
            run_with(fake.config(), lambda t: t.put("obj", b"x"))
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    wait_until(lambda: gate.entered == 1, what="the put to hang")
    assert thread.is_alive()
    gate.release()
    thread.join(60)
    assert result == [None]


def test_slow_calls_wait_on_an_injected_clock(memory_targets: MemoryTargets) -> None:
    clock = FakeClock()
    fake = memory_targets.add("m")
    fake.plan.sleep = clock.sleep
    fake.plan.slow("get", seconds=30)

    async def go(t: Target) -> bytes:
        await t.put("obj", b"payload")
        task = asyncio.create_task(t.get("obj"))
        await clock.wait_for_sleepers(1)
        clock.advance(29.5)
        await asyncio.sleep(0)
        assert not task.done() and clock.next_wakeup() == pytest.approx(0.5)
        clock.advance(0.5)
        return await task

    assert run_with(fake.config(), go) == b"payload"
    assert fake.plan.calls_to("get") == [Call("get", "obj", "slow", "ok")]


def test_short_write_succeeds_and_only_reading_back_tells(memory_targets: MemoryTargets) -> None:
    fake = memory_targets.add("m")
    fault = fake.plan.short_write(keep=3)
    data = b"0123456789"

    async def go(t: Target) -> tuple[Any, bytes]:
        await t.put("chunks/aa/1", data)
        return await t.stat("chunks/aa/1"), await t.get("chunks/aa/1")

    info, back = run_with(fake.config(), go)
    assert info.size == 3 and back == b"012" != data
    assert fault.hits == 1 and fake.plan.calls_to("put") == [Call("put", "chunks/aa/1", "short_write", "ok")]


async def new_repo(t: Target) -> Repository:
    return await Repository.open_or_create(
        t, algorithm="xxh3-128", chunking=ChunkingConfig(), compression=CompressionConfig()
    )


async def put_chunk(repo: Repository, data: bytes) -> str:
    chunk_id = repo.hash.digest(data).hex()
    await repo.put_chunk(chunk_id, ChunkEncoder().encode(data))
    return chunk_id


def test_repository_catches_short_write_error_body_and_garbled_read(memory_targets: MemoryTargets) -> None:
    """The repository re-hashes every read (DESIGN.md): each lie a store can tell is caught."""
    fake = memory_targets.add("m")
    data = os.urandom(50_000) + bytes(50_000)

    async def go(t: Target) -> None:
        repo = await new_repo(t)
        fake.plan.short_write(prefix="chunks/")
        short = await put_chunk(repo, data)
        with pytest.raises(IntegrityError):
            await repo.get_chunk(short)
        await t.delete(f"chunks/{short[:2]}/{short}")
        good = await put_chunk(repo, data + b"!")
        fake.plan.error_body(code="InternalError", prefix="chunks/")
        with pytest.raises(IntegrityError):
            await repo.get_chunk(good)
        fake.plan.garble_first_read(prefix="chunks/")
        with pytest.raises(IntegrityError):
            await repo.get_chunk(good)
        assert bytes(await repo.get_chunk(good)) == data + b"!"  # only the first read was garbled

    run_with(fake.config(), go)
    assert [c.fault for c in fake.plan.calls_to("get", "chunks/")] == [None, "error_body", "garble", None]


def test_error_body_is_an_s3_error_document(memory_targets: MemoryTargets) -> None:
    fake = memory_targets.add("m")
    fake.plan.error_body(code="SlowDown")

    async def go(t: Target) -> bytes:
        await t.put("obj", b"real bytes")
        return await t.get("obj")

    body = run_with(fake.config(), go)
    assert body.startswith(b"<?xml") and b"<Code>SlowDown</Code>" in body


def test_garbled_first_read_flips_one_bit_once_per_key(memory_targets: MemoryTargets) -> None:
    fake = memory_targets.add("m")
    fake.plan.garble_first_read(keys=1)

    async def go(t: Target) -> list[bytes]:
        await t.put("a", b"\x00" * 8)
        await t.put("b", b"\x00" * 8)
        return [await t.get("a"), await t.get("a"), await t.get("b")]

    first, second, other = run_with(fake.config(), go)
    assert first == b"\x00" * 4 + b"\x01" + b"\x00" * 3
    assert second == other == b"\x00" * 8


def test_listing_that_breaks_part_way_is_resumed_without_repeats(memory_targets: MemoryTargets) -> None:
    fake = memory_targets.add("m")
    keys = [f"chunks/{i:03d}" for i in range(10)]

    async def go(t: Target) -> list[str]:
        for k in keys:
            await t.put(k, b"x")
        fake.plan.fail("list", after=4)
        return [o.key async for o in t.list("chunks/")]

    assert run_with(fast(fake.config()), go) == keys
    assert fake.plan.outcomes("list") == ["TransientTargetError", "ok"]


def test_faulty_wraps_a_posix_target(memory_targets: MemoryTargets, tmp_path: Path) -> None:
    fake = memory_targets.wrap("nfs", str(tmp_path))
    fake.plan.short_write(keep=1)
    fake.plan.fail("stat", times=1)

    async def go(t: Target) -> Any:
        await t.put("obj", b"abc")
        return await t.stat("obj")

    info = run_with(fast(fake.config()), go)
    assert info.size == 1 and (tmp_path / "obj").read_bytes() == b"a"
    assert fake.plan.outcomes() == ["ok", "TransientTargetError", "ok"]


def test_faulty_wraps_an_s3_target(memory_targets: MemoryTargets, moto: MotoServer) -> None:
    bucket = moto.new_bucket()
    fake = memory_targets.wrap("s3", f"s3://{bucket}/replica")
    fake.plan.fail("put", times=1, error=TargetUnreachableError)

    async def go(t: Target) -> tuple[FaultyTarget | None, Target]:
        await t.put("obj", b"through the wrapper")
        return unwrap(t, FaultyTarget), backend_of(t)

    faulty, backend = run_with(fast(fake.config(endpoint_url=moto.endpoint)), go)
    assert faulty is not None and faulty.inner is backend and type(backend).__name__ == "S3Target"
    body = moto.client().get_object(Bucket=bucket, Key="replica/obj")["Body"].read()
    assert body == b"through the wrapper"
    assert fake.plan.outcomes("put") == ["TargetUnreachableError", "ok"]


def test_in_process_sync_publishes_to_the_healthy_target_during_a_storm(
    memory_targets: MemoryTargets, tmp_path: Path
) -> None:
    """memory:// targets run through the real engine, configured like any other target."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(100_000))
    good, bad = memory_targets.add("good"), memory_targets.add("bad")
    bad.plan.storm()
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "sources": [{"name": "src", "url": str(src)}],
            "targets": [good.config(retry=FAST_RETRY), bad.config(retry=FAST_RETRY)],
        },
        tmp_path,
    )
    results, errors = asyncio.run(run_sync(config))
    assert {r.target: r.status for r in results[0].targets} == {"good": "published", "bad": "failed"}
    assert isinstance(errors["bad"], TransientTargetError)  # it failed to open: its config GET
    assert good.store is not None and good.store.keys("refs/") == ["refs/src/latest"]
    assert bad.plan.calls and set(bad.plan.outcomes()) == {"TransientTargetError"}


# --- FakeClock -----------------------------------------------------------------------------


def test_fake_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = FakeClock()
    t0, m0 = clock.time(), clock.monotonic()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    async def go() -> None:
        tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("late", 10), ("early", 5), ("zero", 0))]
        await clock.wait_for_sleepers(2)
        assert clock.sleepers == 2 and clock.next_wakeup() == 5
        await asyncio.sleep(0)
        assert woke == ["zero"]
        clock.advance(4.999)
        await asyncio.sleep(0)
        assert woke == ["zero"]
        clock.advance(0.001)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert woke == ["zero", "early"]
        clock.advance(100)
        await asyncio.gather(*tasks)
        assert woke == ["zero", "early", "late"] and clock.sleepers == 0 and clock.next_wakeup() is None

    asyncio.run(go())
    assert clock.time() - t0 == clock.monotonic() - m0 == pytest.approx(105)
    assert clock.now().timestamp() == pytest.approx(clock.time())
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_fake_clock_cancelled_sleep_is_forgotten() -> None:
    clock = FakeClock()

    async def go() -> None:
        task = asyncio.create_task(clock.sleep(5))
        await clock.wait_for_sleepers(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert clock.sleepers == 0 and clock.next_wakeup() is None
        clock.advance(10)  # waking a cancelled sleep is harmless

    asyncio.run(go())


def test_fault_plan_drives_retry_backoff_on_a_fake_clock() -> None:
    """What the clock is for: a retry schedule tested without waiting for it."""
    clock = FakeClock()
    plan = FaultPlan(sleep=clock.sleep)
    plan.slow("put", seconds=3600, times=1)
    target = FaultyTarget(MemoryTarget("m"), plan)

    async def go() -> None:
        task = asyncio.create_task(target.put("k", b"v"))
        await clock.wait_for_sleepers()
        clock.advance(3600)
        await task

    asyncio.run(go())
    assert plan.outcomes() == ["ok"] and clock.monotonic() == 1000 + 3600


# --- FaultProxy against real servers -------------------------------------------------------


def s3_config(proxy: FaultProxy, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "p",
        "url": f"s3://{bucket}/replica",
        "endpoint_url": proxy.endpoint,
        "retry": FAST_RETRY,
        **extra,
    }


async def roundtrip(t: Target) -> bytes:
    await t.put("obj", b"hello")
    return await t.get("obj")


@pytest.mark.parametrize("kind", ["rclone", "moto"])
def test_proxy_pass_forwards_boto3_and_our_target(
    request: pytest.FixtureRequest, fault_proxy: ProxyFactory, kind: str
) -> None:
    server: S3Server = request.getfixturevalue(kind)
    proxy = fault_proxy(server)
    via = S3Server(server.kind, proxy.endpoint)
    bucket = via.new_bucket()
    via.client().put_object(Bucket=bucket, Key="boto", Body=b"from boto3")
    assert server.client().get_object(Bucket=bucket, Key="boto")["Body"].read() == b"from boto3"
    assert run_with(s3_config(proxy, bucket), roundtrip) == b"hello"
    stats = proxy.stats
    assert stats.connections >= 2 and stats.bytes_up > 0 and stats.bytes_down > 0
    assert stats.resets == 0 and stats.dropped == 0


def test_proxy_modes_at_the_socket_level(rclone: RcloneServer, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(rclone)
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", proxy.port), timeout=30)

    with connect() as s:  # pass: the server answers
        s.sendall(request)
        assert s.recv(12).startswith(b"HTTP/1.1")
        held = connect()
    try:
        wait_until(lambda: proxy.stats.active >= 1, what="the proxy to see the connection")
        proxy.cut()  # reset now, keep the mode
        with pytest.raises(ConnectionResetError):
            held.recv(1)
        assert proxy.mode == "pass"
    finally:
        held.close()

    proxy.set_mode("reset")
    # The RST may even beat connect()'s return.
    with pytest.raises((ConnectionResetError, BrokenPipeError)), connect() as s:
        s.sendall(request)
        s.recv(1)

    proxy.set_mode("blackhole")
    with connect() as s:
        s.sendall(request)
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(1)
        wait_until(lambda: proxy.stats.dropped >= len(request), what="the request to be swallowed")

    proxy.set_mode("refuse")
    with pytest.raises(ConnectionRefusedError):
        connect()

    proxy.set_mode("delay", delay=0.01)
    with connect() as s:
        s.sendall(request)
        assert s.recv(12).startswith(b"HTTP/1.1")
    with pytest.raises(ValueError):
        proxy.set_mode("delay")


def test_refused_target_is_unreachable_and_recovers(rclone: RcloneServer, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(rclone)
    bucket = rclone.new_bucket()

    async def go(t: Target) -> bytes:
        assert await roundtrip(t) == b"hello"  # a pooled connection now exists
        proxy.set_mode("refuse")
        with pytest.raises(TargetUnreachableError) as info:
            await t.get("obj")
        assert info.value.exit_code == 3 and "cannot connect" in str(info.value)
        proxy.set_mode("pass")
        return await t.get("obj")

    assert run_with(s3_config(proxy, bucket), go) == b"hello"


def test_reset_target_is_transient_and_recovers(rclone: RcloneServer, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(rclone)
    bucket = rclone.new_bucket()

    async def go(t: Target) -> bytes:
        await t.put("obj", b"hello")
        proxy.set_mode("reset")
        with pytest.raises(TransientTargetError):
            await t.get("obj")
        proxy.set_mode("pass")
        return await t.get("obj")

    assert run_with(s3_config(proxy, bucket), go) == b"hello"
    assert proxy.stats.resets >= 1


def test_blackholed_target_times_out_and_recovers(rclone: RcloneServer, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(rclone)
    bucket = rclone.new_bucket()

    async def go(t: Target) -> bytes:
        await t.put("obj", b"hello")
        proxy.set_mode("blackhole")
        with pytest.raises(TransientTargetError) as info:
            await t.get("obj")
        assert "timeout" in str(info.value).lower()
        proxy.set_mode("pass")
        return await t.get("obj")

    assert run_with(s3_config(proxy, bucket, timeout=1), go) == b"hello"
    assert proxy.stats.dropped > 0


@pytest.mark.parametrize("op", ["get", "stat"])
def test_a_blackholed_request_is_one_attempt_and_unreachable(
    rclone: RcloneServer, fault_proxy: ProxyFactory, op: str
) -> None:
    """The SDK makes one attempt per request (our RetryingTarget does the retrying), and a
    server that never answers is reported as unreachable (exit code 3), like a refused one.
    (A read timeout in ``stat``, the daemon's probe, once crashed the publisher: the SDK's
    transport errors carry ``response = None``.)"""
    proxy = fault_proxy(rclone)
    bucket = rclone.new_bucket()
    proxy.set_mode("blackhole")
    before = proxy.stats.connections

    async def go(t: Target) -> None:
        with pytest.raises(TargetUnreachableError) as info:
            await (t.get("obj") if op == "get" else t.stat("obj"))
        assert info.value.exit_code == 3

    cfg = {**s3_config(proxy, bucket, timeout=1), "retry": {"give_up_after": 0, "command_give_up_after": 0}}
    run_with(cfg, go)
    assert proxy.stats.connections - before == 1


def test_delay_mode_still_delivers(moto: MotoServer, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(moto)
    bucket = moto.new_bucket()
    proxy.set_mode("delay", delay=0.02)
    payload = os.urandom(300_000)  # several chunks each way

    async def go(t: Target) -> bytes:
        await t.put("big", payload)
        return await t.get("big")

    assert run_with(s3_config(proxy, bucket), go) == payload


def test_many_concurrent_connections(moto: MotoServer, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(moto)
    bucket = moto.new_bucket()

    async def go(t: Target) -> list[bytes]:
        await asyncio.gather(*(t.put(f"o/{i}", str(i).encode()) for i in range(64)))
        return await asyncio.gather(*(t.get(f"o/{i}") for i in range(64)))

    got = run_with({**s3_config(proxy, bucket), "concurrency": 32}, go)
    assert got == [str(i).encode() for i in range(64)]
    assert proxy.stats.connections > 1


def test_upstream_restarts_behind_the_proxy(tmp_path: Path, fault_proxy: ProxyFactory) -> None:
    server = RcloneServer(tmp_path / "root", port=free_port()).start()
    try:
        proxy = fault_proxy(server)
        bucket = server.new_bucket()

        async def go(t: Target) -> bytes:
            await t.put("obj", b"kept on disk")
            server.stop()
            with pytest.raises(TransientTargetError):
                await t.get("obj")
            server.start()
            return await t.get("obj")

        assert run_with(s3_config(proxy, bucket), go) == b"kept on disk"
    finally:
        server.stop()


def test_proxy_serves_a_subprocess(rclone: RcloneServer, fault_proxy: ProxyFactory, tmp_path: Path) -> None:
    """The proxy runs in its own thread, so a blocking subprocess call can go through it."""
    proxy = fault_proxy(rclone)
    bucket = rclone.new_bucket()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(200_000))
    target = s3_config(proxy, bucket)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        {
            "state_dir": str(tmp_path / "state"),
            "sources": [{"name": "s", "url": str(src)}],
            "targets": [target],
        },
    )
    done = cli("sync", "-q", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    assert latest_manifest(target, "s") is not None
    assert proxy.stats.bytes_up > 200_000

    proxy.set_mode("refuse")
    (src / "g.bin").write_bytes(b"new")
    failed = cli("sync", "-q", "-c", str(cfg))
    assert failed.returncode != 0 and "cannot connect" in failed.stderr


def test_proxy_close_is_idempotent_and_final(rclone: RcloneServer) -> None:
    with FaultProxy.for_server(rclone) as proxy:
        port = proxy.port
        held = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        with pytest.raises(ConnectionResetError):
            held.recv(1)  # close() resets what was open
    finally:
        held.close()
    proxy.close()
    with pytest.raises(RuntimeError):
        proxy.set_mode("pass")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=30)


def test_an_unretrieved_connection_error_of_the_http_client_is_not_reported_as_a_crash() -> None:
    """aiohttp's background body writes fail with "Cannot write to closing transport" when a
    target resets the connection (found by the reset outage test): the request that owned
    them is retried and reported, so the loop's handler keeps them out of the error log;
    any other unretrieved exception still reaches asyncio's default handler."""
    from replicator.log import loop_exception_handler

    class Loop:
        def __init__(self) -> None:
            self.reported: list[dict[str, Any]] = []

        def default_exception_handler(self, context: dict[str, Any]) -> None:
            self.reported.append(context)

    loop = Loop()
    message = "Task exception was never retrieved"
    loop_exception_handler(loop, {"message": message, "exception": ConnectionResetError("closing transport")})
    assert loop.reported == []
    bug = {"message": message, "exception": ValueError("a bug")}
    loop_exception_handler(loop, bug)
    assert loop.reported == [bug]
