"""Concurrency torture of garbage collection: writers and looping collectors on one repository.

    python -m bench.bench_gc_torture [--writers 3] [--shared-writers 2] [--rounds 20]
                                     [--prunes 2] [--kill-every 5] [--keep-last 2]
                                     [--server rclone|moto] [--seed N] [--workdir DIR]

One repository on a real S3 server on 127.0.0.1 (``rclone serve s3`` over a local directory,
or moto's server). Writers are ``replicator sync`` processes, each with its own state
directory: ``--writers`` of them have a source of their own (``w0``, ``w1``, ...), and
``--shared-writers`` more take turns on one source ``shared`` over the same primary
directory, as a standby host taking over would (docs/FORMAT.md section 7 assumes one writer
per source *at a time*, so they never run at once; between its turns a writer's state cache
grows stale while the others publish and the collectors delete). ``--prunes`` threads loop
``replicator prune --grace 0`` without pause, and in every ``--kill-every``-th round one more
prune is started and ``SIGKILL``ed at a random point.

A *round* is every writer changing its data (new, rewritten and deleted files; small files that
land in packs, big ones cut into loose chunks; blobs from a pool that every writer draws
from, so chunks are shared between sources and come back after being collected) and syncing
once, concurrently, with ``keep_last: --keep-last`` so every round retention deletes manifests
and their chunks become garbage. After each round, while the collectors keep looping, every
snapshot not checked yet (``replicator snapshots --json``) is restored and compared with the
files its writer had when ``sync --json`` reported it. At the end: two more prunes,
``replicator verify --read-data``, every retained snapshot restored again, the latest of each
source restored by tools/restore_reference.py from a copy of the bucket, and an independent
count of referenced chunks of which the bucket holds no stored form (*dangling references*,
must be 0; a packed chunk's loose copy counts, as readers fall back to it).

Results: bench/out/gc-torture-<server>.json and a summary on stdout; exit 1 if anything failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT
from tests.helpers import REFERENCE_READER, tree_digest
from tests.servers import MotoServer, RcloneServer, S3Server, isolate_aws_environment

Digest = dict[str, tuple[str, int, int]]
CHUNKING = {"min_size": "16KiB", "avg_size": "64KiB", "max_size": "256KiB"}
"""Small chunks, so that files of a few hundred KiB are several loose chunks and files under
16 KiB go into packs (replicator.fanout.PACK_BELOW)."""
RETRY = {"initial": "100ms", "max": "2s", "give_up_after": "120s", "command_give_up_after": "120s"}
PATIENCE = 600.0
"""Seconds any one command may take before the run is declared hung."""


@dataclass(frozen=True)
class Options:
    writers: int = 3
    shared_writers: int = 2
    rounds: int = 20
    prunes: int = 2
    kill_every: int = 5
    keep_last: int = 2
    seed: int = 20261207


@dataclass
class Report:
    server: str
    options: dict[str, int]
    rounds: int = 0
    syncs: int = 0
    sync_failures: list[str] = field(default_factory=list)
    snapshots_published: int = 0
    snapshots_verified: int = 0
    """Published snapshots restored byte-identically after their round."""
    snapshots_unchecked: list[str] = field(default_factory=list)
    """Published, but gone (retention) before the check after their round could restore them."""
    restore_failures: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    prune_runs: int = 0
    prune_deferred: int = 0
    prune_busy: int = 0
    prune_refused: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    prune_failures: list[str] = field(default_factory=list)
    prunes_killed: int = 0
    prunes_killed_running: int = 0
    """Killed before they exited by themselves."""
    deleted_objects: int = 0
    deleted_bytes: int = 0
    planned_objects: int = 0
    missing_seen_by_prune: int = 0
    """Largest ``missing`` a prune reported mid-run (may be a race with retention; final must be 0)."""
    final_missing: int = -1
    final_retained_verified: int = 0
    verify_read_data: bool = False
    verify_output: str = ""
    reference_restores: int = 0
    reference_failures: list[str] = field(default_factory=list)
    dangling_references: int = -1
    """Objects some manifest names that the bucket does not hold, counted at the end."""
    wall_seconds: float = 0.0

    def ok(self) -> bool:
        return (
            self.dangling_references == 0
            and self.final_missing == 0
            and self.verify_read_data
            and not (self.sync_failures or self.restore_failures or self.mismatches)
            and not (self.prune_failures or self.reference_failures or self.snapshots_unchecked)
            and self.snapshots_verified == self.snapshots_published
        )


class Cli:
    """``replicator`` subprocesses against one repository."""

    def __init__(self, command: list[str], server: S3Server, bucket: str) -> None:
        self.command = command
        self.server = server
        self.url = f"s3://{bucket}/repo"
        self.bucket = bucket

    def repo_args(self) -> list[str]:
        return ["--repo", self.url, "--endpoint-url", self.server.endpoint]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.command, *args], capture_output=True, text=True, timeout=PATIENCE, check=False
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self.command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def target(self) -> dict[str, Any]:
        return {"name": "s3", "url": self.url, "endpoint_url": self.server.endpoint, "retry": RETRY}


class Source:
    """One source name in the repository: its primary directory, the files each published
    snapshot was taken of, and the lock that keeps its writers from running at once."""

    def __init__(self, name: str, primary: Path, seed: int) -> None:
        self.name = name
        self.primary = primary
        self.primary.mkdir(parents=True)
        (primary / "small").mkdir()
        self.rng = random.Random(f"{seed}-{name}")
        self.lock = threading.Lock()
        self.trees: dict[str, Digest] = {}
        self.checked: set[str] = set()
        self.step = 0

    def change(self, pool: list[bytes]) -> None:
        """New, rewritten and deleted files: big ones (loose chunks), small ones (packs) and
        pool blobs (shared with other sources, and back after being collected)."""
        self.step += 1
        rng, root = self.rng, self.primary
        bigs = sorted(root.glob("big-*.bin"))
        (root / f"big-{self.step:03d}.bin").write_bytes(rng.randbytes(rng.randint(150_000, 500_000)))
        for old in bigs[:-2]:
            old.unlink()
        if bigs and rng.random() < 0.5:  # an edit in place: most chunks stay, one or two change
            victim = bigs[-1]
            data = bytearray(victim.read_bytes())
            at = rng.randrange(len(data))
            data[at : at + 4096] = rng.randbytes(4096)
            victim.write_bytes(bytes(data))
        smalls = sorted((root / "small").iterdir())
        for p in rng.sample(smalls, k=min(3, len(smalls))):
            p.write_bytes(rng.randbytes(rng.randint(500, 8000)))
        if len(smalls) > 6:
            rng.choice(smalls).unlink()
        for i in range(2):
            (root / "small" / f"s-{self.step:03d}-{i}.txt").write_bytes(rng.randbytes(rng.randint(500, 8000)))
        k = rng.randrange(len(pool))
        blob = root / f"pool-{k}.bin"
        if blob.exists():
            blob.unlink()
        else:
            blob.write_bytes(pool[k])
        if self.step % 3 == 0:
            shutil.rmtree(root / "nested", ignore_errors=True)
            (root / "nested" / f"d{self.step}").mkdir(parents=True)
            (root / "nested" / f"d{self.step}" / "x.bin").write_bytes(rng.randbytes(40_000))


class Writer:
    """A ``replicator sync`` of one source from one state directory."""

    def __init__(self, label: str, source: Source, work: Path, cli: Cli, keep_last: int) -> None:
        self.label, self.source, self.cli = label, source, cli
        src = {"name": source.name, "url": str(source.primary), "keep_last": keep_last, "max_delete": "100%"}
        config = {
            "state_dir": str(work / f"state-{label}"),
            "sources": [src],
            "targets": [cli.target()],
            "chunking": CHUNKING,
        }
        self.cfg = work / f"{label}.yaml"
        self.cfg.write_text(yaml.safe_dump(config, sort_keys=False))

    def turn(self, pool: list[bytes], report: Report, guard: threading.Lock) -> None:
        """Change the source's files and sync them, the source's other writers kept out."""
        with self.source.lock:
            self.source.change(pool)
            res = self.cli.run("sync", "-c", str(self.cfg), "--json", "-q")
            snapshot = _published(res)
            tree = tree_digest(self.source.primary) if snapshot else None
        with guard:
            report.syncs += 1
            if snapshot is None or tree is None:
                report.sync_failures.append(f"{self.label}: exit {res.returncode}: {res.stderr[-500:]}")
                return
            if snapshot not in self.source.trees:
                report.snapshots_published += 1
            self.source.trees[snapshot] = tree


def _published(res: subprocess.CompletedProcess[str]) -> str | None:
    """The snapshot id ``sync --json`` reports for the one target, if it published."""
    if res.returncode != 0:
        return None
    (source,) = json.loads(res.stdout)["sources"]
    (target,) = source["targets"]
    return str(target["snapshot"]) if target["status"] == "published" and target["snapshot"] else None


class Collectors:
    """Threads looping ``replicator prune --grace 0``, and the occasional prune killed midway."""

    def __init__(self, cli: Cli, report: Report, guard: threading.Lock, rng: random.Random) -> None:
        self.cli, self.report, self.guard, self.rng = cli, report, guard, rng
        self.stop = threading.Event()
        self.finished = 0
        self.threads: list[threading.Thread] = []

    def start(self, loops: int) -> None:
        for _ in range(loops):
            th = threading.Thread(target=self._loop, daemon=True)
            th.start()
            self.threads.append(th)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.once()

    def once(self) -> None:
        res = self.cli.run("prune", *self.cli.repo_args(), "--grace", "0", "--json", "-q")
        self.record(res)

    def record(self, res: subprocess.CompletedProcess[str]) -> None:
        with self.guard:
            r = self.report
            self.finished += 1
            r.prune_runs += 1
            if res.returncode == 0:
                (doc,) = json.loads(res.stdout)
                r.deleted_objects += doc["deleted_objects"]
                r.deleted_bytes += doc["deleted_bytes"]
                r.planned_objects += doc["planned_objects"]
                r.prune_deferred += doc["deferred"] is not None
                r.missing_seen_by_prune = max(r.missing_seen_by_prune, doc["missing"])
                return
            message = _error(res)
            if "another prune" in message:
                r.prune_busy += 1
            elif res.returncode == 1 and _is_refusal(message):
                r.prune_refused += 1
                reason = message.split(" (")[0][:90]
                r.refusals[reason] = r.refusals.get(reason, 0) + 1
            else:
                r.prune_failures.append(f"exit {res.returncode}: {message[:500]}")

    def kill_one(self) -> None:
        """A prune SIGKILLed anywhere from interpreter start-up to the end of its deletions."""
        proc = self.cli.popen("prune", *self.cli.repo_args(), "--grace", "0", "--json", "-q")
        time.sleep(self.rng.uniform(0.2, 3.0))
        running = proc.poll() is None
        if running:
            os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        with self.guard:
            self.report.prunes_killed += 1
            self.report.prunes_killed_running += running
        if not running:  # it finished first: an ordinary run
            self.record(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))

    def close(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(PATIENCE)


REFUSALS = (
    "does not show",
    "cannot read a manifest",
    "keep disappearing",
    "unrecognized object",
    "no snapshot manifest found",
    "could not be kept fresh",
)


def _is_refusal(message: str) -> bool:
    return any(r in message for r in REFUSALS)


def _error(res: subprocess.CompletedProcess[str]) -> str:
    line = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
    try:
        return str(json.loads(line)["error"])
    except (ValueError, KeyError, TypeError):
        return line


# -- checks ----------------------------------------------------------------------------------


def check_snapshots(
    cli: Cli, sources: list[Source], work: Path, report: Report, guard: threading.Lock, final: bool = False
) -> None:
    """Restore every snapshot not checked yet (``final``: every one retained), one thread per
    source (the writers are idle; the collectors, until ``final``, are not)."""
    threads = [
        threading.Thread(target=_check_source, args=(cli, s, work, report, guard, final)) for s in sources
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(PATIENCE)


def retained(cli: Cli, source: str) -> list[dict[str, Any]] | str:
    """``replicator snapshots --json`` of one source, or the error."""
    res = cli.run("snapshots", *cli.repo_args(), "-s", source, "--json")
    if res.returncode != 0:
        return f"snapshots -s {source}: exit {res.returncode}: {_error(res)}"
    rows: list[dict[str, Any]] = json.loads(res.stdout)
    return rows


def _check_source(
    cli: Cli, source: Source, work: Path, report: Report, guard: threading.Lock, final: bool = False
) -> None:
    rows = retained(cli, source.name)
    if isinstance(rows, str):
        with guard:
            report.restore_failures.append(rows)
        return
    ids = [str(r["snapshot"]) for r in rows]
    for sid in ids:
        if not final and sid in source.checked:
            continue
        problem = restore_and_compare(cli, source, sid, work)
        with guard:
            if problem is None:
                source.checked.add(sid)
                if final:
                    report.final_retained_verified += 1
                else:
                    report.snapshots_verified += 1
            elif problem.startswith("restore"):
                report.restore_failures.append(problem)
            else:
                report.mismatches.append(problem)
    with guard:
        for sid in source.trees.keys() - source.checked - set(ids):
            if f"{source.name}/{sid}" not in report.snapshots_unchecked:
                report.snapshots_unchecked.append(f"{source.name}/{sid}")


def restore_and_compare(cli: Cli, source: Source, sid: str, work: Path) -> str | None:
    """None if snapshot ``sid`` restores to exactly the files it was taken of, else what differs."""
    dest = work / "restores" / f"{source.name}-{sid}"
    shutil.rmtree(dest, ignore_errors=True)
    try:
        res = cli.run("restore", *cli.repo_args(), "-s", source.name, "--snapshot", sid, str(dest), "-q")
        if res.returncode != 0:
            return f"restore {source.name}/{sid}: exit {res.returncode}: {_error(res)}"
        return _compare(source, sid, tree_digest(dest))
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _compare(source: Source, sid: str, got: Digest) -> str | None:
    want = source.trees.get(sid)
    if want is None:
        return f"{source.name}/{sid}: a snapshot no writer reported publishing"
    if got == want:
        return None
    differ = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    return f"{source.name}/{sid}: {len(differ)} files differ, e.g. {differ[:3]}"


def mirror(server: S3Server, bucket: str, dest: Path) -> Path:
    """A POSIX copy of the bucket (what `aws s3 sync` would make), for the reference reader."""
    client = server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            path = dest / obj["Key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(path))
    return dest / "repo"


async def dangling(repo_dir: Path) -> int:
    """Chunks the manifests name of which the copy holds no stored form: neither the object
    the manifest locates it in, nor (for a packed chunk, whose pack a repack may have
    superseded: FORMAT.md 4.1, 10.2) its loose copy. Read with the repository's reader, not
    the collector's marking code."""
    from replicator.config import target_config
    from replicator.repository import Repository, chunk_key, pack_key
    from replicator.targets import open_target

    target = await open_target(target_config({"name": "copy", "url": str(repo_dir)}))
    try:
        repo = await Repository.open(target)
        held = {i.key for p in ("chunks/", "packs/") async for i in target.list(p)}
        lost: set[str] = set()
        for source in await repo.list_sources():
            for sid in await repo.list_snapshots(source):
                m = await repo.load_manifest(source, sid)
                for f in m.files:
                    for cid, _ in f.chunks:
                        pack = {pack_key(m.packed[cid][0])} if cid in m.packed else set()
                        if not ({chunk_key(cid)} | pack) & held:
                            lost.add(cid)
        return len(lost)
    finally:
        await target.close()


