"""One conformance suite for every target kind: POSIX, rclone serve s3, moto server, and the
in-memory target of the fault harness (tests/faults.py, which other tests rely on to behave
like a real store).

Each test drives the full production stack (retry -> limits -> backend) from
``open_target`` against a real store, and S3 results are read back with the independent
minio client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pytest
from minio import Minio

from replicator.config import S3Access, target_config
from replicator.errors import (
    AlreadyExistsError,
    NotFoundError,
    PermanentTargetError,
    TargetUnreachableError,
)
from replicator.s3.settings import config_kwargs, is_loopback
from replicator.targets import Target, open_target
from replicator.targets.s3 import S3Target
from replicator.targets.wrappers import unwrap
from tests.conftest import TARGET_KINDS, TargetSpec, make_target_spec
from tests.servers import ACCESS_KEY, SECRET_KEY, free_port

T = TypeVar("T")


@pytest.fixture(params=[*TARGET_KINDS, "memory"])
def target_spec(request: pytest.FixtureRequest, tmp_path: Path) -> TargetSpec:
    """The conformance suite's own kinds: the shared ones plus the in-process memory target."""
    return make_target_spec(request, request.param, tmp_path)


def run(fn: Callable[[Target], Awaitable[T]], spec: TargetSpec, **overrides: Any) -> T:
    async def go() -> T:
        target = await open_target(target_config({**spec.config, **overrides}))
        try:
            return await fn(target)
        finally:
            await target.close()

    return asyncio.run(go())


def minio_get(spec: TargetSpec, key: str) -> bytes:
    assert spec.server is not None and spec.bucket is not None
    client = Minio(
        urlparse(spec.server.endpoint).netloc, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False
    )
    resp = client.get_object(spec.bucket, f"replica/{key}")
    try:
        return resp.read()
    finally:
        resp.close()
        resp.release_conn()


def test_put_get_roundtrip_and_independent_readback(target_spec: TargetSpec) -> None:
    payload = os.urandom(3 << 20) + b"tail"

    async def go(t: Target) -> bytes:
        await t.put("chunks/ab/abcdef", payload)
        return await t.get("chunks/ab/abcdef")

    assert run(go, target_spec) == payload
    if target_spec.server is not None:
        assert (
            hashlib.sha256(minio_get(target_spec, "chunks/ab/abcdef")).digest()
            == hashlib.sha256(payload).digest()
        )
    elif target_spec.store is not None:
        assert target_spec.store.objects["chunks/ab/abcdef"] == payload
    else:
        assert target_spec.path is not None
        assert (target_spec.path / "chunks/ab/abcdef").read_bytes() == payload


def test_ranged_get_and_stat(target_spec: TargetSpec) -> None:
    async def go(t: Target) -> tuple[bytes, bytes, bytes, Any, Any]:
        await t.put("obj", b"0123456789")
        return (
            await t.get("obj", offset=2, length=3),
            await t.get("obj", offset=7),
            await t.get("obj", length=0),
            await t.stat("obj"),
            await t.stat("absent"),
        )

    mid, tail, empty, info, missing = run(go, target_spec)
    assert (mid, tail, empty) == (b"234", b"789", b"")
    assert info.size == 10 and info.key == "obj"
    assert missing is None


def test_overwrite_is_atomic_replace(target_spec: TargetSpec) -> None:
    async def go(t: Target) -> bytes:
        await t.put("refs/src/latest", b"first")
        await t.put("refs/src/latest", b"second version")
        return await t.get("refs/src/latest")

    assert run(go, target_spec) == b"second version"


def test_missing_object_is_not_found(target_spec: TargetSpec) -> None:
    async def go(t: Target) -> None:
        await t.get("chunks/00/nothing")

    with pytest.raises(NotFoundError):
        run(go, target_spec)


def test_list_is_sorted_complete_and_resumable(target_spec: TargetSpec) -> None:
    keys = [f"chunks/{i % 7:02x}/{i:04d}" for i in range(1100)] + ["snapshots/a/x", "chunksX"]

    async def go(t: Target) -> tuple[list[str], list[str], list[str]]:
        sem = asyncio.Semaphore(32)

        async def put(k: str) -> None:
            async with sem:
                await t.put(k, k.encode())

        await asyncio.gather(*(put(k) for k in keys))
        full = [o.key async for o in t.list("chunks/")]
        after = [o.key async for o in t.list("chunks/", start_after=full[499])]
        nothing = [o.key async for o in t.list("nope/")]
        return full, after, nothing

    full, after, nothing = run(go, target_spec)
    expected = sorted(k for k in keys if k.startswith("chunks/"))
    assert full == expected  # > 1000 keys: S3 pagination is exercised
    assert after == expected[500:]
    assert nothing == []


def test_modification_time_in_stat_and_list(target_spec: TargetSpec) -> None:
    """Garbage collection orders writes by the storage's clock (replicator.gc): stat and list
    report when an object was last written, and rewriting it moves that time forward."""

    async def go(t: Target) -> tuple[Any, Any, Any, Any]:
        await t.put("gc/a", b"1")
        first = await t.stat("gc/a")
        listed = [o async for o in t.list("gc/")]
        await asyncio.sleep(1.1)  # S3's LastModified has whole seconds on some servers
        await t.put("gc/a", b"1")
        again = [o async for o in t.list("gc/")]
        return first, listed[0], await t.stat("gc/a"), again[0]

    started = time.time()
    first, listed, again, listed_again = run(go, target_spec)
    for info in (first, listed, again, listed_again):
        assert info.mtime is not None
        assert started - 5 <= info.mtime <= time.time() + 5  # the servers run on this machine
    assert abs(first.mtime - listed.mtime) < 1.0
    assert again.mtime > first.mtime and listed_again.mtime > listed.mtime


