"""When a target misbehaves, the others never wait and the lag never lies (issue 18).

The user stories replayed against real servers (`rclone serve s3`, moto), through the fault
proxy where a failure must be made on demand."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from replicator.config import TargetConfig
from replicator.manifest import encode_manifest
from replicator.repository import Repository, ref_key, snapshot_key
from replicator.targets import open_target
from tests.conftest import TargetSpec, cli, make_target_spec, write_config
from tests.daemon_helpers import latest_manifest
from tests.helpers import config_dict, make_checkpoint, stored_chunks, tree_digest

SMALL_CHUNKS = {"min_size": "16KiB", "avg_size": "64KiB", "max_size": "256KiB"}


def _repo_args(spec: TargetSpec) -> list[str]:
    args = ["--repo", str(spec.config["url"])]
    if spec.server is not None:
        args += ["--endpoint-url", spec.server.endpoint]
    return args


def _loose_chunk_keys(spec: TargetSpec) -> list[str]:
    if spec.path is not None:
        return sorted(str(p.relative_to(spec.path)) for p in (spec.path / "chunks").rglob("*") if p.is_file())
    assert spec.server is not None and spec.bucket is not None
    pages = (
        spec.server.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=spec.bucket, Prefix="replica/chunks/")
    )
    return sorted(o["Key"].removeprefix("replica/") for page in pages for o in page.get("Contents", []))


def _delete(spec: TargetSpec, key: str) -> None:
    if spec.path is not None:
        (spec.path / key).unlink()
    else:
        assert spec.server is not None
        spec.server.client().delete_object(Bucket=spec.bucket, Key=f"replica/{key}")


@pytest.mark.parametrize("kind", ["posix", "rclone"])
def test_a_chunk_lost_behind_our_back_is_sent_again_before_a_snapshot_names_it(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    """One chunk object is removed from the target out of band; the next `sync` (a new
    process, trusting the state store's cache) must not publish a snapshot that references
    it: it confirms what it relies on and uploads the chunk again."""
    spec = make_target_spec(request, kind, tmp_path)
    primary = tmp_path / "primary"
    make_checkpoint(primary, 1, hidden=192)
    data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [spec.config], chunking=SMALL_CHUNKS)
    cfg = write_config(tmp_path / "r.yaml", data)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    victim = _loose_chunk_keys(spec)[0]
    _delete(spec, victim)
    (primary / "step-000001" / "trainer_state.json").write_text('{"step": 1, "edited": true}')

    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    assert victim in _loose_chunk_keys(spec), "the lost chunk was not sent again"
    assert "target.chunks_missing" in res.stderr
    check = cli("verify", *_repo_args(spec), "--read-data")
    assert check.returncode == 0, check.stdout


def test_verify_read_data_checks_that_chunks_reassemble_to_the_file_digest(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A manifest whose file digest and chunk list disagree (a writer bug, or a forgery that
    keeps every chunk valid) fails `verify --read-data`, not only a restore."""
    spec = make_target_spec(request, "posix", tmp_path)
    primary = tmp_path / "primary"
    make_checkpoint(primary, 1, hidden=192)
    data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [spec.config], chunking=SMALL_CHUNKS)
    cfg = write_config(tmp_path / "r.yaml", data)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    assert cli("verify", *_repo_args(spec), "--read-data").returncode == 0

    async def forge() -> str:
        target = await open_target(TargetConfig.model_validate(spec.config))
        try:
            repo = await Repository.open(target)
            sid = await repo.resolve("d")
            manifest = await repo.load_manifest("d", sid)
            big = next(f for f in manifest.files if len(f.chunks) > 1)
            swapped = big.model_copy(update={"chunks": (big.chunks[1], big.chunks[0], *big.chunks[2:])})
            files = tuple(swapped if f.path == big.path else f for f in manifest.files)
            forged = manifest.model_copy(update={"files": files})
            stored = encode_manifest(forged)
            new_id = repo.new_snapshot_id(forged, stored)
            await target.put(snapshot_key("d", new_id), stored)
            await target.put(
                ref_key("d"), json.dumps({"snapshot": new_id, "updated": forged.created}).encode()
            )
            return big.path
        finally:
            await target.close()

    path = asyncio.run(forge())
    res = cli("verify", *_repo_args(spec), "--read-data", "--json")
    assert res.returncode == 1
    problems: list[dict[str, Any]] = json.loads(res.stdout)[0]["problems"]
    assert [p["message"] for p in problems if p["key"].endswith(path)] == [
        "file digest differs from its re-assembled chunks"
    ]


def test_verify_repair_heals_a_deleted_and_a_damaged_chunk_from_the_source(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A loose chunk deleted and a packed chunk damaged on the target: `verify --repair`
    sends both again from the primary's files; a chunk whose file is gone from the primary is
    named as not repairable."""
    spec = make_target_spec(request, "posix", tmp_path)
    assert spec.path is not None
    primary = tmp_path / "primary"
    make_checkpoint(primary, 1, hidden=192)
    (primary / "notes.txt").write_text("only here")
    data = config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [spec.config], chunking=SMALL_CHUNKS)
    cfg = write_config(tmp_path / "r.yaml", data)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    chunks = stored_chunks(spec.path)
    loose = next(c for c in chunks if c.key.startswith("chunks/"))
    packed = next(c for c in chunks if c.key.startswith("packs/"))
    loose.path.unlink()
    packed.flip(packed.length // 2)

    res = cli("verify", "-c", str(cfg), "--read-data", "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "repaired 2 of 2 damaged chunks" in res.stdout
    again = cli("verify", "-c", str(cfg), "--read-data")
    assert again.returncode == 0, again.stdout
    dest = tmp_path / "restored"
    assert cli("restore", "--repo", str(spec.path), "-s", "d", str(dest)).returncode == 0
    assert tree_digest(dest) == tree_digest(primary)

    manifest = latest_manifest(spec.config, "d")
    assert manifest is not None
    notes_id = next(f.chunks[0][0] for f in manifest.files if f.path == "notes.txt")
    notes = next(c for c in stored_chunks(spec.path) if c.id == notes_id)
    notes.flip(notes.length // 2)  # its only copy damaged...
    (primary / "notes.txt").unlink()  # ...and its file gone from the primary
    res = cli("verify", "-c", str(cfg), "--read-data", "--repair")
    assert res.returncode == 1, res.stdout
    assert f"NOT REPAIRED chunks/{notes_id[:2]}/{notes_id}: d/notes.txt is gone from the source" in res.stdout
