"""Scale-out of one source: one checkpoint directory replicated by 1, 2 and 4 instances.

    python -m bench.bench_scaleout [--instances 1,2,4] [--set-gib 2] [--files 16] [--runs 1]
                                   [--target posix|rclone] [--workdir /tmp/replicator-bench-scaleout]

One checkpoint set (``--files`` bf16 safetensors shards totalling ``--set-gib``, the marker
``COMPLETE`` written last; bench/common.py ``generate_checkpoints``) in ONE directory. For each
N in ``--instances``, into a fresh target: N ``replicator sync --json`` processes started at
the same moment, each with ``shared: {instances: N, instance: replicator-<i>, split: true}``
and its own state dir (each reads only the files whose path hashes to its number); then the
assembler (replicator-0) syncs again until the set is published. The clock runs from the
start of the N processes to the set being published. Before the shared runs, the baseline:
one plain ``replicator sync`` (no ``shared``), so that the cost of parts is visible.

Checked for every row: the instances' ``bytes_read`` sum to the directory's size exactly
(each byte read once across the instances), exactly one snapshot is published, and the
published set restores byte-identically. Results go to bench/out/scaleout.json and a Markdown
table on stdout.

The page cache is warm for every row (the directory is read once before each), so this
measures the instances' CPU (hash, compress) and the target's writes, not the source's disks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from bench.common import ROOT, du, generate_checkpoints, replicator_command, same_tree, timed, warm_cache
from tests.servers import ACCESS_KEY, SECRET_KEY, RcloneServer, free_port

S3_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
}

_LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
with open(sys.argv[1], "wb") as out, open(sys.argv[1] + ".err", "wb") as err:
    proc = subprocess.Popen(sys.argv[2:], stdout=out, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - start
print(os.waitstatus_to_exitcode(status), seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
"""
"""Like bench.common.timed, but keeps the command's stdout (its --json) in a file, and is
started without waiting, so that N of them run at once."""


@dataclass
class Instance:
    name: str
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    bytes_read: int
    files_read: int
    status: str
    """The target's status of this instance's (last) sync: contributed, waiting, published."""


@dataclass
class Row:
    mode: str
    """``plain`` (no ``shared``: the baseline) or ``shared``."""
    instances: int
    run: int
    seconds: float
    """From starting the N processes to the set being published on the target."""
    input_bytes: int
    assembler_syncs: int
    """How many times the assembler ran (1 + the re-runs that found every part in)."""
    per_instance: list[Instance] = field(default_factory=list)
    snapshots: int = 0
    """Snapshots on the target: the assembler also publishes while it waits for parts (the
    files outside any set, here ``.generated.json``), as any checkpoint source does while a
    set is incomplete."""
    snapshots_with_set: int = 0
    """Snapshots holding the set: exactly one, the newest (published once, whole)."""
    stored_bytes: int = 0
    restored_identical: bool = False

    @property
    def bytes_read(self) -> int:
        return sum(i.bytes_read for i in self.per_instance)

    @property
    def cpu_seconds(self) -> float:
        return sum(i.cpu_seconds for i in self.per_instance)

    @property
    def mib_per_s(self) -> float:
        return self.input_bytes / self.seconds / 2**20


class Setup:
    """Where the runs write: a fresh target per row (a directory, or a bucket on one local
    ``rclone serve s3``), state dirs and configs below ``work``."""

    def __init__(self, work: Path, data: Path, target: str, server: RcloneServer | None) -> None:
        self.work, self.data, self.target, self.server = work, data, target, server

    def fresh(self, label: str) -> tuple[dict[str, Any], Path]:
        """(target config, the directory holding the repository's objects) for a new row."""
        shutil.rmtree(self.work / label, ignore_errors=True)
        if self.server is None:
            repo = self.work / label / "target"
            repo.mkdir(parents=True)
            return {"name": "t", "url": str(repo)}, repo
        bucket = self.server.new_bucket(label.replace("_", "-"))
        spec = {"name": "t", "url": f"s3://{bucket}/repo", "endpoint_url": self.server.endpoint}
        return spec, self.server.root / bucket / "repo"

    def config(self, label: str, target: dict[str, Any], shared: dict[str, Any] | None) -> Path:
        name = shared["instance"] if shared else "plain"
        source: dict[str, Any] = {
            "name": "ckpt",
            "url": str(self.data),
            "kind": "checkpoint",
            "complete_when": {"marker": "COMPLETE"},
        }
        if shared:
            source["shared"] = shared
        cfg = {"state_dir": str(self.work / label / name / "state"), "sources": [source], "targets": [target]}
        path = self.work / label / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg))  # JSON is YAML
        return path


