"""Configuration: validation, units, ${ENV} expansion, secrets, and the CLI's exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from replicator.config import (
    PosixSourceConfig,
    PosixTargetConfig,
    S3SourceConfig,
    S3TargetConfig,
    load_config,
)
from replicator.errors import ConfigError
from tests.conftest import cli

GOOD = """
state_dir: state
sources:
  - name: ckpt
    url: primary
    kind: checkpoint
    complete_when: {marker: .metadata, quiet: 30s}
targets:
  - name: nfs
    url: /mnt/replica
  - name: s3
    url: s3://bucket/prefix
    endpoint_url: ${TEST_ENDPOINT}
    secret_access_key: ${TEST_SECRET}
    access_key_id: ${TEST_KEY}
    concurrency: 16
chunking: {min_size: 512KiB, avg_size: 2MiB, max_size: 8MiB}
compression: {level: 5}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "replicator.yaml"
    p.write_text(text)
    return p


def test_valid_config_with_env_and_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("TEST_SECRET", "s3cr3t-value")
    monkeypatch.setenv("TEST_KEY", "AKIAXXXX")
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.state_dir == tmp_path / "state"  # relative to the config file
    assert cfg.sources[0].url == str(tmp_path / "primary")
    assert cfg.sources[0].completion.quiet == 30 and cfg.sources[0].completion.marker == ".metadata"
    s3 = cfg.target("s3")
    assert isinstance(s3, S3TargetConfig)
    assert s3.endpoint_url == "http://127.0.0.1:9000"
    assert s3.secret_access_key is not None and s3.secret_access_key.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(s3)
    assert cfg.chunking.avg_size == 2 << 20 and cfg.compression.level == 5
    assert cfg.secret_values() == ["AKIAXXXX", "s3cr3t-value"]


