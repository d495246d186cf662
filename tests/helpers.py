"""Test data and small utilities shared by the end-to-end tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from replicator.demo import bf16, write_safetensors
from replicator.format.manifest import Manifest, PackedAt, parse_manifest
from replicator.repository import chunk_key, pack_key, stored_key
from tests.servers import free_port


def make_checkpoint(
    root: Path,
    step: int,
    *,
    shards: int = 2,
    hidden: int = 256,
    seed: int | None = None,
    marker: str | None = "COMPLETE",
) -> Path:
    """A checkpoint set like a sharded trainer writes: safetensors shards, a JSON state, a marker."""
    rng = np.random.default_rng(step if seed is None else seed)
    d = root / f"step-{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    for rank in range(shards):
        tensors = {f"layer.{i}.weight": bf16(rng, (hidden, hidden)) for i in range(4)}
        write_safetensors(d / f"model-{rank:05d}-of-{shards:05d}.safetensors", tensors)
    (d / "trainer_state.json").write_text(f'{{"step": {step}}}')
    if marker:
        (d / marker).write_text("")
    return d


@dataclass(frozen=True)
class StoredChunk:
    """One chunk object on disk: a loose object, or a byte range of a pack."""

    id: str
    path: Path
    offset: int
    length: int
    key: str
    """How replicator names it in problems (``chunks/..`` or ``packs/..@offset``)."""

    def flip(self, at: int) -> bytes:
        """Flip one bit of the object's byte ``at``; return the file's bytes from before."""
        original = self.path.read_bytes()
        data = bytearray(original)
        data[self.offset + at] ^= 0x10
        self.path.write_bytes(bytes(data))
        return original


def manifests(repo: Path) -> list[Manifest]:
    """Every snapshot manifest of a repository directory, parsed."""
    return [parse_manifest(m.read_bytes(), where=str(m)) for m in (repo / "snapshots").rglob("*.json.zst")]


def stored_chunks(repo: Path) -> list[StoredChunk]:
    """Every chunk object of a repository directory, loose or packed (found through the
    manifests), largest first."""
    out = [
        StoredChunk(p.name, p, 0, p.stat().st_size, chunk_key(p.name))
        for p in (repo / "chunks").rglob("*")
        if p.is_file()
    ]
    packed: dict[str, PackedAt] = {}
    for m in manifests(repo):
        packed.update(m.packed)
    for cid, at in packed.items():
        out.append(StoredChunk(cid, repo / pack_key(at[0]), at[1], at[2], stored_key(cid, at)))
    return sorted(out, key=lambda c: (-c.length, c.key))


def loose_chunk_ids(repo: Path) -> set[str]:
    """Ids of the loose chunk objects of a repository directory (not writers' temporaries)."""
    return {p.name for p in (repo / "chunks").rglob("*") if p.is_file() and not p.name.startswith(".")}


def chunks_written_since(repo: Path, loose_before: set[str], since_ns: int) -> int:
    """Chunk uploads since ``since_ns``: loose objects not in ``loose_before``, plus the chunks
    the manifests place in packs written since then. (A pack sealed just before a crash,
    whose chunks the state had not recorded, is written again after it: the accepted cost of
    packs, a few small chunks per crash; docs/FORMAT.md 4.1.)"""
    packed = {
        (cid, at)
        for m in manifests(repo)
        for cid, at in m.packed.items()
        if (repo / pack_key(at[0])).stat().st_mtime_ns >= since_ns
    }
    return len(loose_chunk_ids(repo) - loose_before) + len(packed)


def tree_digest(root: Path) -> dict[str, tuple[str, int, int]]:
    """path -> (sha256, mode bits, mtime_ns) for every regular file below ``root``."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for fn in files:
            p = Path(dirpath) / fn
            st = p.stat()
            rel = str(p.relative_to(root))
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode & 0o777, st.st_mtime_ns)
    return out


def config_dict(
    tmp_path: Path, sources: list[dict[str, Any]], targets: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    fast_retry = {"initial": "50ms", "max": "200ms", "give_up_after": "2s"}
    targets = [{"retry": fast_retry, **t} for t in targets]
    # A free port, not the default 9464: a daemon the tests start must not collide with any
    # other `replicator run` on the machine (a benchmark, a deployed one).
    listen = f"127.0.0.1:{free_port()}"
    return {
        "state_dir": str(tmp_path / "state"),
        "listen": listen,
        "sources": sources,
        "targets": targets,
        **extra,
    }


def local_setup(tmp_path: Path, *, checkpoint: bool = False) -> tuple[Path, Path, Path]:
    """The simplest replication: POSIX source at tmp_path/primary (``d``, or with ``checkpoint``
    the :func:`checkpoint_source` ``ckpt``) to POSIX target ``t`` at tmp_path/target (both
    created). Returns (primary, target, config file)."""
    primary, target = tmp_path / "primary", tmp_path / "target"
    primary.mkdir(exist_ok=True)
    target.mkdir(exist_ok=True)
    cfg = tmp_path / "r.yaml"
    source = checkpoint_source(primary) if checkpoint else {"name": "d", "url": str(primary)}
    data = config_dict(tmp_path, [source], [{"name": "t", "url": str(target)}])
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    return primary, target, cfg


def checkpoint_source(path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "ckpt",
        "url": str(path),
        "kind": "checkpoint",
        "complete_when": {"marker": "COMPLETE"},
        **extra,
    }


PATIENCE = 60.0
"""Deadline for what must happen at once (an operation on a few MiB, a state the code reaches
without waiting): generous on a loaded machine, never a bound on speed."""

REFERENCE_READER = Path(__file__).resolve().parent.parent / "tools" / "restore_reference.py"
_BLOCK_REPLICATOR = """
import runpy, sys
class NoReplicator:
    def find_spec(self, name, path=None, target=None):
        if name == "replicator" or name.startswith("replicator."):
            raise ImportError("the reference reader must not import replicator")
sys.meta_path.insert(0, NoReplicator())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_reference_reader(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """tools/restore_reference.py in a fresh interpreter where importing replicator fails."""
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_REPLICATOR, str(REFERENCE_READER), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
