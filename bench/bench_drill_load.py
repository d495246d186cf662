"""Peak memory of the restore drill's DCP load (``verify --restore-drill --load``).

    python -m bench.bench_drill_load [--tensors 24] [--tensor-mib 64] [--workdir /tmp/replicator-bench-load]

Writes a torch.distributed.checkpoint of ``--tensors`` float32 tensors of ``--tensor-mib`` MiB
each (one process, no process group), then loads it in fresh processes: with replicator's
loader (batches of LOAD_BATCH_BYTES) and, for comparison, with ``dcp.load`` into a state dict
of the whole checkpoint (what the loader does with an unlimited batch). Reports each one's
time and its peak RSS (VmHWM) above the RSS it had once torch was imported.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

_LOAD = """
import sys, time
from pathlib import Path
from replicator.verify.torch_loaders import LOAD_BATCH_BYTES, load_dcp

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

d, whole = Path(sys.argv[1]), sys.argv[2] == "whole"
files = {f.name: f.stat().st_size for f in d.iterdir()}
before = kib("VmRSS")
started = time.monotonic()
load_dcp(d, "", files, batch_bytes=1 << 62 if whole else LOAD_BATCH_BYTES)
print(time.monotonic() - started, (kib("VmHWM") - before) / 1024)
"""


def write_checkpoint(path: Path, tensors: int, tensor_mib: int) -> int:
    import torch
    from torch.distributed.checkpoint.state_dict_saver import save

    rows = tensor_mib * (1 << 20) // (4 * 4096)
    state = {f"w{i}": torch.full((rows, 4096), float(i)) for i in range(tensors)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one process, no process group: as meant
        save(state, checkpoint_id=path, no_dist=True)
    return sum(f.stat().st_size for f in path.iterdir())


def measure(path: Path, mode: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path), mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=24)
    parser.add_argument("--tensor-mib", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/replicator-bench-load"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    size = write_checkpoint(args.workdir / "ckpt", args.tensors, args.tensor_mib)
    print(f"checkpoint: {args.tensors} x {args.tensor_mib} MiB tensors, {size / 2**20:.0f} MiB on disk")
    print("| load | time | peak RSS above the process after imports |\n|---|---|---|")
    for mode, label in (("batched", "replicator (batches of 256 MiB)"), ("whole", "one state dict, whole")):
        seconds, mib = measure(args.workdir / "ckpt", mode)
        print(f"| {label} | {seconds:.1f} s | {mib:.0f} MiB |")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
