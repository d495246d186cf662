"""No lock-in: tools/restore_reference.py, written from docs/FORMAT.md with zstandard and xxhash
alone, restores exactly what `replicator restore` does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import cli, write_config
from tests.helpers import (
    config_dict,
    local_setup,
    make_checkpoint,
    run_reference_reader,
    stored_chunks,
    tree_digest,
)

SMALL_CHUNKS = {"min_size": "16KiB", "avg_size": "64KiB", "max_size": "256KiB"}


@pytest.mark.parametrize("algorithm", ["xxh3-128", "blake3"])
def test_reference_reader_restores_what_replicator_restores(tmp_path: Path, algorithm: str) -> None:
    primary, target = tmp_path / "primary", tmp_path / "target"
    target.mkdir()
    make_checkpoint(primary / "ckpt", 1, hidden=192)  # bf16 tensors: byte-grouped chunks
    data = primary / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:  # text: zstd chunks
        for i in range(4000):
            f.write(json.dumps({"id": i, "text": f"sample {i}"}) + "\n")
    (data / "noise.bin").write_bytes(os.urandom(300_000))  # incompressible: raw chunks
    (data / "empty").write_bytes(b"")
    (data / "deep" / "er").mkdir(parents=True)
    (data / "deep" / "er" / "run.sh").write_text("#!/bin/sh\n")
    (data / "deep" / "er" / "run.sh").chmod(0o750)
    cfg = write_config(
        tmp_path / "r.yaml",
        config_dict(
            tmp_path,
            [{"name": "d", "url": str(primary)}],
            [{"name": "t", "url": str(target), "hash": algorithm}],
            chunking=SMALL_CHUNKS,
        ),
    )
    assert cli("sync", "-c", str(cfg)).returncode == 0
    chunks = stored_chunks(target)
    codecs = {c.path.read_bytes()[c.offset] for c in chunks}
    assert codecs == {0, 1, 2}, "every chunk codec of FORMAT.md section 4 is exercised"
    assert {c.key.split("/")[0] for c in chunks} == {"chunks", "packs"}, "loose and packed chunks"

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    res = cli("restore", "--repo", str(target), "-s", "d", str(ours))
    assert res.returncode == 0, res.stderr
    ref = run_reference_reader(target, "d", "latest", theirs, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    assert "restored 8 of 8 files" in ref.stdout
    assert tree_digest(theirs) == tree_digest(ours) == tree_digest(primary)  # bytes, mode, mtime

    snapshot = json.loads((target / "refs" / "d" / "latest").read_text())["snapshot"]
    by_id = run_reference_reader(target, "d", snapshot, tmp_path / "by-id", cwd=tmp_path)
    assert by_id.returncode == 0 and tree_digest(tmp_path / "by-id") == tree_digest(primary)


def test_reference_reader_refuses_a_corrupt_chunk_and_a_forged_manifest(tmp_path: Path) -> None:
    primary, target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 2, hidden=64)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    victim = stored_chunks(target)[0]
    original = victim.flip(victim.length - 1)
    res = run_reference_reader(target, "d", "latest", tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 1 and victim.key in res.stderr
    assert "restored 3 of 4 files" in res.stdout
    victim.path.write_bytes(original)

    manifest = next((target / "snapshots" / "d").iterdir())
    manifest.write_bytes(manifest.read_bytes() + b"\x00")
    res = run_reference_reader(target, "d", "latest", tmp_path / "out2", cwd=tmp_path)
    assert res.returncode == 1 and "does not match the digest in its id" in res.stderr
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_reference_reader_reads_versions_1_to_3_and_refuses_newer(tmp_path: Path, version: int) -> None:
    from tests.test_format import new_repo
    from tests.test_restore_safety import PAYLOAD, b64_entry, publish_raw

    repo = tmp_path / "repo"
    new_repo(repo)
    files = [{"path": "plain/new\nline"}]
    if version >= 3:
        files.append(b64_entry(b"\xff\xfe.bin"))
    publish_raw(repo, files, version=version)
    res = run_reference_reader(repo, "src", "latest", tmp_path / "out", cwd=tmp_path)
    if version == 4:
        assert res.returncode == 1 and "manifest version 4 is not supported" in res.stderr
        return
    assert res.returncode == 0, res.stderr
    out = os.fsencode(tmp_path / "out")
    names = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert names == sorted([b"plain/new\nline", b"\xff\xfe.bin"][: len(files)])
    for n in names:
        with open(os.path.join(out, n), "rb") as f:
            assert f.read() == PAYLOAD
