"""Crash torture: `kill -9` the daemon at random points of a large sync, many times.

    python -m bench.bench_crash [--trials 100] [--mib 32] [--seed N]

The suite runs 20 such trials (tests/test_daemon.py); this runs as many as you like, on more
data. Each trial starts `replicator run` on a fresh state directory and an empty local
target, kills it with SIGKILL after a random share of the chunk uploads (some trials during
start-up, before any), then restarts on the same state and target with `replicator sync
--json` and checks, through the CLI a user would run:

* no chunk was uploaded twice: the chunks the restart sent = the chunk files it added, plus
  the chunks of the packs it wrote (file tails below min_size; a pack sealed just before
  the kill may be written again, see tests.helpers.chunks_written_since);
* `replicator verify --read-data` passes (every ref names a complete snapshot, every chunk
  decodes and matches its id);
* `replicator restore --repo` gives back files byte-identical to the source.

Small chunks (4/16/64 KiB) make thousands of chunks, so kills land mid-upload. Results go to
bench/out/crash.json; the run exits 1 on the first failed trial.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, replicator_command
from tests.helpers import chunks_written_since, loose_chunk_ids


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*replicator_command(), *args], capture_output=True, text=True, check=False)


def write_config(work: Path, name: str, source: Path) -> tuple[Path, Path]:
    target = work / f"target-{name}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(work / f"state-{name}", ignore_errors=True)
    target.mkdir(parents=True)
    cfg = work / f"{name}.yaml"
    cfg.write_text(
        f"state_dir: {work}/state-{name}\n"
        f"sources: [{{name: data, url: {source}, debounce: 50ms}}]\n"
        f"targets: [{{name: t, url: {target}, concurrency: 4}}]\n"
        "chunking: {min_size: 4KiB, avg_size: 16KiB, max_size: 64KiB}\n"
    )
    return cfg, target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--mib", type=int, default=32, help="source size (random data, 32 files)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/replicator-bench-crash"))
    args = ap.parse_args()
    rng = random.Random(args.seed)

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    source = work / "source"
    for i in range(32):
        d = source / f"dir{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.bin").write_bytes(rng.randbytes(args.mib * 2**20 // 32))
    want = tree_digest(source)

    cfg, reference = write_config(work, "reference", source)
    if run("sync", "-c", str(cfg), "-q").returncode != 0:
        raise SystemExit("the reference sync failed")
    total = len(loose_chunk_ids(reference))

    trials: list[dict[str, object]] = []
    for trial in range(args.trials):
        share = 0.0 if trial % 10 == 0 else rng.uniform(0.02, 0.98)
        cfg, target = write_config(work, "trial", source)
        log = open(work / "daemon.log", "wb")  # noqa: SIM115 - closed after the kill
        daemon = subprocess.Popen(
            [*replicator_command(), "run", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT
        )
        started = time.monotonic()
        if share == 0.0:
            time.sleep(rng.uniform(0.05, 0.5))
        else:
            while len(loose_chunk_ids(target)) < share * total and daemon.poll() is None:
                if time.monotonic() - started > 120:
                    raise SystemExit(f"trial {trial}: the daemon made no progress in 120 s")
                time.sleep(0.005)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        log.close()
        before = loose_chunk_ids(target)
        restarted_ns = time.time_ns()

        res = run("sync", "-c", str(cfg), "--json")
        if res.returncode != 0:
            raise SystemExit(f"trial {trial}: restart failed: {res.stderr}")
        sent = json.loads(res.stdout)["sources"][0]["targets"][0]["uploads"]["chunks_sent"]
        added = chunks_written_since(target, before, restarted_ns)
        verified = run("verify", "--repo", str(target), "--read-data", "-q").returncode == 0
        dest = work / "restored"
        shutil.rmtree(dest, ignore_errors=True)
        restored = run("restore", "--repo", str(target), "-s", "data", "-q", str(dest)).returncode == 0
        identical = restored and tree_digest(dest) == want
        row = {
            "trial": trial,
            "killed_after_chunks": len(before),
            "of_chunks": total,
            "restart_sent": sent,
            "restart_added": added,
            "verify_ok": verified,
            "restore_identical": identical,
        }
        trials.append(row)
        print(json.dumps(row), file=sys.stderr)
        if sent != added or not verified or not identical:
            raise SystemExit(f"trial {trial} failed: {row}")

    interrupted = sum(1 for t in trials if 0 < int(str(t["killed_after_chunks"])) < total)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "crash.json").write_text(json.dumps({"chunks": total, "trials": trials}, indent=2))
    print(
        f"{len(trials)} trials, {interrupted} killed mid-upload ({total} chunks, {args.mib} MiB): "
        "every restart resent nothing, verified and restored byte-identically"
    )


if __name__ == "__main__":
    main()
