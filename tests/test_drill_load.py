"""``verify --restore-drill --load``: DCP and sharded safetensors checkpoints are loaded with torch,
each tensor checked against what the checkpoint's own index says; a set that does not load is
named with the file or tensor at fault; without torch the drill says so instead of loading."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.multiprocessing.spawn import spawn as mp_spawn

from replicator.demo import bf16, write_safetensors
from tests.conftest import cli, make_target_spec, write_config
from tests.helpers import checkpoint_source, config_dict
from tests.servers import free_port

DCP_TENSORS = 16  # 4 parameters; AdamW's step, exp_avg and exp_avg_sq for each
DCP_OBJECTS = 13  # AdamW's 12 param_group entries, and "step"


def save_dcp(root: Path, step: int) -> Path:
    """A checkpoint set as torch.distributed.checkpoint writes it (one process, no process group):
    a model's and an optimizer's state after one training step, and a plain int."""
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    d = root / f"step-{step:06d}"
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp_save(state, checkpoint_id=d, no_dist=True)
    (d / "COMPLETE").write_text("")
    return d


def save_sharded_safetensors(root: Path, step: int, shards: int = 2) -> Path:
    """A Hugging Face style sharded checkpoint: shards and ``model.safetensors.index.json``."""
    rng = np.random.default_rng(step)
    d = root / f"step-{step:06d}"
    d.mkdir(parents=True)
    weight_map = {}
    for rank in range(shards):
        name = f"model-{rank + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{rank}.{i}.weight": bf16(rng, (32, 24)) for i in range(4)}
        write_safetensors(d / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "COMPLETE").write_text("")
    return d


def edit_metadata(d: Path, fqn: str, **changes: Any) -> None:
    """Re-pickle a DCP checkpoint's ``.metadata`` with one tensor's entry changed."""
    with (d / ".metadata").open("rb") as f:
        meta = pickle.load(f)
    entry = meta.state_dict_metadata[fqn]
    meta.state_dict_metadata[fqn] = dataclasses.replace(entry, **changes)
    with (d / ".metadata").open("wb") as f:
        pickle.dump(meta, f)


def sync(tmp_path: Path, primary: Path, target: dict[str, Any]) -> None:
    cfg = write_config(tmp_path / "r.yaml", config_dict(tmp_path, [checkpoint_source(primary)], [target]))
    res = cli("sync", "-c", str(cfg))
    assert res.returncode == 0, res.stderr


def drill(target: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["verify", "--repo", str(target["url"]), "--restore-drill", *extra]
    if "endpoint_url" in target:
        args += ["--endpoint-url", str(target["endpoint_url"])]
    return cli(*args)


def drill_json(target: dict[str, Any], *extra: str) -> tuple[int, dict[str, Any]]:
    res = drill(target, "--json", *extra)
    assert res.stdout, res.stderr
    (source,) = json.loads(res.stdout)[0]["drill"]["sources"]
    return res.returncode, source


def loads_by_set(source: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["set"]: row for row in source["loads"]}


@pytest.mark.parametrize("kind", ["posix", "rclone"])
def test_drill_loads_dcp_and_sharded_safetensors(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    primary = tmp_path / "primary"
    save_dcp(primary, 1)
    save_sharded_safetensors(primary, 2)
    target = make_target_spec(request, kind, tmp_path).config
    sync(tmp_path, primary, target)

    code, src = drill_json(target, "--load")
    assert code == 0, src
    assert src["ok"] and src["loaded"] == 2
    sets = loads_by_set(src)
    assert set(sets) == {"step-000001", "step-000002"}
    dcp_set, st_set = sets["step-000001"], sets["step-000002"]
    assert dcp_set["status"] == "loaded" and dcp_set["reason"] is None
    assert dcp_set["tensors"] == DCP_TENSORS and dcp_set["objects"] == DCP_OBJECTS
    ((ckpt,),) = [dcp_set["checkpoints"]]
    assert ckpt["path"] == "step-000001" and ckpt["format"] == "dcp" and ckpt["status"] == "loaded"
    assert st_set["status"] == "loaded" and st_set["tensors"] == 8
    assert [c["format"] for c in st_set["checkpoints"]] == ["safetensors-sharded"]
    assert st_set["bytes"] == 8 * 32 * 24 * 2
    assert src["newest_restorable_set"] == "step-000002"

    text = drill(target, "--load")
    assert text.returncode == 0, text.stderr
    assert f"load step-000001: loaded: 1 checkpoint (dcp), {DCP_TENSORS} tensors" in text.stdout
    assert "load step-000002: loaded: 1 checkpoint (safetensors-sharded), 8 tensors" in text.stdout

    # Without --load nothing claims a load.
    code, src = drill_json(target)
    assert code == 0 and src["loaded"] == 0 and src["loads"] == []


def write_broken_sets(primary: Path) -> int:
    """step-000001: a clean DCP set; steps 2-7: sets that do not load, each for its own reason.
    Returns the size of step 2's storage file before it was truncated by 100 bytes."""
    save_dcp(primary, 1)

    truncated = save_dcp(primary, 2) / "__0_0.distcp"
    full = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:-100])

    reshaped = save_dcp(primary, 3)  # .metadata says a shape its chunks do not cover
    edit_metadata(reshaped, "model.0.weight", size=torch.Size([16, 4]))

    relaid = save_dcp(primary, 4)  # shape and chunk agree with each other, not with the stored tensor
    meta_chunk = dataclasses.replace(
        pickle.loads((relaid / ".metadata").read_bytes()).state_dict_metadata["model.2.weight"].chunks[0],
        sizes=torch.Size([1, 8]),
    )
    edit_metadata(relaid, "model.2.weight", size=torch.Size([1, 8]), chunks=[meta_chunk])

    retyped = save_dcp(primary, 5)
    props = pickle.loads((retyped / ".metadata").read_bytes()).state_dict_metadata["model.0.bias"].properties
    edit_metadata(retyped, "model.0.bias", properties=dataclasses.replace(props, dtype=torch.float64))

    shard = save_sharded_safetensors(primary, 6) / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])

    missing = save_sharded_safetensors(primary, 7)  # the index maps a tensor to a shard without it
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.0.0.weight"] = "model-00002-of-00002.safetensors"
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    return full