def start(cfg: Path, out: Path) -> subprocess.Popen[str]:
    cmd = [*replicator_command(), "sync", "-c", str(cfg), "--json"]
    env = {**os.environ, **S3_ENV}
    return subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(out), *cmd], env=env, stdout=subprocess.PIPE, text=True
    )


def finish(name: str, proc: subprocess.Popen[str], out: Path) -> Instance:
    stdout, _ = proc.communicate()
    code, seconds, cpu, maxrss = stdout.split()
    if int(code) != 0:
        err = Path(str(out) + ".err").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name}: replicator sync failed ({code}): {err}")
    src = json.loads(out.read_text())["sources"][0]
    status = src["targets"][0]["status"]
    return Instance(
        name, float(seconds), float(cpu), int(maxrss) / 1024, src["bytes_read"], src["files_read"], status
    )


def run_row(setup: Setup, n: int, run: int, size: int, plain: bool = False) -> Row:
    """One row: N instances (or the plain baseline) from a fresh target to the set published."""
    label = f"plain-r{run}" if plain else f"n{n}-r{run}"
    target, repo = setup.fresh(label)
    shared: list[dict[str, Any] | None] = (
        [None]
        if plain
        else [{"instances": n, "instance": f"replicator-{i}", "split": True} for i in range(n)]
    )
    configs = [setup.config(label, target, s) for s in shared]
    outs = [setup.work / label / f"out-{i}.json" for i in range(len(configs))]
    warm_cache(setup.data)
    os.sync()
    t0 = time.perf_counter()
    procs = [start(c, o) for c, o in zip(configs, outs, strict=True)]
    names = [str(s["instance"]) if s else "plain" for s in shared]
    instances = [finish(nm, p, o) for nm, p, o in zip(names, procs, outs, strict=True)]
    syncs = 1
    while instances[0].status != "published":
        if syncs >= 5:
            raise RuntimeError(f"{label}: not published after {syncs} assembler syncs: {instances[0]}")
        again = finish(names[0], start(configs[0], outs[0]), outs[0])
        first = instances[0]
        instances[0] = Instance(
            first.name,
            first.seconds + again.seconds,
            first.cpu_seconds + again.cpu_seconds,
            max(first.peak_rss_mib, again.peak_rss_mib),
            first.bytes_read + again.bytes_read,
            first.files_read + again.files_read,
            again.status,
        )
        syncs += 1
    seconds = time.perf_counter() - t0
    row = Row("plain" if plain else "shared", n, run, seconds, size, syncs, instances)
    held = [SET in sets for sets in snapshot_sets(repo)]
    row.snapshots, row.snapshots_with_set = len(held), sum(held) if held and held[-1] else 0
    row.stored_bytes = du(repo)
    row.restored_identical = restored(
        configs[1 if len(configs) > 1 else 0], setup.work / label / "restored", setup.data
    )
    shutil.rmtree(setup.work / label / "restored", ignore_errors=True)
    return row


SET = "step-001000"
"""The set ``generate_checkpoints`` writes."""


def snapshot_sets(repo: Path) -> list[list[str]]:
    """The sets of each snapshot of source ``ckpt``, oldest first, read as docs/FORMAT.md
    describes manifests (zstd-compressed JSON; snapshot ids sort by time)."""
    out = []
    for p in sorted((repo / "snapshots" / "ckpt").glob("*.json.zst")):
        manifest = json.loads(zstandard.ZstdDecompressor().decompressobj().decompress(p.read_bytes()))
        out.append([s["name"] for s in manifest["sets"]])
    return out


def restored(cfg: Path, out: Path, data: Path) -> bool:
    """Restore the published set (with a non-assembler's config where there is one) and compare
    both ways: the same files, the same bytes."""
    try:
        timed([*replicator_command(), "restore", "-c", str(cfg), "-s", "ckpt", str(out), "-q"], S3_ENV)
    except RuntimeError as exc:  # a failed restore is a result to report, not a crash
        print(exc, file=sys.stderr)
        return False
    return same_tree(data, out) and same_tree(out, data)


def check(row: Row) -> list[str]:
    """What is wrong with a row (nothing, normally)."""
    wrong = []
    if row.bytes_read != row.input_bytes:
        wrong.append(f"bytes read {row.bytes_read} != the directory's {row.input_bytes} (each byte once)")
    if row.snapshots_with_set != 1:
        wrong.append(f"the set is in {row.snapshots_with_set} snapshots, not in the newest alone")
    if not row.restored_identical:
        wrong.append("the restored set differs from the source")
    return wrong


