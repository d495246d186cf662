"""``replicator run`` end to end: event-driven, checkpoint-consistent, multi-target, crash-safe."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from replicator.config import Config
from replicator.repository import Repository
from replicator.restore.core import restore_snapshot
from replicator.targets import open_target
from replicator.verify.check import verify_repository
from tests.conftest import cli, make_target_spec, write_config
from tests.daemon_helpers import (
    DaemonProcess,
    all_manifests,
    file_count,
    latest_manifest,
    set_names,
    wait_until,
)
from tests.helpers import (
    checkpoint_source,
    chunks_written_since,
    config_dict,
    local_setup,
    loose_chunk_ids,
    make_checkpoint,
    tree_digest,
)
from tests.servers import RcloneServer, free_port

FAST_RETRY = {"initial": "100ms", "max": "1s", "give_up_after": "3s"}


def test_checkpoint_set_appears_whole_on_both_targets_and_never_partial(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    primary = tmp_path / "primary"
    primary.mkdir()
    posix = make_target_spec(request, "posix", tmp_path, "nfs")
    s3 = make_target_spec(request, "rclone", tmp_path, "s3")
    cfg = write_config(
        tmp_path / "r.yaml", config_dict(tmp_path, [checkpoint_source(primary)], [posix.config, s3.config])
    )
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    try:
        wait_until(daemon.ready, what="daemon ready")
        make_checkpoint(primary, 100, shards=3, marker=None)  # being written: no marker yet
        time.sleep(1.5)
        for t in (posix, s3):
            assert latest_manifest(t.config, "ckpt") is None, "a set without its marker was published"
        (primary / "step-000100" / "COMPLETE").write_text("")
        for t in (posix, s3):
            m = wait_until(partial(latest_manifest, t.config, "ckpt"), what=f"snapshot on {t.kind}")
            assert m is not None and set_names(m) == ["step-000100"]
            assert sorted(f.path for f in m.files) == sorted(
                str(p.relative_to(primary)) for p in primary.rglob("*") if p.is_file()
            )
        make_checkpoint(primary, 200, marker=None)  # the next one, never completed
        time.sleep(1.5)
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    for t in (posix, s3):
        for m in all_manifests(t.config, "ckpt"):
            assert "step-000200" not in set_names(m)
            assert not [f for f in m.files if f.path.startswith("step-000200/")]


def test_sigterm_and_sigint_drain_and_exit_zero(tmp_path: Path) -> None:
    """A signal right after a candidate is handed to the publishers: its publication is in
    flight, and the drain lets it finish."""
    primary, target, cfg = local_setup(tmp_path, checkpoint=True)
    make_checkpoint(primary, 1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        daemon = DaemonProcess(cfg, tmp_path / f"daemon-{sig}.log")
        wait_until(lambda d=daemon: "candidate.ready" in d.log_text(), what="a candidate")  # type: ignore[misc]
        assert daemon.stop(sig) == 0, daemon.log_text()
        assert "daemon.stopped" in daemon.log_text()
    assert set_names(latest_manifest({"name": "t", "url": str(target)}, "ckpt")) == ["step-000001"]


def test_dead_target_never_stalls_the_other_and_catches_up(tmp_path: Path) -> None:
    primary = tmp_path / "primary"
    primary.mkdir()
    server = RcloneServer(tmp_path / "rclone-root", port=free_port()).start()
    try:
        bucket = server.new_bucket()
        s3: dict[str, Any] = {
            "name": "s3",
            "url": f"s3://{bucket}/replica",
            "endpoint_url": server.endpoint,
            "retry": FAST_RETRY,
        }
        nfs = {"name": "nfs", "url": str(tmp_path / "nfs"), "retry": FAST_RETRY}
        (tmp_path / "nfs").mkdir()
        cfg = write_config(
            tmp_path / "r.yaml", config_dict(tmp_path, [checkpoint_source(primary)], [nfs, s3])
        )
        daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
        try:
            wait_until(daemon.ready, what="ready")
            make_checkpoint(primary, 1)
            wait_until(lambda: set_names(latest_manifest(s3, "ckpt")) == ["step-000001"], what="s3 first set")

            server.stop()  # the secondary S3 endpoint goes away
            make_checkpoint(primary, 2, hidden=512)
            wait_until(
                lambda: set_names(latest_manifest(nfs, "ckpt")) == ["step-000001", "step-000002"], what="nfs"
            )
            make_checkpoint(primary, 3, hidden=512)
            wait_until(
                lambda: len(set_names(latest_manifest(nfs, "ckpt"))) == 3, timeout=20, what="nfs keeps up"
            )

            server.start()  # it comes back: everything that happened meanwhile arrives
            wait_until(
                lambda: len(set_names(latest_manifest(s3, "ckpt"))) == 3, timeout=60, what="s3 catches up"
            )
        finally:
            assert daemon.stop() == 0, daemon.log_text()
        for target in (nfs, s3):
            dest = tmp_path / f"restored-{target['name']}"
            args = ["--repo", str(target["url"])] + (
                ["--endpoint-url", server.endpoint] if "endpoint_url" in target else []
            )
            res = cli("restore", *args, "-s", "ckpt", str(dest))
            assert res.returncode == 0, res.stderr
            assert tree_digest(dest) == tree_digest(primary)
            assert cli("verify", *args, "--read-data").returncode == 0
    finally:
        server.stop()


def test_s3_source_replicates_to_posix_target(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    primary = make_target_spec(request, "moto", tmp_path, "primary")  # a bucket acting as the primary store
    assert primary.server is not None and primary.bucket is not None
    client = primary.server.client()
    objects = {
        "data/shard-000.jsonl": b'{"x": 1}\n' * 50000,
        "data/shard-001.jsonl": b'{"y": 2}\n' * 1000,
        "README": b"dataset card",
        "weird/../skip": b"unsafe key",
    }
    for key, body in objects.items():
        client.put_object(Bucket=primary.bucket, Key=f"datasets/v1/{key}", Body=body)
    target = tmp_path / "target"
    target.mkdir()
    source = {
        "name": "ds",
        "url": f"s3://{primary.bucket}/datasets/v1",
        "endpoint_url": primary.server.endpoint,
        "kind": "dataset",
        "poll_interval": "500ms",
        "debounce": "100ms",
    }
    cfg = write_config(
        tmp_path / "r.yaml", config_dict(tmp_path, [source], [{"name": "t", "url": str(target)}])
    )
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    t = {"name": "t", "url": str(target)}
    try:
        m = wait_until(partial(latest_manifest, t, "ds"), what="first snapshot")
        assert m is not None
        assert sorted(f.path for f in m.files) == ["README", "data/shard-000.jsonl", "data/shard-001.jsonl"]
        client.put_object(Bucket=primary.bucket, Key="datasets/v1/README", Body=b"dataset card, v2")
        client.put_object(Bucket=primary.bucket, Key="datasets/v1/data/shard-002.jsonl", Body=b"{}\n")
        wait_until(lambda: file_count(t, "ds") == 4, what="second snapshot")
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    dest = tmp_path / "dest"
    assert cli("restore", "--repo", str(target), "-s", "ds", str(dest)).returncode == 0
    assert (dest / "README").read_bytes() == b"dataset card, v2"
    assert (dest / "data" / "shard-000.jsonl").read_bytes() == objects["data/shard-000.jsonl"]
    assert (dest / "data" / "shard-002.jsonl").read_bytes() == b"{}\n"
    assert "unsafe" not in json.dumps([str(p) for p in dest.rglob("*")])


def test_poll_mode_keep_last_and_dataset_debounce(tmp_path: Path) -> None:
    primary, target = tmp_path / "primary", tmp_path / "target"
    primary.mkdir()
    target.mkdir()
    source: dict[str, Any] = {"name": "ds", "url": str(primary), "watch": "poll", "poll_interval": "200ms"}
    source |= {"debounce": "300ms", "keep_last": 2}
    t = {"name": "t", "url": str(target)}
    cfg = write_config(tmp_path / "r.yaml", config_dict(tmp_path, [source], [t]))
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    try:
        wait_until(daemon.ready, what="ready")
        for i in range(4):
            (primary / f"part-{i}.bin").write_bytes(bytes([i]) * 100_000)
            wait_until(partial(_has_files, t, i + 1), what=f"snapshot {i}")
        wait_until(lambda: len(all_manifests(t, "ds")) == 2, what="retention")
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert [len(m.files) for m in all_manifests(t, "ds")] == [3, 4]


def _has_files(target: dict[str, Any], n: int) -> bool:
    return file_count(target, "ds") == n


def _has_chunks(target: Path, n: float) -> bool:
    return len(loose_chunk_ids(target)) >= n


def _check_target(config: Config, primary: Path, dest: Path) -> None:
    async def go() -> None:
        t = await open_target(config.targets[0])
        try:
            repo = await Repository.open(t)
            report = await verify_repository(repo, read_data=1.0)
            assert report.ok, report.problems
            manifest = await repo.load_manifest("data", await repo.resolve("data"))
            assert (await restore_snapshot(repo, manifest, dest)).ok
        finally:
            await t.close()

    asyncio.run(go())
    assert tree_digest(dest) == tree_digest(primary)


@pytest.mark.slow
def test_kill9_at_random_points_leaves_targets_consistent_and_resumes_without_resending(
    tmp_path: Path,
) -> None:
    """8 trials (`python -m bench.bench_crash --trials 100` runs more): the daemon is killed -9
    after a random share of the chunk uploads (including none and all of them), then
    restarted on the same state and target."""
    primary = tmp_path / "primary"
    rng = random.Random(20261122)
    for i in range(12):  # 24 MiB in ~1,500 small chunks: plenty of moments to interrupt
        d = primary / f"dir{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.bin").write_bytes(rng.randbytes(2 << 20))
    chunking = {"min_size": "4KiB", "avg_size": "16KiB", "max_size": "64KiB"}

    def setup(name: str) -> tuple[Path, Path, dict[str, Any]]:
        target = tmp_path / f"target-{name}"
        target.mkdir()
        data = config_dict(
            tmp_path / f"state-{name}",
            [{"name": "data", "url": str(primary), "debounce": "50ms"}],
            [{"name": "t", "url": str(target), "concurrency": 2}],
            chunking=chunking,
        )
        return target, write_config(tmp_path / f"{name}.yaml", data), data

    reference, ref_cfg, _ = setup("reference")
    assert cli("sync", "-c", str(ref_cfg)).returncode == 0
    total = len(loose_chunk_ids(reference))
    assert total > 1000

    resent_total, interrupted = 0, 0
    shares = [0.0, 1.0] + [rng.uniform(0.02, 0.98) for _ in range(6)]
    for trial, share in enumerate(shares):
        target, cfg, cfg_data = setup(f"trial{trial}")
        daemon = DaemonProcess(cfg, tmp_path / f"daemon-{trial}.log")
        if share == 0.0:
            time.sleep(rng.uniform(0.05, 0.5))  # during start-up, before any upload
        else:
            wait_until(partial(_has_chunks, target, share * total), interval=0.005, timeout=60)
        daemon.kill9()
        before = loose_chunk_ids(target)
        interrupted += 0 < len(before) < total

        restarted_ns = time.time_ns()

        res = cli("sync", "-c", str(cfg), "--json")  # restart on the same state and target
        assert res.returncode == 0, res.stderr
        sent = json.loads(res.stdout)["sources"][0]["targets"][0]["uploads"]["chunks_sent"]
        new = chunks_written_since(target, before, restarted_ns)  # file tails travel in packs
        assert sent == new, f"trial {trial}: {sent} uploads for {new} new chunks (a chunk was sent twice)"
        resent_total += sent - new
        _check_target(Config.model_validate(cfg_data), primary, tmp_path / f"restored-{trial}")
    assert resent_total == 0
    assert interrupted >= 4, f"only {interrupted} trials interrupted an upload in progress"


def test_systemd_notify_readiness_watchdog_and_stopping(tmp_path: Path) -> None:
    """Under systemd (Type=notify) the daemon reports READY=1, pings WATCHDOG=1 and says STOPPING=1."""
    import socket

    _primary, _target, cfg = local_setup(tmp_path)
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        daemon = DaemonProcess(
            cfg, tmp_path / "daemon.log", env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
        )
        messages: list[str] = []
        try:
            while messages.count("WATCHDOG=1") < 3:
                messages.append(sock.recv(256).decode())
            assert "READY=1" in messages
        finally:
            assert daemon.stop() == 0, daemon.log_text()
        while "STOPPING=1" not in messages:
            messages.append(sock.recv(256).decode())
