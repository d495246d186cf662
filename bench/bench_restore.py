"""Restore throughput (the recovery-time side): replicator vs restic (and rclone) on the same data.

    python -m bench.bench_restore [--size-gib 1] [--runs 5] [--workdir /tmp/replicator-bench-restore]

The same generated bf16 safetensors checkpoint as bench_sync is replicated once, untimed,
into a local replicator repository, a restic repository and an rclone copy. Each run then
restores it into a fresh empty directory (page cache warm for every repository): replicator
`restore --repo DIR` (needs no config or state, like a DR site; durable when it returns, and
again with `--no-sync`), `restic restore latest` (alone, and followed by `sync`),
and rclone `copy` back as the cost of merely moving the bytes. Each restored tree is checked
against the input before its time counts. Results go to bench/out/restore.json and a
Markdown table on stdout.
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
    same_tree,
    summarize,
    timed,
    write_results,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/replicator-bench-restore"))
    args = ap.parse_args()

    data = args.workdir / "data"
    size = generate_checkpoints(data, args.size_gib)
    restic, rclone = find_tool("restic"), find_tool("rclone")
    env = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(args.workdir / "restic-cache")}

    repl, rrepo, rcopy = args.workdir / "replicator", args.workdir / "restic", args.workdir / "rclone"
    for d in (rrepo, rcopy):
        shutil.rmtree(d, ignore_errors=True)
    cfg = replicator_repo(repl, data)
    timed([*replicator_command(), "sync", "-c", str(cfg), "-q"])
    timed([restic, "init", "--repo", str(rrepo)], env)
    timed([restic, "backup", "--repo", str(rrepo), "--quiet", str(data)], env)
    timed([rclone, "copy", "--config", "/dev/null", str(data), str(rcopy)])

    out = args.workdir / "out"
    ours = [*replicator_command(), "restore", "-q", "--repo", f"{repl}/target", "-s", "ckpt"]
    theirs = [restic, "restore", "latest", "--repo", str(rrepo), "--quiet", "--target", str(out)]
    # replicator's default restore is durable when it returns (one syncfs), restic's is not:
    # each is timed both ways (restic followed by `sync`; replicator --no-sync).
    commands: dict[str, tuple[list[str], Path]] = {
        "replicator": ([*ours, str(out)], out),
        "replicator --no-sync": ([*ours, "--no-sync", str(out)], out),
        # restic restores the absolute source path below --target.
        "restic": (theirs, out / data.relative_to("/")),
        "restic + sync": (["sh", "-c", '"$@" && sync', "sh", *theirs], out / data.relative_to("/")),
        "rclone copy": ([rclone, "copy", "--config", "/dev/null", str(rcopy), str(out)], out),
    }
    runs: list[Run] = []
    for i in range(args.runs):
        for tool, (cmd, restored) in commands.items():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            secs, cpu, rss = timed(cmd, env if tool.startswith("restic") else None)
            if not same_tree(data, restored):
                raise SystemExit(f"{tool} restored something other than the input into {restored}")
            runs.append(Run(tool, secs, cpu, rss, du(restored), size))
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)

    summary = summarize(runs)
    versions = peer_versions(restic, rclone)
    path = write_results("restore", runs, {"versions": versions, "input_bytes": size})
    print(f"\ninput: {size / 2**30:.2f} GiB bf16 safetensors; {args.runs} runs each; {versions}\n")
    print("| tool | wall time, median (min-max) | throughput | CPU time | peak RSS |")
    print("|---|---|---|---|---|")
    for tool, st in summary.items():
        print(
            f"| {tool} | {st['seconds_median']:.2f} s ({st['seconds_min']:.2f}-{st['seconds_max']:.2f}) | "
            f"{st['mib_per_s_median']:.0f} MiB/s | {st['cpu_seconds_median']:.2f} s | "
            f"{st['peak_rss_mib_max']:.0f} MiB |"
        )
    for ours_tool, peer in (("replicator", "restic + sync"), ("replicator --no-sync", "restic")):
        mine, rs = summary[ours_tool], summary[peer]
        speedup = mine["mib_per_s_median"] / rs["mib_per_s_median"]
        print(
            f"{ours_tool} vs {peer}: restore throughput {speedup:.2f}x, "
            f"CPU time {mine['cpu_seconds_median'] / rs['cpu_seconds_median']:.2f}x"
        )
    print(f"(raw results: {path})")


if __name__ == "__main__":
    main()
