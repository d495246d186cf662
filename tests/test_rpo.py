"""RPO lag, alerts, metrics, health endpoints and ``replicator status``, end to end."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import cli, write_config
from tests.daemon_helpers import DaemonProcess, wait_until
from tests.helpers import config_dict, make_checkpoint
from tests.servers import ACCESS_KEY, SECRET_KEY, RcloneServer, free_port

FAST_RETRY = {"initial": "100ms", "max": "500ms", "give_up_after": "2s"}


class WebhookReceiver:
    """A local HTTP server that records every JSON POST it receives."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                events.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/T0123/B0456/secret-hook-token-789"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def close(self) -> None:
        self.server.shutdown()


def metric(listen: str, name: str, **labels: str) -> float | None:
    """One sample from the daemon's /metrics, or None (no such series, or no daemon yet)."""
    try:
        text = urllib.request.urlopen(f"http://{listen}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return None


def get(listen: str, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://{listen}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, None  # not listening yet


def status_of(listen: str) -> dict[str, Any]:
    _, doc = get(listen, "/status")
    return {p["target"]: p for p in doc["pairs"]}


def test_lag_alerts_and_status_follow_a_stopped_target(tmp_path: Path) -> None:
    primary = tmp_path / "primary"
    primary.mkdir()
    server = RcloneServer(tmp_path / "rclone-root").start()
    hooks = WebhookReceiver()
    listen = f"127.0.0.1:{free_port()}"
    try:
        bucket = server.new_bucket()
        s3 = {"name": "s3", "url": f"s3://{bucket}/r", "endpoint_url": server.endpoint, "retry": FAST_RETRY}
        nfs = {"name": "nfs", "url": str(tmp_path / "nfs"), "retry": FAST_RETRY}
        (tmp_path / "nfs").mkdir()
        source: dict[str, Any] = {"name": "ckpt", "url": str(primary), "kind": "checkpoint", "rpo": "2s"}
        source["complete_when"] = {"marker": "COMPLETE"}
        data = config_dict(tmp_path, [source], [nfs, s3], listen=listen)
        data["alerts"] = {"webhooks": [hooks.url], "repeat": "1h"}
        cfg = write_config(tmp_path / "r.yaml", data)
        daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
        nfs_lags: list[float] = []

        def lag(target: str) -> float:
            value = metric(listen, "replicator_rpo_lag_seconds", source="ckpt", target=target)
            if target == "nfs" and value is not None:
                nfs_lags.append(value)
            return value if value is not None else -1.0

        try:
            wait_until(lambda: get(listen, "/readyz")[0] == 200, what="ready")
            assert get(listen, "/healthz") == (200, {"status": "ok"})
            make_checkpoint(primary, 1)
            wait_until(
                lambda: metric(
                    listen, "replicator_last_snapshot_timestamp_seconds", source="ckpt", target="s3"
                ),
                what="first snapshot on s3",
            )
            assert cli("status", "-c", str(cfg)).returncode == 0

            server.stop()
            make_checkpoint(primary, 2)
            wait_until(lambda: lag("s3") > 2, timeout=30, what="s3 lag past the RPO")
            wait_until(lambda: "rpo.breached" in hooks.kinds(), timeout=15, what="breach webhook")
            breach = hooks.events[hooks.kinds().index("rpo.breached")]
            assert breach["target"] == "s3" and breach["rpo_seconds"] == 2 and "behind" in breach["text"]
            # The failed upload is reported once its retries are spent (give_up_after: 2s).
            wait_until(lambda: status_of(listen)["s3"]["last_error"], what="the error reaches status")
            res = cli("status", "-c", str(cfg), "--json")
            assert res.returncode == 1, res.stdout
            pairs = {p["target"]: p for p in json.loads(res.stdout)["pairs"]}
            assert pairs["s3"]["breached"] and not pairs["nfs"]["breached"]
            assert pairs["s3"]["pending_files"] >= 4 and "s3" in pairs["s3"]["last_error"]
            assert metric(listen, "replicator_rpo_breached", source="ckpt", target="s3") == 1

            server.start()
            wait_until(lambda: "rpo.resolved" in hooks.kinds(), timeout=60, what="resolved webhook")
            wait_until(lambda: lag("s3") == 0, what="s3 caught up")
            assert cli("status", "-c", str(cfg)).returncode == 0
            assert hooks.kinds().count("rpo.breached") == 1  # repeat is 1h: no re-send meanwhile
            lag("nfs")
        finally:
            assert daemon.stop() == 0, daemon.log_text()
        assert nfs_lags and max(nfs_lags) < 2, f"the healthy target breached: {max(nfs_lags)}"
        log = daemon.log_text()
        assert '"event": "rpo.breached"' in log and '"level": "error"' in log
        assert "secret-hook-token-789" not in log
    finally:
        hooks.close()
        server.stop()


def test_lag_survives_a_restart_while_work_is_pending(tmp_path: Path) -> None:
    primary = tmp_path / "primary"
    primary.mkdir()
    listen = f"127.0.0.1:{free_port()}"
    dead = {
        "name": "dead",
        "url": "s3://bucket/x",
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
        "retry": FAST_RETRY,
    }
    source = {"name": "d", "url": str(primary), "rpo": "1h", "debounce": "100ms"}
    cfg = write_config(tmp_path / "r.yaml", config_dict(tmp_path, [source], [dead], listen=listen))
    (primary / "a.bin").write_bytes(b"x" * 1000)
    daemon = DaemonProcess(cfg, tmp_path / "d1.log")
    try:
        wait_until(
            lambda: (metric(listen, "replicator_rpo_lag_seconds", source="d", target="dead") or 0) > 3,
            what="lag grows",
        )
    finally:
        assert daemon.stop() == 0
    before = time.time()
    daemon = DaemonProcess(cfg, tmp_path / "d2.log")
    try:
        wait_until(
            lambda: metric(listen, "replicator_rpo_lag_seconds", source="d", target="dead") is not None,
            what="metrics after restart",
        )
        value = metric(listen, "replicator_rpo_lag_seconds", source="d", target="dead")
        assert value is not None and value >= 3 + (time.time() - before) - 1, "restart reset the lag"
    finally:
        assert daemon.stop() == 0


def test_secrets_never_reach_the_logs_even_at_debug(tmp_path: Path) -> None:
    """Debug logging, botocore's included, with keys from ${ENV} in the config, the AWS
    environment, and a webhook URL carrying a token: none of them appears in the output."""
    primary = tmp_path / "primary"
    make_checkpoint(primary, 1)
    server = RcloneServer(tmp_path / "rclone-root").start()
    try:
        bucket = server.new_bucket()
        target = {
            "name": "s3",
            "url": f"s3://{bucket}/r",
            "endpoint_url": server.endpoint,
            "access_key_id": "${REPL_TEST_KEY}",
            "secret_access_key": "${REPL_TEST_SECRET}",
            "session_token": "${REPL_TEST_TOKEN}",
        }
        data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [target], log_level="debug")
        data["alerts"] = {"webhooks": ["https://hooks.example.invalid/services/T1/B2/webhook-token-abcdef"]}
        cfg = write_config(tmp_path / "r.yaml", data)
        env = {
            "REPL_TEST_KEY": ACCESS_KEY,
            "REPL_TEST_SECRET": SECRET_KEY,
            "REPL_TEST_TOKEN": "session-token-xyz123",
        }
        sync = cli("sync", "-c", str(cfg), "--log-level", "debug", env=env)
        daemon = DaemonProcess(cfg, tmp_path / "daemon.log", env=env)
        try:
            wait_until(lambda: "snapshot.unchanged" in daemon.log_text(), timeout=30, what="a round")
            time.sleep(0.5)
        finally:
            daemon.stop()
        output = sync.stdout + sync.stderr + daemon.log_text()
        assert "botocore" in output.lower() or "x-amz" in output.lower(), "debug logging was not on"
        for secret in (ACCESS_KEY, SECRET_KEY, "session-token-xyz123", "webhook-token-abcdef"):
            assert secret not in output, f"a secret leaked into the logs: {secret[:4]}..."
    finally:
        server.stop()
