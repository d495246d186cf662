"""Looking inside snapshots before restoring (issue 22): ``ls`` and ``diff`` read manifests
only; ``restore --dry-run`` writes nothing; ``restore --overwrite`` decides what happens to
files a non-empty destination already holds. In-process through typer's CliRunner, like
tests/test_cli.py; one test restores into a bucket served by ``rclone serve s3``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from replicator.cli import app
from replicator.format.manifest import FileEntry
from replicator.hashing import HashSpec
from replicator.restore.local import ExistsError, LocalDestination
from tests.conftest import make_target_spec
from tests.helpers import local_setup, make_checkpoint, tree_digest

pytestmark = pytest.mark.usefixtures("restore_logging")

ODD = os.fsdecode(b"odd\nna\xffme.bin")
"""A name with a newline and a byte that is not UTF-8."""


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={"REPLICATOR_CONFIG": None})


def ok(*args: str | Path) -> Result:
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return res


def snapshot_ids(target: Path) -> list[str]:
    return [row["snapshot"] for row in json.loads(ok("snapshots", "--repo", target, "--json").stdout)]


@pytest.fixture
def two_snapshots(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """(primary, target, [first, second]) of checkpoint source ``ckpt``: the first holds set
    step-000001 (with an odd name in it); the second adds set step-000002 and changes
    step-000001/trainer_state.json."""
    primary, target, cfg = local_setup(tmp_path, checkpoint=True)
    make_checkpoint(primary, 1, hidden=16)
    (primary / "step-000001" / ODD).write_bytes(b"odd bytes")
    ok("sync", "-q", "-c", cfg)
    make_checkpoint(primary, 2, hidden=16)
    (primary / "step-000001" / "trainer_state.json").write_text('{"step": 1, "epoch": 3}')
    ok("sync", "-q", "-c", cfg)
    ids = snapshot_ids(target)
    assert len(ids) == 2
    return primary, target, ids


def test_ls_lists_a_snapshot_with_globs_and_odd_names(two_snapshots: tuple[Path, Path, list[str]]) -> None:
    primary, target, (first, second) = two_snapshots
    doc = json.loads(ok("ls", "--repo", target, "-s", "ckpt", "--json").stdout)
    assert (doc["snapshot"], doc["kind"], doc["sets"]) == (
        second,
        "checkpoint",
        ["step-000001", "step-000002"],
    )
    on_disk = tree_digest(primary)
    by_path = {f["path"]: f for f in doc["files"]}
    assert len(by_path) == len(on_disk) == doc["total_files"] == 9
    state = by_path["step-000001/trainer_state.json"]
    st = (primary / "step-000001/trainer_state.json").stat()
    assert (state["size"], state["mode"], state["mtime_ns"]) == (
        st.st_size,
        st.st_mode & 0o777,
        st.st_mtime_ns,
    )
    assert state["set"] == "step-000001" and by_path["step-000002/COMPLETE"]["set"] == "step-000002"

    # A glob, an older snapshot by a prefix of its id: the odd name carries its exact bytes.
    doc = json.loads(
        ok("ls", "--repo", target, "-s", "ckpt", "--snapshot", first[:20], "*.bin", "--json").stdout
    )
    assert doc["snapshot"] == first
    [odd] = doc["files"]
    assert base64.b64decode(odd["path_b64"]) == b"step-000001/odd\nna\xffme.bin"
    assert "\n" in odd["path"] and odd["size"] == len(b"odd bytes")

    text = ok("ls", "--repo", target, "-s", "ckpt", "step-000001").stdout.splitlines()
    assert text[0].startswith(f"ckpt/{second} (checkpoint, ") and ": 5 files, " in text[0]
    assert text[1].startswith("set step-000001: 5 files")
    assert text[2].startswith("  -rw-r--r--         0 B  ") and text[2].endswith("  step-000001/COMPLETE")
    assert any(line.endswith("  $'step-000001/odd\\nna\\xffme.bin'") for line in text)
    assert not any("step-000002" in line for line in text)

    bad = invoke("ls", "--repo", target, "-s", "ckpt", "--snapshot", "nosuch")
    assert bad.exit_code == 1 and "no snapshot of source 'ckpt' match 'nosuch'" in bad.stderr


def test_diff_groups_changes_per_checkpoint_set(two_snapshots: tuple[Path, Path, list[str]]) -> None:
    primary, target, (first, second) = two_snapshots
    doc = json.loads(ok("diff", "--repo", target, "-s", "ckpt", first[:20], "latest", "--json").stdout)
    assert (doc["old"], doc["new"]) == (first, second)
    added = {c["path"] for c in doc["changes"] if c["change"] == "added"}
    assert added == {str(p.relative_to(primary)) for p in (primary / "step-000002").iterdir()}
    [changed] = [c for c in doc["changes"] if c["change"] == "changed"]
    assert changed["path"] == "step-000001/trainer_state.json" and changed["set"] == "step-000001"
    assert (changed["old_size"], changed["size"]) == (len('{"step": 1}'), len('{"step": 1, "epoch": 3}'))
    sets = {s["name"]: s for s in doc["sets"]}
    assert set(sets) == {"step-000001", "step-000002"}
    assert sets["step-000002"]["status"] == "added" and len(sets["step-000002"]["changes"]) == 4
    assert sets["step-000001"]["status"] == "changed" and len(sets["step-000001"]["changes"]) == 1
    new_bytes = sum(p.stat().st_size for p in (primary / "step-000002").iterdir())
    totals = doc["totals"]
    assert totals["added"] == {"files": 4, "bytes": new_bytes}
    assert totals["removed"] == {"files": 0, "bytes": 0}
    assert totals["changed"] == {"files": 1, "bytes": changed["size"]}
    assert totals["unchanged"]["files"] == 4  # the shards, the marker and the odd file

    text = ok("diff", "--repo", target, "-s", "ckpt", "latest", first).stdout  # backwards
    assert "set step-000002 (removed): 4 files" in text
    assert "  M step-000001/trainer_state.json  (23 B -> 11 B)" in text
    assert "  - step-000002/COMPLETE  (0 B)" in text
    assert text.splitlines()[-1].startswith("totals: 0 added (0 B), 4 removed (")


def conflicted(target: Path, dest: Path) -> dict[str, tuple[str, int, int]]:
    """Restore the latest ``d`` into ``dest``, then make one file conflict (other bytes) and
    add one the snapshot does not have; the rest stay identical. Returns the tree."""
    ok("restore", "--repo", target, "-s", "d", "--no-sync", dest)
    (dest / "step-000001" / "trainer_state.json").write_text("edited by hand")
    (dest / "notes.txt").write_text("mine")
    return tree_digest(dest)


def test_restore_dry_run_writes_nothing(tmp_path: Path) -> None:
    primary, target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 1, hidden=16)
    ok("sync", "-q", "-c", cfg)

    fresh = tmp_path / "fresh"
    doc = json.loads(ok("restore", "--repo", target, "-s", "d", "--dry-run", "--json", fresh).stdout)
    assert not fresh.exists()  # not even the directory
    assert doc["dry_run"] and doc["files"] == 4 and doc["replaced"] == [] and doc["kept"] == []
    assert sorted(p["path"] for p in doc["created"]) == sorted(tree_digest(primary))

    dest = tmp_path / "dest"
    before = conflicted(target, dest)
    for mode in ("if-changed", "always", "never"):
        res = ok("restore", "--repo", target, "-s", "d", "-n", "--overwrite", mode, dest)
        assert tree_digest(dest) == before, mode  # bytes, modes and mtimes untouched
        assert res.stdout.splitlines()[-1].endswith("; nothing was written"), res.stdout
    assert not [p for p in dest.rglob(".*") if p.name.startswith(".")]  # no temporary left

    a_file = dest / "notes.txt"  # DEST is a file: one line, no traceback, with and without -n
    for extra in (["-n"], []):
        res = invoke("restore", "--repo", target, "-s", "d", *extra, a_file)
        assert res.exit_code == 1 and res.stderr.startswith("replicator: error: open destination")
        assert res.stderr.count("\n") == 1 and a_file.read_text() == "mine"


@pytest.mark.parametrize(
    ("mode", "replaced", "kept", "up_to_date"),
    [
        ("if-changed", ["step-000001/trainer_state.json"], [], 3),
        (
            "always",
            sorted(
                f"step-000001/{n}"
                for n in [
                    "COMPLETE",
                    "trainer_state.json",
                    *[f"model-0000{r}-of-00002.safetensors" for r in (0, 1)],
                ]
            ),
            [],
            0,
        ),
        ("never", [], ["step-000001/trainer_state.json"], 3),
    ],
)
def test_restore_overwrite_modes(
    tmp_path: Path, mode: str, replaced: list[str], kept: list[str], up_to_date: int
) -> None:
    primary, target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 1, hidden=16)
    ok("sync", "-q", "-c", cfg)
    dest = tmp_path / "dest"
    before = conflicted(target, dest)
    expected = tree_digest(primary)

    plan = json.loads(
        ok("restore", "--repo", target, "-s", "d", "-n", "--overwrite", mode, "--json", dest).stdout
    )
    doc = json.loads(ok("restore", "--repo", target, "-s", "d", "--overwrite", mode, "--json", dest).stdout)
    for d in (plan, doc):  # the dry run said what the restore then did
        assert sorted(p["path"] for p in d["replaced"]) == replaced
        assert [p["path"] for p in d["kept"]] == kept
        assert (d["files"], d["skipped_existing"]) == (len(replaced), up_to_date)
    after = tree_digest(dest)
    assert after["notes.txt"] == before["notes.txt"]  # never touched: not in the snapshot
    conflict = "step-000001/trainer_state.json"
    if mode == "never":
        assert after[conflict] == before[conflict]
    else:
        assert after[conflict] == expected[conflict]
    assert {k: v for k, v in after.items() if k != "notes.txt"} == (
        expected if mode != "never" else {**expected, conflict: before[conflict]}
    )

    text = ok("restore", "--repo", target, "-s", "d", "--overwrite", "never", dest).stdout
    if mode == "never":
        assert text.startswith(f"  kept {conflict}\nrestored 0 files")
        assert text.endswith("(3 already up to date, 1 existing kept, not restored)\n")
    else:
        assert text.startswith("restored 0 files") and text.endswith("(4 already up to date)\n")


def test_never_does_not_replace_a_file_that_appears_during_the_restore(tmp_path: Path) -> None:
    """``--overwrite never`` commits by hard link, which fails if the name exists by then: a
    file written meanwhile (by a job already running) is not replaced."""
    data = b"restored bytes"
    hs = HashSpec("xxh3-128")
    dest_dir = tmp_path / "dest"

    async def go() -> None:
        dest = LocalDestination(dest_dir, hs)
        entry = FileEntry(
            path="a/b.bin",
            size=len(data),
            mode=0o644,
            mtime_ns=0,
            digest=hs.digest(data).hex(),
            chunks=((hs.digest(data).hex(), len(data)),),
        )
        assert await dest.examine(entry) == "absent"
        writer = await dest.create(entry, replace=False)
        await writer.write(data)
        (dest_dir / "a" / "b.bin").write_bytes(b"the job's own")
        with pytest.raises(ExistsError):
            await writer.commit()
        await writer.discard()
        assert await dest.examine(entry) == "different"
        await dest.close()

    asyncio.run(go())
    assert (dest_dir / "a" / "b.bin").read_bytes() == b"the job's own"
    assert [p.name for p in (dest_dir / "a").iterdir()] == ["b.bin"]  # the temporary is gone


def test_restore_into_a_bucket_dry_run_and_never(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    primary, target, cfg = local_setup(tmp_path)
    make_checkpoint(primary, 1, hidden=16)
    ok("sync", "-q", "-c", cfg)
    dest = make_target_spec(request, "rclone", tmp_path, "dest")
    assert dest.server is not None and dest.bucket is not None
    url = f"s3://{dest.bucket}/restored"
    args: list[str | Path] = [
        "restore",
        "--repo",
        target,
        "-s",
        "d",
        url,
        "--dest-endpoint-url",
        dest.server.endpoint,
        "--json",
    ]
    s3 = dest.server.client()

    plan = json.loads(ok(*args, "--dry-run").stdout)
    assert plan["dry_run"] and len(plan["created"]) == plan["files"] == 4
    assert not s3.list_objects_v2(Bucket=dest.bucket, Prefix="restored/").get("Contents")

    ok(*args)
    conflict = "restored/step-000001/trainer_state.json"
    s3.put_object(Bucket=dest.bucket, Key=conflict, Body=b"edited")
    s3.put_object(Bucket=dest.bucket, Key="restored/notes.txt", Body=b"mine")
    for extra in (["--dry-run"], []):
        doc = json.loads(ok(*args, "--overwrite", "never", *extra).stdout)
        assert [p["path"] for p in doc["kept"]] == ["step-000001/trainer_state.json"]
        assert (doc["files"], doc["skipped_existing"]) == (0, 3)
        assert s3.get_object(Bucket=dest.bucket, Key=conflict)["Body"].read() == b"edited"
    doc = json.loads(ok(*args, "--overwrite", "if-changed").stdout)
    assert [p["path"] for p in doc["replaced"]] == ["step-000001/trainer_state.json"]
    body = s3.get_object(Bucket=dest.bucket, Key=conflict)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == tree_digest(primary)["step-000001/trainer_state.json"][0]
    assert s3.get_object(Bucket=dest.bucket, Key="restored/notes.txt")["Body"].read() == b"mine"
