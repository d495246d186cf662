"""Format checks on artifacts written by the real writers (torch.save, torch.distributed.checkpoint,
numpy, safetensors layout), each with the damage it must catch."""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from replicator.demo import bf16, write_safetensors
from replicator.verify.formats import FormatCheck, check_file, format_of
from replicator.verify.torch_loaders import torch_load


def check(path: Path, root: Path | None = None) -> FormatCheck | None:
    """Check ``path`` as a file of a snapshot made of everything below ``root``."""
    root = root or path.parent
    files = {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    with open(path, "rb") as f:
        return check_file(f, str(path.relative_to(root)), files)


def problem(path: Path, root: Path | None = None) -> str:
    result = check(path, root)
    assert result is not None and result.problem is not None, f"{path.name} passed: {result}"
    return result.problem


def passes(path: Path, root: Path | None = None) -> FormatCheck:
    result = check(path, root)
    assert result is not None and result.problem is None, result
    return result


def member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start: after its local header (whose extra field torch pads)."""
    raw = path.read_bytes()[info.header_offset : info.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", raw[26:30])
    return int(info.header_offset + 30 + name_len + extra_len)


def flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def test_format_is_chosen_by_name() -> None:
    assert format_of("step-1/model-00001-of-00002.safetensors") == "safetensors"
    assert format_of("model.safetensors.index.json") == "safetensors-index"
    assert format_of("step-1/.metadata") == "dcp"
    assert [format_of(f"x.{e}") for e in ("pt", "pth", "ckpt", "bin")] == ["torch"] * 4
    assert format_of("shard.parquet") == "parquet" and format_of("a.ndjson") == "jsonl"
    assert format_of("optimizer.distcp") is None and format_of("README") is None


def test_safetensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = tmp_path / "m.safetensors"
    write_safetensors(good, {"a": bf16(rng, (8, 4)), "b": bf16(rng, (3,))})
    assert passes(good).format == "safetensors"

    short = tmp_path / "short.safetensors"
    short.write_bytes(good.read_bytes()[:-2])  # a write cut short
    assert "cover 70 bytes of data, the file holds 68" in problem(short)

    header_len = struct.unpack("<Q", good.read_bytes()[:8])[0]
    header = json.loads(good.read_bytes()[8 : 8 + header_len])
    mutations: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
        ("shape", lambda h: h["a"].update(shape=[8, 5]), "needs 80 bytes, data_offsets give 64"),
        ("dtype", lambda h: h["a"].update(dtype="Q7"), "unknown dtype"),
        ("overlap", lambda h: h["b"].update(data_offsets=[58, 64]), "overlaps"),
    ]
    for name, mutate, needle in mutations:
        h = json.loads(json.dumps(header))
        mutate(h)
        raw = json.dumps(h).encode()
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(struct.pack("<Q", len(raw)) + raw + good.read_bytes()[8 + header_len :])
        assert needle in problem(bad), name
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert "does not fit" in problem(huge)


def test_safetensors_index_names_shards_present(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model-1.safetensors", {"w": np.zeros(2, np.uint16)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    passes(index)
    index.write_text(json.dumps({"weight_map": {"w": "model-1.safetensors", "v": "model-2.safetensors"}}))
    assert "'model-2.safetensors'" in problem(index)
    index.write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    assert "unsafe path" in problem(index)


def small_state() -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "rng": torch.get_rng_state(), "step": 1}


def test_torch_save_zip(tmp_path: Path) -> None:
    good = tmp_path / "checkpoint.pt"
    torch.save(small_state(), good)
    assert passes(good).format == "torch-zip"
    assert torch_load(good).tensors == 2 + 2 * 3 + 1  # weight and bias, Adam's 3 tensors for each, RNG state

    members = zipfile.ZipFile(good).infolist()
    biggest = max((m for m in members if "/data/" in m.filename), key=lambda m: m.file_size)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes())
    flip(corrupt, member_data_offset(good, biggest) + 3)
    assert f"{biggest.filename} is corrupt (CRC mismatch)" in problem(corrupt)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:-200])
    assert "zip archive is damaged" in problem(truncated)

    missing = tmp_path / "missing.pt"  # an archive whose data.pkl names a storage that is gone
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(missing, "w") as dst:
        for m in src.infolist():
            if m.filename != biggest.filename:
                dst.writestr(m, src.read(m))
    assert f"references storage {biggest.filename.rsplit('/', 1)[-1]!r}" in problem(missing)

    legacy = tmp_path / "legacy.pt"
    torch.save(small_state(), legacy, _use_new_zipfile_serialization=False)
    assert passes(legacy).format == "torch-legacy"
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert "neither a torch.save zip" in problem(tmp_path / "garbage.pt")
    (tmp_path / "vocab.bin").write_bytes(b"\x00\x01 arbitrary binary")
    assert check(tmp_path / "vocab.bin") is None  # a .bin that is not a zip: digest only


def test_torch_load_failure_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Payload()}, path)
    assert passes(path).format == "torch-zip"  # structurally a fine archive...
    with pytest.raises(Exception, match="weights_only=True"):
        torch_load(path)  # ...that weights_only refuses to unpickle
    assert not (tmp_path / "pwned").exists()


def test_pickles_are_inspected_without_running_them(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    meta = tmp_path / ".metadata"
    meta.write_bytes(pickle.dumps(Payload()))
    assert "not a torch.distributed.checkpoint Metadata" in problem(meta)
    assert not (tmp_path / "pwned").exists()


def test_torch_distributed_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "step-1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-process save warns that no process group exists
        dcp_save(small_state(), checkpoint_id=ckpt)
    assert passes(ckpt / ".metadata", tmp_path).format == "dcp"

    storage = next(ckpt.glob("*.distcp"))
    storage.write_bytes(storage.read_bytes()[:100])
    assert f"storage file {storage.name!r} is 100 bytes" in problem(ckpt / ".metadata", tmp_path)
    storage.unlink()
    assert f"storage file {storage.name!r} is not in the snapshot" in problem(ckpt / ".metadata", tmp_path)


def test_numpy(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    passes(tmp_path / "a.npy")
    (tmp_path / "short.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-4])
    assert "header describes 48 bytes of data, the file holds 44" in problem(tmp_path / "short.npy")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': oops}   \n")
    assert "header does not parse" in problem(tmp_path / "bad.npy")

    np.savez(tmp_path / "b.npz", x=np.arange(100), y=np.ones((4, 4)))
    passes(tmp_path / "b.npz")
    info = zipfile.ZipFile(tmp_path / "b.npz").getinfo("x.npy")
    flip(tmp_path / "b.npz", member_data_offset(tmp_path / "b.npz", info) + 200)
    assert "x.npy is corrupt" in problem(tmp_path / "b.npz")


def minimal_parquet() -> bytes:
    """An empty table: PAR1, FileMetaData in Thrift compact protocol, its length, PAR1."""
    schema_root = b"\x48\x06schema" + b"\x15\x00" + b"\x00"  # name, num_children = 0, stop
    meta = b"\x15\x02" + b"\x19\x1c" + schema_root + b"\x16\x00" + b"\x19\x0c" + b"\x00"
    return b"PAR1" + meta + struct.pack("<I", len(meta)) + b"PAR1"


def test_parquet_footer(tmp_path: Path) -> None:
    good = tmp_path / "t.parquet"
    good.write_bytes(minimal_parquet())
    result = passes(good)
    assert result.note is not None and "pyarrow" in result.note  # pyarrow is not a test dependency
    for name, data, needle in [
        ("truncated", minimal_parquet()[:-3], "magic"),
        ("nomagic", b"PAR0" + minimal_parquet()[4:], "magic"),
        ("length", minimal_parquet()[:-8] + struct.pack("<I", 999) + b"PAR1", "footer length 999"),
        ("tiny", b"PAR1PAR1", "too short"),
    ]:
        (tmp_path / f"{name}.parquet").write_bytes(data)
        assert needle in problem(tmp_path / f"{name}.parquet"), name


def test_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"step": 3}')
    passes(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"step": 3')
    assert "not valid JSON" in problem(tmp_path / "b.json")
    (tmp_path / "c.jsonl").write_text('{"a": 1}\n\n{"b": 2}\n')
    passes(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n{"b": \n')
    assert "line 2 is not valid JSON" in problem(tmp_path / "d.jsonl")
