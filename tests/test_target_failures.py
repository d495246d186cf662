"""When a target misbehaves, the others never wait and the lag never lies (issue 18).

The user stories replayed against real servers (`rclone serve s3`, moto), through the fault
proxy where a failure must be made on demand."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from replicator.config import target_config
from replicator.format.manifest import encode_manifest
from replicator.repository import Repository, ref_key, snapshot_key
from replicator.targets import open_target
from tests.conftest import TargetSpec, cli, make_target_spec, write_config
from tests.daemon_helpers import DaemonProcess, latest_manifest, set_names, wait_until
from tests.faults import FaultProxy, ProxyFactory, ProxyMode
from tests.helpers import checkpoint_source, config_dict, make_checkpoint, stored_chunks, tree_digest
from tests.servers import RcloneServer, S3Server
from tests.test_rpo import WebhookReceiver, get, metric, status_of

SMALL_CHUNKS = {"min_size": "16KiB", "avg_size": "64KiB", "max_size": "256KiB"}


def _repo_args(spec: TargetSpec) -> list[str]:
    args = ["--repo", str(spec.config["url"])]
    if spec.server is not None:
        args += ["--endpoint-url", spec.server.endpoint]
    return args


def _loose_chunk_keys(spec: TargetSpec) -> list[str]:
    if spec.path is not None:
        return sorted(str(p.relative_to(spec.path)) for p in (spec.path / "chunks").rglob("*") if p.is_file())
    assert spec.server is not None and spec.bucket is not None
    pages = (
        spec.server.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=spec.bucket, Prefix="replica/chunks/")
    )
    return sorted(o["Key"].removeprefix("replica/") for page in pages for o in page.get("Contents", []))


def _delete(spec: TargetSpec, key: str) -> None:
    if spec.path is not None:
        (spec.path / key).unlink()
    else:
        assert spec.server is not None
        spec.server.client().delete_object(Bucket=spec.bucket, Key=f"replica/{key}")


@pytest.mark.parametrize("kind", ["posix", "rclone"])
def test_a_chunk_lost_behind_our_back_is_sent_again_before_a_snapshot_names_it(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    """One chunk object is removed from the target out of band; the next `sync` (a new
    process, trusting the state store's cache) must not publish a snapshot that references
    it: it confirms what it relies on and uploads the chunk again."""
    spec = make_target_spec(request, kind, tmp_path)
    primary = tmp_path / "primary"
    make_checkpoint(primary, 1, hidden=192)
    data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [spec.config], chunking=SMALL_CHUNKS)
    cfg = write_config(tmp_path / "r.yaml", data)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    victim = _loose_chunk_keys(spec)[0]
    _delete(spec, victim)
    (primary / "step-000001" / "trainer_state.json").write_text('{"step": 1, "edited": true}')

    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    assert victim in _loose_chunk_keys(spec), "the lost chunk was not sent again"
    assert "target.chunks_missing" in res.stderr
    check = cli("verify", *_repo_args(spec), "--read-data")
    assert check.returncode == 0, check.stdout


def test_verify_read_data_checks_that_chunks_reassemble_to_the_file_digest(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A manifest whose file digest and chunk list disagree (a writer bug, or a forgery that
    keeps every chunk valid) fails `verify --read-data`, not only a restore."""
    spec = make_target_spec(request, "posix", tmp_path)
    primary = tmp_path / "primary"
    make_checkpoint(primary, 1, hidden=192)
    data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [spec.config], chunking=SMALL_CHUNKS)
    cfg = write_config(tmp_path / "r.yaml", data)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    assert cli("verify", *_repo_args(spec), "--read-data").returncode == 0

    async def forge() -> str:
        target = await open_target(target_config(spec.config))
        try:
            repo = await Repository.open(target)
            sid = await repo.resolve("d")
            manifest = await repo.load_manifest("d", sid)
            big = next(f for f in manifest.files if len(f.chunks) > 1)
            swapped = big.model_copy(update={"chunks": (big.chunks[1], big.chunks[0], *big.chunks[2:])})
            files = tuple(swapped if f.path == big.path else f for f in manifest.files)
            forged = manifest.model_copy(update={"files": files})
            stored = encode_manifest(forged)
            new_id = repo.new_snapshot_id(forged, stored)
            await target.put(snapshot_key("d", new_id), stored)
            await target.put(
                ref_key("d"), json.dumps({"snapshot": new_id, "updated": forged.created}).encode()
            )
            return big.path
        finally:
            await target.close()

    path = asyncio.run(forge())
    res = cli("verify", *_repo_args(spec), "--read-data", "--json")
    assert res.returncode == 1
    problems: list[dict[str, Any]] = json.loads(res.stdout)[0]["problems"]
    assert [p["message"] for p in problems if p["key"].endswith(path)] == [
        "file digest differs from its re-assembled chunks"
    ]