def test_delete_is_idempotent(target_spec: TargetSpec) -> None:
    async def go(t: Target) -> Any:
        await t.put("snapshots/s/1", b"x")
        await t.delete("snapshots/s/1")
        await t.delete("snapshots/s/1")
        return await t.stat("snapshots/s/1")

    assert run(go, target_spec) is None


def test_if_absent_create(target_spec: TargetSpec) -> None:
    async def go(t: Target) -> bytes:
        await t.put("config.json", b"one", if_absent=True)
        with contextlib.suppress(AlreadyExistsError):
            await t.put("config.json", b"two", if_absent=True)
        return await t.get("config.json")

    got = run(go, target_spec)
    if target_spec.kind == "rclone":
        # rclone serve s3 ignores If-None-Match: documented last-writer-wins degradation.
        assert got in (b"one", b"two")
    else:
        assert got == b"one"


def test_invalid_keys_are_refused(target_spec: TargetSpec) -> None:
    for bad in ("../escape", "/abs", "a//b", "a/./b", ".hidden", "a\\b", ""):

        async def go(t: Target, bad: str = bad) -> None:
            await t.put(bad, b"x")

        with pytest.raises(ValueError):
            run(go, target_spec)


def test_missing_container_is_permanent(target_spec: TargetSpec) -> None:
    if target_spec.kind == "posix":
        assert target_spec.path is not None
        overrides = {"url": str(target_spec.path / "does-not-exist")}
    elif target_spec.kind == "memory":
        overrides = {"url": "memory://does-not-exist"}
    else:
        overrides = {"url": "s3://no-such-bucket-here/x"}

    async def go(t: Target) -> None:
        await t.get("config.json")

    with pytest.raises((PermanentTargetError, NotFoundError)) as info:
        run(go, target_spec, **overrides)
    if target_spec.kind != "posix":
        assert isinstance(info.value, PermanentTargetError), (
            "a missing bucket must not look like a missing key"
        )


def test_unreachable_endpoint_gives_up_with_clear_error() -> None:
    cfg = {
        "name": "dead",
        "url": "s3://bucket/x",
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
        "retry": {"initial": 0.05, "max": 0.1, "give_up_after": 0.5},
    }

    async def go() -> None:
        t = await open_target(target_config(cfg))
        try:
            await t.get("config.json")
        finally:
            await t.close()

    with pytest.raises(TargetUnreachableError) as info:
        asyncio.run(go())
    assert "dead" in str(info.value) and "config.json" in str(info.value)


def test_s3_checksum_modes_accepted_by_servers(s3_target_spec: TargetSpec) -> None:
    target_spec = s3_target_spec
    for checksum in ("md5", "crc32", "sha256"):

        async def go(t: Target) -> bytes:
            await t.put("obj", b"payload" * 100)
            return await t.get("obj")

        assert run(go, target_spec, checksum=checksum) == b"payload" * 100


def test_s3_put_on_loopback_carries_checksum_and_no_payload_hash(s3_target_spec: TargetSpec) -> None:
    """On a loopback endpoint the body is not SHA-256-signed (no network to guard against);
    the server still checks it against Content-MD5, computed off the event loop when big."""
    body = os.urandom(1 << 20)
    sent: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        sent.append(
            {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        )

    async def go(t: Target) -> bytes:
        s3 = unwrap(t, S3Target)
        assert s3 is not None
        s3._client.meta.events.register("before-send.s3.PutObject", record)
        await t.put("big", body)
        return await t.get("big")

    assert run(go, s3_target_spec, checksum="md5") == body
    assert sent[0]["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert sent[0]["content-md5"] == base64.b64encode(hashlib.md5(body).digest()).decode()


def test_payload_signing_stays_on_for_plain_http_across_a_network() -> None:
    assert [is_loopback(u) for u in ("http://127.0.0.1:9000", "http://localhost", "http://[::1]:80")] == [
        True
    ] * 3
    assert not is_loopback("http://10.0.0.5:9000") and not is_loopback("http://minio.internal")
    remote = config_kwargs(S3Access(endpoint_url="http://10.0.0.5:9000"))
    assert "payload_signing_enabled" not in remote["s3"]
    local = config_kwargs(S3Access(endpoint_url="http://127.0.0.1:9000"))
    assert local["s3"]["payload_signing_enabled"] is False


def test_bandwidth_cap_paces_uploads(tmp_path: Path) -> None:
    """max_bandwidth is a token bucket: 3 MiB at 1 MiB/s (1 s of burst) takes about 2 s."""
    cfg = target_config({"name": "slow", "url": str(tmp_path), "max_bandwidth": "1MiB/s"})

    async def go() -> float:
        target = await open_target(cfg)
        started = time.monotonic()
        for i in range(6):
            await target.put(f"obj{i}", bytes(512 << 10))
        await target.close()
        return time.monotonic() - started

    assert asyncio.run(go()) >= 1.8
