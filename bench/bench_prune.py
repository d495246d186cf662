"""Garbage collection: replicator prune vs restic forget --prune on the same checkpoint history.

    python -m bench.bench_prune [--steps 30] [--step-mib 64] [--changed 0.1] [--keep 5]
                                [--workdir /tmp/replicator-bench-prune]

A trainer writes ``--steps`` checkpoint steps of ~``--step-mib`` each (bf16 weights and fp32
Adam moments, bench/data.py), re-drawing ``--changed`` of the layers at every step, and keeps
only the newest step on disk. After each step, untimed: `replicator sync` (checkpoint source,
`keep_last: --keep`, so retention deletes the manifests of older steps) and `restic backup`.
Then, timed: `replicator prune --grace 0` twice (the first run plans, the second deletes;
production runs them at least --grace apart) and `restic forget --keep-last N --prune`.
Reported: wall and CPU time, bytes reclaimed, repository size after, and the data the kept
snapshots hold (each kept step's bytes; shared layers make the stored size smaller). Results go
to bench/out/prune.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.common import Run, du, find_tool, peer_versions, replicator_command, timed, write_results
from bench.data import LAYERS, _write_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--step-mib", type=float, default=64.0)
    ap.add_argument("--changed", type=float, default=0.1)
    ap.add_argument("--keep", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/replicator-bench-prune"))
    args = ap.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    data, repl, rrepo = args.workdir / "data", args.workdir / "replicator", args.workdir / "restic"
    data.mkdir(parents=True)
    (repl / "target").mkdir(parents=True)
    cfg = repl / "replicator.yaml"
    cfg.write_text(
        f"state_dir: {repl}/state\n"
        f"sources: [{{name: ckpt, url: {data}, kind: checkpoint, complete_when: {{marker: COMPLETE}}, "
        f"keep_last: {args.keep}, max_delete: 100%}}]\n"
        f"targets: [{{name: local, url: {repl}/target}}]\n"
    )
    restic = find_tool("restic")
    env = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(args.workdir / "restic-cache")}
    ours = replicator_command()
    timed([restic, "init", "--repo", str(rrepo)], env)

    per_layer = int(args.step_mib * 2**20 / LAYERS / 10)  # 2 bytes of weight + 8 of moments
    versions = [1] * LAYERS
    rng = np.random.default_rng(11)
    step_bytes: list[int] = []
    for step in range(1, args.steps + 1):
        if step > 1:
            for layer in rng.choice(LAYERS, size=max(1, round(args.changed * LAYERS)), replace=False):
                versions[int(layer)] += 1
        for old in data.glob("step-*"):
            shutil.rmtree(old)  # the trainer keeps only its newest checkpoint
        _write_step(data / f"step-{step:06d}", list(versions), per_layer)
        step_bytes.append(du(data))
        timed([*ours, "sync", "-c", str(cfg), "-q"])
        timed([restic, "backup", "--repo", str(rrepo), "--quiet", "--host", "bench", str(data)], env)
        print(f"step {step}/{args.steps} synced", file=sys.stderr)
    live = sum(step_bytes[-args.keep :])

    runs: list[Run] = []
    extra: dict[str, object] = {}
    before = du(repl / "target")
    prune = [*ours, "prune", "-c", str(cfg), "--grace", "0", "-q", "--json"]
    plan = timed(prune)
    sweep = timed(prune)
    after = du(repl / "target")
    check = subprocess.run([*ours, "verify", "-c", str(cfg), "--read-data"], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"replicator verify failed after prune: {check.stdout}{check.stderr}")
    runs.append(
        Run(
            "replicator prune (plan + delete)",
            plan[0] + sweep[0],
            plan[1] + sweep[1],
            max(plan[2], sweep[2]),
            after,
            live,
        )
    )
    extra["replicator"] = {
        "before": before,
        "after": after,
        "reclaimed": before - after,
        "plan_seconds": plan[0],
        "delete_seconds": sweep[0],
    }

    before = du(rrepo)
    forget = [restic, "forget", "--repo", str(rrepo), "--quiet", "--keep-last", str(args.keep), "--prune"]
    secs, cpu, rss = timed(forget, env)
    after = du(rrepo)
    timed([restic, "check", "--repo", str(rrepo), "--quiet"], env)
    runs.append(Run("restic forget --prune", secs, cpu, rss, after, live))
    extra["restic"] = {"before": before, "after": after, "reclaimed": before - after}

    versions_info = peer_versions(restic, find_tool("rclone"))
    params = {"steps": args.steps, "step_mib": args.step_mib, "changed": args.changed, "keep": args.keep}
    path = write_results(
        "prune", runs, {**extra, "params": params, "live_bytes": live, "versions": versions_info}
    )
    print(
        f"\n{args.steps} steps of {args.step_mib:g} MiB, {args.changed:.0%} of layers changed per step, "
        f"keep {args.keep}; kept snapshots hold {live / 2**20:.0f} MiB; {versions_info}\n"
    )
    print("| tool | wall time | CPU time | peak RSS | reclaimed | repository after |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        key = "replicator" if run.tool.startswith("replicator") else "restic"
        info = extra[key]
        assert isinstance(info, dict)
        print(
            f"| {run.tool} | {run.seconds:.2f} s | {run.cpu_seconds:.2f} s | {run.peak_rss_mib:.0f} MiB | "
            f"{info['reclaimed'] / 2**20:.1f} MiB | {info['after'] / 2**20:.1f} MiB |"
        )
    print(f"(raw results: {path}; {json.dumps(params)})")


if __name__ == "__main__":
    main()
