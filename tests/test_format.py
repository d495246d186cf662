"""The repository format: config object, manifests as untrusted input, write order."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.config import ChunkingConfig, CompressionConfig
from replicator.errors import IntegrityError, RepositoryError, TargetError, UnsupportedFormatError
from replicator.format import manifest as manifest_module
from replicator.format.manifest import (
    FileEntry,
    Manifest,
    SetInfo,
    encode_manifest,
    format_time,
    manifest_json,
    now_utc,
    parse_manifest,
)
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
        ([entry("a\x00b")], "NUL"),
        ([entry("a/" + "x" * 256)], "longer than 255 bytes"),
        ([entry("/".join(["x" * 200] * 21))], "4220 bytes long"),
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
    for version in (4, "2", 2.0, True):
        doc["version"] = version
        (tmp_path / CONFIG_KEY).write_text(json.dumps(doc))
        with pytest.raises(UnsupportedFormatError, match=r"this build reads 1, 2, 3"):
            asyncio.run(Repository.open(PosixTarget("t", tmp_path)))


def test_version_2_repositories_are_read_and_prune_upgrades_version_1(tmp_path: Path) -> None:
    """Version 2 (garbage collection, docs/FORMAT.md section 10) reads like version 1; new
    repositories stay version 1 until a collector raises them."""
    new_repo(tmp_path)
    assert json.loads((tmp_path / CONFIG_KEY).read_text())["version"] == 1

    async def upgrade() -> tuple[bool, bool, int]:
        repo = await Repository.open(PosixTarget("t", tmp_path))
        first, again = await repo.upgrade_for_gc(), await repo.upgrade_for_gc()
        reopened = await Repository.open(PosixTarget("t", tmp_path))
        assert reopened.config == repo.config
        return first, again, reopened.config.version

    assert asyncio.run(upgrade()) == (True, False, 2)
    assert json.loads((tmp_path / CONFIG_KEY).read_text())["version"] == 2


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


# -- version 3: any name POSIX allows (issue 17) -------------------------------------------------

ODD = os.fsdecode(b"\xff\xfe.bin")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def odd_entry(raw: bytes, shown: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        **entry(raw.decode("utf-8", "replace") if shown is None else shown),
        "path_b64": b64(raw),
        **extra,
    }


def stored_doc(m: Manifest) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(zstandard.ZstdDecompressor().decompress(encode_manifest(m)))
    return doc


def test_names_that_are_valid_utf8_are_plain_json_strings_even_with_control_characters() -> None:
    names = ["new\nline", "tab\there", "back\\slash", "-rf", "caf\u00e9", "x" * 255, "\u00fd" * 127]
    m = Manifest(
        source="s", kind="dataset", created=format_time(now_utc()),
        files=tuple(FileEntry(path=n, size=0, mode=0, mtime_ns=0, digest=ID, chunks=()) for n in names),
    )  # fmt: skip
    doc = stored_doc(m)
    assert doc["version"] == 3
    assert [f["path"] for f in doc["files"]] == names and not any("path_b64" in f for f in doc["files"])
    assert parse_manifest(encode_manifest(m), where="x") == m


def test_a_name_that_is_not_utf8_carries_its_bytes_in_base64() -> None:
    sets = (SetInfo(name=os.fsdecode(b"step\xff"), files=1, bytes=0, newest_mtime_ns=0),)
    files = (
        FileEntry(path=ODD, size=0, mode=0, mtime_ns=0, digest=ID, chunks=()),
        FileEntry(path=os.fsdecode(b"step\xff/m.bin"), size=0, mode=0, mtime_ns=0, digest=ID, chunks=()),
        FileEntry(path="plain", size=0, mode=0, mtime_ns=0, digest=ID, chunks=()),
    )
    m = Manifest(source="s", kind="checkpoint", created=format_time(now_utc()), files=files, sets=sets)
    doc = stored_doc(m)
    assert doc["files"][0] == {**doc["files"][0], "path": "\ufffd\ufffd.bin", "path_b64": "//4uYmlu"}
    assert list(doc["files"][0])[:2] == ["path", "path_b64"]
    assert doc["files"][2]["path"] == "plain" and "path_b64" not in doc["files"][2]
    assert doc["sets"][0]["name"] == "step\ufffd" and doc["sets"][0]["name_b64"] == b64(b"step\xff")
    back = parse_manifest(encode_manifest(m), where="x")
    assert back == m and back.files[0].path == ODD and back.files[0].path_b64 is None
    assert os.fsencode(back.sets[0].name) == b"step\xff"


def test_a_name_that_is_not_utf8_is_found_without_slowing_the_usual_manifest() -> None:
    """encode_manifest's fast path (one pydantic call) must refuse such a name rather than
    write it some other way: that refusal is how the per-entry path is chosen."""
    m = Manifest.model_construct(
        source="s", kind="dataset", created=format_time(now_utc()), sets=(), packed={},
        files=(FileEntry.model_construct(path=ODD, size=0, mode=0, mtime_ns=0, digest=ID, chunks=()),),
    )  # fmt: skip
    with pytest.raises(ValueError, match="surrogates not allowed"):
        m.model_dump_json()
    assert b'"path_b64":"//4uYmlu"' in manifest_json(m)


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ([odd_entry(b"\xff", path_b64="not base64!")], "is not base64"),
        ([odd_entry(b"\xff", path_b64="/w")], "is not base64"),  # no padding
        ([odd_entry(b"\xff", path_b64="/x==")], "not canonical"),  # stray bits in the padding
        ([odd_entry(b"plain")], "valid UTF-8"),  # one canonical form per name
        ([odd_entry(b"../\xff")], "'..'"),  # the true name is what is checked
        ([odd_entry(b"/etc/\xff")], "absolute"),
        ([odd_entry(b"a\x00\xff")], "NUL"),
        ([odd_entry(b"\xff" * 256)], "longer than 255 bytes"),
        ([odd_entry(b"\xff", shown="innocent")], "display form"),
        ([odd_entry(b"a\xff"), odd_entry(b"a\xff")], "duplicate"),
        ([odd_entry(b"d\xff"), odd_entry(b"d\xff/f")], "both a file and a directory"),
        ([{**entry("x"), "path_b64": 7}], "string"),
    ],
)
def test_malformed_base64_names_are_refused(files: list[dict[str, Any]], needle: str) -> None:
    with pytest.raises(RepositoryError) as info:
        parse_manifest(manifest_bytes(files, version=3), where="snapshots/s/x")
    assert needle in str(info.value) and "snapshots/s/x" in str(info.value)


def test_display_forms_may_collide_while_true_names_differ() -> None:
    files = [odd_entry(b"a\xff"), odd_entry(b"a\xfe"), entry("a\ufffd")]
    m = parse_manifest(manifest_bytes(files, version=3), where="x")
    assert [os.fsencode(f.path) for f in m.files] == [b"a\xff", b"a\xfe", "a\ufffd".encode()]


def test_a_set_name_in_base64_is_checked_like_a_path() -> None:
    sets = [{"name": "\ufffd", "name_b64": b64(b"\xff"), "files": 1, "bytes": 3, "newest_mtime_ns": 1}]
    m = parse_manifest(manifest_bytes([entry("x")], version=3, sets=sets), where="x")
    assert os.fsencode(m.sets[0].name) == b"\xff"
    bad = [{**sets[0], "name": "\ufffd/x", "name_b64": b64(b"\xff/x")}]
    with pytest.raises(RepositoryError, match="not a top-level name"):
        parse_manifest(manifest_bytes([entry("x")], version=3, sets=bad), where="x")


def test_version_2_manifests_are_still_read() -> None:
    m = parse_manifest(
        manifest_bytes([entry("step-1/a")], version=2, packed={ID: ["1" * 32, 0, 9]}), where="x"
    )
    assert m.version == 2 and m.files[0].path == "step-1/a"


def test_a_reader_of_versions_1_and_2_refuses_version_3_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a release before issue 17 does with what this one writes (its version check,
    which this build shares, with the versions it knew)."""
    monkeypatch.setattr(manifest_module, "READABLE_VERSIONS", (1, 2))
    stored = encode_manifest(Manifest(source="s", kind="dataset", created=format_time(now_utc()), files=()))
    with pytest.raises(UnsupportedFormatError) as info:
        parse_manifest(stored, where="snapshots/s/x")
    assert str(info.value) == (
        "snapshots/s/x: manifest version 3 is not supported (this build reads 1, 2) "
        "(hint: upgrade replicator)"
    )
    assert info.value.exit_code == 2