def test_drill_load_names_the_file_or_tensor_that_fails(tmp_path: Path) -> None:
    primary, target_dir = tmp_path / "primary", tmp_path / "target"
    target_dir.mkdir()
    full = write_broken_sets(primary)
    target = {"name": "t", "url": str(target_dir)}
    sync(tmp_path, primary, target)

    # The format checks alone miss the edited .metadata files and the index: a load is needed.
    code, src = drill_json(target)
    assert code == 1 and src["newest_restorable_set"] == "step-000007"

    code, src = drill_json(target, "--load")
    assert code == 1 and not src["ok"]
    sets = loads_by_set(src)
    assert sets["step-000001"]["status"] == "loaded"
    failed = {name: row["reason"] for name, row in sets.items() if row["status"] == "failed"}
    assert set(failed) == {f"step-00000{i}" for i in range(2, 8)}, sets
    assert "step-000002/__0_0.distcp" in failed["step-000002"]
    assert f"{full - 100} bytes" in failed["step-000002"] and str(full) in failed["step-000002"]
    assert "'model.0.weight'" in failed["step-000003"] and "[16, 4]" in failed["step-000003"]
    assert "'model.2.weight'" in failed["step-000004"] and "[1, 16]" in failed["step-000004"]
    assert "'model.0.bias'" in failed["step-000005"] and "float64" in failed["step-000005"]
    assert "model-00002-of-00002.safetensors" in failed["step-000006"]
    assert "truncated" in failed["step-000006"]
    assert "'layers.0.0.weight'" in failed["step-000007"]
    assert "model-00002-of-00002.safetensors" in failed["step-000007"]
    assert src["loaded"] == 1
    assert src["newest_restorable_set"] == "step-000001"

    text = drill(target, "--load")
    assert text.returncode == 1
    assert "load step-000001: loaded" in text.stdout
    line = next(ln for ln in text.stdout.splitlines() if "load step-000002:" in ln)
    assert "FAILED" in line and "__0_0.distcp" in line


_BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch' (blocked)", name=name)
sys.meta_path.insert(0, NoTorch())
"""

_CLI = (
    _BLOCK_TORCH
    + """
import runpy
sys.argv = ["replicator", *sys.argv[1:]]
runpy.run_module("replicator", run_name="__main__", alter_sys=True)
"""
)

_LIBRARY = (
    _BLOCK_TORCH
    + """
