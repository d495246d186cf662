"""A config you can check (issue 22): ``replicator config check`` offline and ``--online``, a
missing AWS profile as a one-line config error, "did you mean" for misspelt settings and
unknown -s/-t names, and -s optional where the config has one source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from replicator.cli import app
from tests.helpers import config_dict, local_setup, make_checkpoint, tree_digest
from tests.servers import ACCESS_KEY, SECRET_KEY, MotoServer

pytestmark = pytest.mark.usefixtures("restore_logging")

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={"REPLICATOR_CONFIG": None})


def one_line_error(res: Result, code: int, *needles: str) -> None:
    assert res.exit_code == code, res.output
    # moto's server runs in this process: its request log reaches the handler replicator set up
    stderr = "".join(
        line for line in res.stderr.splitlines(True) if "werkzeug" not in line and "127.0.0.1 - -" not in line
    )
    assert stderr.startswith("replicator: error: ") and stderr.count("\n") == 1, stderr
    for needle in needles:
        assert needle in stderr, stderr


@pytest.fixture
def aws_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An AWS config file of this test's own, defining the profile ``present`` only."""
    path = tmp_path / "aws-config"
    path.write_text(
        f"[profile present]\nregion = us-east-1\naws_access_key_id = {ACCESS_KEY}\n"
        f"aws_secret_access_key = {SECRET_KEY}\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(path))
    return path


def shipped_s3_to_nfs(tmp_path: Path) -> Path:
    """config/s3-to-nfs.yaml as shipped, with its state and NFS directories under tmp_path."""
    data = yaml.safe_load((ROOT / "config" / "s3-to-nfs.yaml").read_text())
    data["state_dir"] = str(tmp_path / "state")
    data["targets"][0]["url"] = str(tmp_path / "nfs")
    (tmp_path / "nfs").mkdir()
    path = tmp_path / "s3-to-nfs.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- a missing AWS profile ----------------------------------------------------------------------


@pytest.mark.usefixtures("aws_config")
@pytest.mark.parametrize("command", ["sync", "run", "plan"])
def test_a_missing_source_profile_is_a_one_line_config_error(tmp_path: Path, command: str) -> None:
    res = invoke(command, "-c", shipped_s3_to_nfs(tmp_path))
    one_line_error(res, 2, "source checkpoints: AWS profile 'replicator-reader' does not exist")
    assert "[profile replicator-reader]" in res.stderr and "Traceback" not in res.output


@pytest.mark.usefixtures("aws_config")
def test_a_missing_target_profile_is_a_one_line_config_error(tmp_path: Path, moto: MotoServer) -> None:
    primary, _, _ = local_setup(tmp_path)
    make_checkpoint(primary, 1, hidden=32)
    target = {"name": "dr", "url": f"s3://{moto.new_bucket()}/r", "endpoint_url": moto.endpoint}
    cfg = tmp_path / "c.yaml"
    for profile, code in (("absent", 2), ("present", 0)):
        data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [{**target, "profile": profile}])
        cfg.write_text(yaml.safe_dump(data))
        res = invoke("sync", "-q", "-c", cfg)
        if code:
            one_line_error(res, code, "target dr: AWS profile 'absent' does not exist")
        else:
            assert res.exit_code == 0 and "-> dr: published" in res.stdout, res.output

    res = invoke(
        "restore", "-c", cfg, "--dest-profile", "absent", "--dest-endpoint-url", moto.endpoint, "s3://b-x/y"
    )
    one_line_error(res, 2, "restore destination: AWS profile 'absent' does not exist")


# -- config check, offline ----------------------------------------------------------------------


def test_check_lists_every_problem_with_suggestions(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "sources": [{"name": "a", "url": "/data", "keep_lats": 3, "kind": "model"}],
                "targets": [
                    {"name": "t", "url": "s3://bucket/x", "concurency": 4, "retry": {"intial": "1s"}}
                ],
                "compresion": {"level": 3},
            }
        )
    )
    res = invoke("config", "check", "-c", cfg)
    assert res.exit_code == 2, res.output
    assert res.stdout.splitlines() == [
        f"{cfg}: INVALID: 5 problems",
        "  sources[0].kind: Input should be 'checkpoint', 'dataset' or 'embedding' (got 'model')",
        "  sources[0].keep_lats: unknown setting; did you mean 'keep_last'?",
        "  targets[0].retry.intial: unknown setting; did you mean 'initial'?",
        "  targets[0].concurency: unknown setting; did you mean 'concurrency'?",
        "  compresion: unknown setting; did you mean 'compression'?",
    ]
    doc = json.loads(invoke("config", "check", "-c", cfg, "--json").stdout)
    assert doc["exit_code"] == 2 and len(doc["problems"]) == 5 and not doc["ok"]

    # Every other command stops at the first problem, with the same suggestion.
    one_line_error(
        invoke("sync", "-c", cfg),
        2,
        "sources[0].kind: Input should be 'checkpoint', 'dataset' or 'embedding' (got 'model') (and 4 more",
    )


