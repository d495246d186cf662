"""End to end through the CLI: sync, snapshots, restore --repo and verify, on every target kind."""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
from pathlib import Path

import pytest

from replicator.repository import DECODE_IN_THREAD
from tests.conftest import TargetSpec, cli, make_target_spec, write_config
from tests.helpers import (
    checkpoint_source,
    config_dict,
    local_setup,
    make_checkpoint,
    stored_chunks,
    tree_digest,
)


def repo_args(spec: TargetSpec) -> list[str]:
    args = ["--repo", spec.config["url"]]
    if spec.server is not None:
        args += ["--endpoint-url", spec.server.endpoint]
    return args


def test_sync_then_restore_from_repo_url_is_byte_identical(tmp_path: Path, target_spec: TargetSpec) -> None:
    primary = tmp_path / "primary"
    make_checkpoint(primary, 100)
    make_checkpoint(primary, 200)
    (primary / "step-000200" / "model-00000-of-00002.safetensors").chmod(0o600)
    cfg = write_config(
        tmp_path / "r.yaml",
        config_dict(
            tmp_path,
            [checkpoint_source(primary)],
            [target_spec.config],
        ),
    )

    res = cli("sync", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "ckpt: 8 files" in res.stdout and "published" in res.stdout

    snaps = cli("snapshots", *repo_args(target_spec), "--json")
    assert snaps.returncode == 0, snaps.stderr
    rows = json.loads(snaps.stdout)
    assert [r["sets"] for r in rows] == [["step-000100", "step-000200"]] and rows[0]["latest"]

    dest = tmp_path / "restored"
    res = cli("restore", *repo_args(target_spec), "--source", "ckpt", str(dest))
    assert res.returncode == 0, res.stderr
    assert tree_digest(dest) == tree_digest(primary)  # content, mode and mtime

    # A second sync of an unchanged source reads nothing and publishes nothing new.
    again = cli("sync", "--config", str(cfg), "--json")
    assert again.returncode == 0
    result = json.loads(again.stdout)["sources"][0]
    assert result["files_read"] == 0 and result["targets"][0]["status"] == "unchanged"


def test_restore_include_and_snapshot_selection(tmp_path: Path) -> None:
    primary, target, cfg = local_setup(tmp_path, checkpoint=True)
    make_checkpoint(primary, 1)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    first = json.loads(cli("snapshots", "--repo", str(target), "--json").stdout)[0]["snapshot"]
    make_checkpoint(primary, 2)
    assert cli("sync", "-c", str(cfg)).returncode == 0

    dest = tmp_path / "only-json"
    res = cli("restore", "-c", str(cfg), "--source", "ckpt", "--include", "*.json", str(dest))
    assert res.returncode == 0, res.stderr
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "step-000001/trainer_state.json",
        "step-000002/trainer_state.json",
    ]

    old = tmp_path / "old"
    assert cli("restore", "-c", str(cfg), "-s", "ckpt", "--snapshot", first[:20], str(old)).returncode == 0
    assert sorted(p.name for p in old.iterdir()) == ["step-000001"]


def test_incomplete_checkpoint_sets_are_never_published(tmp_path: Path) -> None:
    primary, target, cfg = local_setup(tmp_path, checkpoint=True)
    make_checkpoint(primary, 1)
    make_checkpoint(primary, 2, marker=None)  # still being written
    res = cli("sync", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "held back step-000002: no COMPLETE marker" in res.stdout
    rows = json.loads(cli("snapshots", "--repo", str(target), "--json").stdout)
    assert rows[0]["sets"] == ["step-000001"] and rows[0]["files"] == 4


def test_dedup_across_sources_and_snapshots(tmp_path: Path) -> None:
    a, b, target = tmp_path / "a", tmp_path / "b", tmp_path / "target"
    target.mkdir()
    make_checkpoint(a, 7)
    make_checkpoint(b, 7)  # same content under another source
    cfg = write_config(
        tmp_path / "r.yaml",
        config_dict(
            tmp_path,
            [{"name": "a", "url": str(a)}, {"name": "b", "url": str(b)}],
            [{"name": "t", "url": str(target)}],
        ),
    )
    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    first, second = json.loads(res.stdout)["sources"]
    assert first["targets"][0]["uploads"]["bytes_sent"] > 0
    assert second["bytes_read"] == first["bytes_read"] > 0
    assert second["targets"][0]["uploads"]["chunks_sent"] == 0
    assert second["targets"][0]["uploads"]["bytes_dedup"] == second["bytes_read"]


def test_state_loss_rebuilds_from_target_without_resending(tmp_path: Path) -> None:
    primary, _target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 3)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    for p in (tmp_path / "state").iterdir():
        p.unlink()
    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)["sources"][0]
    assert out["files_read"] == 4  # the file cache is gone, so files are read again...
    assert out["targets"][0]["uploads"]["chunks_sent"] == 0  # ...but no chunk is sent twice


