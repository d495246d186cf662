"""Any name the filesystem allows (issue 17): names that are not UTF-8, or hold newlines, tabs,
backslashes or a leading dash, 255-byte names and ~4,000-byte paths are replicated and
restored byte-identically, from POSIX and S3 sources, by `replicator restore` and by the
reference reader; what a destination cannot hold is named, never dropped in silence."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest

from replicator.paths import display_path
from replicator.read.pipeline import FileRecord
from replicator.state import SCHEMA_VERSION, StateStore
from tests.conftest import TargetSpec, cli, make_target_spec, write_config
from tests.daemon_helpers import DaemonProcess, latest_manifest, wait_until
from tests.helpers import config_dict, run_reference_reader
from tests.test_state import OLD_SCHEMAS

DEEP_SEGMENT = 240
"""16 directories of 240 bytes and a 100-byte name: a 3,956-byte relative path, which still
fits PATH_MAX (4,096) below a pytest temporary directory."""


def odd_names() -> dict[bytes, bytes]:
    """Relative path (bytes) -> content, covering every kind of name the issue lists."""
    deep = b"/".join(bytes([ord("a") + i]) * DEEP_SEGMENT for i in range(16)) + b"/" + b"f" * 100
    names = [
        b"\xff\xfe.bin",  # not UTF-8 at all
        b"new\nline.txt",
        b"dir\nwith newline/inner.bin",  # a directory whose name has a newline
        b"tab\there.txt",
        b"back\\slash.txt",
        b"a\\..\\..\\outside.txt",  # one segment on POSIX, a traversal on Windows
        b"-rf",
        b"--help",
        b"bell\x07and\rcarriage",
        b"caf\xc3\xa9/d\xe9j\xe0.txt",  # UTF-8 directory, Latin-1 file name
        b"n" * 251 + b".bin",  # 255 bytes
        "é".encode() * 100 + b"\xff" * 55,  # 255 bytes, 155 characters
        b"space and 'quote\".txt",
        b"plain/ok.txt",
        deep,
    ]
    assert len(deep) > 3900 and max(len(s) for n in names for s in n.split(b"/")) == 255
    return {n: b"content of " + n for n in names}


def make_tree(root: Path, files: dict[bytes, bytes]) -> None:
    base = os.fsencode(root)
    for rel, data in files.items():
        full = base + b"/" + rel
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)


def byte_tree(root: Path) -> dict[bytes, bytes]:
    """Every regular file below ``root`` by its exact relative name (bytes), with its bytes."""
    base = os.fsencode(root)
    out = {}
    for dirpath, _, filenames in os.walk(base):
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, base)] = f.read()
    return out


def assert_same_tree(restored: Path, original: Path) -> None:
    assert byte_tree(restored) == byte_tree(original)
    diff = subprocess.run(["diff", "-r", str(original), str(restored)], capture_output=True)
    assert diff.returncode == 0, diff.stdout + diff.stderr


def repo_args(spec: TargetSpec) -> list[str]:
    args = ["--repo", spec.config["url"]]
    if spec.server is not None:
        args += ["--endpoint-url", spec.server.endpoint]
    return args


def test_every_posix_name_round_trips_through_sync_and_restore(
    tmp_path: Path, target_spec: TargetSpec
) -> None:
    primary = tmp_path / "primary"
    files = odd_names()
    make_tree(primary, files)
    cfg = write_config(
        tmp_path / "r.yaml", config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [target_spec.config])
    )
    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)["sources"][0]
    assert out["skipped"] == {} and out["files"] == len(files)

    dest = tmp_path / "restored"
    res = cli("restore", *repo_args(target_spec), "-s", "d", str(dest))
    assert res.returncode == 0, res.stderr
    assert_same_tree(dest, primary)
    again = cli("restore", *repo_args(target_spec), "-s", "d", str(dest))
    assert again.returncode == 0 and f"({len(files)} already up to date)" in again.stdout

    # An unchanged source is recognised from the state store (paths stored as exact bytes).
    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)["sources"][0]
    assert out["files_read"] == 0 and out["targets"][0]["status"] == "unchanged"
    assert cli("verify", *repo_args(target_spec), "--read-data").returncode == 0

    if target_spec.path is not None:  # the reference reader reads a repository directory
        ref = run_reference_reader(target_spec.path, "d", "latest", tmp_path / "ref", cwd=tmp_path)
        assert ref.returncode == 0, ref.stderr
        assert_same_tree(tmp_path / "ref", primary)


def test_checkpoint_sets_with_odd_names_and_the_cli_output_stays_one_line_per_name(tmp_path: Path) -> None:
    primary, target = tmp_path / "primary", tmp_path / "target"
    target.mkdir()
    files = {
        b"step\n1/model.bin": b"weights",
        b"step\n1/COMPLETE": b"",
        b"\xffstep/model.bin": b"more weights",
        b"\xffstep/COMPLETE": b"",
        b"pending\t2/model.bin": b"no marker yet",
    }
    make_tree(primary, files)
    source = {"name": "c", "url": str(primary), "kind": "checkpoint", "complete_when": {"marker": "COMPLETE"}}
    cfg = write_config(
        tmp_path / "r.yaml", config_dict(tmp_path, [source], [{"name": "t", "url": str(target)}])
    )
    res = cli("sync", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "  held back $'pending\\t2': no COMPLETE marker" in res.stdout.splitlines()

    snaps = cli("snapshots", "--repo", str(target))
    assert snaps.returncode == 0, snaps.stderr
    (line,) = snaps.stdout.splitlines()
    assert line.endswith("sets: $'step\\n1', $'\\xffstep'"), line
    rows = json.loads(cli("snapshots", "--repo", str(target), "--json").stdout)
    assert rows[0]["sets"] == ["step\n1", os.fsdecode(b"\xffstep")]

    dest = tmp_path / "restored"
    assert cli("restore", "--repo", str(target), "-s", "c", str(dest)).returncode == 0
    assert byte_tree(dest) == {k: v for k, v in files.items() if not k.startswith(b"pending")}
    ref = run_reference_reader(target, "c", "latest", tmp_path / "ref", cwd=tmp_path)
    assert ref.returncode == 0 and byte_tree(tmp_path / "ref") == byte_tree(dest)

    drill = cli("verify", "--repo", str(target), "--restore-drill")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "newest restorable checkpoint set: $'" in drill.stdout


def test_s3_source_keys_with_control_characters_round_trip(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """moto's router cannot take a key with a newline (werkzeug's pattern stops at it), and
    `rclone serve s3` lists control characters as lookalikes: newlines in keys are covered by
    test_s3_source_takes_a_newline_in_a_key, below, without a server."""
    src = make_target_spec(request, "moto", tmp_path, "src")
    assert src.server is not None and src.bucket is not None
    s3 = src.server.client()
    good = {
        "tab\there/x.bin": b"1",
        "carriage\rreturn": b"2",
        "back\\slash": b"3",
        "a\\..\\..\\outside": b"4",
        "-rf": b"5",
        "\u00fcn\u00efc\u00f6d\u00e9/ok": b"6",
        "x" * 255: b"7",
    }
    for key, body in good.items():
        s3.put_object(Bucket=src.bucket, Key=f"data/{key}", Body=body)
    target = tmp_path / "target"
    target.mkdir()
    source = {"name": "s", "url": f"s3://{src.bucket}/data/", "endpoint_url": src.server.endpoint}
    cfg = write_config(
        tmp_path / "r.yaml", config_dict(tmp_path, [source], [{"name": "t", "url": str(target)}])
    )
    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["sources"][0]["files"] == len(good)
    dest = tmp_path / "restored"
    assert cli("restore", "--repo", str(target), "-s", "s", str(dest)).returncode == 0
    assert byte_tree(dest) == {k.encode(): v for k, v in good.items()}

    # Keys no relative path can hold are named in `skipped`, with a warning; the rest is still
    # published, and the exit code says the snapshot is incomplete (4).
    bad = ["a//b", "../escape", "y" * 256, "dot/./x"]
    for key in bad:
        s3.put_object(Bucket=src.bucket, Key=f"data/{key}", Body=b"?")
    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 4, res.stderr
    out = json.loads(res.stdout)["sources"][0]
    assert sorted(out["skipped"]) == sorted(bad) and out["files"] == len(good)
    assert out["targets"][0]["status"] in ("published", "unchanged")
    assert res.stderr.count("source.skipped") == len(bad)
    text = cli("sync", "-c", str(cfg))
    assert "  unreadable a//b: path 'a//b' has an empty, '.' or '..' segment" in text.stdout.splitlines()


def test_s3_source_takes_a_newline_in_a_key() -> None:
    from datetime import UTC, datetime

    from replicator.config import source_config
    from replicator.sources import open_source
    from replicator.sources.base import Listing

    source = open_source(source_config({"name": "s", "url": "s3://bucket/data/"}))
    listed = {"ETag": '"e"', "LastModified": datetime.now(UTC), "Size": 1}
    listing = Listing()
    for key in ("data/new\nline", "data/dir\nname/inner", "data/\r\n\t\\"):
        found = source._describe({**listed, "Key": key}, listing)  # type: ignore[attr-defined]
        assert found is not None and found.path == key.removeprefix("data/")
    assert listing.unreadable == {} and listing.ignored == {}
    assert source._describe({**listed, "Key": "data/a/../b"}, listing) is None  # type: ignore[attr-defined]
    assert list(listing.unreadable) == ["a/../b"]


def test_restore_into_a_bucket_names_what_cannot_be_a_key(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    primary, target = tmp_path / "primary", tmp_path / "target"
    target.mkdir()
    long_key = b"/".join([b"k" * 250] * 5)  # 1,254 bytes: a valid path, too long for a key
    files = {b"\xff\xfe.bin": b"a", b"ok/tab\tname": b"b", b"plain.txt": b"c", long_key: b"d"}
    make_tree(primary, files)
    cfg = write_config(
        tmp_path / "r.yaml",
        config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [{"name": "t", "url": str(target)}]),
    )
    assert cli("sync", "-c", str(cfg)).returncode == 0
    dest = make_target_spec(request, "moto", tmp_path, "dest")
    assert dest.server is not None and dest.bucket is not None
    res = cli(
        "restore", "--repo", str(target), "-s", "d", f"s3://{dest.bucket}/r",
        "--dest-endpoint-url", dest.server.endpoint,
    )  # fmt: skip
    assert res.returncode == 1
    failed = sorted(line for line in res.stderr.splitlines() if line.startswith("  FAILED "))
    assert len(failed) == 2, res.stderr
    assert failed[0].startswith("  FAILED $'\\xff\\xfe.bin': not valid UTF-8"), failed
    assert failed[1].startswith(f"  FAILED {os.fsdecode(long_key)}: a key of 1256 bytes"), failed
    assert "restored 2 files" in res.stdout
    listed = dest.server.client().list_objects_v2(Bucket=dest.bucket, Prefix="r/")["Contents"]
    assert sorted(o["Key"] for o in listed) == ["r/ok/tab\tname", "r/plain.txt"]


def test_a_path_too_long_for_any_manifest_is_named_in_skipped(tmp_path: Path) -> None:
    """17 directories of 250 bytes: deeper than 4,096 bytes, which no manifest holds and
    PATH_MAX cannot open. Built through directory descriptors, reported by name, exit 4
    (published, incomplete)."""
    primary, target = tmp_path / "primary", tmp_path / "target"
    target.mkdir()
    make_tree(primary, {b"ok.txt": b"fine"})
    fd = os.open(primary, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(17):
        segment = bytes([ord("a") + i]) * 250
        os.mkdir(segment, dir_fd=fd)
        next_fd = os.open(segment, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = next_fd
    os.close(os.open("deep.bin", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    cfg = write_config(
        tmp_path / "r.yaml",
        config_dict(tmp_path, [{"name": "d", "url": str(primary)}], [{"name": "t", "url": str(target)}]),
    )
    res = cli("sync", "-c", str(cfg), "--json")
    assert res.returncode == 4, res.stderr
    out = json.loads(res.stdout)["sources"][0]
    (skipped,) = out["skipped"]  # the directory that cannot be listed, or the file itself
    assert skipped.startswith("a" * 250 + "/" + "b" * 250) and out["files"] == 1
    assert out["targets"][0]["status"] == "published"
    assert "source.unreadable_dir" in res.stderr or "source.skipped" in res.stderr


def test_daemon_replicates_names_that_are_not_utf8(tmp_path: Path) -> None:
    """watchfiles cannot report such a name (it fails to decode it): the daemon must neither
    crash nor miss it."""
    primary, target = tmp_path / "primary", tmp_path / "target"
    primary.mkdir()
    target.mkdir()
    source = {"name": "d", "url": str(primary), "debounce": "200ms"}
    tcfg = {"name": "t", "url": str(target)}
    cfg = write_config(tmp_path / "r.yaml", config_dict(tmp_path, [source], [tcfg]))
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    try:
        wait_until(daemon.ready, what="daemon ready")
        (primary / "first.txt").write_text("1")
        wait_until(partial(latest_manifest, tcfg, "d"), what="first snapshot")
        make_tree(primary, {b"\xff\xfe.bin": b"2", b"dir\nx/f\xe9": b"3"})
        time.sleep(0.2)
        (primary / "after.txt").write_text("4")  # events keep flowing after the odd names

        def published() -> bool:
            m = latest_manifest(tcfg, "d")
            return m is not None and len(m.files) == 4

        wait_until(published, timeout=60, what="snapshot with the odd names")
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    log = daemon.log_text()
    assert "daemon.task_crashed" not in log and "Traceback" not in log, log
    dest = tmp_path / "restored"
    assert cli("restore", "--repo", str(target), "-s", "d", str(dest)).returncode == 0
    assert_same_tree(dest, primary)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("plain/name.txt", "plain/name.txt"),
        ("with space", "with space"),
        ("-rf", "-rf"),
        ("new\nline", "$'new\\nline'"),
        ("tab\t", "$'tab\\t'"),
        ("back\\slash", "$'back\\\\slash'"),
        ("it's", "$'it\\'s'"),
        (os.fsdecode(b"\xff\xfe.bin"), "$'\\xff\\xfe.bin'"),
        ("caf\u00e9", "caf\u00e9"),
        ("line\u2028sep", "$'line\\u2028sep'"),
    ],
)
def test_names_are_displayed_on_one_line_without_ambiguity(name: str, shown: str) -> None:
    assert display_path(name) == shown


# -- the state store keeps exact names ------------------------------------------------------------

V4_SCHEMA = OLD_SCHEMAS[4]
"""A state store of schema version 4, the last whose paths were TEXT."""


def record(path: str, signature: str = "sig") -> FileRecord:
    return FileRecord(path, 1, 2, 0o644, signature, {"xxh3-128": "0" * 32}, {"xxh3-128": (("1" * 32, 1),)})


def test_the_state_store_keeps_names_as_their_exact_bytes(tmp_path: Path) -> None:
    names = [os.fsdecode(b"\xff\xfe.bin"), "new\nline", os.fsdecode(b"d\xe9j\xe0/f"), "plain"]
    state = StateStore.open(tmp_path)
    try:
        for n in names:
            state.files.put("s", record(n))
        state.commit()  # written, not only buffered
        assert set(state.files.get("s", [(n, "sig") for n in names])) == set(names)
        assert state.files.get("s", [(names[0], "other")]) == {}  # the signature still decides
        state.files.forget_except("s", {names[0]})
        assert state.files.count("s") == 1
        raw = state.db.execute("SELECT path FROM files").fetchall()
        assert raw == [(b"\xff\xfe.bin",)]
    finally:
        state.close()


def test_a_version_4_state_store_is_migrated_keeping_what_targets_hold(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "state.db")) as db, db:
        db.executescript(V4_SCHEMA)
        db.execute("INSERT INTO files VALUES ('s', 'old', 'sig', 1, 2, 420)")
        db.execute("INSERT INTO chunks VALUES ('repo', x'01', NULL, NULL, NULL, 1)")
        db.execute("INSERT INTO published VALUES ('repo', 's', 'snap', 'key', 1.0)")
        db.execute("PRAGMA user_version=4")
    state = StateStore.open(tmp_path)
    try:
        assert state.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert (
            sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []
        )  # migrated, not rebuilt
        assert state.files.count("s") == 0  # the file cache is rebuilt from the sources
        assert state.chunks("repo").has("01")  # what a target holds is still known
        assert state.published.get("repo", "s") == ("snap", "key")
        types = {row[1]: row[2] for row in state.db.execute("PRAGMA table_info(files)")}
        assert types["path"] == "BLOB"
        state.files.put("s", record(os.fsdecode(b"\xff")))
        state.commit()
        assert list(state.files.get("s", [(os.fsdecode(b"\xff"), "sig")])) == [os.fsdecode(b"\xff")]
    finally:
        state.close()


@pytest.mark.usefixtures("restore_logging")
def test_one_line_logs_and_errors_for_any_name() -> None:
    from replicator import log
    from replicator.errors import SourceError

    name = os.fsdecode(b"dir\nx/\xff\tname")
    for json_output in (True, False):
        stream = io.StringIO()
        log.configure("info", json_output=json_output, stream=stream)
        log.get_logger("t").warning("source.skipped", path=name, reason=f"read {name}")
        err = SourceError("cannot open", operation="read", key=name)
        log.get_logger("t").error("source.unreadable", error=str(err))
        lines = stream.getvalue().splitlines()
        assert len(lines) == 2, lines
        stream.getvalue().encode("utf-8")  # nothing a UTF-8 stream would refuse
        assert "$'dir\\nx/\\xff\\tname'" in lines[0].replace("\\\\", "\\")
    assert str(err) == "read $'dir\\nx/\\xff\\tname': cannot open"
