"""Outage-and-recovery trials: a target goes away while checkpoints are written, then returns.

    python -m bench.bench_outage [--trials 21] [--modes refuse,reset,blackhole] [--workdir DIR]

Each trial runs ``replicator run`` (the installed copy, bench.common.replicator_command) with a
checkpoint source, a POSIX target ``nfs`` and an S3 target ``s3`` on a local
``rclone serve s3`` reached through the fault proxy (tests/faults.py). After a first set is on
both targets, the proxy fails in the trial's mode (refuse: nothing listens; reset: every
connection is reset; blackhole: connections are accepted and never answered) for a random
5-25 s, while 1-3 more checkpoint sets are written. Then the proxy passes traffic again and
nothing else happens: no new change, no restart, no signal.

Measured per trial: how long the healthy target took to publish each set written during the
outage (it must never wait for the dead one), how long after the target returned its latest
snapshot held every set (*recovery*), whether it recovered at all within --patience (a
*hang*), and whether `verify --read-data` of both repositories passes afterwards (objects
lost). Results: bench/out/outage.json and a Markdown summary on stdout.

The S3 target uses `timeout: 5s` (a hung server is noticed within seconds; the default is
60 s) and the default retry settings otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, replicator_command
from replicator.errors import ReplicatorError
from tests.daemon_helpers import latest_manifest, set_names
from tests.faults import FaultProxy, ProxyMode
from tests.helpers import make_checkpoint
from tests.servers import ACCESS_KEY, SECRET_KEY, RcloneServer, free_port

S3_ENV = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


@dataclass
class Trial:
    mode: str
    outage_seconds: float
    sets_during_outage: int
    nfs_max_seconds: float
    """Longest time from a set's marker to its publication on the healthy target, during the outage."""
    recovery_seconds: float | None
    """From the target's return to its latest snapshot holding every set; None: a hang."""
    verified: bool


def _sets(target: dict[str, Any]) -> list[str]:
    """The sets of the source's latest snapshot on a target ([] if none, or unreachable)."""
    try:
        return set_names(latest_manifest(target, "ckpt"))
    except ReplicatorError:
        return []


def _wait(predicate: Any, patience: float) -> float | None:
    """Seconds until ``predicate()`` holds, or None after ``patience``."""
    start = time.monotonic()
    while time.monotonic() - start < patience:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def trial(
    n: int, mode: ProxyMode, server: RcloneServer, work: Path, rng: random.Random, patience: float
) -> Trial:
    env = {**os.environ, **S3_ENV}
    root = work / f"trial-{n:02d}"
    shutil.rmtree(root, ignore_errors=True)
    primary, nfs_dir = root / "primary", root / "nfs"
    primary.mkdir(parents=True)
    nfs_dir.mkdir()
    proxy = FaultProxy.for_server(server)
    s3 = {
        "name": "s3",
        "url": f"s3://{server.new_bucket()}/r",
        "endpoint_url": proxy.endpoint,
        "timeout": "5s",  # credentials: the environment (S3_ENV)
    }
    nfs = {"name": "nfs", "url": str(nfs_dir)}
    config = {
        "state_dir": str(root / "state"),
        "listen": f"127.0.0.1:{free_port()}",
        "sources": [
            {
                "name": "ckpt",
                "url": str(primary),
                "kind": "checkpoint",
                "complete_when": {"marker": "COMPLETE"},
            }
        ],
        "targets": [nfs, s3],
    }
    cfg = root / "r.yaml"
    cfg.write_text(yaml.safe_dump(config))
    direct = {**s3, "endpoint_url": server.endpoint}
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen(
        [*replicator_command(), "run", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        make_checkpoint(primary, 1, hidden=1024)
        want = ["step-000001"]
        if _wait(lambda: _sets(direct) == want and _sets(nfs) == want, patience) is None:
            raise SystemExit(
                f"trial {n}: the first set never reached both targets (see {root / 'daemon.log'})"
            )
        proxy.set_mode(mode)
        outage = rng.uniform(5, 25)
        started = time.monotonic()
        count = rng.randint(1, 3)
        nfs_times = []
        for step in range(2, 2 + count):
            make_checkpoint(primary, step, hidden=1024)
            want = [f"step-{s:06d}" for s in range(1, step + 1)]
            took = _wait(lambda want=want: _sets(nfs) == want, patience)
            if took is None:
                raise SystemExit(f"trial {n}: the healthy target waited for the dead one")
            nfs_times.append(took)
        time.sleep(max(0.0, outage - (time.monotonic() - started)))
        proxy.set_mode("pass")
        recovery = _wait(lambda: _sets(direct) == want, patience)
        verified = all(
            subprocess.run(
                [*replicator_command(), "verify", "--repo", t["url"], "--read-data"]
                + (["--endpoint-url", server.endpoint] if "endpoint_url" in t else []),
                capture_output=True,
                env=env,
            ).returncode
            == 0
            for t in (nfs, direct)
        )
        return Trial(
            mode, round(outage, 1), count, round(max(nfs_times), 2), recovery and round(recovery, 2), verified
        )
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=21)
    parser.add_argument("--modes", default="refuse,reset,blackhole")
    parser.add_argument(
        "--patience", type=float, default=180.0, help="seconds before a trial counts as a hang"
    )
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "outage")
    args = parser.parse_args()
    os.environ.update(S3_ENV)  # for this process's own reads of the S3 target
    modes: list[ProxyMode] = args.modes.split(",")
    rng = random.Random(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    server = RcloneServer(args.workdir / "rclone-root", port=free_port()).start()
    results = []
    try:
        for n in range(args.trials):
            t = trial(n, modes[n % len(modes)], server, args.workdir, rng, args.patience)
            print(json.dumps(asdict(t)), flush=True)
            results.append(t)
    finally:
        server.stop()
    out = ROOT / "bench" / "out" / "outage.json"
    out.write_text(json.dumps([asdict(t) for t in results], indent=2))
    print("\n| mode | trials | hangs | recovery after return p50 / max | healthy target, max | verify |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        rows = [t for t in results if t.mode == mode]
        rec = [t.recovery_seconds for t in rows if t.recovery_seconds is not None]
        hangs = sum(t.recovery_seconds is None for t in rows)
        span = f"{statistics.median(rec):.1f} s / {max(rec):.1f} s" if rec else "-"
        nfs_max = max(t.nfs_max_seconds for t in rows)
        ok = sum(t.verified for t in rows)
        print(f"| {mode} | {len(rows)} | {hangs} | {span} | {nfs_max:.1f} s | {ok}/{len(rows)} pass |")


if __name__ == "__main__":
    main()