@pytest.mark.usefixtures("aws_config")
def test_check_names_missing_profiles_and_summarizes(tmp_path: Path) -> None:
    path = shipped_s3_to_nfs(tmp_path)
    res = invoke("config", "check", "-c", path)
    assert res.exit_code == 2
    assert res.stdout.splitlines()[1:] == [
        f"  {kind} {name}: AWS profile 'replicator-reader' does not exist (hint: add [profile "
        "replicator-reader] to the AWS config file of the user running replicator (AWS_CONFIG_FILE, "
        "default ~/.aws/config), or remove profile: to use the default chain)"
        for kind, name in (("source", "checkpoints"), ("source", "tokenized"))
    ]

    data = yaml.safe_load(path.read_text())
    for source in data["sources"]:
        source["profile"] = "present"
    data["targets"].append(
        {
            "name": "vault",
            "url": "s3://dr-vault/replica",
            "sse": {"type": "kms", "kms_key_id": "alias/dr"},
            "storage_class": "STANDARD_IA",
            "tags": {"team": "ml"},
        }
    )
    path.write_text(yaml.safe_dump(data))
    res = invoke("config", "check", "-c", path)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        f"{path}: valid: 2 sources, 2 targets",
        "  source checkpoints  s3://acme-training/checkpoints  (kind: checkpoint, region: us-east-1, "
        "profile: present)",
        "  source tokenized    s3://acme-training/datasets/tokenized-v3  (kind: dataset, region: us-east-1, "
        "profile: present)",
        f"  target dc1-nfs      {tmp_path / 'nfs'}",
        "  target vault        s3://dr-vault/replica  (storage_class: STANDARD_IA, sse: kms (alias/dr), "
        "tags: team=ml)",
    ]


