"""Every scenario, side by side, in one run: replicator vs restic vs rclone on the same data.

    python -m bench [--size-gib 1] [--small-files 20000] [--big-gib 8] [--workdir DIR]

Data (deterministic, see bench/data.py): checkpoint steps of a transformer-shaped model,
bf16 weights ~ N(0, 0.02) and fp32 Adam moments, where step 2 re-draws 10 % of the layers;
a dataset of many small JSON files. Destinations: a local directory and a bucket on a local
`rclone serve s3` (the same server for every tool). Scenarios:

* initial   -- the first checkpoint step, into an empty repository (POSIX and S3);
* increment -- the next step (10 % of layers changed) into the same repository;
* small     -- N small files into an empty repository (POSIX);
* restore   -- both steps back from the POSIX repository into an empty directory: durable
               (replicator's default; restic followed by `sync`) and not (`--no-sync`; restic);
* verify    -- `verify --read-data` vs `restic check --read-data` (POSIX);
* big       -- one file of --big-gib (0 to skip) synced to POSIX: peak RSS.

"sent" is what the destination grew by (for replicator, restic and rclone alike). Results go
to bench/out/bench.json and a Markdown table on stdout, with the machine and tool versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import (
    ROOT,
    cpu_seconds,
    du,
    find_tool,
    peer_versions,
    replicator_command,
    same_tree,
    timed,
    warm_cache,
)
from bench.data import small_files, training_steps
from tests.servers import ACCESS_KEY, SECRET_KEY, RcloneServer, free_port

DURABLE_PEER = {("restore", "replicator"): "restic + sync", ("small restore", "replicator"): "restic + sync"}
"""Rows compared with another peer than plain restic: like with like."""
S3_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    "RESTIC_PASSWORD": "bench",
}


@dataclass
class Result:
    scenario: str
    dest: str
    tool: str
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    input_bytes: int
    sent_bytes: int
    stored_bytes: int
    server_cpu_seconds: float | None = None
    """S3 rows: the CPU time of the ``rclone serve s3`` all tools share, during this run (it
    competes with the tool for the same cores)."""

    @property
    def mib_per_s(self) -> float:
        return self.input_bytes / self.seconds / 2**20


class Bench:
    def __init__(self, work: Path, server: RcloneServer) -> None:
        self.work, self.server = work, server
        self.restic, self.rclone = find_tool("restic"), find_tool("rclone")
        self.results: list[Result] = []
        self.env = {**S3_ENV, "RESTIC_CACHE_DIR": str(work / "restic-cache")}
        self._dests: dict[tuple[str, str, str], tuple[str, Path]] = {}

    # -- destinations -------------------------------------------------------------------------

    def dest(self, tool: str, kind: str, name: str) -> tuple[str, Path]:
        """(URL the tool is given, directory whose size is the destination's size)."""
        if kind == "posix":
            path = self.work / "dest" / f"{name}-{tool}"
            if tool == "replicator":
                path.mkdir(parents=True)  # a POSIX target must exist (a typo must not create one)
            return str(path), path
        bucket = f"{name}-{tool}".replace(" ", "-")
        self.server.client().create_bucket(Bucket=bucket)
        where = self.server.root / bucket
        if tool == "replicator":
            return f"s3://{bucket}/repo", where
        if tool == "restic":
            return f"s3:{self.server.endpoint}/{bucket}/repo", where
        remote = f":s3,provider=Other,endpoint='{self.server.endpoint}',access_key_id={ACCESS_KEY}"
        return f"{remote},secret_access_key={SECRET_KEY}:{bucket}/copy", where

    def replicator_config(self, name: str, source: Path, url: str) -> Path:
        target: dict[str, object] = {"name": "t", "url": url}
        if url.startswith("s3://"):
            target["endpoint_url"] = self.server.endpoint
        cfg = {
            "state_dir": str(self.work / "state" / name),
            "sources": [{"name": "src", "url": str(source)}],
            "targets": [target],
        }
        path = self.work / f"{name}.yaml"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        return path

    # -- running ------------------------------------------------------------------------------

    def run(
        self, scenario: str, dest: str, tool: str, cmd: list[str], size: Path, input_bytes: int, reads: Path
    ) -> None:
        """Time ``cmd``, which reads ``reads`` (warmed into the page cache first, for every tool)."""
        before = du(size) if size.exists() else 0
        warm_cache(reads)
        server = self.server.proc.pid if dest == "s3" and self.server.proc else None
        server_before = cpu_seconds(server) if server else 0.0
        secs, cpu, rss = timed(cmd, self.env)
        server_cpu = cpu_seconds(server) - server_before if server else None
        stored = du(size)
        self.results.append(
            Result(scenario, dest, tool, secs, cpu, rss, input_bytes, stored - before, stored, server_cpu)
        )
        print(f"{scenario:9} {dest:5} {tool:10} {secs:7.2f} s  {stored / 2**20:8.1f} MiB", file=sys.stderr)

    def backup_all(self, scenario: str, kind: str, name: str, source: Path, input_bytes: int) -> None:
        """One backup by each tool of ``source`` into its ``name`` destination (created on first use)."""
        url, size = self.dest_cached(kind, name, "replicator")
        cfg = self.replicator_config(f"{name}-{kind}", source, url)
        cmd = [*replicator_command(), "sync", "-c", str(cfg), "-q"]
        self.run(scenario, kind, "replicator", cmd, size, input_bytes, source)

        url, size = self.dest_cached(kind, name, "restic")
        if not (size / "repo" / "config").exists() and not (size / "config").exists():
            timed([self.restic, "init", "--repo", url], self.env)
        cmd = [self.restic, "backup", "--repo", url, "--quiet", str(source)]
        self.run(scenario, kind, "restic", cmd, size, input_bytes, source)

        url, size = self.dest_cached(kind, name, "rclone")
        cmd = [self.rclone, "copy", "--config", "/dev/null", str(source), url]
        self.run(scenario, kind, "rclone", cmd, size, input_bytes, source)

    def dest_cached(self, kind: str, name: str, tool: str) -> tuple[str, Path]:
        key = (kind, name, tool)
        if key not in self._dests:
            self._dests[key] = self.dest(tool, kind, name)
        return self._dests[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0, help="size of one checkpoint step")
    ap.add_argument("--changed", type=float, default=0.10, help="share of layers the next step changes")
    ap.add_argument("--small-files", type=int, default=20_000)
    ap.add_argument("--big-gib", type=float, default=8.0, help="single-file RSS scenario (0: skip)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/replicator-bench-all"))
    args = ap.parse_args()

    work = args.workdir
    source = work / "data" / "ckpt"
    leftovers = ("dest", "state", "restore", "restored", "restic-cache", "s3")
    remove_and_settle([source, *(work / d for d in leftovers)])
    step1, step2 = training_steps(work / "data" / "steps", args.size_gib, args.changed)
    server = RcloneServer(work / "s3", port=free_port()).start()
    try:
        bench = Bench(work, server)
        source.mkdir(parents=True)
        shutil.copytree(step1, source / step1.name)
        first = du(source)
        for kind in ("posix", "s3"):
            bench.backup_all("initial", kind, "ckpt", source, first)
        shutil.copytree(step2, source / step2.name)
        second = du(source / step2.name)
        for kind in ("posix", "s3"):
            bench.backup_all("increment", kind, "ckpt", source, second)

        restore_scenario(bench, source)
        verify_scenario(bench, source)

        files = small_files(work / "data" / "small", args.small_files)
        bench.backup_all("small", "posix", "small", files, du(files))
        restore_scenario(bench, files, "small", "small restore")
        if args.big_gib:
            big_file_scenario(bench, work / "data" / "big", args.big_gib)
    finally:
        server.stop()
    report(bench, args)
    # Deleted last, not between scenarios: see remove_and_settle.
    shutil.rmtree(work / "restored", ignore_errors=True)


