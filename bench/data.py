"""Deterministic benchmark data: training checkpoints step by step, small files, one big file.

Generated once per parameter set and reused (a marker file records the parameters), so that
every tool in a run, and every run, sees the same bytes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from replicator.demo import bf16, write_safetensors

LAYERS = 32
SHARDS = 4


def _fresh(root: Path, params: Mapping[str, object]) -> bool:
    """True if ``root`` already holds data generated with ``params``; else empty it."""
    marker = root / ".generated.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return True
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return False


def _layer(layer: int, version: int, params: int) -> dict[str, np.ndarray]:
    """One layer's weights (bf16) and Adam moments (fp32); same (layer, version), same bytes."""
    rng = np.random.default_rng([layer, version])
    hidden = 1024
    rows = max(1, params // hidden)
    grad = rng.standard_normal((rows, hidden), dtype=np.float32) * np.float32(1e-3)
    return {
        "weight": bf16(rng, (rows, hidden)),
        "exp_avg": grad * np.float32(0.1),
        "exp_avg_sq": grad * grad * np.float32(0.001),
    }


def _write_step(d: Path, versions: list[int], params: int) -> None:
    d.mkdir(parents=True)
    per_shard = LAYERS // SHARDS
    for s in range(SHARDS):
        weights: dict[str, np.ndarray] = {}
        moments: dict[str, np.ndarray] = {}
        for layer in range(s * per_shard, (s + 1) * per_shard):
            t = _layer(layer, versions[layer], params)
            weights[f"layers.{layer}.weight"] = t["weight"]
            moments[f"layers.{layer}.exp_avg"] = t["exp_avg"].view(np.uint32)
            moments[f"layers.{layer}.exp_avg_sq"] = t["exp_avg_sq"].view(np.uint32)
        write_safetensors(d / f"model-{s:05d}-of-{SHARDS:05d}.safetensors", weights)
        write_safetensors(d / f"optimizer-{s:05d}-of-{SHARDS:05d}.safetensors", moments, dtype="F32")
    (d / "trainer_state.json").write_text(json.dumps({"step": d.name, "versions": versions}))
    (d / "COMPLETE").write_text("")


def training_steps(root: Path, step_gib: float, changed: float) -> tuple[Path, Path]:
    """Two checkpoint steps of ~``step_gib`` each; the second re-draws ``changed`` of the layers
    (weights and their moments), the rest are byte-identical to step 1."""
    params = {"step_gib": step_gib, "changed": changed, "layers": LAYERS, "version": 1}
    first, second = root / "step-000001", root / "step-000002"
    if _fresh(root, params):
        return first, second
    per_layer = int(step_gib * 2**30 / LAYERS / 10)  # 2 bytes of weight + 8 of moments per parameter
    _write_step(first, [1] * LAYERS, per_layer)
    rng = np.random.default_rng(7)
    redrawn = set(rng.choice(LAYERS, size=max(1, round(changed * LAYERS)), replace=False).tolist())
    _write_step(second, [2 if i in redrawn else 1 for i in range(LAYERS)], per_layer)
    (root / ".generated.json").write_text(json.dumps(params))
    return first, second


def small_files(root: Path, count: int) -> Path:
    """``count`` JSON records of 200 B to 4 KiB in 100 directories (a dataset's manifest shards)."""
    params = {"count": count, "version": 1}
    if _fresh(root, params):
        return root
    rng = np.random.default_rng(3)
    for i in range(count):
        d = root / f"part-{i % 100:03d}"
        d.mkdir(exist_ok=True)
        words = rng.integers(0, 50_000, size=int(rng.integers(20, 500))).tolist()
        (d / f"rec-{i:06d}.json").write_text(json.dumps({"id": i, "tokens": words}))
    (root / ".generated.json").write_text(json.dumps(params))
    return root


def one_big_file(root: Path, gib: float) -> Path:
    """One bf16 safetensors file of ``gib``, written 64 MiB at a time."""
    path = root / "data" / "huge.safetensors"
    params = {"gib": gib, "version": 1}
    if _fresh(root, params):
        return path
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(5)
    n = int(gib * 2**30) // (64 << 20)
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(bf16(rng, (32 << 20,)).tobytes())
    (root / ".generated.json").write_text(json.dumps(params))
    return path
