"""What a new process pays to confirm the chunk claims an earlier one left, on `rclone serve s3`.

    python -m bench.bench_confirm [--size-gib 1] [--runs 2]

The S3 half of `python -m bench`'s initial and increment scenarios, each round on a fresh
`rclone serve s3` (with `-vv`, to count its requests) and a fresh state: `replicator sync` of
step 1, then of steps 1 and 2. The increment's manifest names every chunk of step 1, which the
first process stored; a new process checks those claims before naming them (HEADs up to
`presence.CONFIRM_BY_HEAD`), unless `confirm_window` trusts what was confirmed lately. Rounds
alternate the default and `confirm_window: 1h`; each line gives the increment's wall time, the
server's CPU time during it (read from /proc), and the HEAD and LIST requests the server
logged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import cpu_seconds, replicator_command
from bench.data import training_steps
from tests.servers import ACCESS_KEY, SECRET_KEY, RcloneServer

ENV = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


def one_round(
    replicator: list[str], work: Path, steps: tuple[Path, Path], window: str | None
) -> dict[str, float]:
    shutil.rmtree(work, ignore_errors=True)
    log = work / "rclone.log"
    work.mkdir(parents=True)
    server = RcloneServer(work / "s3", log=log).start()
    assert server.proc is not None
    try:
        server.client().create_bucket(Bucket="bench")
        source = work / "src"
        source.mkdir()
        target: dict[str, object] = {"name": "t", "url": "s3://bench/repo", "endpoint_url": server.endpoint}
        if window:
            target["confirm_window"] = window
        cfg = work / "c.yaml"
        sources = [{"name": "src", "url": str(source)}]
        state = str(work / "state")
        cfg.write_text(json.dumps({"state_dir": state, "sources": sources, "targets": [target]}))
        sync = [*replicator, "sync", "-q", "-c", str(cfg)]
        shutil.copytree(steps[0], source / steps[0].name)
        subprocess.run(sync, env=ENV, check=True, stdout=subprocess.DEVNULL)
        shutil.copytree(steps[1], source / steps[1].name)
        os.sync()
        logged = log.stat().st_size
        cpu = cpu_seconds(server.proc.pid)
        started = time.monotonic()
        subprocess.run(sync, env=ENV, check=True, stdout=subprocess.DEVNULL)
        wall = time.monotonic() - started
        cpu = cpu_seconds(server.proc.pid) - cpu
        with log.open() as f:
            f.seek(logged)
            lines = f.read()
        return {
            "wall": wall,
            "server_cpu": cpu,
            "heads": len(re.findall(r"serve s3: HEAD OBJECT", lines)),
            "lists": len(re.findall(r"serve s3: LIST BUCKET", lines)),
        }
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0, help="size of one checkpoint step")
    ap.add_argument("--runs", type=int, default=2, help="rounds of each setting")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "replicator-bench-confirm")
    args = ap.parse_args()
    steps = training_steps(args.workdir / "data", args.size_gib, 0.10)
    replicator = replicator_command()
    for _ in range(args.runs):
        for name, window in (("default (HEADs)", None), ("confirm_window: 1h", "1h")):
            r = one_round(replicator, args.workdir / "round", steps, window)
            print(
                f"{name:20} increment {r['wall']:.2f} s, server CPU {r['server_cpu']:.2f} s, "
                f"{r['heads']:.0f} HEADs, {r['lists']:.0f} LISTs"
            )
    shutil.rmtree(args.workdir / "round", ignore_errors=True)


if __name__ == "__main__":
    main()
