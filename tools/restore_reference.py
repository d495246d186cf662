#!/usr/bin/env python3
"""Reference reader: restore a snapshot from a POSIX copy of a replicator repository.

Written from docs/FORMAT.md alone, with the standard library, ``zstandard`` and ``xxhash``
(``blake3`` only for repositories that use it). It imports nothing from replicator: it is the
proof that the format is open, and a way out should replicator ever be unavailable.

    python3 tools/restore_reference.py REPOSITORY SOURCE latest|SNAPSHOT-ID DEST

Like any reader it treats the repository as untrusted (FORMAT.md section 5): it refuses
unsafe paths, never follows a symlink in DEST, checks every chunk and file against its hash,
and makes each file appear only once complete (temporary name, then rename). Names are
handled as bytes throughout, so a name that is not UTF-8 (``path_b64``) is restored exactly.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import os
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash
import zstandard

MAX_CHUNK = 16 << 20  # section 4
MAX_MANIFEST = 1 << 30  # section 5
SOURCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # section 1
ID_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-([0-9a-f]{32}|[0-9a-f]{64})$")  # section 5
HEX_RE = re.compile(r"^(?:[0-9a-f]{32}|[0-9a-f]{64})$")


class Refused(Exception):
    """The repository breaks a rule of FORMAT.md; restoring stops."""


MAX_STORED_CHUNK = MAX_CHUNK + 64  # section 5, "packed"


def read(repo: Path, key: str) -> bytes:
    return (repo / key).read_bytes()


def read_range(repo: Path, key: str, offset: int, length: int) -> bytes:
    with open(repo / key, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise Refused(f"{key} is too short for the chunk at offset {offset}")
    return data


def hash_function(config: dict[str, Any]) -> Callable[[], Any]:
    """Section 3: a factory of the repository's (streaming) hashers: update(), hexdigest()."""
    algorithm, seed = config["hash"]["algorithm"], int(config["hash"]["seed"], 16)
    if algorithm == "xxh3-128":
        return lambda: xxhash.xxh3_128(seed=seed)
    if algorithm == "blake3":
        import blake3  # only needed for repositories that use it

        return lambda: blake3.blake3()
    raise Refused(f"unknown hash algorithm {algorithm!r}")


def hex_of(new_hash: Callable[[], Any], data: bytes) -> str:
    h = new_hash()
    h.update(data)
    return str(h.hexdigest())


def inflate(frame: bytes, limit: int) -> bytes:
    """One zstd frame, never more than ``limit`` bytes whatever its header claims."""
    out = zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False).read(limit + 1)
    if len(out) > limit:
        raise Refused("zstd frame decompresses past the chunk limit")
    return out