SETTLE_AFTER_DELETE = 35.0
"""ext4 does not reuse an inode within 30 s of its deletion (``recently_deleted`` in
fs/ext4/ialloc.c): creating many files soon after deleting many scans for others, in the
creating process's CPU time. A 2026-12-07 run restored 20,000 small files with 8.7 CPU-s
right after the checkpoint restore's trees were deleted, against 2.4 CPU-s on a settled disk."""


def remove_and_settle(paths: list[Path]) -> None:
    """Delete ``paths`` (a previous run's leftovers) and, if that deleted anything, wait until
    no timed command can meet the deleted inodes (:data:`SETTLE_AFTER_DELETE`)."""
    existing = [p for p in paths if p.exists()]
    for p in existing:
        shutil.rmtree(p, ignore_errors=True)
    if existing:
        os.sync()
        time.sleep(SETTLE_AFTER_DELETE)


def restore_scenario(bench: Bench, source: Path, name: str = "ckpt", scenario: str = "restore") -> None:
    """Restore ``name``'s backups with each tool and check the trees. Each tool restores into a
    fresh directory, kept until the whole run is over (see :data:`SETTLE_AFTER_DELETE`): a
    tree deleted here would slow whichever tool ran next."""
    total = du(source)
    out = bench.work / "restore"
    url, repo = bench.dest_cached("posix", name, "replicator")
    restic_url, restic_repo = bench.dest_cached("posix", name, "restic")
    rclone_url, rclone_copy = bench.dest_cached("posix", name, "rclone")
    ours = [*replicator_command(), "restore", "-q", "--repo", url, "-s", "src", str(out)]
    theirs = [bench.restic, "restore", "latest", "--repo", restic_url, "--quiet", "--target", str(out)]
    # replicator's restore is durable when it returns (one syncfs); restic's is not: compare
    # each with its like, `--no-sync` with restic and the default with restic followed by sync.
    runs = {
        "replicator": (ours, out, repo),
        "replicator --no-sync": ([*ours, "--no-sync"], out, repo),
        "restic": (theirs, out / source.relative_to("/"), restic_repo),
        "restic + sync": (
            ["sh", "-c", '"$@" && sync', "sh", *theirs],
            out / source.relative_to("/"),
            restic_repo,
        ),
        "rclone": ([bench.rclone, "copy", "--config", "/dev/null", rclone_url, str(out)], out, rclone_copy),
    }
    keep = bench.work / "restored"
    keep.mkdir(exist_ok=True)
    for i, (tool, (cmd, restored, reads)) in enumerate(runs.items()):
        out.mkdir(parents=True)
        bench.run(scenario, "posix", tool, cmd, out, total, reads)
        if not same_tree(source, restored):
            raise SystemExit(f"{tool} restored something other than the source")
        out.rename(keep / f"{name}-{i}")  # the command names `out`: the next tool gets a fresh one


