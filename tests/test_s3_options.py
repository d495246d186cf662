"""S3 target options enterprises require (issue 22): server-side encryption (SSE-S3, SSE-KMS,
SSE-C), storage class and object tags, on every object replicator writes and on restored
objects; and the config's validation of them.

moto's server records encryption, storage class and tags: they are read back with boto3,
independently of replicator. moto does not enforce SSE-C (it serves such objects without the
key), so the SSE-C test watches the requests botocore sends instead.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from replicator.cli import app
from replicator.config import S3TargetConfig, load_config, target_config
from replicator.errors import ConfigError
from replicator.targets import backend_of, open_target
from replicator.targets.s3 import S3Target
from tests.helpers import config_dict, make_checkpoint, tree_digest
from tests.servers import MotoServer, RcloneServer

pytestmark = pytest.mark.usefixtures("restore_logging")


def invoke(*args: str | Path, env: Mapping[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={"REPLICATOR_CONFIG": None, **(env or {})})


def s3_target(server: MotoServer | RcloneServer, bucket: str, **options: Any) -> dict[str, Any]:
    return {"name": "t", "url": f"s3://{bucket}/replica", "endpoint_url": server.endpoint, **options}


def setup(tmp_path: Path, target: dict[str, Any]) -> tuple[Path, Path]:
    primary = tmp_path / "primary"
    make_checkpoint(primary, 1, hidden=64)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [target])))
    return primary, cfg


def heads(server: MotoServer, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    client = server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {key: client.head_object(Bucket=bucket, Key=key) for key in keys}


def tags_of(server: MotoServer, bucket: str, key: str) -> dict[str, str]:
    tag_set = server.client().get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    return {t["Key"]: t["Value"] for t in tag_set}


@pytest.mark.parametrize(
    ("sse", "expected"),
    [
        ({"type": "aes256"}, {"ServerSideEncryption": "AES256"}),
        (
            {"type": "kms", "kms_key_id": "alias/replicator-dr"},
            {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/replicator-dr"},
        ),
    ],
)
def test_every_object_synced_is_encrypted_classed_and_tagged_and_restores(
    tmp_path: Path, moto: MotoServer, sse: dict[str, str], expected: dict[str, str]
) -> None:
    bucket = moto.new_bucket()
    tags = {"team": "ml-platform", "purpose": "dr copy=1 +x/y@z"}  # " ", "=", "+", "/", "@": URL-encoded
    target = s3_target(moto, bucket, sse=sse, storage_class="standard_ia", tags=tags)
    primary, cfg = setup(tmp_path, target)
    res = invoke("sync", "-q", "-c", cfg)
    assert res.exit_code == 0, res.output

    objects = heads(moto, bucket, "replica/")
    kinds = {key.split("/")[1] for key in objects}
    assert {"config.json", "snapshots", "refs"} <= kinds and kinds & {"chunks", "packs"}
    for key, head in objects.items():
        assert {k: head.get(k) for k in expected} == expected, key
        assert head["StorageClass"] == "STANDARD_IA", key
        assert tags_of(moto, bucket, key) == tags, key

    dest = tmp_path / "restored"
    args = ["--repo", target["url"], "--endpoint-url", moto.endpoint]
    res = invoke("restore", *args, "-s", "d", "--no-sync", dest)
    assert res.exit_code == 0, res.output
    assert tree_digest(dest) == tree_digest(primary)


def test_sse_c_key_goes_with_every_put_get_and_head(moto: MotoServer) -> None:
    key = os.urandom(32)
    key_md5 = base64.b64encode(hashlib.md5(key).digest()).decode()
    bucket = moto.new_bucket()
    cfg = target_config(
        s3_target(moto, bucket, sse={"type": "customer", "customer_key": base64.b64encode(key)})
    )
    seen: list[tuple[str, Any, Any]] = []

    def record(request: Any, **_: Any) -> None:
        h = request.headers
        if "/chunks/" not in request.url:
            return  # checksum: auto's probe (tests/test_s3_checksum.py)
        seen.append(
            (
                request.method,
                h.get("x-amz-server-side-encryption-customer-algorithm"),
                h.get("x-amz-server-side-encryption-customer-key-MD5"),
            )
        )

    async def go() -> tuple[bytes, int | None]:
        target = await open_target(cfg)
        try:
            backend = backend_of(target)
            assert isinstance(backend, S3Target)
            backend._client.meta.events.register("before-send.s3", record)
            await target.put("chunks/ab/abcd", b"secret bytes")
            data = await target.get("chunks/ab/abcd")
            info = await target.stat("chunks/ab/abcd")
            return data, None if info is None else info.size
        finally:
            await target.close()

    assert asyncio.run(go()) == (b"secret bytes", 12)

    def text(value: Any) -> Any:
        return value.decode() if isinstance(value, bytes) else value

    assert [(m, text(alg), text(md5)) for m, alg, md5 in seen] == [
        ("PUT", "AES256", key_md5),
        ("GET", "AES256", key_md5),
        ("HEAD", "AES256", key_md5),
    ]
    assert key.hex() not in repr(cfg) and base64.b64encode(key).decode() not in repr(cfg)


def test_restore_into_a_bucket_with_dest_options(tmp_path: Path, moto: MotoServer) -> None:
    primary, cfg = setup(tmp_path, {"name": "t", "url": str(tmp_path / "target")})
    (tmp_path / "target").mkdir()
    (primary / "big.bin").write_bytes(os.urandom((16 << 20) + 4096))  # a multipart upload
    assert invoke("sync", "-q", "-c", cfg).exit_code == 0
    bucket = moto.new_bucket()
    res = invoke(
        "restore",
        "-c",
        cfg,
        "--dest-endpoint-url",
        moto.endpoint,
        "--dest-sse",
        "kms",
        "--dest-kms-key-id",
        "alias/training",
        "--dest-storage-class",
        "INTELLIGENT_TIERING",
        "--dest-tag",
        "team=ml",
        "--dest-tag",
        "run=7 a+b=c",
        f"s3://{bucket}/restored",
    )
    assert res.exit_code == 0, res.output
    objects = heads(moto, bucket, "restored/")
    files = [p for p in primary.rglob("*") if p.is_file()]
    assert len(objects) == len(files) and objects["restored/big.bin"]["ContentLength"] == (16 << 20) + 4096
    for key, head in objects.items():
        assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", "alias/training"), key
        assert head["StorageClass"] == "INTELLIGENT_TIERING"
        assert tags_of(moto, bucket, key) == {"team": "ml", "run": "7 a+b=c"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dest-tag", "novalue"], "--dest-tag: use KEY=VALUE (got 'novalue')"),
        (["--dest-storage-class", "GLACIER"], "cannot be read without a restore request"),
        (["--dest-sse", "customer"], "REPLICATOR_DEST_SSE_CUSTOMER_KEY"),
        (["--dest-kms-key-id", "k"], "kms_key_id applies to type: kms only"),
    ],
)
def test_bad_dest_options_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    res = invoke("restore", "--repo", tmp_path, "-s", "d", *args, "s3://bucket/x")
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("replicator: error: ") and message in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1


def test_dest_options_need_an_s3_dest(tmp_path: Path) -> None:
    res = invoke("restore", "--repo", tmp_path, "-s", "d", "--dest-sse", "aes256", tmp_path / "out")
    assert res.exit_code == 2 and "--dest-sse" in res.stderr and "s3://" in res.stderr


def test_rclone_with_default_options_sends_none_of_the_headers(tmp_path: Path, rclone: RcloneServer) -> None:
    """S3-compatible servers that know nothing of SSE, storage classes or tags keep working."""
    primary, cfg = setup(tmp_path, s3_target(rclone, rclone.new_bucket()))
    res = invoke("sync", "-q", "-c", cfg)
    assert res.exit_code == 0, res.output
    tcfg = load_config(cfg).target("t")
    assert isinstance(tcfg, S3TargetConfig) and tcfg.object_options.model_dump() == {
        "sse": None,
        "storage_class": None,
        "tags": {},
    }
    res = invoke("restore", "-c", cfg, "-s", "d", "--no-sync", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert tree_digest(tmp_path / "out") == tree_digest(primary)


# -- validation ---------------------------------------------------------------------------------


def target(**options: Any) -> dict[str, Any]:
    return {"name": "t", "url": "s3://bucket/x", **options}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"storage_class": "GLACIER"}, "GLACIER objects cannot be read without a restore request"),
        ({"storage_class": "DEEP_ARCHIVE"}, "use GLACIER_IR"),
        ({"storage_class": "COLD"}, "unknown S3 storage class (use one of STANDARD,"),
        ({"storage_class": 3}, "storage_class: Input should be a valid string"),
        ({"sse": {"type": "aes256", "kms_key_id": "k"}}, "kms_key_id applies to type: kms only"),
        ({"sse": {"type": "customer"}}, "type: customer needs customer_key"),
        ({"sse": {"type": "customer", "customer_key": "c2hvcnQ="}}, "must decode to 32 bytes"),
        ({"sse": {"type": "customer", "customer_key": "%%%"}}, "customer_key must be base64"),
        ({"sse": {"type": "rot13"}}, "sse.type: Input should be 'aes256', 'kms' or 'customer'"),
        ({"tags": {f"k{i}": "v" for i in range(11)}}, "at most 10 tags"),
        ({"tags": {"aws:owner": "me"}}, "the aws: prefix is reserved"),
        ({"tags": {"k": "x" * 257}}, "values at most 256"),
    ],
)
def test_invalid_options_name_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        target_config(target(**options))
    assert message in str(err.value), str(err.value)


def test_options_do_not_apply_to_directories_nor_sources() -> None:
    with pytest.raises(ConfigError, match=r"sse: does not apply to a directory \(only to s3:// targets\)"):
        target_config({"name": "t", "url": "/srv/replica", "sse": {"type": "aes256"}})
    from replicator.config import source_config

    with pytest.raises(ConfigError, match="storage_class"):
        source_config({"name": "s", "url": "s3://bucket/x", "storage_class": "STANDARD_IA"})


def test_customer_key_must_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    sse = {"type": "customer", "customer_key": key}
    text = {"state_dir": "s", "targets": [target(sse=sse)]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match=r"targets\[0\]\.sse\.customer_key: secrets must not be written"):
        load_config(path)

    monkeypatch.setenv("DR_SSE_KEY", key)
    sse["customer_key"] = "${DR_SSE_KEY}"
    path.write_text(yaml.safe_dump(text))
    cfg = load_config(path)
    assert key in cfg.secret_values()  # the log redactor masks it
    assert key not in repr(cfg) and key not in cfg.model_dump_json()


def test_repo_url_of_an_sse_c_repository_takes_its_key_from_the_environment(
    tmp_path: Path, moto: MotoServer
) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    bucket = moto.new_bucket()
    primary, cfg = setup(
        tmp_path, s3_target(moto, bucket, sse={"type": "customer", "customer_key": "${DR_KEY}"})
    )
    assert invoke("sync", "-q", "-c", cfg, env={"DR_KEY": key}).exit_code == 0

    args = ["--repo", f"s3://{bucket}/replica", "--endpoint-url", moto.endpoint]
    res = invoke("restore", *args, "--no-sync", tmp_path / "out", env={"REPLICATOR_SSE_CUSTOMER_KEY": key})
    assert res.exit_code == 0, res.output
    assert tree_digest(tmp_path / "out") == tree_digest(primary)

    bad = invoke("snapshots", *args, env={"REPLICATOR_SSE_CUSTOMER_KEY": "not-a-key"})
    assert (
        bad.exit_code == 2
        and "--repo (with REPLICATOR_SSE_CUSTOMER_KEY): sse: customer_key must be" in bad.stderr
    )
    assert "not-a-key" not in bad.stderr


def test_sse_c_key_never_reaches_the_log(tmp_path: Path, moto: MotoServer) -> None:
    """Not even botocore's request log at --log-level debug, which shows request headers."""
    key = base64.b64encode(os.urandom(32)).decode()
    bucket = moto.new_bucket()
    _, cfg = setup(tmp_path, s3_target(moto, bucket, sse={"type": "customer", "customer_key": "${DR_KEY}"}))
    assert invoke("sync", "-q", "-c", cfg, env={"DR_KEY": key}).exit_code == 0
    for how, env in (
        (["-c", cfg], {"DR_KEY": key}),
        (
            ["--repo", f"s3://{bucket}/replica", "--endpoint-url", moto.endpoint],
            {"REPLICATOR_SSE_CUSTOMER_KEY": key},
        ),
    ):
        res = invoke("snapshots", "--log-level", "debug", *how, env=env)
        assert res.exit_code == 0, res.output
        assert "x-amz-server-side-encryption-customer-key" in res.stderr.lower()  # headers were logged
        assert key not in res.output and key not in res.stderr