def decode_chunk(stored: bytes) -> bytes:
    """Section 4: codec byte, then payload."""
    if not stored:
        raise Refused("empty chunk object")
    codec, payload = stored[0], stored[1:]
    if codec == 0x00:
        return payload
    if codec == 0x01:
        return inflate(payload, MAX_CHUNK)
    if codec != 0x02:
        raise Refused(f"unknown codec byte {codec}")
    if len(stored) < 2 or not 2 <= stored[1] <= 8:
        raise Refused("grouped chunk: bad width")
    width, pos, streams = stored[1], 2, []
    for _ in range(width):
        if pos + 5 > len(stored):
            raise Refused("grouped chunk: truncated record")
        stream_codec, length = stored[pos], int.from_bytes(stored[pos + 1 : pos + 5], "little")
        body, pos = stored[pos + 5 : pos + 5 + length], pos + 5 + length
        if len(body) != length or stream_codec not in (0, 1):
            raise Refused("grouped chunk: truncated record or unknown stream codec")
        streams.append(body if stream_codec == 0 else inflate(body, MAX_CHUNK))
    if pos != len(stored):
        raise Refused("grouped chunk: trailing bytes")
    n = sum(len(s) for s in streams)
    if n > MAX_CHUNK or any(len(s) != -(-(n - i) // width) for i, s in enumerate(streams)):
        raise Refused("grouped chunk: stream lengths are inconsistent")
    out = bytearray(n)
    for i, s in enumerate(streams):
        out[i::width] = s
    return bytes(out)


def shown(raw: bytes) -> str:
    """A name for a one-line message: as it is if printable UTF-8, else Python's bytes repr."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return repr(raw)
    return text if text.isprintable() and "\\" not in text else repr(raw)


def name_bytes(entry: dict[str, Any], key: str) -> bytes:
    """Section 5: the exact bytes of a name: ``<key>_b64`` when present (after checking that it
    is canonical base64 of bytes that are not valid UTF-8 and that ``<key>`` is their display
    form), else ``<key>`` encoded as UTF-8."""
    text, b64 = entry.get(key), entry.get(f"{key}_b64")
    if not isinstance(text, str):
        raise Refused(f"{key} is not a string: {text!r}")
    if b64 is None:
        return text.encode("utf-8")
    if not isinstance(b64, str):
        raise Refused(f"{key}_b64 is not a string: {b64!r}")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(f"{key}_b64 {b64!r} is not base64") from None
    if base64.b64encode(raw).decode("ascii") != b64:
        raise Refused(f"{key}_b64 {b64!r} is not canonical base64")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        raise Refused(f"{key}_b64 {b64!r} is valid UTF-8: it must not be there")
    if raw.decode("utf-8", "replace") != text:
        raise Refused(f"{key} {text!r} is not the display form of {key}_b64")
    return raw


def safe_path(path: bytes) -> bytes:
    """Section 5: relative, '/'-separated, not empty, no NUL, no empty/./.. segment, segments
    of at most 255 bytes, at most 4096 bytes in all."""
    segments = path.split(b"/")
    if (
        not path
        or len(path) > 4096
        or b"\x00" in path
        or any(seg in (b"", b".", b"..") or len(seg) > 255 for seg in segments)
    ):
        raise Refused(f"unsafe path {shown(path)}")
    return path


def is_int(v: object, low: int, high: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def check_packed(m: dict[str, Any]) -> dict[str, list[Any]]:
    """Section 5: ``packed`` maps chunk ids to [pack id, offset, length] (version 2)."""
    packed = m.get("packed", {})
    if not isinstance(packed, dict):
        raise Refused("packed is not an object")
    for cid, at in packed.items():
        if not (
            HEX_RE.match(cid)
            and isinstance(at, list)
            and len(at) == 3
            and isinstance(at[0], str)
            and HEX_RE.match(at[0])
            and is_int(at[1], 0)
            and is_int(at[2], 1, MAX_STORED_CHUNK)
        ):
            raise Refused(f"malformed pack location for chunk {cid!r}")
    return packed


def check_manifest(m: Any, source: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Section 5: validate every field a restore acts on; return (name bytes, entry) per file."""
    if not isinstance(m, dict) or m.get("format") != "replicator-snapshot":
        raise Refused("not a snapshot manifest")
    if m.get("version") not in (1, 2, 3):
        raise Refused(f"manifest version {m.get('version')!r} is not supported")
    if m.get("source") != source or not isinstance(m.get("files"), list):
        raise Refused("manifest belongs to another source or has no file list")
    paths: set[bytes] = set()
    out = []
    for f in m["files"]:
        if not isinstance(f, dict):
            raise Refused("file entry is not an object")
        raw = safe_path(name_bytes(f, "path"))
        path = shown(raw)
        chunks = f.get("chunks")
        if not (
            is_int(f.get("size"), 0)
            and is_int(f.get("mode"), 0, 0o7777)
            and is_int(f.get("mtime_ns"), -(1 << 63))
            and isinstance(f.get("digest"), str)
            and HEX_RE.match(f["digest"])
            and isinstance(chunks, list)
        ):
            raise Refused(f"{path}: malformed entry")
        for c in chunks:
            if not (isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and HEX_RE.match(c[0])):
                raise Refused(f"{path}: malformed chunk reference")
            if not is_int(c[1], 0, MAX_CHUNK):
                raise Refused(f"{path}: malformed chunk length")
        if sum(c[1] for c in chunks) != f["size"]:
            raise Refused(f"{path}: chunk lengths do not add up to the size")
        if raw in paths:
            raise Refused(f"{path}: listed twice")
        paths.add(raw)
        out.append((raw, f))
    for raw in paths:  # no path may be a directory prefix of another
        parts = raw.split(b"/")
        if any(b"/".join(parts[:i]) in paths for i in range(1, len(parts))):
            raise Refused(f"{shown(raw)}: a parent of it is also a file")
    return out


def open_parent(root_fd: int, path: bytes) -> tuple[int, bytes]:
    """Open (creating) the directories of ``path`` below ``root_fd``, refusing symlinks."""
    *dirs, name = path.split(b"/")
    fd = os.dup(root_fd)
    try:
        for d in dirs:
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o755, dir_fd=fd)
            next_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def restore(repo: Path, source: str, snapshot: str, dest: Path) -> int:
    config = json.loads(read(repo, "config.json"))  # section 2
    if config.get("format") != "replicator-repository" or config.get("version") not in (1, 2, 3):
        raise Refused("not a version 1, 2 or 3 replicator repository")
    new_hash = hash_function(config)
    if not SOURCE_RE.match(source):
        raise Refused(f"invalid source name {source!r}")
    if snapshot == "latest":  # section 6
        snapshot = json.loads(read(repo, f"refs/{source}/latest"))["snapshot"]
    match = ID_RE.match(snapshot) if isinstance(snapshot, str) else None
    if not match:
        raise Refused(f"invalid snapshot id {snapshot!r}")
    stored = read(repo, f"snapshots/{source}/{snapshot}.json.zst")
    if hex_of(new_hash, stored) != match.group(1):
        raise Refused("manifest does not match the digest in its id")
    body = zstandard.ZstdDecompressor().stream_reader(stored, read_across_frames=False).read(MAX_MANIFEST + 1)
    if len(body) > MAX_MANIFEST:
        raise Refused("manifest larger than 1 GiB")
    manifest = json.loads(body)
    files = check_manifest(manifest, source)
    packed = check_packed(manifest)

    dest.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    failed = 0
    try:
        for raw, f in files:
            try:
                restore_file(repo, root_fd, raw, f, packed, new_hash)
            except (Refused, OSError) as exc:
                failed += 1
                print(f"FAILED {shown(raw)}: {exc}", file=sys.stderr)
    finally:
        os.close(root_fd)
    print(f"restored {len(files) - failed} of {len(files)} files of {source}/{snapshot}")
    return 1 if failed else 0


def read_chunk(
    repo: Path, cid: str, length: int, packed: dict[str, list[Any]], new_hash: Callable[[], Any]
) -> bytes:
    """Sections 4 and 4.1: the chunk's original bytes, checked against its id and length: from
    its loose object, or (version 2) from a byte range of its pack; when the pack is missing
    or its range fails the check, from the loose copy instead (a collector deletes a pack once
    every chunk still used has one, section 10.2)."""
    loose = f"chunks/{cid[:2]}/{cid}"
    if cid not in packed:
        return checked_chunk(read(repo, loose), loose, cid, length, new_hash)
    pack_id, offset, size = packed[cid]
    where = f"packs/{pack_id[:2]}/{pack_id}@{offset}"
    try:
        stored = read_range(repo, f"packs/{pack_id[:2]}/{pack_id}", offset, size)
        return checked_chunk(stored, where, cid, length, new_hash)
    except (OSError, Refused) as exc:
        try:
            stored = read(repo, loose)
        except FileNotFoundError:
            raise exc from None
        return checked_chunk(stored, loose, cid, length, new_hash)


def checked_chunk(stored: bytes, where: str, cid: str, length: int, new_hash: Callable[[], Any]) -> bytes:
    try:
        data = decode_chunk(stored)
    except zstandard.ZstdError as exc:
        raise Refused(f"{where}: zstd frame is corrupt ({exc})") from None
    except Refused as exc:
        raise Refused(f"{where}: {exc}") from None
    if len(data) != length or hex_of(new_hash, data) != cid:
        raise Refused(f"{where} does not match chunk id {cid} or its length")
    return data


def restore_file(
    repo: Path,
    root_fd: int,
    path: bytes,
    f: dict[str, Any],
    packed: dict[str, list[Any]],
    new_hash: Callable[[], Any],
) -> None:
    dir_fd, name = open_parent(root_fd, path)
    suffix = f".ref-{secrets.token_hex(6)}".encode()
    tmp = b"." + name[: 254 - len(suffix)] + suffix  # a temporary name of at most 255 bytes
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            whole = new_hash()
            for cid, length in f["chunks"]:
                data = read_chunk(repo, cid, length, packed, new_hash)
                whole.update(data)
                view = memoryview(data)
                while view:  # os.write may write less than asked
                    view = view[os.write(fd, view) :]
            if whole.hexdigest() != f["digest"]:
                raise Refused("file does not match its digest")
            os.fchmod(fd, f["mode"] & 0o777)  # no setuid, setgid or sticky bits
            os.utime(fd, ns=(f["mtime_ns"], f["mtime_ns"]))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("repository", type=Path, help="holds config.json, chunks/, packs/, snapshots/, refs/")
    parser.add_argument("source", help="source name")
    parser.add_argument("snapshot", help="'latest' or a snapshot id")
    parser.add_argument("dest", type=Path, help="destination directory (created if needed)")
    args = parser.parse_args()
    try:
        return restore(args.repository, args.source, args.snapshot, args.dest)
    except (Refused, OSError, ValueError, KeyError, TypeError, zstandard.ZstdError) as exc:
        print(f"restore_reference: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