import asyncio, json
from replicator.config import target_config
from replicator.verify.run import VerifyOptions, run_verify
options = VerifyOptions(restore_drill=True, load=True)
rows = asyncio.run(run_verify([target_config({"name": "t", "url": sys.argv[1]})], None, options))
print(json.dumps([row.to_json() for row in rows]))
"""
)


def without_torch(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_without_torch_the_drill_says_so_instead_of_loading(tmp_path: Path) -> None:
    primary, target_dir = tmp_path / "primary", tmp_path / "target"
    target_dir.mkdir()
    save_dcp(primary, 1)
    save_sharded_safetensors(primary, 2)
    sync(tmp_path, primary, {"name": "t", "url": str(target_dir)})

    usage = without_torch(_CLI, "verify", "--repo", str(target_dir), "--restore-drill", "--load")
    assert usage.returncode == 2, usage.stderr
    assert usage.stderr.count("\n") == 1 and "PyTorch" in usage.stderr and "blocked" in usage.stderr
    assert "loaded" not in usage.stdout

    # The library, asked to load where torch cannot be imported: every set skipped, with why.
    res = without_torch(_LIBRARY, str(target_dir))
    assert res.returncode == 0, res.stderr
    drill_report = json.loads(res.stdout.splitlines()[-1])[0]["drill"]  # after the library's log lines
    (src,) = drill_report["sources"]
    assert src["loaded"] == 0 and not src["ok"] and not drill_report["ok"]
    assert {row["set"]: row["status"] for row in src["loads"]} == {
        "step-000001": "skipped",
        "step-000002": "skipped",
    }
    assert all("PyTorch" in row["reason"] and "blocked" in row["reason"] for row in src["loads"])
    # Without the CLI's check, the blocker really kept torch out: the drill ran without it.
    assert src["digest_failures"] == {} and src["format_failures"] == {}


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec from the (large) parent process.
_MEASURE = """
import sys
from pathlib import Path
from replicator.verify.torch_loaders import load_dcp

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

d = Path(sys.argv[1])
files = {f.name: f.stat().st_size for f in d.iterdir()}
before = kib("VmRSS")
loaded = load_dcp(d, "", files, batch_bytes=40 << 20)
print(loaded.tensors, loaded.bytes, (kib("VmHWM") - before) * 1024)
"""


def test_a_dcp_load_holds_one_batch_not_the_checkpoint(tmp_path: Path) -> None:
    """240 MiB of tensors loaded one 40 MiB tensor at a time: the process grows by about a batch
    and a stored item (80 MiB; measured 83), nowhere near the checkpoint's size (loaded in one
    batch: 283). Tensors over glibc's largest mmap threshold (32 MiB), so that a freed batch
    goes back to the system and the peak does not depend on heap fragmentation."""
    d = tmp_path / "ckpt"
    state = {f"w{i}": torch.full((2560, 4096), float(i)) for i in range(6)}  # 40 MiB each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp_save(state, checkpoint_id=d, no_dist=True)
    del state
    res = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(d)], capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr
    tensors, size, growth = map(int, res.stdout.split())
    assert tensors == 6 and size == 240 << 20
    assert growth < 120 << 20, f"peak RSS grew by {growth >> 20} MiB"


def _save_rank(rank: int, world: int, path: str, port: int) -> None:
    """One rank of a gloo job saving row-sharded DTensors: each tensor in ``world`` chunks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        state = {
            "w": distribute_tensor(torch.randn(10, 6), mesh, [Shard(0)]),
            "b": distribute_tensor(torch.arange(7.0), mesh, [Shard(0)]),
            "step": 5,
        }
        dcp_save(state, checkpoint_id=path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo ranks, each a fresh interpreter importing torch
def test_drill_loads_a_checkpoint_sharded_across_ranks(tmp_path: Path) -> None:
    """A DCP checkpoint written by two ranks (a storage file each, every tensor in two chunks)
    loads into one process; a .metadata that lost a chunk fails, naming the tensor."""
    primary, target_dir = tmp_path / "primary", tmp_path / "target"
    target_dir.mkdir()
    d = primary / "step-000001"
    mp_spawn(_save_rank, args=(2, str(d), free_port()), nprocs=2)  # type: ignore[no-untyped-call]
    (d / "COMPLETE").write_text("")
    shutil.copytree(d, primary / "step-000002")
    w = pickle.loads((primary / "step-000002" / ".metadata").read_bytes()).state_dict_metadata["w"]
    edit_metadata(primary / "step-000002", "w", chunks=w.chunks[:1])
    target = {"name": "t", "url": str(target_dir)}
    sync(tmp_path, primary, target)

    code, src = drill_json(target, "--load")
    assert code == 1
    sets = loads_by_set(src)
    whole = sets["step-000001"]
    assert whole["status"] == "loaded" and whole["tensors"] == 2 and whole["objects"] == 1
    assert whole["bytes"] == (10 * 6 + 7) * 4
    assert sets["step-000002"]["status"] == "failed"
    assert "tensor 'w'" in sets["step-000002"]["reason"] and "chunks hold 30" in sets["step-000002"]["reason"]
    assert src["newest_restorable_set"] == "step-000001"
