"""When the primary misbehaves, the replica keeps every good checkpoint (issue 17).

Each test replays a user's story against the real daemon (a subprocess) or the real CLI, with
a POSIX target and, where S3 is involved, a real ``rclone serve s3``."""

from __future__ import annotations

import json
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli, make_target_spec, write_config
from tests.daemon_helpers import DaemonProcess, all_manifests, latest_manifest, set_names, wait_until
from tests.helpers import checkpoint_source, config_dict, make_checkpoint, tree_digest
from tests.test_rpo import WebhookReceiver, metric


def _files_of(root: Path) -> dict[str, str]:
    return {p: sha for p, (sha, _, _) in tree_digest(root).items()}


def _repo_args(target: dict[str, Any]) -> list[str]:
    args = ["--repo", str(target["url"])]
    if "endpoint_url" in target:
        args += ["--endpoint-url", str(target["endpoint_url"])]
    return args


def test_files_deleted_from_published_sets_never_reach_latest(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A cleanup script deletes the files of published checkpoint sets one by one while the
    daemon runs: every target keeps each set whole until its directory is gone, the restore
    drill on ``latest`` passes, retention keeps the newest complete sets, and ``status`` says
    which sets are damaged on the primary."""
    primary = tmp_path / "primary"
    primary.mkdir()
    posix = make_target_spec(request, "posix", tmp_path, "nfs")
    s3 = make_target_spec(request, "rclone", tmp_path, "s3")
    source = checkpoint_source(primary, keep_last=2)
    data = config_dict(tmp_path, [source], [posix.config, s3.config])
    cfg = write_config(tmp_path / "r.yaml", data)
    targets = (posix.config, s3.config)
    for step in (1, 2, 3):
        make_checkpoint(primary, step)
    originals = {f"step-{s:06d}": _files_of(primary / f"step-{s:06d}") for s in (1, 2, 3)}
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    try:
        for t in targets:
            wait_until(partial(_set_count_is, t, 3), what=f"3 sets on {t['name']}")
        for name in ("step-000001", "step-000002"):
            for f in sorted((primary / name).iterdir()):
                if f.name != "COMPLETE":
                    f.unlink()
                    time.sleep(0.3)  # one event, one round each: every intermediate state is seen
        make_checkpoint(primary, 4)
        for t in targets:
            wait_until(partial(_holds_set, t, "step-000004"), what="step 4")
        for t in targets:
            latest = latest_manifest(t, "ckpt")
            assert latest is not None
            held = {f.path for f in latest.files}
            for name, files in originals.items():
                assert {f"{name}/{p}" for p in files} <= held, f"{name} is not whole on {t['name']}"
            drill = cli("verify", *_repo_args(t), "--restore-drill", "--json")
            assert drill.returncode == 0, drill.stdout + drill.stderr
        report = json.loads(cli("status", "-c", str(cfg), "--json").stdout)
        for pair in report["pairs"]:
            assert sorted(pair["damaged"]) == ["step-000001", "step-000002"], pair
        assert "set.damaged_on_primary" in daemon.log_text()

        shutil.rmtree(primary / "step-000001")  # now the whole set goes: removed as a unit
        for t in targets:
            wait_until(partial(_lacks_set, t, "step-000001"), what="unit removal")
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    for t in targets:
        manifests = all_manifests(t, "ckpt")
        assert len(manifests) <= 2, "retention kept snapshots no kept set needs"
        kept_sets = {s.name for m in manifests for s in m.sets}
        assert {"step-000003", "step-000004"} <= kept_sets  # keep_last 2: the two newest sets
        for m in manifests:  # never a partial set, in any snapshot retention kept
            for s in m.sets:
                members = [f for f in m.files if f.path.startswith(s.name + "/")]
                assert len(members) == s.files
                if s.name in originals:
                    assert {f.path.split("/", 1)[1] for f in members} == set(originals[s.name])


def test_a_mass_deletion_is_held_alerted_and_released(tmp_path: Path) -> None:
    """A wiped volume: most of a dataset disappears. The daemon keeps the replica, alerts,
    `status` exits 1 saying HELD; `replicator release` publishes the deletion. `sync` refuses
    likewise unless given --allow-deletes."""
    primary, target = tmp_path / "primary", tmp_path / "target"
    primary.mkdir()
    target.mkdir()
    for i in range(10):
        (primary / f"part-{i}.bin").write_bytes(bytes([i]) * 50_000)
    hooks = WebhookReceiver()
    source = {"name": "d", "url": str(primary), "debounce": "200ms"}
    t = {"name": "t", "url": str(target)}
    data = config_dict(tmp_path, [source], [t])
    data["alerts"] = {"webhooks": [hooks.url]}
    cfg = write_config(tmp_path / "r.yaml", data)
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    try:
        wait_until(lambda: len((latest_manifest(t, "d") or _EMPTY).files) == 10, what="first snapshot")
        for i in range(8):
            (primary / f"part-{i}.bin").unlink()
        wait_until(lambda: "deletion.held" in hooks.kinds(), what="the held alert")
        assert metric(data["listen"], "replicator_deletion_held", source="d", target="t") == 1.0
        res = cli("status", "-c", str(cfg))
        assert res.returncode == 1 and "HELD" in res.stdout, res.stdout
        assert len((latest_manifest(t, "d") or _EMPTY).files) == 10  # the replica is untouched

        released = cli("release", "-c", str(cfg), "-s", "d")
        assert released.returncode == 0, released.stderr
        wait_until(lambda: len((latest_manifest(t, "d") or _EMPTY).files) == 2, what="the released deletion")
        wait_until(lambda: cli("status", "-c", str(cfg)).returncode == 0, what="status ok again")
        assert metric(data["listen"], "replicator_deletion_held", source="d", target="t") == 0.0
    finally:
        assert daemon.stop() == 0, daemon.log_text()
        hooks.close()
    assert cli("release", "-c", str(cfg), "-s", "d").returncode == 1  # no daemon: says what to do

    for i in range(2):  # the one-shot command: refused, then allowed
        (primary / f"more-{i}.bin").write_bytes(b"x")
    for f in list(primary.glob("part-*")):
        f.unlink()
    res = cli("sync", "-c", str(cfg))
    assert res.returncode == 1 and "HELD" in res.stdout and "--allow-deletes" in res.stdout, res.stdout
    assert len((latest_manifest(t, "d") or _EMPTY).files) == 2
    res = cli("sync", "-c", str(cfg), "--allow-deletes")
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(f.path for f in (latest_manifest(t, "d") or _EMPTY).files) == ["more-0.bin", "more-1.bin"]


@pytest.mark.parametrize("kind", ["dataset", "checkpoint"])
def test_an_unreadable_directory_is_carried_forward_and_sync_says_incomplete(
    tmp_path: Path, kind: str
) -> None:
    """A directory the service user cannot list this time keeps what the previous snapshot
    holds of it; `sync` exits 4 and names it."""
    primary, target = tmp_path / "primary", tmp_path / "target"
    primary.mkdir()
    target.mkdir()
    if kind == "checkpoint":
        make_checkpoint(primary, 1)
        make_checkpoint(primary, 2)
        hidden = primary / "step-000001"
        source = checkpoint_source(primary)
    else:
        hidden = primary / "sub"
        hidden.mkdir()
        (hidden / "a.bin").write_bytes(b"a" * 1000)
        (hidden / "b.bin").write_bytes(b"b" * 1000)
        (primary / "top.txt").write_text("top")
        source = {"name": "ckpt", "url": str(primary)}
    t = {"name": "t", "url": str(target)}
    cfg = write_config(tmp_path / "r.yaml", config_dict(tmp_path, [source], [t]))
    assert cli("sync", "-c", str(cfg), as_unprivileged=True).returncode == 0
    before = {f.path: f.digest for f in (latest_manifest(t, "ckpt") or _EMPTY).files}
    (primary / "new.txt").write_text("new")
    hidden.chmod(0)
    try:
        res = cli("sync", "-c", str(cfg), as_unprivileged=True)
    finally:
        hidden.chmod(0o755)
    assert res.returncode == 4, res.stdout + res.stderr
    assert f"unreadable {hidden.name}" in res.stdout
    after = {f.path: f.digest for f in (latest_manifest(t, "ckpt") or _EMPTY).files}
    assert {p: d for p, d in after.items() if p != "new.txt"} == before  # carried forward, unchanged
    assert "new.txt" in after
    if kind == "checkpoint":
        assert set_names(latest_manifest(t, "ckpt")) == ["step-000001", "step-000002"]


def test_bad_entries_never_cost_the_other_files_or_sources(tmp_path: Path) -> None:
    """A FIFO, a symlink loop, an unreadable file and a directory that cannot be listed in one
    source: the daemon replicates every other file of it and of the other source, names the
    bad entries, and keeps running."""
    bad, good, target = tmp_path / "bad", tmp_path / "good", tmp_path / "target"
    for d in (bad, good, target):
        d.mkdir()
    (bad / "ok.bin").write_bytes(b"fine" * 1000)
    os.mkfifo(bad / "pipe")
    (bad / "loop").symlink_to(bad / "loop")
    (bad / "secret.bin").write_bytes(b"s")
    (bad / "secret.bin").chmod(0)
    (bad / "locked").mkdir()
    (bad / "locked" / "inside.bin").write_bytes(b"i")
    (bad / "locked").chmod(0)
    (good / "g.bin").write_bytes(b"good" * 1000)
    sources = [
        {"name": "bad", "url": str(bad), "debounce": "100ms"},
        {"name": "good", "url": str(good), "debounce": "100ms"},
    ]
    t = {"name": "t", "url": str(target)}
    cfg = write_config(tmp_path / "r.yaml", config_dict(tmp_path, sources, [t]))
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log", as_unprivileged=True)
    try:
        wait_until(partial(_paths, t, "bad", ["ok.bin"]), what="the good file of the bad source")
        wait_until(partial(_paths, t, "good", ["g.bin"]), what="the other source")
        (good / "g2.bin").write_bytes(b"more")
        wait_until(partial(_paths, t, "good", ["g.bin", "g2.bin"]), what="the daemon keeps going")
        log = daemon.log_text()
        for name in ("pipe", "loop", "secret.bin", "locked"):
            assert name in log, f"{name} is not named in the log"
        assert not daemon.crashes(), daemon.crashes()
    finally:
        (bad / "locked").chmod(0o755)
        assert daemon.stop() == 0, daemon.log_text()


def _set_count_is(target: dict[str, Any], n: int) -> bool:
    return len(set_names(latest_manifest(target, "ckpt"))) == n


def _holds_set(target: dict[str, Any], name: str) -> bool:
    return name in set_names(latest_manifest(target, "ckpt"))


def _lacks_set(target: dict[str, Any], name: str) -> bool:
    m = latest_manifest(target, "ckpt")
    return m is not None and name not in set_names(m)


def _paths(target: dict[str, Any], source: str, want: list[str]) -> bool:
    m = latest_manifest(target, source)
    return m is not None and sorted(f.path for f in m.files) == want


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"target": "primary/replica"}, "inside source"),
        ({"target": "outer", "source_in_target": True}, "inside target"),
        ({"state": "primary/.state"}, "state_dir"),
    ],
)
def test_a_config_cannot_point_a_replica_at_itself(
    tmp_path: Path, layout: dict[str, Any], message: str
) -> None:
    primary = tmp_path / "outer" / "primary" if layout.get("source_in_target") else tmp_path / "primary"
    primary.mkdir(parents=True)
    target = tmp_path / layout.get("target", "target")
    target.mkdir(parents=True, exist_ok=True)
    data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [{"name": "t", "url": str(target)}])
    if "state" in layout:
        data["state_dir"] = str(tmp_path / layout["state"])
    cfg = write_config(tmp_path / "r.yaml", data)
    res = cli("sync", "-c", str(cfg))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and str(primary) in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


class _Empty:
    files: tuple[()] = ()


_EMPTY: Any = _Empty()
