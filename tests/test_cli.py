"""The command line in-process, through typer's CliRunner: each command parses its options,
calls one library function and prints the result as text or JSON; usage errors are one line
on stderr with exit code 2. Fast: no subprocess, a small repository on local disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from replicator.cli import app
from replicator.units import plural
from tests.helpers import local_setup, make_checkpoint, stored_chunks, tree_digest

pytestmark = pytest.mark.usefixtures("restore_logging")


def invoke(*args: str | Path) -> Result:
    """Run ``replicator ARGS`` in this process, without REPLICATOR_CONFIG from the environment."""
    return CliRunner().invoke(app, [str(a) for a in args], env={"REPLICATOR_CONFIG": None})


@pytest.fixture
def replicated(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(primary, target, config): one small checkpoint replicated as source ``d``."""
    primary, target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 1, hidden=64)
    res = invoke("sync", "-q", "-c", cfg)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("d: 4 files") and "-> t: published" in res.stdout
    return primary, target, cfg


def test_snapshots_json_and_text(replicated: tuple[Path, Path, Path]) -> None:
    primary, target, cfg = replicated
    res = invoke("snapshots", "--repo", target, "--json")
    assert res.exit_code == 0, res.output
    [row] = json.loads(res.stdout)
    files = [p for p in primary.rglob("*") if p.is_file()]
    assert row["source"] == "d" and row["latest"] and row["kind"] == "dataset"
    assert (row["files"], row["bytes"]) == (len(files), sum(p.stat().st_size for p in files))
    assert set(row) == {"source", "snapshot", "created", "kind", "files", "bytes", "latest", "sets"}

    text = invoke("snapshots", "-c", cfg)
    assert text.exit_code == 0 and text.stdout.startswith(f"* d {' ' * 15}{row['snapshot']}")
    assert invoke("snapshots", "-c", cfg, "-s", "other").stdout == "no snapshots\n"


def test_verify_json_then_a_lost_chunk_named_in_text(replicated: tuple[Path, Path, Path]) -> None:
    _, target, cfg = replicated
    res = invoke("verify", "-c", cfg, "--read-data", "100", "--json")
    assert res.exit_code == 0, res.output
    [report] = json.loads(res.stdout)  # one object per target
    assert report["repository"] == str(target) and report["problems"] == [] and report["files"] == 4
    assert report["chunks_read"] >= report["chunks_referenced"] > 0
    assert "drill" not in report and "repair" not in report

    chunks = stored_chunks(target)
    lost = [c for c in chunks if c.path == chunks[0].path]  # a loose chunk, or a pack's chunks
    chunks[0].path.unlink()
    res = invoke("verify", "-c", cfg)
    assert res.exit_code == 1
    assert res.stdout.startswith(f"{target}: {plural(len(lost), 'PROBLEM')}:")
    assert all(f"  BAD {c.key}: " in res.stdout for c in lost)


def test_restore_json_into_a_directory(replicated: tuple[Path, Path, Path], tmp_path: Path) -> None:
    primary, target, _ = replicated
    dest = tmp_path / "restored"
    res = invoke("restore", "--repo", target, "-s", "d", "--no-sync", "--json", dest)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (doc["files"], doc["skipped_existing"], doc["failures"]) == (4, 0, {})
    [row] = json.loads(invoke("snapshots", "--repo", target, "--json").stdout)
    assert doc["snapshot"] == row["snapshot"]
    assert tree_digest(dest) == tree_digest(primary)

    again = invoke("restore", "--repo", target, "-s", "d", "--no-sync", dest)
    assert again.exit_code == 0 and again.stdout.startswith(f"restored 0 files, 0 B from d/{doc['snapshot']}")
    assert again.stdout.endswith("(4 already up to date)\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["verify", "--read-data", "abc"], "--read-data takes a percentage between 0 and 100 (got 'abc')"),
        (["verify", "--scratch", "s"], "--scratch and --load need --restore-drill"),
        (["restore", "-s", "d", "--at", "1h", "--snapshot", "1", "out"], "give either --snapshot or --at"),
        (["restore", "-s", "d", "--at", "soon", "out"], "--at: "),
        (["restore", "-s", "d", "ftp://host/x"], "DEST must be a directory or s3://bucket/prefix"),
        (["snapshots"], "--config is required (or set REPLICATOR_CONFIG)"),
        (["sync", "-s", "nosuch"], "nosuch"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    args: list[str], message: str, replicated: tuple[Path, Path, Path]
) -> None:
    _, target, cfg = replicated
    where = {"snapshots": [], "restore": ["--repo", str(target)]}.get(args[0], ["-c", str(cfg)])
    res = invoke(*args[:1], *where, *args[1:])
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    assert res.stderr.startswith("replicator: error: ") and message in res.stderr
    assert res.stderr.count("\n") == 1