def test_verify_repair_heals_a_deleted_and_a_damaged_chunk_from_the_source(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A loose chunk deleted and a packed chunk damaged on the target: `verify --repair`
    sends both again from the primary's files; a chunk whose file is gone from the primary is
    named as not repairable."""
    spec = make_target_spec(request, "posix", tmp_path)
    assert spec.path is not None
    primary = tmp_path / "primary"
    make_checkpoint(primary, 1, hidden=192)
    (primary / "notes.txt").write_text("only here")
    data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [spec.config], chunking=SMALL_CHUNKS)
    cfg = write_config(tmp_path / "r.yaml", data)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    chunks = stored_chunks(spec.path)
    loose = next(c for c in chunks if c.key.startswith("chunks/"))
    packed = next(c for c in chunks if c.key.startswith("packs/"))
    loose.path.unlink()
    packed.flip(packed.length // 2)

    res = cli("verify", "-c", str(cfg), "--read-data", "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "repaired 2 of 2 damaged chunks" in res.stdout
    again = cli("verify", "-c", str(cfg), "--read-data")
    assert again.returncode == 0, again.stdout
    dest = tmp_path / "restored"
    assert cli("restore", "--repo", str(spec.path), "-s", "d", str(dest)).returncode == 0
    assert tree_digest(dest) == tree_digest(primary)

    manifest = latest_manifest(spec.config, "d")
    assert manifest is not None
    notes_id = next(f.chunks[0][0] for f in manifest.files if f.path == "notes.txt")
    notes = next(c for c in stored_chunks(spec.path) if c.id == notes_id)
    notes.flip(notes.length // 2)  # its only copy damaged...
    (primary / "notes.txt").unlink()  # ...and its file gone from the primary
    res = cli("verify", "-c", str(cfg), "--read-data", "--repair")
    assert res.returncode == 1, res.stdout
    assert f"NOT REPAIRED chunks/{notes_id[:2]}/{notes_id}: d/notes.txt is gone from the source" in res.stdout


# --- the daemon, through the fault proxy ---------------------------------------------------

FAST = {"initial": "100ms", "max": "1s", "give_up_after": "5s", "command_give_up_after": "5s"}


def _two_targets(
    tmp_path: Path, proxy: FaultProxy, server: S3Server, **source: Any
) -> tuple[Path, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A checkpoint source, a POSIX target `nfs` and an S3 target `s3` behind ``proxy``."""
    primary = tmp_path / "primary"
    primary.mkdir()
    (tmp_path / "nfs").mkdir()
    nfs = {"name": "nfs", "url": str(tmp_path / "nfs"), "retry": FAST}
    s3 = {
        "name": "s3",
        "url": f"s3://{server.new_bucket()}/r",
        "endpoint_url": proxy.endpoint,
        "retry": FAST,
        "timeout": "2s",
    }
    src = checkpoint_source(primary, **source)
    data = config_dict(tmp_path, [src], [nfs, s3], shutdown_grace="5s")
    return primary, nfs, s3, data


def _direct(s3: dict[str, Any], server: S3Server) -> dict[str, Any]:
    """The S3 target's config without the proxy: for the test's own reads."""
    return {**s3, "endpoint_url": server.endpoint}


def test_a_target_dead_at_start_never_delays_the_others_and_joins_when_it_answers(
    tmp_path: Path, rclone: RcloneServer, fault_proxy: ProxyFactory
) -> None:
    """S3 is down when `replicator run` starts: the HTTP endpoint answers, the POSIX target
    receives the set, the dead one is unhealthy with its error and alerts past its RPO,
    SIGTERM is honoured at once; once S3 answers it catches up with no new change."""
    proxy = fault_proxy(rclone)
    proxy.set_mode("refuse")
    primary, nfs, s3, data = _two_targets(tmp_path, proxy, rclone, rpo="2s")
    hooks = WebhookReceiver()
    data["alerts"] = {"webhooks": [hooks.url], "repeat": "1h"}
    cfg = write_config(tmp_path / "r.yaml", data)
    listen = data["listen"]
    make_checkpoint(primary, 1)
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    try:
        wait_until(lambda: get(listen, "/healthz")[0] == 200, what="the HTTP endpoint")
        wait_until(lambda: set_names(latest_manifest(nfs, "ckpt")) == ["step-000001"], what="nfs")
        assert metric(listen, "replicator_target_healthy", target="s3") == 0.0
        assert metric(listen, "replicator_sent_bytes_total", target="s3") == 0.0  # exists at 0
        wait_until(lambda: "rpo.breached" in hooks.kinds(), what="the breach alert for s3")
        pair = status_of(listen)["s3"]
        assert pair["breached"] and pair["lag_seconds"] > 2
        assert "cannot connect" in (pair["last_error"] or ""), pair
        assert status_of(listen)["nfs"]["lag_seconds"] == 0
        assert get(listen, "/readyz")[0] == 200  # one target open: replicating
    finally:
        assert daemon.stop(timeout=60) == 0, daemon.log_text()  # while s3 is still down
    assert "daemon.grace_expired" not in daemon.log_text()

    daemon = DaemonProcess(cfg, tmp_path / "daemon2.log")  # again, and this time it comes back
    try:
        wait_until(lambda: get(listen, "/healthz")[0] == 200, what="the HTTP endpoint")
        proxy.set_mode("pass")
        wait_until(
            lambda: set_names(latest_manifest(_direct(s3, rclone), "ckpt")) == ["step-000001"],
            what="s3 joins without a new change",
        )
        wait_until(lambda: status_of(listen)["s3"]["last_error"] is None, what="the error clears")
        assert metric(listen, "replicator_target_healthy", target="s3") == 1.0
        wait_until(lambda: "rpo.resolved" in hooks.kinds(), what="the recovery alert")
    finally:
        assert daemon.stop() == 0, daemon.log_text()
        hooks.close()


@pytest.mark.parametrize("mode", ["refuse", "reset", "blackhole"])
def test_a_target_back_from_an_outage_catches_up_without_a_new_change(
    tmp_path: Path, rclone: RcloneServer, fault_proxy: ProxyFactory, mode: ProxyMode
) -> None:
    """S3 goes away while checkpoints are written and comes back: it catches up on its own
    (no new change, no restart), the POSIX target never waited, and no error stays behind."""
    proxy = fault_proxy(rclone)
    primary, nfs, s3, data = _two_targets(tmp_path, proxy, rclone)
    cfg = write_config(tmp_path / "r.yaml", data)
    listen = data["listen"]
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    direct = _direct(s3, rclone)
    try:
        make_checkpoint(primary, 1)
        wait_until(lambda: set_names(latest_manifest(direct, "ckpt")) == ["step-000001"], what="s3, first")
        proxy.set_mode(mode)
        for step in (2, 3):
            make_checkpoint(primary, step, hidden=384)
            wait_until(lambda step=step: len(set_names(latest_manifest(nfs, "ckpt"))) == step, what="nfs")  # type: ignore[misc]
        wait_until(
            lambda: metric(listen, "replicator_target_healthy", target="s3") == 0.0, what="s3 unhealthy"
        )
        proxy.set_mode("pass")
        wait_until(
            lambda: len(set_names(latest_manifest(direct, "ckpt"))) == 3, timeout=90, what="s3 catches up"
        )
        wait_until(lambda: status_of(listen)["s3"]["lag_seconds"] == 0, what="lag back to 0")
        wait_until(lambda: status_of(listen)["s3"]["last_error"] is None, what="no stale error")
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert not daemon.crashes(), daemon.crashes()
    assert (
        cli(
            "verify", "--repo", str(direct["url"]), "--endpoint-url", rclone.endpoint, "--read-data"
        ).returncode
        == 0
    )


def test_a_source_written_without_pause_shows_growing_lag_and_breaches(tmp_path: Path) -> None:
    """A dataset file appended every 0.2 s: the lag is never 0 while it is written, grows past
    the RPO and alerts; once the writer stops, the next snapshot brings it back to 0."""
    primary, target = tmp_path / "primary", tmp_path / "target"
    primary.mkdir()
    target.mkdir()
    hooks = WebhookReceiver()
    source = {"name": "d", "url": str(primary), "rpo": "2s", "debounce": "1s", "max_delay": "30s"}
    data = config_dict(tmp_path, [source], [{"name": "t", "url": str(target)}])
    data["alerts"] = {"webhooks": [hooks.url], "repeat": "1h"}
    cfg = write_config(tmp_path / "r.yaml", data)
    listen = data["listen"]
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    lags: list[float] = []
    try:
        wait_until(lambda: get(listen, "/healthz")[0] == 200, what="the endpoint")
        log = primary / "train.log"
        deadline = time.monotonic() + 120
        while "rpo.breached" not in hooks.kinds() or max(lags, default=0) <= 2:
            with log.open("a") as f:
                f.write("step\n")
            value = metric(listen, "replicator_rpo_lag_seconds", source="d", target="t")
            if value is not None:
                lags.append(value)
            assert time.monotonic() < deadline, f"no breach; lags seen: {lags[-20:]}"
            time.sleep(0.2)
        assert lags and max(lags) > 2
        assert all(v > 0 for v in lags[5:]), "lag read 0 while the file was being written"
        wait_until(
            lambda: metric(listen, "replicator_rpo_lag_seconds", source="d", target="t") == 0,
            timeout=90,
            what="lag back to 0 after the writer stopped",
        )
        wait_until(lambda: "rpo.resolved" in hooks.kinds(), what="the recovery alert")
    finally:
        assert daemon.stop() == 0, daemon.log_text()
        hooks.close()


def test_status_ignores_a_daemon_that_runs_another_configuration(tmp_path: Path) -> None:
    primary, target = tmp_path / "primary", tmp_path / "target"
    primary.mkdir()
    target.mkdir()
    data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [{"name": "t", "url": str(target)}])
    cfg = write_config(tmp_path / "r.yaml", data)
    other_dir = tmp_path / "other"
    (other_dir / "primary").mkdir(parents=True)
    (other_dir / "target").mkdir()
    other = config_dict(
        other_dir,
        [{"name": "elsewhere", "url": str(other_dir / "primary")}],
        [{"name": "far", "url": str(other_dir / "target")}],
        listen=data["listen"],
    )
    other_cfg = write_config(tmp_path / "other.yaml", other)
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    try:
        wait_until(lambda: get(data["listen"], "/healthz")[0] == 200, what="the endpoint")
        mine = json.loads(cli("status", "-c", str(cfg), "--json").stdout)
        assert mine["daemon_running"] and [p["target"] for p in mine["pairs"]] == ["t"]
        res = cli("status", "-c", str(other_cfg), "--json")
        theirs = json.loads(res.stdout)
        assert not theirs["daemon_running"]
        assert [(p["source"], p["target"]) for p in theirs["pairs"]] == [("elsewhere", "far")]
        assert "another configuration" in theirs["warnings"][0]
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_one_shot_commands_give_up_on_a_dead_target_with_exit_3(
    tmp_path: Path, rclone: RcloneServer, fault_proxy: ProxyFactory
) -> None:
    """`sync` publishes the healthy target and exits 3; `snapshots`, `verify` and `restore`
    against the dead endpoint give up after --give-up-after and exit 3."""
    proxy = fault_proxy(rclone)
    primary, _nfs, s3, data = _two_targets(tmp_path, proxy, rclone)
    data["sources"] = [{"name": "d", "url": str(primary)}]
    cfg = write_config(tmp_path / "r.yaml", data)
    make_checkpoint(primary, 1)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    proxy.set_mode("blackhole")
    (primary / "new.bin").write_bytes(b"new")
    res = cli("sync", "-c", str(cfg))
    assert res.returncode == 3, res.stdout + res.stderr
    assert "-> nfs: published" in res.stdout and "-> s3: FAILED" in res.stdout
    repo = ["--repo", str(s3["url"]), "--endpoint-url", proxy.endpoint, "--give-up-after", "2s"]
    for args in (["snapshots"], ["verify"], ["restore", "-s", "d", str(tmp_path / "dest")]):
        res = cli(*args, *repo)
        assert res.returncode == 3, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "could not be reached" not in res.stdout