def load_reference_reader() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "tools" / "restore_reference.py"
    spec = importlib.util.spec_from_file_location("restore_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = load_reference_reader()
SEGMENT = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"\x00" not in b and b"/" not in b and b not in (b".", b"..")
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.lists(st.lists(SEGMENT, min_size=1, max_size=4), min_size=1, max_size=6, unique_by=lambda s: tuple(s))
)
def test_any_byte_name_round_trips_through_the_manifest_and_the_reference_reader(
    trees: list[list[bytes]],
) -> None:
    """Arbitrary names (any bytes but NUL and '/', 1 to 255 per segment) come back exactly
    from our encoding, through our parser and through the reference reader's decoding."""
    names = [b"/".join(segments) for segments in trees]
    if any(len(n) > 4096 for n in names):
        return
    prefixes = {b"/".join(s[:i]) for s in trees for i in range(1, len(s))}
    names = [n for n in names if n not in prefixes]  # a file cannot also be a directory
    files = tuple(
        FileEntry(path=os.fsdecode(n), size=0, mode=0o644, mtime_ns=0, digest=ID, chunks=())
        for n in sorted(set(names))
    )
    m = Manifest(source="s", kind="dataset", created=format_time(now_utc()), files=files)
    stored = encode_manifest(m)
    back = parse_manifest(stored, where="x")
    assert back == m
    assert [os.fsencode(f.path) for f in back.files] == sorted(set(names))
    doc = json.loads(zstandard.ZstdDecompressor().decompress(stored))
    assert [raw for raw, _ in REFERENCE.check_manifest(doc, "s")] == sorted(set(names))
