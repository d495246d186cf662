"""Garbage collection: replicator prune vs restic forget --prune on the same history.

    python -m bench.bench_prune [--steps 30] [--step-mib 64] [--changed 0.1] [--keep 5]
                                [--workdir /tmp/replicator-bench-prune]
    python -m bench.bench_prune --small-files [--files 20000] [--steps 10] [--churn 0.3]
                                [--added 0.1] [--keep 3] [--repack-below 0.5]

Checkpoints (the default): a trainer writes ``--steps`` checkpoint steps of ~``--step-mib``
each (bf16 weights and fp32 Adam moments, bench/data.py), re-drawing ``--changed`` of the
layers at every step, and keeps only the newest step on disk.

Small files (``--small-files``): a dataset of ``--files`` JSON records of 200 B to 4 KiB (every
one packed by replicator); each later step deletes ``--churn`` of the files present and adds
``--added`` x ``--files`` new ones, so most of the first steps' files are gone by the end and
their packs are sparse: what repacking (``--repack-below``) is for.

After each step, untimed: `replicator sync` (retention `keep_last: --keep` deletes the
manifests of older steps) and `restic backup`. Then, timed: `replicator prune --grace 0` twice
(the first run repacks and plans, the second deletes; production runs them at least --grace
apart) and `restic forget --keep-last N --prune`. Reported: wall and CPU time, bytes reclaimed,
repository size and object count after, and *live* data as stored: for replicator the
distinct chunks the kept snapshots reference (a packed chunk by its range) plus manifests,
refs and config; for restic `restic stats --mode raw-data` (every blob the kept snapshots
reference, as stored). "after / live" is how much the repository holds beyond that. Results go
to bench/out/prune[-small-files].json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import Run, du, find_tool, peer_versions, replicator_command, timed, write_results
from bench.data import LAYERS, _write_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-files", action="store_true", help="the small-files scenario")
    ap.add_argument("--steps", type=int, default=None, help="default 30 (checkpoints), 10 (small files)")
    ap.add_argument("--step-mib", type=float, default=64.0)
    ap.add_argument("--changed", type=float, default=0.1)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--churn", type=float, default=0.3)
    ap.add_argument("--added", type=float, default=0.1)
    ap.add_argument("--keep", type=int, default=None, help="default 5 (checkpoints), 3 (small files)")
    ap.add_argument("--repack-below", default="0.5")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/replicator-bench-prune"))
    args = ap.parse_args()
    args.steps = args.steps or (10 if args.small_files else 30)
    args.keep = args.keep or (3 if args.small_files else 5)

    shutil.rmtree(args.workdir, ignore_errors=True)
    data, repl, rrepo = args.workdir / "data", args.workdir / "replicator", args.workdir / "restic"
    data.mkdir(parents=True)
    (repl / "target").mkdir(parents=True)
    cfg = repl / "replicator.yaml"
    source = (
        f"{{name: data, url: {data}, keep_last: {args.keep}, max_delete: 100%}}"
        if args.small_files
        else f"{{name: ckpt, url: {data}, kind: checkpoint, complete_when: {{marker: COMPLETE}}, "
        f"keep_last: {args.keep}, max_delete: 100%}}"
    )
    cfg.write_text(
        f"state_dir: {repl}/state\nsources: [{source}]\ntargets: [{{name: local, url: {repl}/target}}]\n"
    )
    restic = find_tool("restic")
    env = {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(args.workdir / "restic-cache")}
    ours = replicator_command()
    timed([restic, "init", "--repo", str(rrepo)], env)

    step = _small_files_step(data, args) if args.small_files else _checkpoint_step(data, args)
    step_bytes: list[int] = []
    for n in range(1, args.steps + 1):
        step(n)
        step_bytes.append(du(data))
        timed([*ours, "sync", "-c", str(cfg), "-q"])
        timed([restic, "backup", "--repo", str(rrepo), "--quiet", "--host", "bench", str(data)], env)
        print(f"step {n}/{args.steps} synced", file=sys.stderr)
    held = sum(step_bytes[-args.keep :])

    runs, extra = _replicator(ours, cfg, repl / "target", held, args.repack_below)
    run, extra["restic"] = _restic(restic, rrepo, env, args.keep, held)
    runs.append(run)
    _report(args, runs, extra, held, restic)


def _checkpoint_step(data: Path, args: argparse.Namespace) -> Callable[[int], None]:
    per_layer = int(args.step_mib * 2**20 / LAYERS / 10)  # 2 bytes of weight + 8 of moments
    versions = [1] * LAYERS
    rng = np.random.default_rng(11)

    def step(n: int) -> None:
        if n > 1:
            for layer in rng.choice(LAYERS, size=max(1, round(args.changed * LAYERS)), replace=False):
                versions[int(layer)] += 1
        for old in data.glob("step-*"):
            shutil.rmtree(old)  # the trainer keeps only its newest checkpoint
        _write_step(data / f"step-{n:06d}", list(versions), per_layer)

    return step


def _small_files_step(data: Path, args: argparse.Namespace) -> Callable[[int], None]:
    rng = np.random.default_rng(3)
    serial = [0]

    def add(count: int) -> None:
        for _ in range(count):
            i = serial[0] = serial[0] + 1
            d = data / f"part-{i % 100:03d}"
            d.mkdir(exist_ok=True)
            words = rng.integers(0, 50_000, size=int(rng.integers(20, 500))).tolist()
            (d / f"rec-{i:07d}.json").write_text(json.dumps({"id": i, "tokens": words}))

    def step(n: int) -> None:
        if n == 1:
            add(args.files)
            return
        present = sorted(data.rglob("rec-*.json"))
        for i in rng.choice(len(present), size=round(args.churn * len(present)), replace=False):
            present[int(i)].unlink()
        add(round(args.added * args.files))

    return step


def _replicator(
    ours: list[str], cfg: Path, target: Path, held: int, repack_below: str
) -> tuple[list[Run], dict[str, object]]:
    before = du(target)
    prune = [*ours, "prune", "-c", str(cfg), "--grace", "0", "-q", "--json", "--repack-below", repack_below]
    # The JSON goes to a file (timed() discards stdout); `exec` keeps the measured process.
    outs = [target.parent / f"prune-{i}.json" for i in (1, 2)]
    plan, sweep = (timed(["sh", "-c", f'exec "$@" > {out}', "sh", *prune]) for out in outs)
    first, second = (json.loads(out.read_text())[0] for out in outs)
    after = du(target)
    check = subprocess.run([*ours, "verify", "-c", str(cfg), "--read-data"], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"replicator verify failed after prune: {check.stdout}{check.stderr}")
    stats = second
    metadata = sum(du(target / d) for d in ("snapshots", "refs")) + (target / "config.json").stat().st_size
    live = stats["referenced_bytes"] + metadata
    run = Run(
        "replicator prune (plan + delete)",
        plan[0] + sweep[0],
        plan[1] + sweep[1],
        max(plan[2], sweep[2]),
        after,
        held,
    )
    info = {
        "before": before,
        "after": after,
        "reclaimed": before - after,
        "live": live,
        "live_chunks": stats["referenced_bytes"],
        "live_metadata": metadata,
        "objects_after": sum(1 for p in target.rglob("*") if p.is_file()),
        "plan_seconds": plan[0],
        "delete_seconds": sweep[0],
        "repack_below": repack_below,
        "repacked_packs": first["repacked_packs"],
        "repacked_bytes": first["repacked_bytes"],
        "deleted_objects": second["deleted_objects"],
    }
    return [run], {"replicator": info}


def _restic(
    restic: str, rrepo: Path, env: dict[str, str], keep: int, held: int
) -> tuple[Run, dict[str, object]]:
    before = du(rrepo)
    forget = [restic, "forget", "--repo", str(rrepo), "--quiet", "--keep-last", str(keep), "--prune"]
    secs, cpu, rss = timed(forget, env)
    after = du(rrepo)
    timed([restic, "check", "--repo", str(rrepo), "--quiet"], env)
    stats = subprocess.run(
        [restic, "stats", "--repo", str(rrepo), "--mode", "raw-data", "--json", "--quiet"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    raw = json.loads(stats.stdout)
    info = {
        "before": before,
        "after": after,
        "reclaimed": before - after,
        "live": raw["total_size"],
        "raw_data": raw,
        "objects_after": sum(1 for p in rrepo.rglob("*") if p.is_file()),
    }
    return Run("restic forget --prune", secs, cpu, rss, after, held), info


def _report(
    args: argparse.Namespace, runs: list[Run], extra: dict[str, object], held: int, restic: str
) -> None:
    versions_info = peer_versions(restic, find_tool("rclone"))
    params = {
        k: getattr(args, k)
        for k in (
            ("small_files", "files", "steps", "churn", "added", "keep", "repack_below")
            if args.small_files
            else ("small_files", "steps", "step_mib", "changed", "keep", "repack_below")
        )
    }
    name = "prune-small-files" if args.small_files else "prune"
    path = write_results(
        name, runs, {**extra, "params": params, "live_bytes": held, "versions": versions_info}
    )
    print(f"\n{json.dumps(params)}; kept snapshots hold {held / 2**20:.1f} MiB of files; {versions_info}\n")
    header = "| tool | wall time | CPU time | peak RSS | reclaimed | repository after | live | after / live |"
    print(f"{header} objects |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        info = extra["replicator" if run.tool.startswith("replicator") else "restic"]
        assert isinstance(info, dict)
        print(
            f"| {run.tool} | {run.seconds:.2f} s | {run.cpu_seconds:.2f} s | {run.peak_rss_mib:.0f} MiB | "
            f"{info['reclaimed'] / 2**20:.1f} MiB | {info['after'] / 2**20:.1f} MiB | "
            f"{info['live'] / 2**20:.1f} MiB | {info['after'] / info['live']:.3f}x | "
            f"{info['objects_after']} |"
        )
    print(f"(raw results: {path})")


if __name__ == "__main__":
    main()