def summarize(rows: list[Row]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault("plain" if r.mode == "plain" else f"shared N={r.instances}", []).append(r)
    return {
        key: {
            "instances": rs[0].instances,
            "seconds_median": statistics.median(r.seconds for r in rs),
            "seconds_min": min(r.seconds for r in rs),
            "seconds_max": max(r.seconds for r in rs),
            "mib_per_s_median": statistics.median(r.mib_per_s for r in rs),
            "cpu_seconds_median": statistics.median(r.cpu_seconds for r in rs),
            "bytes_read_per_instance": [i.bytes_read for i in rs[-1].per_instance],
            "files_read_per_instance": [i.files_read for i in rs[-1].per_instance],
            "cpu_seconds_per_instance": [round(i.cpu_seconds, 2) for i in rs[-1].per_instance],
            "busiest_instance_cpu_seconds_median": statistics.median(
                max(i.cpu_seconds for i in r.per_instance) for r in rs
            ),
            "peak_rss_mib_max": max(i.peak_rss_mib for r in rs for i in r.per_instance),
            "assembler_syncs": rs[-1].assembler_syncs,
            "stored_bytes": rs[-1].stored_bytes,
            "each_byte_read_once": all(r.bytes_read == r.input_bytes for r in rs),
            "runs": len(rs),
        }
        for key, rs in groups.items()
    }


def report(rows: list[Row], args: argparse.Namespace, size: int) -> None:
    summary = summarize(rows)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scaleout.json"
    raw = [
        {**asdict(r), "bytes_read": r.bytes_read, "cpu_seconds": r.cpu_seconds, "mib_per_s": r.mib_per_s}
        for r in rows
    ]
    params = {"set_gib": args.set_gib, "files": args.files, "target": args.target, "runs": args.runs}
    path.write_text(
        json.dumps(
            {"params": params, "input_bytes": size, "cpus": os.cpu_count(), "rows": raw, "summary": summary},
            indent=2,
        )
    )
    base = summary["plain"]["mib_per_s_median"]
    print(
        f"\ninput: {size / 2**30:.2f} GiB in {args.files} bf16 shards; target {args.target}; "
        f"{args.runs} run(s); {os.cpu_count()} CPUs\n"
    )
    print(
        "| instances | wall time to published, median (min-max) | throughput | vs plain | CPU time, total "
        "| CPU time, busiest instance | bytes read per instance (MiB) | read once |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key, st in summary.items():
        mib = ", ".join(f"{b / 2**20:.0f}" for b in st["bytes_read_per_instance"])
        once = "yes" if st["each_byte_read_once"] else "NO"
        print(
            f"| {key} | {st['seconds_median']:.2f} s ({st['seconds_min']:.2f}-{st['seconds_max']:.2f}) | "
            f"{st['mib_per_s_median']:.0f} MiB/s | {st['mib_per_s_median'] / base:.2f}x | "
            f"{st['cpu_seconds_median']:.2f} s | {st['busiest_instance_cpu_seconds_median']:.2f} s | "
            f"{mib} | {once} |"
        )
    print(f"\nraw results: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", default="1,2,4", help="comma-separated instance counts")
    ap.add_argument("--set-gib", type=float, default=2.0)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--target", choices=("posix", "rclone"), default="posix")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/replicator-bench-scaleout"))
    args = ap.parse_args()

    data = args.workdir / "data" / f"{args.set_gib}g-{args.files}"
    size = generate_checkpoints(data, args.set_gib, shards=args.files)
    counts = [int(n) for n in args.instances.split(",")]
    replicator_command()  # install before the clock runs
    server = RcloneServer(args.workdir / "s3", port=free_port()).start() if args.target == "rclone" else None
    rows: list[Row] = []
    try:
        setup = Setup(args.workdir / "runs", data, args.target, server)
        for run in range(args.runs):
            for n in [0, *counts]:
                row = run_row(setup, max(n, 1), run, size, plain=n == 0)
                rows.append(row)
                print(
                    f"{row.mode} N={row.instances} run {run + 1}: {row.seconds:.2f} s {check(row) or 'ok'}",
                    file=sys.stderr,
                )
    finally:
        if server is not None:
            server.stop()
    report(rows, args, size)
    wrong = [f"{r.mode} N={r.instances} run {r.run}: {w}" for r in rows for w in check(r)]
    if wrong:
        raise SystemExit("\n".join(wrong))


if __name__ == "__main__":
    main()
