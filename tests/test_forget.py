"""``replicator forget`` end to end: a trainer's history replicated to a POSIX directory and to
a real S3 server (rclone), then a retention policy applied, per target."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import urllib.request
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from replicator.config import parse_config
from replicator.errors import PermanentTargetError
from replicator.metrics import REGISTRY
from replicator.sync import run_sync
from tests.conftest import TargetSpec, cli, make_target_spec, write_config
from tests.daemon_helpers import DaemonProcess, all_manifests, file_count, wait_until
from tests.faults import MemoryTargets
from tests.helpers import checkpoint_source, config_dict, make_checkpoint

STEPS = [500, 1000, 1500, 2000, 2500, 3000]
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def set_name(step: int) -> str:
    return f"step-{step:06d}"


def train(primary: Path, config: Path, steps: list[int] = STEPS, window: int = 2) -> None:
    """A trainer writing one checkpoint set a day and keeping ``window`` on disk, each state
    replicated by ``replicator sync``: snapshot i holds the sets of steps i-1 and i."""
    for day, step in enumerate(steps):
        d = make_checkpoint(primary, step, shards=1, hidden=32)
        when = (T0 + timedelta(days=day)).timestamp()
        for f in d.iterdir():
            os.utime(f, (when, when))
        for old in sorted(primary.iterdir())[:-window]:
            shutil.rmtree(old)
        r = cli("sync", "-c", str(config), "-q")
        assert r.returncode == 0, r.stderr


def snapshot_sets(config: Path, target: str) -> dict[str, list[str]]:
    """snapshot id -> the sets it holds, as ``replicator snapshots`` lists them."""
    r = cli("snapshots", "-c", str(config), "-t", target, "--json")
    assert r.returncode == 0, r.stderr
    return {row["snapshot"]: row["sets"] for row in json.loads(r.stdout)}


def forget(config: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    r = cli("forget", "-c", str(config), "--json", *args)
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout), r.stderr


def entry(report: dict[str, Any], target: str, source: str = "ckpt") -> dict[str, Any]:
    entries: list[dict[str, Any]] = report["entries"]
    found = [e for e in entries if e["target"] == target and e["source"] == source]
    assert len(found) == 1, report
    return found[0]


def setup(tmp_path: Path, targets: list[TargetSpec], **source: Any) -> tuple[Path, Path, dict[str, Any]]:
    primary = tmp_path / "primary"
    primary.mkdir()
    data = config_dict(
        tmp_path,
        [checkpoint_source(primary, max_delete="100%")],
        [t.config for t in targets],
    )
    config = write_config(tmp_path / "r.yaml", data)
    train(primary, config)
    data["sources"][0].update(source)
    return primary, write_config(tmp_path / "r.yaml", data), data


@pytest.mark.parametrize("kind", ["posix", "rclone"])
def test_dry_run_gives_reasons_and_deletes_nothing_then_forget_deletes_exactly_that(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    spec = make_target_spec(request, kind, tmp_path)
    _, config, _ = setup(tmp_path, [spec], retention={"keep_last": 1, "keep_sets": ["step-*000"]})
    before = snapshot_sets(config, "t1")
    ids = sorted(before)
    assert len(ids) == 6

    code, report, err = forget(config, "--dry-run")
    assert code == 0, err
    e = entry(report, "t1")
    assert report["dry_run"] and e["status"] == "ok" and e["deleted"] == []
    assert snapshot_sets(config, "t1") == before, "--dry-run deleted something"
    # Snapshot i holds steps i-1 and i: each milestone (step-*000) is kept in its newest holder.
    assert {k["snapshot"]: k["reasons"] for k in e["keep"]} == {
        ids[2]: ["holds kept set step-001000"],
        ids[4]: ["holds kept set step-002000"],
        ids[5]: ["latest", "holds kept set step-003000"],
    }
    assert [d["snapshot"] for d in e["drop"]] == [ids[0], ids[1], ids[3]]
    sets = {s["name"]: s for s in e["sets"]}
    assert sets["step-001000"]["reasons"] == ["keep_sets step-*000"]
    assert sets["step-003000"]["reasons"] == ["in latest", "last 1", "keep_sets step-*000"]
    assert not sets["step-000500"]["keep"]

    text = cli("forget", "-c", str(config), "--dry-run")
    assert text.returncode == 0, text.stderr
    assert f"keep {ids[4]}  holds kept set step-002000" in text.stdout
    assert f"drop {ids[0]}  (sets step-000500)" in text.stdout
    assert "3 kept, 3 to drop (dry run: nothing deleted)" in text.stdout

    code, applied, err = forget(config)
    assert code == 0, err
    done = entry(applied, "t1")
    assert done["deleted"] == [d["snapshot"] for d in e["drop"]]
    assert done["keep"] == e["keep"]
    after = snapshot_sets(config, "t1")
    assert sorted(after) == [ids[2], ids[4], ids[5]]
    milestones = {name for sets_ in after.values() for name in sets_}
    assert {"step-001000", "step-002000", "step-003000"} <= milestones
    assert "step-000500" not in milestones

    code, again, err = forget(config)
    assert code == 0, err
    assert entry(again, "t1")["deleted"] == [] and entry(again, "t1")["drop"] == []


def test_per_target_override_and_target_selection(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    local = make_target_spec(request, "posix", tmp_path, name="local")
    s3 = make_target_spec(request, "rclone", tmp_path, name="s3")
    _, config, _ = setup(
        tmp_path,
        [local, s3],
        retention={"keep_last": 1, "keep_sets": ["step-*000"]},
        retention_overrides={"s3": {"keep_last": 3}},
    )
    ids = sorted(snapshot_sets(config, "s3"))
    local_ids = sorted(snapshot_sets(config, "local"))  # each repository has its own hash seed

    code, report, err = forget(config, "-t", "s3")
    assert code == 0, err
    assert [e["target"] for e in report["entries"]] == ["s3"]
    e = entry(report, "s3")
    assert e["policy"] == "keep_last 3"
    # The three newest sets: 3000 and 2500 in the latest, 2000 in the snapshot before it.
    assert [k["snapshot"] for k in e["keep"]] == [ids[4], ids[5]]
    assert sorted(snapshot_sets(config, "s3")) == [ids[4], ids[5]]
    assert len(snapshot_sets(config, "local")) == 6, "-t s3 touched another target"

    code, report, err = forget(config)
    assert code == 0, err
    assert entry(report, "local")["policy"] == "keep_last 1, keep_sets step-*000"
    assert sorted(snapshot_sets(config, "local")) == [local_ids[2], local_ids[4], local_ids[5]]
    assert entry(report, "s3")["deleted"] == []


def test_sync_applies_the_same_policy_after_each_publish(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    spec = make_target_spec(request, "posix", tmp_path)
    primary = tmp_path / "primary"
    primary.mkdir()
    policy = {"keep_last": 1, "keep_sets": ["step-*000"]}
    source = checkpoint_source(primary, max_delete="100%", retention=policy)
    config = write_config(tmp_path / "r.yaml", config_dict(tmp_path, [source], [spec.config]))
    train(primary, config)
    kept = snapshot_sets(config, "t1")
    assert len(kept) == 3
    assert {"step-001000", "step-002000", "step-003000"} <= {n for s in kept.values() for n in s}
    code, report, err = forget(config, "--dry-run")
    assert code == 0, err
    assert entry(report, "t1")["drop"] == [], "forget disagrees with what sync kept"


def test_bad_input_and_an_unreachable_target(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    spec = make_target_spec(request, "posix", tmp_path)
    primary = tmp_path / "primary"
    primary.mkdir()
    data = config_dict(tmp_path, [checkpoint_source(primary, keep_last=1)], [spec.config])
    config = write_config(tmp_path / "r.yaml", data)
    r = cli("sync", "-c", str(config), "-q")  # creates the repository; no set is complete yet
    assert r.returncode == 0, r.stderr
    dead = {"name": "dead", "url": "s3://nowhere/x", "endpoint_url": "http://127.0.0.1:9"}
    data["targets"].append(dead)
    write_config(config, data)
    r = cli("forget", "-c", str(config), "-s", "nope")
    assert r.returncode == 2 and "no source named 'nope'" in r.stderr
    r = cli("forget", "-c", str(config), "-t", "t1", "--json")
    assert r.returncode == 0, r.stderr
    assert entry(json.loads(r.stdout), "t1")["status"] == "nothing"
    r = cli("forget", "-c", str(config), "--give-up-after", "1s")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "dead / ckpt (checkpoint; keep_last 1): FAILED" in r.stdout


def test_an_unreadable_manifest_is_kept_and_a_listing_without_the_latest_deletes_nothing(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    spec = make_target_spec(request, "posix", tmp_path)
    assert spec.path is not None
    _, config, _ = setup(tmp_path, [spec], retention={"keep_last": 1})
    ids = sorted(snapshot_sets(config, "t1"))
    manifests = spec.path / "snapshots" / "ckpt"
    damaged = manifests / f"{ids[1]}.json.zst"
    damaged.write_bytes(damaged.read_bytes()[:-3])

    code, report, err = forget(config, "--dry-run")
    assert code == 0, err
    e = entry(report, "t1")
    assert {k["snapshot"]: k["reasons"] for k in e["keep"]} == {
        ids[1]: ["unreadable: kept"],
        ids[5]: ["latest", "holds kept set step-003000"],
    }

    # The ref names a snapshot the listing does not show: no deletion is trusted to it.
    ref = spec.path / "refs" / "ckpt" / "latest"
    missing = "20991231T000000.000000Z-" + "0" * 32
    ref.write_text(json.dumps({"snapshot": missing, "updated": "2099-12-31T00:00:00.000000Z"}))
    code, report, err = forget(config)
    assert code == 1
    e = entry(report, "t1")
    assert e["status"] == "failed" and "does not show the latest snapshot" in e["error"]
    assert e["deleted"] == [] and len(list(manifests.iterdir())) == 6


def test_the_daemon_applies_each_targets_policy_and_a_reloaded_one(tmp_path: Path) -> None:
    primary = tmp_path / "primary"
    primary.mkdir()
    targets = [{"name": n, "url": str(tmp_path / n)} for n in ("a", "b")]
    for t in targets:
        Path(t["url"]).mkdir()
    source: dict[str, Any] = {"name": "ds", "url": str(primary), "watch": "poll", "poll_interval": "200ms"}
    source |= {
        "debounce": "300ms",
        "retention": {"keep_last": 1},
        "retention_overrides": {"b": {"keep_last": 3}},
    }
    data = config_dict(tmp_path, [source], targets)
    config = write_config(tmp_path / "r.yaml", data)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    a, b = targets
    try:
        wait_until(daemon.ready, what="ready")
        for i in range(4):
            (primary / f"part-{i}.bin").write_bytes(bytes([i]) * 10_000)
            wait_until(partial(_both_have, a, b, i + 1), what=f"snapshot {i}")
        wait_until(lambda: len(all_manifests(a, "ds")) == 1, what="a keeps 1")
        wait_until(lambda: len(all_manifests(b, "ds")) == 3, what="b keeps 3")
        # A new policy for b, read on SIGHUP, applies from b's next publish.
        data["sources"][0]["retention_overrides"] = {"b": {"keep_last": 2}}
        write_config(config, data)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config.reloaded" in daemon.log_text(), what="reloaded")
        (primary / "part-4.bin").write_bytes(b"4" * 10_000)
        wait_until(lambda: len(all_manifests(b, "ds")) == 2, what="b keeps 2")
        wait_until(lambda: len(all_manifests(a, "ds")) == 1, what="a keeps 1 again")
        with urllib.request.urlopen(f"http://{data['listen']}/metrics", timeout=10) as response:
            exported = response.read().decode()
        assert 'replicator_snapshots_forgotten_total{source="ds",target="a"} 4.0' in exported
        assert 'replicator_snapshots_forgotten_total{source="ds",target="b"} 3.0' in exported
        assert 'replicator_retention_failures_total{source="ds",target="a"} 0.0' in exported
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert [len(m.files) for m in all_manifests(b, "ds")] == [4, 5]
    assert [len(m.files) for m in all_manifests(a, "ds")] == [5]


def _both_have(a: dict[str, Any], b: dict[str, Any], n: int) -> bool:
    return file_count(a, "ds") == n == file_count(b, "ds")


def test_a_denied_delete_fails_retention_not_the_publish(
    tmp_path: Path, memory_targets: MemoryTargets
) -> None:
    """A credential without DeleteObject: every publish succeeds, old manifests stay, and the
    failure is counted; once deletes are allowed, the next publish catches up."""
    fake = memory_targets.add("m")
    store = fake.store
    assert store is not None
    primary = tmp_path / "primary"
    primary.mkdir()
    source = {"name": "ds", "url": str(primary), "retention": {"keep_last": 1}}
    config = parse_config(config_dict(tmp_path, [source], [{"name": "m", "url": "memory://m"}]), tmp_path)
    labels = {"source": "ds", "target": "m"}

    def counter(name: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    def publish(i: int) -> None:
        (primary / f"part-{i}").write_bytes(bytes([i]) * 1000)
        results, errors = asyncio.run(run_sync(config))
        assert not errors and [t.status for t in results[0].targets] == ["published"]

    failures, forgotten = (
        counter("replicator_retention_failures_total"),
        counter("replicator_snapshots_forgotten_total"),
    )
    denied = fake.plan.fail("delete", times=None, error=PermanentTargetError, message="AccessDenied")
    for i in range(3):
        publish(i)
    assert len(store.keys("snapshots/ds/")) == 3
    # The first publish had nothing to delete; the next two each failed on their first delete.
    assert counter("replicator_retention_failures_total") == failures + 2
    denied.cancel()
    publish(3)
    assert len(store.keys("snapshots/ds/")) == 1
    assert counter("replicator_snapshots_forgotten_total") == forgotten + 3