def test_after_an_unclean_shutdown_the_listing_replaces_recorded_chunks(tmp_path: Path) -> None:
    """A power cut can leave the state naming chunks whose directory entries never became
    durable on the target. The restart after it must not dedup against them."""
    primary, target, cfg = local_setup(tmp_path)
    (primary / "a.bin").write_bytes(random.Random(1).randbytes(3 << 20))
    assert cli("sync", "-c", str(cfg)).returncode == 0
    lost = [p for p in (target / "chunks").rglob("*") if p.is_file()]
    assert lost
    for p in lost:  # the entries the power cut took
        p.unlink()
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "state.db")) as db, db:
        db.execute("UPDATE meta SET value='0' WHERE key='clean'")  # the run never ended
    (primary / "b.bin").write_bytes((primary / "a.bin").read_bytes())

    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["sources"][0]["targets"][0]["uploads"]["chunks_sent"] == len(lost)
    res = cli("verify", "-c", str(cfg), "--read-data")
    assert res.returncode == 0, res.stdout + res.stderr


def test_two_targets_one_unreachable(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    primary = tmp_path / "primary"
    make_checkpoint(primary, 5)
    good = make_target_spec(request, "rclone", tmp_path, "good")
    dead = {"name": "dead", "url": "s3://bucket/x", "endpoint_url": "http://127.0.0.1:9"}
    cfg = write_config(
        tmp_path / "r.yaml", config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [good.config, dead])
    )
    res = cli("sync", "-c", str(cfg))
    assert res.returncode == 3  # a target could not be reached; the other one is published
    assert "-> good: published" in res.stdout
    assert "-> dead: FAILED" in res.stdout and "cannot connect" in res.stdout


def test_verify_read_data_names_a_flipped_chunk(tmp_path: Path) -> None:
    primary, target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 9)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    assert cli("verify", "--repo", str(target), "--read-data").returncode == 0

    chunk = stored_chunks(target)[0]
    chunk.flip(chunk.length // 3)
    res = cli("verify", "--repo", str(target), "--read-data")
    assert res.returncode == 1
    assert f"BAD {chunk.key}" in res.stdout
    assert cli("verify", "--repo", str(target)).returncode == 0  # structure alone cannot see it
    js = json.loads(cli("verify", "--repo", str(target), "--read-data", "--json").stdout)
    assert [p["key"] for p in js[0]["problems"]] == [chunk.key]


@pytest.mark.parametrize("which", ["first", "largest"])
def test_corrupt_chunk_fails_restore_loudly_without_writing_wrong_bytes(tmp_path: Path, which: str) -> None:
    """Also for a chunk large enough to be decoded in a decoding thread (the largest)."""
    primary, target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 4)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    chunks = stored_chunks(target)
    victim = chunks[0] if which == "first" else max(chunks, key=lambda c: c.length)
    if which == "largest":
        assert victim.length >= DECODE_IN_THREAD
    victim.flip(victim.length // 2)

    dest = tmp_path / "dest"
    res = cli("restore", "--repo", str(target), "--source", "d", str(dest))
    assert res.returncode == 1
    assert victim.key in res.stderr
    restored = tree_digest(dest)
    original = tree_digest(primary)
    assert restored, "files with intact chunks are still restored"
    for path, digest in restored.items():
        assert digest == original[path], f"{path} was written with wrong bytes"
    assert len(restored) < len(original)
    assert not list(dest.rglob(".*restore-*")), "temporary files are cleaned up"


def test_unreadable_file_is_skipped_and_reported(tmp_path: Path) -> None:
    primary, _target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 6)
    (primary / "step-000006" / "trainer_state.json").chmod(0o000)
    res = cli("sync", "-c", str(cfg), "--json", as_unprivileged=True)
    assert res.returncode == 4, res.stderr  # published, but incomplete
    out = json.loads(res.stdout)["sources"][0]
    assert "Permission denied" in out["skipped"]["step-000006/trainer_state.json"]
    assert out["files"] == 3 and out["targets"][0]["status"] == "published"


def test_one_read_fans_out_to_targets_with_different_hashes(tmp_path: Path) -> None:
    """Each repository has its own seed (or BLAKE3): the file is still read once, and every
    target gets its own ids and a byte-identical restore."""
    primary = tmp_path / "primary"
    make_checkpoint(primary, 11)
    targets = []
    for name, algo in (("xa", "xxh3-128"), ("xb", "xxh3-128"), ("b3", "blake3")):
        (tmp_path / name).mkdir()
        targets.append({"name": name, "url": str(tmp_path / name), "hash": algo})
    cfg = write_config(
        tmp_path / "r.yaml", config_dict(tmp_path, [{"name": "d", "url": str(primary)}], targets)
    )
    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)["sources"][0]
    assert out["files_read"] == 4
    assert out["bytes_read"] == sum(f.stat().st_size for f in primary.rglob("*") if f.is_file())
    ids = []
    for t in targets:
        assert all(r["status"] == "published" for r in out["targets"])
        ids.append({c.id for c in stored_chunks(Path(t["url"]))})
        dest = tmp_path / f"restored-{t['name']}"
        assert cli("restore", "--repo", t["url"], "-s", "d", str(dest)).returncode == 0
        assert tree_digest(dest) == tree_digest(primary)
    assert not ids[0] & ids[1], "two xxh3 repositories must not share ids (different seeds)"
    assert {len(i) for i in ids[2]} == {64}, "blake3 ids are 256-bit"
