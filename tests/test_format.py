"""The repository format: config object, manifests as untrusted input, write order."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import zstandard

from replicator.config import ChunkingConfig, CompressionConfig
from replicator.errors import IntegrityError, RepositoryError, TargetError, UnsupportedFormatError
from replicator.manifest import Manifest, encode_manifest, format_time, now_utc, parse_manifest
from replicator.repository import CONFIG_KEY, Repository, ref_key
from replicator.targets import PosixTarget, TargetWrapper

ID = "0" * 32


def manifest_bytes(files: list[dict[str, Any]], **extra: Any) -> bytes:
    doc = {
        "format": "replicator-snapshot",
        "version": 1,  # what the first releases wrote: still read
        "source": "s",
        "kind": "dataset",
        "created": "2026-11-22T10:00:00.000000Z",
        "files": files,
        **extra,
    }
    return zstandard.ZstdCompressor().compress(json.dumps(doc).encode())


def entry(path: str, size: int = 3, chunks: list[list[Any]] | None = None) -> dict[str, Any]:
    return {
        "path": path,
        "size": size,
        "mode": 0o644,
        "mtime_ns": 1,
        "digest": ID,
        "chunks": chunks if chunks is not None else [[ID, size]],
    }


def test_valid_manifest_parses() -> None:
    m = parse_manifest(manifest_bytes([entry("a/b.bin"), entry("c", 0, [])]), where="x")
    assert [f.path for f in m.files] == ["a/b.bin", "c"]
    assert m.total_bytes == 3


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    m = parse_manifest(manifest_bytes([entry("a")], future_field={"x": 1}), where="x")
    assert len(m.files) == 1


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ([entry("../etc/passwd")], "'..'"),
        ([entry("/etc/passwd")], "absolute"),
        ([entry("a/../../x")], "'..'"),
        ([entry("a\\..\\x")], "backslash"),
        ([entry("a\x00b")], "control"),
        ([entry("./a")], "'.'"),
        ([entry("a//b")], "empty"),
        ([entry("")], "empty"),
        ([entry("a"), entry("a")], "duplicate"),
        ([entry("a"), entry("a/b")], "both a file and a directory"),
        ([entry("a", 5, [[ID, 3]])], "do not add up"),
        ([entry("a", 3, [["zz" * 16, 3]])], "pattern"),
        ([{**entry("a"), "size": -1}], "greater than or equal"),
        ([{**entry("a"), "mode": "rwx"}], "integer"),
    ],
)
def test_malicious_or_malformed_manifests_are_refused(files: list[dict[str, Any]], needle: str) -> None:
    with pytest.raises(RepositoryError) as info:
        parse_manifest(manifest_bytes(files), where="snapshots/s/x")
    assert needle in str(info.value)
    assert "snapshots/s/x" in str(info.value)


def test_version_2_manifest_says_where_packed_chunks_are() -> None:
    at = ["1" * 32, 7, 20]
    m = parse_manifest(manifest_bytes([entry("a")], version=2, packed={ID: at}), where="x")
    assert m.packed == {ID: tuple(at)}
    assert parse_manifest(encode_manifest(m), where="x") == m


@pytest.mark.parametrize(
    ("packed", "needle"),
    [
        ({ID: ["../../etc/passwd", 0, 5]}, "pattern"),  # a pack id becomes a key: never a path
        ({"zz" * 16: [ID, 0, 5]}, "pattern"),
        ({ID: [ID, -1, 5]}, "greater than or equal to 0"),
        ({ID: [ID, 0, 0]}, "greater than or equal to 1"),
        ({ID: [ID, 0, 1 << 30]}, "less than or equal"),  # no chunk object is that large
        ({ID: [ID, 0]}, "packed"),
        ({ID: [ID, "0", 5]}, "integer"),
        ([[ID, ID, 0, 5]], "packed"),
    ],
)
def test_malformed_pack_locations_are_refused(packed: Any, needle: str) -> None:
    with pytest.raises(RepositoryError) as info:
        parse_manifest(manifest_bytes([entry("a")], version=2, packed=packed), where="snapshots/s/x")
    assert needle in str(info.value)


def test_unknown_manifest_version_is_refused() -> None:
    doc = {"format": "replicator-snapshot", "version": 99, "whatever": True}
    with pytest.raises(UnsupportedFormatError, match="version 99"):
        parse_manifest(zstandard.ZstdCompressor().compress(json.dumps(doc).encode()), where="x")


def test_garbage_manifest() -> None:
    with pytest.raises(RepositoryError, match="zstd"):
        parse_manifest(b"garbage", where="x")


def new_repo(root: Path) -> Repository:
    root.mkdir(exist_ok=True)
    return asyncio.run(
        Repository.open_or_create(
            PosixTarget("t", root),
            algorithm="xxh3-128",
            chunking=ChunkingConfig(),
            compression=CompressionConfig(),
        )
    )


def test_config_object_is_self_describing(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    doc = json.loads((tmp_path / CONFIG_KEY).read_text())
    assert doc["format"] == "replicator-repository" and doc["version"] == 1
    assert doc["hash"]["algorithm"] == "xxh3-128" and int(doc["hash"]["seed"], 16) == repo.hash.seed
    assert doc["chunker"] == {
        "algorithm": "fastcdc-2020",
        "min_size": 1 << 20,
        "avg_size": 4 << 20,
        "max_size": 16 << 20,
        "normalized_chunking": 1,
        "gear_seed": 0,
    }
    assert doc["compression"]["algorithm"] == "zstd"
    # Opening again reuses it: seeds are per repository and stable.
    assert new_repo(tmp_path).hash == repo.hash


def test_each_repository_gets_its_own_seed(tmp_path: Path) -> None:
    assert new_repo(tmp_path / "a").hash.seed != new_repo(tmp_path / "b").hash.seed


def test_unknown_repository_version_is_refused(tmp_path: Path) -> None:
    new_repo(tmp_path)
    doc = json.loads((tmp_path / CONFIG_KEY).read_text())
    doc["version"] = 2
    (tmp_path / CONFIG_KEY).write_text(json.dumps(doc))
    with pytest.raises(UnsupportedFormatError, match="version 2"):
        asyncio.run(Repository.open(PosixTarget("t", tmp_path)))


class FailOn(TargetWrapper):
    """Fault injection: fail every put whose key starts with ``prefix``."""

    def __init__(self, inner: Any, prefix: str) -> None:
        super().__init__(inner)
        self.prefix = prefix

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if key.startswith(self.prefix):
            raise TargetError("injected failure", key=key)
        await self.inner.put(key, data, if_absent=if_absent)


def simple_manifest() -> Manifest:
    return Manifest(source="s", kind="dataset", created=format_time(now_utc()), files=())


def test_ref_is_written_only_after_its_manifest(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    first = asyncio.run(repo.publish(simple_manifest()))
    broken = Repository(FailOn(repo.target, "snapshots/"), repo.config)
    with pytest.raises(TargetError):
        asyncio.run(broken.publish(simple_manifest()))
    assert asyncio.run(repo.latest("s")) == first  # the failed publish never moved the ref
    assert (tmp_path / ref_key("s")).exists()


def test_manifest_is_authenticated_by_its_id(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    sid = asyncio.run(repo.publish(simple_manifest()))
    path = tmp_path / "snapshots" / "s" / f"{sid}.json.zst"
    other = encode_manifest(simple_manifest().model_copy(update={"kind": "embedding"}))
    path.write_bytes(other)
    with pytest.raises(IntegrityError, match="digest"):
        asyncio.run(repo.load_manifest("s", sid))
