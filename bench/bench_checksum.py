"""What the checksum on every S3 PUT costs: the S3 ``initial`` scenario of ``python -m bench``
(the first checkpoint step of bench.data into an empty bucket on a local ``rclone serve s3``)
with each ``checksum:`` setting, the settings taking turns run after run (md5, auto, crc32,
md5, ...) so that the shared machine's drift hits each alike.

    python -m bench.bench_checksum [--size-gib 1] [--runs 3] [--modes md5,auto,crc32]

Each run syncs into a fresh bucket with a fresh state directory. Reported per setting: wall
seconds, replicator's CPU seconds and the server's CPU seconds during the run (from /proc),
medians with the range. First, each checksum's throughput on a 16 MiB buffer in this process.
rclone verifies only Content-MD5, so there ``auto`` picks MD5 (after its probe) and ``crc32`` is
what ``auto`` sends to a server that verifies CRC32 (AWS S3 documents that it does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from bench.common import ROOT, cpu_seconds, du, replicator_command, timed, warm_cache
from bench.data import training_steps
from tests.servers import ACCESS_KEY, SECRET_KEY, RcloneServer, free_port

ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
}


def hash_throughput() -> dict[str, float]:
    """MB/s (10^6 bytes) of each checksum on 16 MiB of random bytes, best of 7."""
    buf = os.urandom(16 << 20)
    hashes: dict[str, Callable[[bytes], object]] = {
        "md5 (hashlib)": lambda b: hashlib.md5(b).digest(),
        "crc32 (zlib)": zlib.crc32,
        "sha1 (hashlib)": lambda b: hashlib.sha1(b).digest(),
        "sha256 (hashlib)": lambda b: hashlib.sha256(b).digest(),
    }
    try:  # not a dependency: botocore uses it for crc32c and crc64nvme when installed
        from awscrt import checksums  # type: ignore[import-not-found, unused-ignore]

        hashes["crc32c (awscrt)"] = checksums.crc32c
        hashes["crc64nvme (awscrt)"] = checksums.crc64nvme
    except ImportError:
        pass
    out = {}
    for name, fn in hashes.items():
        best = float("inf")
        for _ in range(7):
            start = time.perf_counter()
            fn(buf)
            best = min(best, time.perf_counter() - start)
        out[name] = len(buf) / best / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0, help="size of the checkpoint step")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="md5,auto,crc32")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/replicator-bench-checksum"))
    args = ap.parse_args()
    modes = args.modes.split(",")

    for name, mbs in hash_throughput().items():
        print(f"{name:20} {mbs:7.0f} MB/s", file=sys.stderr)
    work = args.workdir
    for d in ("s3", "state"):
        shutil.rmtree(work / d, ignore_errors=True)
    step, _ = training_steps(work / "data" / "steps", args.size_gib, 0.10)
    source = work / "data" / "ckpt"  # the first step alone, as `python -m bench` syncs it
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(step, source / step.name)
    command = replicator_command()
    server = RcloneServer(work / "s3", port=free_port()).start()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    try:
        assert server.proc is not None
        for run in range(args.runs):
            for mode in modes:
                bucket = f"ckpt-{mode}-{run}"
                server.client().create_bucket(Bucket=bucket)
                target = {"name": "t", "url": f"s3://{bucket}/repo", "endpoint_url": server.endpoint}
                cfg = {
                    "state_dir": str(work / "state" / bucket),
                    "sources": [{"name": "src", "url": str(source)}],
                    "targets": [{**target, "checksum": mode}],
                }
                path = work / f"{bucket}.yaml"
                path.write_text(json.dumps(cfg))
                warm_cache(source)
                before = cpu_seconds(server.proc.pid)
                secs, cpu, _ = timed([*command, "sync", "-c", str(path), "-q"], ENV)
                server_cpu = cpu_seconds(server.proc.pid) - before
                results[mode].append({"seconds": secs, "cpu_seconds": cpu, "server_cpu_seconds": server_cpu})
                print(
                    f"run {run} {mode:6} {secs:6.2f} s  cpu {cpu:5.2f}  server {server_cpu:5.2f}",
                    file=sys.stderr,
                )
                shutil.rmtree(work / "s3" / bucket, ignore_errors=True)
    finally:
        server.stop()
    report(results, du(source))


def report(results: dict[str, list[dict[str, float]]], input_bytes: int) -> None:
    print(f"{input_bytes / 2**30:.2f} GiB, {len(next(iter(results.values())))} runs per setting\n")
    print("| checksum | wall s (median, range) | replicator CPU s | server CPU s |")
    print("|---|---|---|---|")
    for mode, runs in results.items():
        cells = []
        for key in ("seconds", "cpu_seconds", "server_cpu_seconds"):
            values = [r[key] for r in runs]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})")
        print(f"| `{mode}` | " + " | ".join(cells) + " |")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "checksum.json").write_text(json.dumps({"input_bytes": input_bytes, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