@pytest.mark.parametrize("example", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid_offline(
    example: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every example parses (profiles aside: the test machine defines none of them)."""
    for var in ("SLACK_WEBHOOK_URL", "PRIMARY_S3_ENDPOINT"):
        monkeypatch.setenv(var, "https://example.invalid/x")
    for var in (
        "PRIMARY_ACCESS_KEY_ID",
        "PRIMARY_SECRET_ACCESS_KEY",
        "R2_ACCESS_KEY_ID",
        "R2_SECRET_ACCESS_KEY",
    ):
        monkeypatch.setenv(var, "secret")
    monkeypatch.setenv("R2_ACCOUNT_ID", "0123abcd")
    monkeypatch.setenv("PRIMARY_S3_REGION", "us-east-1")
    res = invoke("config", "check", "-c", example, "--json")
    doc = json.loads(res.stdout)
    assert [p for p in doc["problems"] if "AWS profile" not in p] == [], doc["problems"]


# -- config check --online ----------------------------------------------------------------------


def online_config(tmp_path: Path, targets: list[dict[str, Any]]) -> Path:
    primary = tmp_path / "primary"
    make_checkpoint(primary, 1, hidden=32)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(tmp_path, [{"name": "d", "url": str(primary)}], targets)))
    return cfg


def test_online_checks_every_permission_and_leaves_nothing(tmp_path: Path, moto: MotoServer) -> None:
    bucket = moto.new_bucket()
    (tmp_path / "nfs").mkdir()
    targets = [
        {"name": "s3", "url": f"s3://{bucket}/replica", "endpoint_url": moto.endpoint},
        {"name": "nfs", "url": str(tmp_path / "nfs")},
    ]
    res = invoke("config", "check", "--online", "-c", online_config(tmp_path, targets))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].endswith(": OK: 1 source, 2 targets")
    assert lines[4:] == [
        "  source d: list ok",
        "  source d: read ok",
        *(f"  target s3: {op} ok" for op in ("put", "get", "list", "delete")),
        "  target s3: checksum ok (md5, not verified: the server stored a wrong CRC32 and a wrong MD5)",
        *(f"  target nfs: {op} ok" for op in ("put", "get", "list", "delete")),
    ]
    assert moto.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert [p for p in (tmp_path / "nfs").rglob("*") if p.is_file()] == []


def test_online_unreachable_and_missing_bucket(tmp_path: Path, moto: MotoServer) -> None:
    targets = [
        {"name": "dead", "url": "s3://bucket/x", "endpoint_url": "http://127.0.0.1:9"},
        {"name": "nobucket", "url": "s3://no-such-bucket-here/x", "endpoint_url": moto.endpoint},
    ]
    res = invoke("config", "check", "--online", "--json", "-c", online_config(tmp_path, targets))
    assert res.exit_code == 3, res.output
    doc = json.loads(res.stdout)
    by = {(c["subject"], c["check"]): c for c in doc["checks"]}
    assert by[("source d", "list")]["ok"] and by[("source d", "read")]["ok"]
    dead = by[("target dead", "put")]
    assert not dead["ok"] and dead["unreachable"] and "cannot connect" in dead["error"]
    missing = by[("target nobucket", "put")]
    assert not missing["ok"] and not missing["unreachable"] and "NoSuchBucket" in missing["error"]

    only_missing = online_config(tmp_path / "b", [targets[1]])
    res = invoke("config", "check", "--online", "-c", only_missing)
    assert res.exit_code == 1 and "  target nobucket: put FAILED: target nobucket: put " in res.stdout


def test_online_s3_source(tmp_path: Path, moto: MotoServer) -> None:
    bucket = moto.new_bucket()
    moto.client().put_object(Bucket=bucket, Key="data/a.bin", Body=b"abc")
    (tmp_path / "nfs").mkdir()
    cfg = tmp_path / "c.yaml"
    source = {"name": "s", "url": f"s3://{bucket}/data", "endpoint_url": moto.endpoint}
    cfg.write_text(
        yaml.safe_dump(config_dict(tmp_path, [source], [{"name": "nfs", "url": str(tmp_path / "nfs")}]))
    )
    res = invoke("config", "check", "--online", "-c", cfg)
    assert res.exit_code == 0, res.output
    assert "  source s: list ok\n  source s: read ok\n" in res.stdout

    source["url"] = "s3://no-such-bucket-here/data"
    cfg.write_text(
        yaml.safe_dump(config_dict(tmp_path, [source], [{"name": "nfs", "url": str(tmp_path / "nfs")}]))
    )
    res = invoke("config", "check", "--online", "-c", cfg)
    assert res.exit_code == 1 and "  source s: list FAILED: " in res.stdout and "NoSuchBucket" in res.stdout


# -- names given with -s / -t, and -s optional ---------------------------------------------------


def test_unknown_source_and_target_names_suggest_the_closest(tmp_path: Path) -> None:
    _, _, cfg = local_setup(tmp_path, checkpoint=True)
    one_line_error(
        invoke("sync", "-c", cfg, "-s", "ckp"), 2, "no source named 'ckp'; did you mean 'ckpt'? (known: ckpt)"
    )
    one_line_error(
        invoke("sync", "-c", cfg, "-t", "tt"), 2, "no target named 'tt'; did you mean 't'? (known: t)"
    )
    one_line_error(invoke("snapshots", "-c", cfg, "-t", "x"), 2, "no target named 'x' (known: t)")


def test_restore_needs_no_source_when_there_is_one(tmp_path: Path) -> None:
    primary, target, cfg = local_setup(tmp_path, checkpoint=True)
    make_checkpoint(primary, 1, hidden=32)
    assert invoke("sync", "-q", "-c", cfg).exit_code == 0
    choices: list[tuple[list[str | Path], Path]] = [
        (["-c", cfg], tmp_path / "from-config"),
        (["--repo", target], tmp_path / "from-repo"),
    ]
    for args, dest in choices:
        res = invoke("restore", *args, "--no-sync", dest)
        assert res.exit_code == 0, res.output
        assert res.stdout.startswith("restored 4 files") and tree_digest(dest) == tree_digest(primary)

    one_line_error(
        invoke("restore", "--repo", target, "-s", "ckp", tmp_path / "x"),
        2,
        f"no source named 'ckp' in {target}; did you mean 'ckpt'? (known: ckpt)",
    )


def test_restore_without_source_from_a_repository_of_several(tmp_path: Path) -> None:
    primary, target, _ = local_setup(tmp_path)
    make_checkpoint(primary, 1, hidden=32)
    other = tmp_path / "other"
    make_checkpoint(other, 2, hidden=32)
    cfg = tmp_path / "two.yaml"
    sources = [{"name": "d", "url": str(primary)}, {"name": "e", "url": str(other)}]
    cfg.write_text(yaml.safe_dump(config_dict(tmp_path, sources, [{"name": "t", "url": str(target)}])))
    assert invoke("sync", "-q", "-c", cfg).exit_code == 0
    ways: list[list[str | Path]] = [["-c", cfg], ["--repo", target]]
    for args in ways:
        one_line_error(
            invoke("restore", *args, tmp_path / "x"),
            2,
            f"--source is required: {target} holds snapshots of several sources (d, e)",
        )


def test_check_a_dr_site_config_without_sources_and_a_broken_file(tmp_path: Path) -> None:
    """A disaster-recovery site's config names targets only (verify, restore): valid."""
    cfg = tmp_path / "dr.yaml"
    cfg.write_text(
        yaml.safe_dump({"state_dir": str(tmp_path / "s"), "targets": [{"name": "t", "url": "/srv/r"}]})
    )
    res = invoke("config", "check", "-c", cfg)
    assert res.exit_code == 0 and res.stdout.splitlines() == [
        f"{cfg}: valid: 0 sources, 1 target",
        "  target t  /srv/r",
    ]

    cfg.write_text("targets: [\n")
    res = invoke("config", "check", "-c", cfg)
    assert res.exit_code == 2 and res.stdout.splitlines()[0] == f"{cfg}: INVALID: 1 problem"
    assert res.stdout.splitlines()[1].startswith(f"  {cfg}: ") and "line 2" in res.stdout
    res = invoke("config", "check", "-c", tmp_path / "none.yaml")
    assert res.exit_code == 2 and "does not exist" in res.stdout
