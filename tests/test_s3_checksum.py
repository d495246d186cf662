"""Integrity in transit on every S3 PUT (issue 23): ``checksum: auto`` (the default) finds once
per target which checksum the server verifies, CRC32 where it can (a fifth of MD5's CPU),
Content-MD5 otherwise; a body damaged on the wire is refused by the server and the PUT retried,
never stored damaged.

Three real servers: rclone (verifies Content-MD5 only), moto (verifies nothing: it stores wrong
checksums as given) and moto behind a layer that verifies like AWS S3 (tests.servers).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.compat
import pytest
import structlog
import yaml
from botocore.exceptions import ClientError
from typer.testing import CliRunner

from replicator.cli import app
from replicator.config import target_config
from replicator.errors import ConfigError, TransientTargetError
from replicator.s3.checksums import PROBE_PREFIX, Detected, wrong_args
from replicator.targets import Target, backend_of, open_target
from replicator.targets.s3 import S3Target
from tests.faults import FaultProxy
from tests.helpers import config_dict, make_checkpoint
from tests.servers import MotoServer, RcloneServer, S3Server, VerifyingMotoServer

pytestmark = pytest.mark.usefixtures("restore_logging")

FAST_RETRY = {"initial": 0.01, "max": 0.05, "give_up_after": 30, "command_give_up_after": 30}


@pytest.fixture(scope="module")
def verifying() -> Iterator[VerifyingMotoServer]:
    server = VerifyingMotoServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def no_flexible() -> Iterator[VerifyingMotoServer]:
    server = VerifyingMotoServer(flexible=False).start()
    yield server
    server.stop()


def server_of(request: pytest.FixtureRequest, kind: str) -> S3Server:
    server: S3Server = request.getfixturevalue(kind)
    return server


def s3_config(endpoint: str, bucket: str, **options: Any) -> dict[str, Any]:
    return {"name": "t", "url": f"s3://{bucket}/replica", "endpoint_url": endpoint, **options}


class Sent:
    """The headers of every PutObject request botocore sends, by key."""

    def __init__(self) -> None:
        self.puts: list[tuple[str, dict[str, str]]] = []

    def attach(self, target: Target) -> S3Target:
        s3 = backend_of(target)
        assert isinstance(s3, S3Target)
        s3._client.meta.events.register("before-send.s3.PutObject", self._record)
        return s3

    def _record(self, request: Any, **_: Any) -> None:
        headers = {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        self.puts.append((request.url, headers))

    def probes(self) -> int:
        return sum(PROBE_PREFIX in url for url, _ in self.puts)

    def of(self, key: str) -> list[dict[str, str]]:
        return [h for url, h in self.puts if url.endswith(f"/replica/{key}")]


def put_all(cfg: dict[str, Any], objects: dict[str, bytes], sent: Sent) -> S3Target:
    """PUT ``objects`` concurrently through a freshly opened target."""

    async def go() -> S3Target:
        target = await open_target(target_config(cfg))
        try:
            s3 = sent.attach(target)
            await asyncio.gather(*(target.put(k, v) for k, v in objects.items()))
            return s3
        finally:
            await target.close()

    return asyncio.run(go())


def stored(server: S3Server, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = server.client()
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}


EXPECTED = {
    "rclone": Detected("md5", True),
    "moto": Detected("md5", False),
    "verifying": Detected("crc32", True),
    "no_flexible": Detected("md5", True),
}
PROBE_PUTS = {"rclone": 3, "moto": 2, "verifying": 2, "no_flexible": 4}
"""A wrong CRC32, then the right one where the wrong one was refused; then a wrong MD5, and
the right one where the wrong one was refused."""


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_auto_detects_once_per_target_what_the_server_verifies(
    request: pytest.FixtureRequest, kind: str
) -> None:
    server = server_of(request, kind)
    bucket = server.new_bucket()
    objects = {f"obj{i}": os.urandom(300 << 10) for i in range(4)}  # hashed in a thread
    sent = Sent()
    with structlog.testing.capture_logs() as logs:
        s3 = put_all(s3_config(server.endpoint, bucket), objects, sent)

    assert s3.checksum == "auto" and s3.detected == EXPECTED[kind]
    assert sent.probes() == PROBE_PUTS[kind]  # one probe for four concurrent first PUTs
    assert stored(server, bucket) == {f"replica/{k}": v for k, v in objects.items()}  # no probe left
    for key, body in objects.items():
        (headers,) = sent.of(key)
        if s3.detected.mode == "crc32":
            assert (
                headers["x-amz-checksum-crc32"]
                == base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
            )
            assert [h for h in headers if h.startswith("x-amz-checksum-") or h == "content-md5"] == [
                "x-amz-checksum-crc32"
            ]
            assert "x-amz-trailer" not in headers and "x-amz-sdk-checksum-algorithm" not in headers
        else:
            assert headers["content-md5"] == base64.b64encode(hashlib.md5(body).digest()).decode()
            assert not any(h.startswith("x-amz-checksum-") for h in headers)
    warned = [e for e in logs if e["event"] == "s3.checksum_unverified"]
    assert len(warned) == (0 if s3.detected.verified else 1)


@pytest.mark.parametrize("kind", ["rclone", "moto", "verifying"])
def test_explicit_checksum_is_used_without_probing(request: pytest.FixtureRequest, kind: str) -> None:
    server = server_of(request, kind)
    bucket = server.new_bucket()
    body = os.urandom(64 << 10)
    for checksum, header in (("md5", "content-md5"), ("crc32", "x-amz-checksum-crc32")):
        sent = Sent()
        s3 = put_all(s3_config(server.endpoint, bucket, checksum=checksum), {checksum: body}, sent)
        assert s3.detected is None and sent.probes() == 0
        (headers,) = sent.of(checksum)
        assert header in headers
    assert stored(server, bucket) == {"replica/md5": body, "replica/crc32": body}


@pytest.mark.parametrize("kind", ["rclone", "verifying"])
def test_a_body_damaged_in_transit_is_refused_and_the_put_retried(
    request: pytest.FixtureRequest, fault_proxy: Any, kind: str
) -> None:
    server = server_of(request, kind)
    bucket = server.new_bucket()
    proxy: FaultProxy = fault_proxy(server)
    body = os.urandom(1 << 20)
    proxy.corrupt_puts(path_contains="/replica/obj", times=2)
    sent = Sent()
    s3 = put_all(s3_config(proxy.endpoint, bucket, retry=FAST_RETRY), {"obj": body}, sent)

    assert s3.detected == EXPECTED[kind]
    assert proxy.stats.corrupted == 2 and len(sent.of("obj")) == 3  # two refused, the third stored
    assert stored(server, bucket) == {"replica/obj": body}
    if isinstance(server, VerifyingMotoServer):
        assert server.rejected >= 2


@pytest.mark.parametrize("kind", ["rclone", "verifying"])
def test_a_put_damaged_every_time_fails_cleanly_and_stores_nothing(
    request: pytest.FixtureRequest, fault_proxy: Any, kind: str
) -> None:
    server = server_of(request, kind)
    bucket = server.new_bucket()
    proxy: FaultProxy = fault_proxy(server)
    proxy.corrupt_puts(path_contains="/replica/obj", times=1000)
    cfg = s3_config(proxy.endpoint, bucket, retry={**FAST_RETRY, "give_up_after": 0.3})
    with pytest.raises(TransientTargetError, match="BadDigest"):
        put_all(cfg, {"obj": os.urandom(100 << 10)}, Sent())
    assert proxy.stats.corrupted >= 1
    assert stored(server, bucket) == {}


def test_the_probe_values_are_really_wrong_and_servers_without_verification_store_them(
    moto: MotoServer, rclone: RcloneServer
) -> None:
    """What the detection rests on, seen with boto3 alone: moto stores a wrong CRC32 and a
    wrong Content-MD5; rclone stores the wrong CRC32 but refuses the wrong MD5 (BadDigest)."""
    body = b"x" * 100
    for server, md5_refused in ((moto, False), (rclone, True)):
        client, bucket = server.client(), server.new_bucket()
        client.put_object(Bucket=bucket, Key="crc", Body=body, **wrong_args("crc32", body))
        if md5_refused:
            with pytest.raises(ClientError, match="BadDigest"):
                client.put_object(Bucket=bucket, Key="md5", Body=body, **wrong_args("md5", body))
        else:
            client.put_object(Bucket=bucket, Key="md5", Body=body, **wrong_args("md5", body))
        assert client.get_object(Bucket=bucket, Key="crc")["Body"].read() == body


def test_crc32c_without_awscrt_is_a_config_error(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(botocore.compat, "HAS_CRT", False)
    with pytest.raises(ConfigError, match="awscrt"):
        put_all(s3_config(moto.endpoint, moto.new_bucket(), checksum="crc32c"), {}, Sent())


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_config_check_online_reports_the_checksum(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    server = server_of(request, kind)
    primary = tmp_path / "primary"
    make_checkpoint(primary, 1, hidden=32)
    targets: list[dict[str, Any]] = [
        {"name": "auto", "url": f"s3://{server.new_bucket()}/r", "endpoint_url": server.endpoint},
        {
            "name": "md5",
            "url": f"s3://{server.new_bucket()}/r",
            "endpoint_url": server.endpoint,
            "checksum": "md5",
        },
    ]
    for t in targets:  # the first PUT also carries auto's probe: room for a busy machine
        t["retry"] = FAST_RETRY
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(tmp_path, [{"name": "d", "url": str(primary)}], targets)))
    res = CliRunner().invoke(
        app, ["config", "check", "--online", "-c", str(cfg)], env={"REPLICATOR_CONFIG": None}
    )
    assert res.exit_code == 0, res.output
    assert f"  target auto: checksum ok ({EXPECTED[kind].describe()})\n" in res.stdout
    assert "  target md5: checksum ok (md5, as configured)\n" in res.stdout


class _Stop(Exception):
    """Raised from before-send: the request is looked at, never sent."""


@pytest.mark.parametrize(
    ("endpoint", "signed"),
    [(None, False), ("https://replica.invalid", False), ("http://replica.invalid", True)],
)
@pytest.mark.parametrize("checksum", ["md5", "crc32"])
def test_the_body_is_hashed_once_besides_over_plain_http_to_another_host(
    endpoint: str | None, signed: bool, checksum: str
) -> None:
    """Over HTTPS (AWS itself: no endpoint_url) the body is not SHA-256-signed as well: TLS and
    the checksum guard it. botocore skips that hash by itself for Content-MD5 but not for an
    x-amz-checksum-crc32 computed by us. Over plain HTTP to another host it stays signed."""
    body = b"x" * 1000
    seen: dict[str, str] = {}

    def record(request: Any, **_: Any) -> None:
        seen.update(
            {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        )
        raise _Stop

    async def go() -> None:
        cfg = target_config(
            {"name": "t", "url": "s3://replica/p", "region": "eu-west-1", "checksum": checksum}
        )
        if endpoint is not None:
            cfg = target_config({**cfg.model_dump(exclude_unset=True), "endpoint_url": endpoint})
        target = await open_target(cfg)
        try:
            backend_of(target)._client.meta.events.register("before-send.s3.PutObject", record)  # type: ignore[attr-defined]
            with pytest.raises(_Stop):
                await target.put("k", body)
        finally:
            await target.close()

    asyncio.run(go())
    assert [h for h in seen if h.startswith("x-amz-checksum-") or h == "content-md5"] == [
        "content-md5" if checksum == "md5" else "x-amz-checksum-crc32"
    ]
    assert "x-amz-trailer" not in seen
    payload = seen["x-amz-content-sha256"]
    assert payload == (hashlib.sha256(body).hexdigest() if signed else "UNSIGNED-PAYLOAD")