def test_defaults() -> None:
    from replicator.config import Config

    cfg = Config.model_validate(
        {"sources": [{"name": "d", "url": "/x"}], "targets": [{"name": "t", "url": "/y"}]}
    )
    assert (cfg.chunking.min_size, cfg.chunking.avg_size, cfg.chunking.max_size) == (
        1 << 20,
        4 << 20,
        16 << 20,
    )
    assert (
        cfg.sources[0].kind == "dataset"
        and cfg.targets[0].concurrency == 8
        and cfg.targets[0].hash == "xxh3-128"
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("targets: [{name: t, url: /x, concurrency: -3}]", "targets[0].concurrency"),
        ("targets: [{name: t, url: /x, concurrency: -3}]", "-3"),
        ("chunking: {avg_size: 4XB}", "chunking.avg_size"),
        ("chunking: {min_size: 8MiB}", "min_size"),
        ("sources: [{name: 'bad name', url: /x}]", "sources[0].name"),
        ("sources: [{name: a, url: /x, kind: model}]", "sources[0].kind"),
        ("sources: [{name: a, url: /x, colour: red}]", "colour"),
        ("targets: [{name: t, url: /x}, {name: t, url: /y}]", "duplicate targets name 't'"),
        ("targets: [{name: t, url: /x, secret_access_key: plaintext}]", "secrets must not be written"),
        ("targets: [{name: t, url: '${NOT_SET_ANYWHERE}'}]", "NOT_SET_ANYWHERE is not set"),
        ("sources: [{name: a, url: /x, complete_when: {marker: M}}]", "checkpoint only"),
        ("targets: [oops", "line 1"),
        ("- just\n- a list", "mapping"),
        (
            "targets: [{name: t, url: /x, region: eu-west-1}]",
            "targets[0].region: does not apply to a directory",
        ),
        ("targets: [{name: t, url: /x, checksum: crc32}]", "only to s3:// targets) (got 'crc32')"),
        ("sources: [{name: s, url: /x, endpoint_url: 'http://h'}]", "only to s3:// sources"),
        ("sources: [{name: s, url: /x, timeout: 5s}]", "sources[0].timeout: does not apply to a dir"),
        (
            "targets: [{name: t, url: 'ftp://h/x'}]",
            "targets[0].url: unsupported url (use a directory or s3://",
        ),
        ("targets: [{name: t, url: 's3://Bad_Bucket/x'}]", "targets[0].url: invalid bucket name"),
        (
            "targets: [{name: t, url: s3://bkt/x, regoin: x}]",
            "targets[0].regoin: unknown setting; did you mean 'region'?",
        ),
        ("targets: [{name: t}]", "targets[0].url: Field required"),
    ],
)
def test_invalid_configs_name_field_and_value(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    assert "plaintext" not in message


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    cfg = write(tmp_path, "targets: [{name: t, url: /x, concurrency: zero}]\nsources: [{name: s, url: /y}]")
    res = cli("sync", "--config", str(cfg))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "targets[0].concurrency" in lines[0] and "'zero'" in lines[0]


def test_backend_settings_live_only_on_their_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY", "AKIA-in-the-env")
    directory = "targets: [{name: t, url: /x, timeout: 5s, access_key_id: '${KEY}'}]"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, directory))
    assert str(info.value).endswith(
        "targets[0].access_key_id: does not apply to a directory (only to s3:// targets) (got ***)"
    )
    cfg = load_config(write(tmp_path, directory.replace(", access_key_id: '${KEY}'", "")))
    (t,) = cfg.targets
    assert isinstance(t, PosixTargetConfig) and t.timeout == 5 and t.path == Path("/x")  # common
    assert not hasattr(t, "region") and not hasattr(t, "checksum")
    cfg = load_config(
        write(
            tmp_path,
            "sources: [{name: s, url: 's3://primary/ckpt', timeout: 5s, access_key_id: '${KEY}', "
            "secret_access_key: '${KEY}'}, {name: d, url: 'file:///data'}]\n"
            "targets: [{name: t, url: 's3://replica/x', region: auto, checksum: crc32}]",
        )
    )
    s3, directory_source = cfg.sources
    assert isinstance(s3, S3SourceConfig) and s3.timeout == 5 and s3.s3_location.bucket == "primary"
    assert isinstance(directory_source, PosixSourceConfig) and directory_source.path == Path("/data")
    (t,) = cfg.targets
    assert isinstance(t, S3TargetConfig) and t.region == "auto" and t.checksum == "crc32"
    assert cfg.secret_values() == ["AKIA-in-the-env", "AKIA-in-the-env"]
    dumped = json.loads(cfg.model_dump_json())  # e.g. status's config fingerprint
    assert (
        dumped["targets"][0]["checksum"] == "crc32" and dumped["sources"][0]["access_key_id"] == "**********"
    )


def test_overlap_check_sees_each_backends_location(tmp_path: Path) -> None:
    same_bucket = (
        "sources: [{name: s, url: 's3://bkt/data', endpoint_url: 'http://a'}]\n"
        "targets: [{name: t, url: 's3://bkt/data/replica', endpoint_url: '%s'}]"
    )
    with pytest.raises(ConfigError, match="target t \\(s3://bkt/data/replica\\) is inside source s"):
        load_config(write(tmp_path, same_bucket % "http://a"))
    load_config(write(tmp_path, same_bucket % "http://b"))  # another server: another bucket
    with pytest.raises(ConfigError, match=r"source s .* is inside target t"):
        load_config(write(tmp_path, f"sources: [{{name: s, url: 'file://{tmp_path}/r/d'}}]\n"
                                    f"targets: [{{name: t, url: '{tmp_path}/r'}}]"))  # fmt: skip


def test_cli_refuses_a_setting_of_another_backend_with_exit_2(tmp_path: Path) -> None:
    cfg = write(tmp_path, "targets: [{name: t, url: /x, region: us-east-1}]\nsources: [{name: s, url: /y}]")
    res = cli("sync", "--config", str(cfg))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"replicator: error: {cfg}: targets[0].region: does not apply to a directory (only to s3:// "
        "targets) (got 'us-east-1')"
    ]
    res = cli("snapshots", "--repo", "ftp://host/x")
    assert res.returncode == 2 and "--repo: url: unsupported url" in res.stderr


def test_cli_missing_config_file(tmp_path: Path) -> None:
    res = cli("sync", "--config", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "does not exist" in res.stderr
