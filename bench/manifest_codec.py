"""Micro-benchmark: encoding and parsing a snapshot manifest of many small files.

    python -m bench.manifest_codec [--files 20000] [--odd 0] [--repeat 15]

The manifest is built the way the engine builds one (``model_construct``, one chunk per file,
every chunk in a pack), so it is what ``encode_manifest`` sees on a dataset of small files.
``--odd N`` gives N of the files names that are not valid UTF-8 (stored with ``path_b64``),
to time the slow path. Prints the fastest and the median of ``--repeat`` runs of each step,
in ms of CPU time (steadier than wall time on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from replicator.format.manifest import (
    FileEntry,
    Manifest,
    encode_manifest,
    format_time,
    now_utc,
    parse_manifest,
)


def build(files: int, odd: int) -> Manifest:
    entries = []
    packed = {}
    for i in range(files):
        name = f"shard-{i // 1000:05d}/sample-{i:08d}.json"
        if i < odd:
            name = os.fsdecode(b"odd-\xff\xfe/" + name.encode())
        cid, digest, pack = f"{i:032x}", f"{i + 1:032x}", f"{i // 500:032x}"
        entries.append(
            FileEntry.model_construct(
                path=name,
                size=300,
                mode=0o644,
                mtime_ns=1_795_314_111_000_000_000 + i,
                digest=digest,
                chunks=((cid, 300),),
            )
        )
        packed[cid] = (pack, (i % 500) * 200, 200)
    entries.sort(key=lambda e: e.path)
    manifest = Manifest.model_construct(
        source="data", kind="dataset", created=format_time(now_utc()), files=tuple(entries), packed=packed
    )
    return manifest.check_tree()


def cpu_ms(step: Callable[[], object], repeat: int) -> str:
    times = []
    for _ in range(repeat):
        started = time.process_time()
        step()
        times.append(time.process_time() - started)
    return f"{min(times) * 1000:.1f} ms (median {statistics.median(times) * 1000:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--odd", type=int, default=0, help="files whose names are not valid UTF-8")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    manifest = build(args.files, args.odd)
    stored = encode_manifest(manifest)
    assert parse_manifest(stored, where="bench") == manifest
    encode = cpu_ms(lambda: encode_manifest(manifest), args.repeat)
    parse = cpu_ms(lambda: parse_manifest(stored, where="bench"), args.repeat)
    print(
        f"{args.files} files ({args.odd} not UTF-8), {len(stored)} bytes stored, {args.repeat} runs: "
        f"encode {encode}, parse {parse}"
    )


if __name__ == "__main__":
    main()
