"""Restore is an attack surface: hand-crafted manifests and planted symlinks never get a byte
written outside DEST, whether through `replicator restore`, the drill or the reference reader."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import zstandard

from replicator.repository import Repository, ref_key, snapshot_key
from replicator.targets import PosixTarget
from tests.conftest import cli
from tests.helpers import run_reference_reader
from tests.test_format import new_repo

PAYLOAD = b"attacker-controlled bytes\n"
TOOLS = ["restore", "drill", "reference"]


def publish_raw(
    repo_dir: Path, files: list[dict[str, Any]], ref: str | None = None, version: int = 1
) -> None:
    """Store a hand-crafted manifest of source ``src`` with a valid id, as an attacker with
    write access to the target could, and point the ref at it (or at ``ref``)."""

    async def go() -> None:
        target = PosixTarget("t", repo_dir)
        repo = await Repository.open(target)
        cid = repo.hash.digest(PAYLOAD).hex()
        await repo.put_chunk(cid, b"\x00" + PAYLOAD)
        created = datetime.now(UTC)
        doc = {
            "format": "replicator-snapshot",
            "version": version,
            "source": "src",
            "kind": "dataset",
            "created": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "files": [
                {
                    "mode": 0o644,
                    "mtime_ns": 1_700_000_000_000_000_000,
                    "size": len(PAYLOAD),
                    "digest": cid,
                    "chunks": [[cid, len(PAYLOAD)]],
                    **f,
                }
                for f in files
            ],
        }
        stored = zstandard.ZstdCompressor().compress(json.dumps(doc).encode())
        sid = f"{created:%Y%m%dT%H%M%S.%fZ}-{repo.hash.digest(stored).hex()}"
        await target.put(snapshot_key("src", sid), stored)
        await target.put(ref_key("src"), json.dumps({"snapshot": ref or sid}).encode())

    asyncio.run(go())


def tree(root: Path, skip: Path) -> dict[str, str]:
    """Every entry below ``root`` except ``skip``: what it is and what it holds."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in [*dirnames, *filenames]:
            p = here / name
            if p.is_symlink():
                out[str(p)] = f"-> {os.readlink(p)}"
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