def verify_scenario(bench: Bench, source: Path) -> None:
    total = du(source)
    url, size = bench.dest_cached("posix", "ckpt", "replicator")
    bench.run(
        "verify",
        "posix",
        "replicator",
        [*replicator_command(), "verify", "-q", "--repo", url, "--read-data"],
        size,
        total,
        size,
    )
    url, size = bench.dest_cached("posix", "ckpt", "restic")
    cmd = [bench.restic, "check", "--repo", url, "--read-data", "--quiet"]
    bench.run("verify", "posix", "restic", cmd, size, total, size)


def big_file_scenario(bench: Bench, root: Path, gib: float) -> None:
    from bench.data import one_big_file

    path = one_big_file(root, gib)
    url, size = bench.dest_cached("posix", "big", "replicator")
    cfg = bench.replicator_config("big", path.parent, url)
    cmd = [*replicator_command(), "sync", "-c", str(cfg), "-q"]
    bench.run("big", "posix", "replicator", cmd, size, du(path.parent), path.parent)
    shutil.rmtree(size, ignore_errors=True)


def report(bench: Bench, args: argparse.Namespace) -> None:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    machine = {
        **peer_versions(bench.restic, bench.rclone),
        "cpu_model": next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")),
            platform.processor(),
        ),
        "python": platform.python_version(),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
    }
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(
        json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                    "results": [asdict(r) | {"mib_per_s": r.mib_per_s} for r in bench.results]}, indent=2)
    )  # fmt: skip
    print(f"\n{machine}\n")
    print(
        "| scenario | dest | tool | wall | throughput | CPU (+ S3 server) | peak RSS | sent | stored ", end=""
    )
    print("| wall time vs restic | CPU vs restic |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    by = {(r.scenario, r.dest, r.tool): r for r in bench.results}
    for r in bench.results:
        peer_tool = DURABLE_PEER.get((r.scenario, r.tool), "restic")
        peer = by.get((r.scenario, r.dest, peer_tool))
        ratio = cpu_ratio = ""
        if peer and not r.tool.startswith("restic"):
            ratio, cpu_ratio = f"{r.seconds / peer.seconds:.2f}x", f"{r.cpu_seconds / peer.cpu_seconds:.2f}x"
            if peer_tool != "restic":
                ratio += f" (vs {peer_tool})"
        cpu = f"{r.cpu_seconds:.2f} s"
        if r.server_cpu_seconds is not None:
            cpu += f" (+ {r.server_cpu_seconds:.2f} s)"
        print(
            f"| {r.scenario} | {r.dest} | {r.tool} | {r.seconds:.2f} s | {r.mib_per_s:.0f} MiB/s | "
            f"{cpu} | {r.peak_rss_mib:.0f} MiB | {r.sent_bytes / 2**20:.1f} MiB | "
            f"{r.stored_bytes / 2**20:.1f} MiB | {ratio} | {cpu_ratio} |"
        )


if __name__ == "__main__":
    main()