def test_catch_up_for_a_returning_target_never_delays_the_current_one(
    tmp_path: Path, rclone: RcloneServer, fault_proxy: ProxyFactory
) -> None:
    """While S3 was away, 48 MiB of checkpoints were written; it returns and catches up at a
    paced 4 MiB/s. A new checkpoint written meanwhile reaches the current target (nfs) long
    before that catch-up is over: fresh work first."""
    proxy = fault_proxy(rclone)
    primary, nfs, s3, data = _two_targets(tmp_path, proxy, rclone)
    data["catch_up_bandwidth"] = "4MiB/s"
    cfg = write_config(tmp_path / "r.yaml", data)
    direct = _direct(s3, rclone)
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    try:
        make_checkpoint(primary, 1)
        wait_until(lambda: set_names(latest_manifest(direct, "ckpt")) == ["step-000001"], what="s3, first")
        proxy.set_mode("refuse")
        for step in (2, 3, 4):
            make_checkpoint(primary, step, hidden=1024)  # 16 MiB each
        wait_until(lambda: len(set_names(latest_manifest(nfs, "ckpt"))) == 4, timeout=60, what="nfs")
        wait_until(lambda: "target.unhealthy" in daemon.log_text(), what="s3's uploads dropped")
        proxy.set_mode("pass")
        wait_until(lambda: "target.healthy" in daemon.log_text(), what="s3 answers again")
        make_checkpoint(primary, 5)  # fresh work, during the catch-up
        wait_until(lambda: "step-000005" in set_names(latest_manifest(nfs, "ckpt")), timeout=60, what="nfs")
        assert len(set_names(latest_manifest(direct, "ckpt"))) < 4, "the catch-up was not under way"
        wait_until(
            lambda: len(set_names(latest_manifest(direct, "ckpt"))) == 5, timeout=120, what="s3 catches up"
        )
    finally:
        assert daemon.stop() == 0, daemon.log_text()