def run(tool: str, repo_dir: Path, dest: Path, cwd: Path) -> tuple[int, str, Path]:
    """Restore source ``src`` with ``tool``: (exit code, stderr, where the files land)."""
    if tool == "reference":
        res = run_reference_reader(repo_dir, "src", "latest", dest, cwd=cwd)
        return res.returncode, res.stderr, dest
    if tool == "drill":
        res = cli("verify", "--repo", str(repo_dir), "--restore-drill", "--scratch", str(dest), "--json")
        return res.returncode, res.stderr + res.stdout, dest / "repo" / "src"
    res = cli("restore", "--repo", str(repo_dir), "--source", "src", str(dest))
    return res.returncode, res.stderr, dest


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(repository, DEST, a directory outside DEST holding files an attacker wants to reach)."""
    repo_dir = tmp_path / "repo"
    new_repo(repo_dir)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious\n")
    (outside / "hard-victim.txt").write_text("also precious\n")
    return repo_dir, tmp_path / "dest", outside


def b64_entry(raw: bytes) -> dict[str, str]:
    return {"path": raw.decode("utf-8", "replace"), "path_b64": base64.b64encode(raw).decode()}


def malicious_paths(outside: Path) -> list[dict[str, str]]:
    plain = [
        "../outside/escape.txt",
        "a/../../outside/escape.txt",
        f"{outside}/absolute.txt",
        "a/\x00/escape.txt",
        "./../outside/escape.txt",
        "a//escape.txt",
        "a/" + "x" * 256,
    ]
    in_base64 = [  # the bytes are the truth, and are checked as strictly
        b"../outside/\xff",
        b"a/../../outside/\xff",
        os.fsencode(outside) + b"/\xff",
        b"a/\x00/\xff",
        b"\xff/./../escape",
    ]
    return [
        *({"path": p} for p in plain),
        *map(b64_entry, in_base64),
        {"path": "innocent\ufffd", "path_b64": base64.b64encode(b"../outside/escape.txt").decode()},
        {"path": "\ufffd", "path_b64": base64.b64encode(b"\xff").decode() + "=="},
    ]


@pytest.mark.parametrize("tool", TOOLS)
def test_malicious_manifest_paths_are_refused_and_nothing_is_written(
    tmp_path: Path, site: tuple[Path, Path, Path], tool: str
) -> None:
    repo_dir, dest, outside = site
    for i, bad in enumerate(malicious_paths(outside)):
        publish_raw(repo_dir, [{"path": "innocent.txt"}, bad], version=3)
        before = tree(tmp_path, skip=dest)
        code, err, _ = run(tool, repo_dir, dest, tmp_path)
        assert code == 1, f"{bad!r}: {err}"
        assert tree(tmp_path, skip=dest) == before, f"{bad!r} wrote outside DEST"
        assert not dest.exists() or not [p for p in dest.rglob("*") if p.is_file()], f"{bad!r}: {i}"
        if tool != "drill":
            assert err.strip().count("\n") == 0, err  # one line, naming the problem
    # A ref that tries to walk out of the repository is refused the same way.
    publish_raw(repo_dir, [{"path": "innocent.txt"}], ref="../../outside/victim")
    code, err, _ = run(tool, repo_dir, dest, tmp_path)
    assert code == 1 and not (dest.exists() and any(dest.rglob("*.txt")))


@pytest.mark.parametrize("tool", TOOLS)
def test_symlinks_and_hard_links_planted_in_dest_are_never_written_through(
    tmp_path: Path, site: tuple[Path, Path, Path], tool: str
) -> None:
    repo_dir, dest, outside = site
    publish_raw(
        repo_dir,
        [{"path": p} for p in ("fine/ok.txt", "hard.txt", "link/escape.txt", "victim.txt", "x/y/z.txt")],
    )
    root = dest / "repo" / "src" if tool == "drill" else dest
    root.mkdir(parents=True)
    (root / "link").symlink_to(outside, target_is_directory=True)  # a directory symlink
    (root / "victim.txt").symlink_to(outside / "victim.txt")  # a file symlink
    os.link(outside / "hard-victim.txt", root / "hard.txt")  # a hard link to a file outside
    (root / "x").symlink_to(outside)  # a symlink two levels above the file
    before = tree(tmp_path, skip=dest)

    code, err, _ = run(tool, repo_dir, dest, tmp_path)
    assert code == 1, err
    assert tree(tmp_path, skip=dest) == before, "something was written outside DEST"
    assert (outside / "victim.txt").read_text() == "precious\n"
    assert (outside / "hard-victim.txt").read_text() == "also precious\n"
    assert "link/escape.txt" in err and "x/y/z.txt" in err
    # Names that were symlinks or links are replaced by regular files; the rest restores.
    for name in ("fine/ok.txt", "victim.txt", "hard.txt"):
        p = root / name
        assert not p.is_symlink() and p.read_bytes() == PAYLOAD, name
    assert (root / "link").is_symlink() and not (outside / "escape.txt").exists()
    assert not list(root.rglob(".*restore-*")) and not list(root.rglob(".*.ref-*")), "temp files left"


@pytest.mark.parametrize("tool", TOOLS)
def test_names_posix_allows_are_restored_inside_dest_as_literal_names(
    tmp_path: Path, site: tuple[Path, Path, Path], tool: str
) -> None:
    """Newlines, backslashes, leading dashes, bytes that are not UTF-8 and names that only
    look like traversals are ordinary names on POSIX: each lands inside DEST, byte for byte,
    and nothing is written anywhere else."""
    repo_dir, dest, _outside = site
    names = [
        b"a\\..\\..\\outside\\escape.txt",  # a traversal on Windows, one name here
        b"a/\n/escape.txt",
        b"..\n",
        b"...",
        b" ..",
        b"-rf",
        b"tab\t/\r",
        b"\xff\xfe.bin",
        b"d\xe9j\xe0/..\xff",
        b"x" * 255,
    ]
    publish_raw(
        repo_dir,
        [b64_entry(n) if not _utf8(n) else {"path": n.decode()} for n in names],
        version=3,
    )
    before = tree(tmp_path, skip=dest)
    code, err, root = run(tool, repo_dir, dest, tmp_path)
    assert code == 0, err
    assert tree(tmp_path, skip=dest) == before, "something was written outside DEST"
    base = os.fsencode(root)
    found = sorted(os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs)
    assert found == sorted(names)
    for n in names:
        with open(base + b"/" + n, "rb") as f:
            assert f.read() == PAYLOAD


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