def reference_restores(cli: Cli, sources: list[Source], repo_dir: Path, work: Path, report: Report) -> None:
    """The latest snapshot of each source through tools/restore_reference.py."""
    for source in sources:
        rows = retained(cli, source.name)
        latest = [str(r["snapshot"]) for r in rows if r["latest"]] if not isinstance(rows, str) else []
        dest = work / "reference" / source.name
        res = subprocess.run(
            [sys.executable, str(REFERENCE_READER), str(repo_dir), source.name, "latest", str(dest)],
            capture_output=True,
            text=True,
            timeout=PATIENCE,
            check=False,
        )
        report.reference_restores += 1
        if res.returncode != 0 or len(latest) != 1:
            report.reference_failures.append(f"{source.name}: exit {res.returncode}: {res.stderr[-300:]}")
            continue
        problem = _compare(source, latest[0], tree_digest(dest))
        if problem is not None:
            report.reference_failures.append(problem)
        shutil.rmtree(dest)


# -- the run ---------------------------------------------------------------------------------


def torture(options: Options, server: S3Server, work: Path, command: list[str]) -> Report:
    """The whole run against ``server``, below ``work`` (emptied first), with ``command`` as
    the ``replicator`` executable. Never raises for what it found: it is all in the report."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    report = Report(server.kind, asdict(options))
    guard = threading.Lock()
    rng = random.Random(options.seed)
    cli = Cli(command, server, server.new_bucket("torture"))
    pool = [rng.randbytes(rng.randint(60_000, 300_000)) for _ in range(4)]
    sources = [Source(f"w{i}", work / f"primary-w{i}", options.seed) for i in range(options.writers)]
    writers = [Writer(s.name, s, work, cli, options.keep_last) for s in sources]
    if options.shared_writers:
        shared = Source("shared", work / "primary-shared", options.seed)
        sources.append(shared)
        for i in range(options.shared_writers):
            writers.append(Writer(f"shared-{'abcdefgh'[i]}", shared, work, cli, options.keep_last))
    writers[0].turn(pool, report, guard)  # creates the repository before anyone prunes it
    collectors = Collectors(cli, report, guard, rng)
    collectors.start(options.prunes)
    try:
        for n in range(1, options.rounds + 1):
            one_round(n, options, writers, collectors, pool, report, guard)
            check_snapshots(cli, sources, work, report, guard)
            report.rounds = n
            print(f"round {n}/{options.rounds}: {_progress(report)}", file=sys.stderr, flush=True)
    finally:
        collectors.close()
    finish(cli, sources, collectors, work, report, guard)
    report.wall_seconds = round(time.monotonic() - started, 1)
    return report


def one_round(
    n: int,
    options: Options,
    writers: list[Writer],
    collectors: Collectors,
    pool: list[bytes],
    report: Report,
    guard: threading.Lock,
) -> None:
    """Every writer syncs once, all at once; with ``kill_every``, a prune is killed midway.
    The round ends once a collector has also finished a run during it."""
    before = collectors.finished
    threads = [threading.Thread(target=w.turn, args=(pool, report, guard)) for w in writers]
    if options.kill_every and n % options.kill_every == 0:
        threads.append(threading.Thread(target=collectors.kill_one))
    for th in threads:
        th.start()
    for th in threads:
        th.join(PATIENCE)
    deadline = time.monotonic() + PATIENCE
    while options.prunes and collectors.finished <= before and time.monotonic() < deadline:
        time.sleep(0.05)


def finish(
    cli: Cli, sources: list[Source], collectors: Collectors, work: Path, report: Report, guard: threading.Lock
) -> None:
    """Two more prunes (the first deletes what the loops planned last), then every check."""
    for _ in range(2):
        res = cli.run("prune", *cli.repo_args(), "--grace", "0", "--json", "-q")
        collectors.record(res)
    report.final_missing = json.loads(res.stdout)[0]["missing"] if res.returncode == 0 else -1
    verify = cli.run("verify", *cli.repo_args(), "--read-data")
    report.verify_read_data = verify.returncode == 0
    report.verify_output = (verify.stdout + verify.stderr).strip()[-1000:]
    check_snapshots(cli, sources, work, report, guard, final=True)
    assert isinstance(cli.server, S3Server)
    copy = mirror(cli.server, cli.bucket, work / "mirror")
    reference_restores(cli, sources, copy, work, report)
    report.dangling_references = asyncio.run(dangling(copy))


def _progress(r: Report) -> str:
    return (
        f"{r.snapshots_published} published, {r.snapshots_verified} verified, {r.prune_runs} prunes "
        f"({r.prune_deferred} deferred, {r.prune_busy} busy, {r.prune_refused} refused), "
        f"{r.deleted_objects} objects deleted, {len(r.sync_failures) + len(r.restore_failures)} failures"
    )


def start_server(kind: str, work: Path) -> S3Server:
    if kind == "rclone":
        return RcloneServer(work / "rclone-root").start()
    return MotoServer().start()


def stop_server(server: S3Server) -> None:
    if isinstance(server, (RcloneServer, MotoServer)):
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Options()
    for name in ("writers", "shared_writers", "rounds", "prunes", "kill_every", "keep_last", "seed"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    ap.add_argument("--server", choices=["rclone", "moto"], default="rclone")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/replicator-bench-gc-torture"))
    ap.add_argument(
        "--dev",
        action="store_true",
        help="run `python -m replicator` from this checkout, not an installed copy",
    )
    args = ap.parse_args()
    options = Options(**{k: getattr(args, k) for k in asdict(defaults)})
    isolate_aws_environment()
    from bench.common import replicator_command

    command = [sys.executable, "-m", "replicator"] if args.dev else replicator_command()
    args.workdir.mkdir(parents=True, exist_ok=True)
    server = start_server(args.server, args.workdir / "server")
    try:
        report = torture(options, server, args.workdir / "run", command)
    finally:
        stop_server(server)
    out = ROOT / "bench" / "out" / f"gc-torture-{args.server}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**asdict(report), "ok": report.ok(), "command": sys.argv}, indent=2))
    print(summary(report, out))
    if not report.ok():
        raise SystemExit(1)


def summary(r: Report, out: Path) -> str:
    mib = r.deleted_bytes / 2**20
    ref_ok = r.reference_restores - len(r.reference_failures)
    return "\n".join(
        [
            f"server {r.server}, {r.rounds} rounds, {r.wall_seconds:.0f} s: {'PASS' if r.ok() else 'FAIL'}",
            f"syncs {r.syncs} ({len(r.sync_failures)} failed), snapshots published {r.snapshots_published}, "
            f"verified after their round {r.snapshots_verified}, unchecked {len(r.snapshots_unchecked)}",
            f"prune runs {r.prune_runs}: deferred {r.prune_deferred}, busy {r.prune_busy}, "
            f"refused {r.prune_refused} {r.refusals or ''}, failed {len(r.prune_failures)}; "
            f"killed {r.prunes_killed} ({r.prunes_killed_running} while running)",
            f"deleted {r.deleted_objects} objects ({mib:.1f} MiB), planned {r.planned_objects}",
            f"end: verify --read-data {'pass' if r.verify_read_data else 'FAIL'}, retained snapshots "
            f"restored {r.final_retained_verified}, reference reader {ref_ok}/{r.reference_restores}, "
            f"dangling references {r.dangling_references}, restore failures {len(r.restore_failures)}, "
            f"mismatches {len(r.mismatches)}",
            f"(raw results: {out})",
        ]
    )


if __name__ == "__main__":
    main()
