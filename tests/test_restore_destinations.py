"""Restore for real use: into a bucket as plain objects (multipart for big files, skip what is
already correct), and the newest snapshot at or before a time."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

import pytest

from replicator.repository import chunk_key
from replicator.restore.s3 import DIGEST_META, PART_SIZE
from tests.conftest import cli, make_target_spec
from tests.daemon_helpers import latest_manifest
from tests.helpers import local_setup, make_checkpoint, tree_digest


@pytest.mark.parametrize("kind", ["rclone", "moto"])
def test_restore_into_a_bucket_as_plain_objects(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    primary, target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 1, hidden=64)
    # Larger than a part plus the largest chunk (16 MiB): some chunk starts after part 1.
    (primary / "step-000001" / "optimizer.bin").write_bytes(os.urandom(PART_SIZE + (17 << 20)))
    assert cli("sync", "-c", str(cfg)).returncode == 0
    dest = make_target_spec(request, kind, tmp_path, "dest")
    assert dest.server is not None and dest.bucket is not None
    url = f"s3://{dest.bucket}/restored/run-7"
    args = ["restore", "--repo", str(target), "-s", "d", url, "--dest-endpoint-url", dest.server.endpoint]

    res = cli(*args, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    expected = {p: d for p, (d, _, _) in tree_digest(primary).items()}
    assert out["files"] == len(expected) == 5 and out["bytes_per_second"] > 0
    s3 = dest.server.client()
    listed = s3.list_objects_v2(Bucket=dest.bucket, Prefix="restored/run-7/")["Contents"]
    assert sorted(o["Key"].removeprefix("restored/run-7/") for o in listed) == sorted(expected)
    for path, digest in expected.items():
        obj = s3.get_object(Bucket=dest.bucket, Key=f"restored/run-7/{path}")
        assert hashlib.sha256(obj["Body"].read()).hexdigest() == digest, path
        meta = {k.lower(): v for k, v in obj["Metadata"].items()}  # rclone capitalizes the names
        assert len(meta[DIGEST_META]) == 32

    again = json.loads(cli(*args, "--json").stdout)
    assert again["files"] == 0 and again["skipped_existing"] == 5  # already correct: not sent again
    s3.put_object(Bucket=dest.bucket, Key="restored/run-7/step-000001/trainer_state.json", Body=b"{}")
    fixed = json.loads(cli(*args, "--json").stdout)
    assert fixed["files"] == 1 and fixed["skipped_existing"] == 4  # only the object someone replaced

    # A chunk past the first part of the big file is corrupt: part 1 is already uploaded when
    # that is found, and the upload is aborted; no object appears.
    manifest = latest_manifest({"name": "t", "url": str(target)}, "d")
    assert manifest is not None
    (big,) = [f for f in manifest.files if f.path.endswith("optimizer.bin")]
    starts = itertools.accumulate((n for _, n in big.chunks), initial=0)
    late = next(cid for (cid, _), start in zip(big.chunks, starts, strict=False) if start >= PART_SIZE)
    chunk = target / chunk_key(late)
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 1]))
    broken = cli(*[a if a != url else f"s3://{dest.bucket}/broken" for a in args])
    assert broken.returncode == 1 and f"FAILED {big.path}" in broken.stderr
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=dest.bucket, Prefix="broken/").get("Contents", [])]
    assert len(keys) == 4 and f"broken/{big.path}" not in keys
    if kind == "moto":  # rclone serve s3 does not list multipart uploads
        assert not s3.list_multipart_uploads(Bucket=dest.bucket).get("Uploads")


def test_restore_at_time_picks_the_newest_snapshot_at_or_before_it(tmp_path: Path) -> None:
    primary, target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 1, hidden=32)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    make_checkpoint(primary, 2, hidden=32)
    assert cli("sync", "-c", str(cfg)).returncode == 0
    first, second = json.loads(cli("snapshots", "--repo", str(target), "--json").stdout)

    def restore_at(at: str, dest: str, *extra: str) -> tuple[int, str, list[str]]:
        res = cli("restore", "--repo", str(target), "-s", "d", "--at", at, str(tmp_path / dest), *extra)
        top = sorted(p.name for p in (tmp_path / dest).iterdir()) if (tmp_path / dest).exists() else []
        return res.returncode, res.stdout + res.stderr, top

    code, out, top = restore_at(first["created"], "at-first")
    assert code == 0 and top == ["step-000001"] and first["snapshot"] in out
    assert "/s)" in out  # throughput is reported
    code, out, top = restore_at(second["created"].replace("Z", "+00:00"), "at-second")
    assert code == 0 and top == ["step-000001", "step-000002"]
    assert restore_at("0s", "now")[2] == ["step-000001", "step-000002"]  # a duration ago: now

    code, out, top = restore_at("2001-01-01T00:00", "too-early")
    assert code == 1 and "no snapshot at or before 2001-01-01T00:00:00Z" in out and top == []
    assert restore_at("yesterday-ish", "bad")[0] == 2
    code, out, _ = restore_at("1h", "both", "--snapshot", "latest")
    assert code == 2 and "either --snapshot or --at" in out
