"""Garbage collection on a schedule in ``replicator run`` (target ``prune: {every, grace}``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from replicator.config import parse_config
from replicator.errors import ConfigError
from tests.conftest import cli, write_config
from tests.daemon_helpers import DaemonProcess, all_manifests, latest_manifest, wait_until
from tests.helpers import config_dict
from tests.test_rpo import metric


def stored_objects(root: Path) -> set[str]:
    """Every chunk object and pack on a POSIX target (relative paths)."""
    return {
        str(p.relative_to(root))
        for top in ("chunks", "packs")
        if (root / top).exists()
        for p in (root / top).rglob("*")
        if p.is_file()
    }


def holds(target: dict[str, Any], name: str) -> bool:
    m = latest_manifest(target, "ds")
    return m is not None and any(f.path == name for f in m.files)


def test_the_daemon_prunes_on_schedule_beside_replication(tmp_path: Path) -> None:
    primary, root = tmp_path / "primary", tmp_path / "t"
    primary.mkdir()
    root.mkdir()
    target: dict[str, Any] = {"name": "t", "url": str(root), "prune": {"every": "1s", "grace": "0s"}}
    source: dict[str, Any] = {"name": "ds", "url": str(primary), "watch": "poll", "poll_interval": "200ms"}
    source |= {"debounce": "300ms", "retention": {"keep_last": 1}}
    data = config_dict(tmp_path, [source], [target])
    listen = data["listen"]
    config = write_config(tmp_path / "r.yaml", data)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        wait_until(daemon.ready, what="ready")
        # base.bin stays (dropping old.bin is then less than max_delete of the snapshot); old.bin
        # comes in its own publish, so its chunks are in objects (packs) of their own.
        (primary / "base.bin").write_bytes(os.urandom(700_000))
        wait_until(lambda: holds(target, "base.bin"), what="first snapshot")
        base = stored_objects(root)
        (primary / "old.bin").write_bytes(os.urandom(300_000))
        wait_until(lambda: holds(target, "old.bin"), what="snapshot with old.bin")
        first = stored_objects(root) - base
        assert first

        # The old file goes; retention keeps only the new snapshot, so old.bin's chunks are
        # referenced by nothing: the scheduled prune (plan, then delete a run later) reclaims them.
        (primary / "old.bin").unlink()
        (primary / "new.bin").write_bytes(os.urandom(200_000))
        wait_until(lambda: holds(target, "new.bin"), what="second snapshot")
        wait_until(lambda: len(all_manifests(target, "ds")) == 1, what="retention dropped the first")
        wait_until(lambda: not (stored_objects(root) & first), timeout=60, what="old chunks deleted")
        assert base <= stored_objects(root), "the live snapshot's chunks stay"

        reclaimed = wait_until(
            lambda: metric(listen, "replicator_prune_reclaimed_bytes_total", target="t") or 0.0,
            what="reclaimed",
        )
        assert reclaimed >= 300_000  # old.bin's chunks: random bytes do not compress
        assert (metric(listen, "replicator_prune_deleted_objects_total", target="t") or 0) >= 1
        assert (metric(listen, "replicator_prune_runs_total", target="t", outcome="success") or 0) >= 2
        assert metric(listen, "replicator_prune_runs_total", target="t", outcome="failed") == 0
        assert (metric(listen, "replicator_prune_last_success_timestamp_seconds", target="t") or 0) > 0
        assert metric(listen, "replicator_prune_duration_seconds", target="t") is not None

        # Replication goes on, and what it publishes now survives the following prunes.
        (primary / "later.bin").write_bytes(os.urandom(100_000))
        wait_until(lambda: holds(target, "later.bin"), what="a snapshot after the prunes")
        runs = metric(listen, "replicator_prune_runs_total", target="t", outcome="success") or 0
        wait_until(
            lambda: (
                (metric(listen, "replicator_prune_runs_total", target="t", outcome="success") or 0)
                >= runs + 2
            ),
            what="two more prunes",
        )
        m = latest_manifest(target, "ds")
        assert m is not None and {f.path for f in m.files} == {"base.bin", "new.bin", "later.bin"}
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    log = daemon.log_text()
    assert "prune.started" in log and "prune.finished" in log
    assert not daemon.crashes(), daemon.crashes()
    r = cli("verify", "-c", str(config))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ({"grace": "1h"}, "every"),
        ({"every": "0s"}, "every"),
        ({"every": "soon"}, "every"),
        ({"every": "1h", "gracee": "1h"}, "gracee"),
        ({"every": "1h", "repack_below": "1.5"}, "repack_below"),
        ({"every": "1h", "repack_below": "most"}, "repack_below"),
    ],
)
def test_config_refuses_a_bad_prune_schedule(tmp_path: Path, prune: dict[str, Any], message: str) -> None:
    data = config_dict(
        tmp_path, [{"name": "ds", "url": str(tmp_path / "src")}], [{"name": "t", "url": str(tmp_path / "t")}]
    )
    data["targets"][0]["prune"] = prune
    with pytest.raises(ConfigError, match=message):
        parse_config(data, tmp_path)


def test_config_prune_schedule_defaults(tmp_path: Path) -> None:
    data = config_dict(
        tmp_path, [{"name": "ds", "url": str(tmp_path / "src")}], [{"name": "t", "url": str(tmp_path / "t")}]
    )
    assert parse_config(data, tmp_path).target("t").prune is None
    data["targets"][0]["prune"] = {"every": "24h"}
    schedule = parse_config(data, tmp_path).target("t").prune
    assert schedule is not None and (schedule.every, schedule.grace) == (86400.0, 3600.0)
    assert schedule.repack_below == 0.5
    data["targets"][0]["prune"] = {"every": "24h", "repack_below": "20%"}
    schedule = parse_config(data, tmp_path).target("t").prune
    assert schedule is not None and schedule.repack_below == 0.2


def test_a_reloaded_config_changes_the_schedule_without_a_restart(tmp_path: Path) -> None:
    from replicator.daemon import merge_live_settings

    data = config_dict(
        tmp_path, [{"name": "ds", "url": str(tmp_path / "src")}], [{"name": "t", "url": str(tmp_path / "t")}]
    )
    old = parse_config(data, tmp_path)
    data["targets"][0]["prune"] = {"every": "6h", "grace": "2h"}
    merged, needs_restart = merge_live_settings(old, parse_config(data, tmp_path))
    schedule = merged.target("t").prune
    assert (
        needs_restart == [] and schedule is not None and (schedule.every, schedule.grace) == (21600.0, 7200.0)
    )
    del data["targets"][0]["prune"]
    merged, needs_restart = merge_live_settings(merged, parse_config(data, tmp_path))
    assert needs_restart == [] and merged.target("t").prune is None
