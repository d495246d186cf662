"""The file cache: per source file, what reading it last time produced, so that a file whose
signature has not changed is not read again.

Rows (``files``, ``file_chunks``; replicator.state.schema): per source and path the file's
signature, size, mtime and mode, and per hash spec its digest and its chunk list, packed as
(id bytes, little-endian u32 length) in file order.

Paths are BLOBs of the name's exact bytes: a name that is not UTF-8 is a str with lone
surrogates in memory (replicator.paths), which SQLite cannot bind as TEXT (issue 17).

Records are buffered and written in batches by the store (replicator.state.store); a record
not yet written is still returned by :meth:`FileCache.get`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from replicator.paths import decode_path, encode_path
from replicator.read.pipeline import FileRecord
from replicator.state.base import Core

ChunkList = tuple[tuple[str, int], ...]
"""A file's chunks as (chunk id, length) in file order."""

_SIZE = struct.Struct("<I")


def _pack(chunks: Iterable[tuple[str, int]]) -> bytes:
    return b"".join(bytes.fromhex(cid) + _SIZE.pack(size) for cid, size in chunks)


def _unpack(blob: bytes, id_len: int) -> ChunkList:
    step = id_len + _SIZE.size
    return tuple(
        (blob[i : i + id_len].hex(), _SIZE.unpack_from(blob, i + id_len)[0])
        for i in range(0, len(blob), step)
    )


def _id_len(hash_key: str) -> int:
    return 32 if hash_key == "blake3" else 16


class FileCache:
    """What each source file was when it was last read (see the module docstring).

    Contract: :meth:`get` answers only for a path whose signature is the one asked for; a
    record :meth:`put` is visible to :meth:`get` at once and durable after the store's next
    commit; :meth:`forget_except` and :meth:`count` see every record put so far."""

    def __init__(self, store: Core) -> None:
        self._store = store
        self._pending: dict[tuple[str, str], FileRecord] = {}
        store.register(self)

    def get(self, source: str, wanted: Sequence[tuple[str, str]]) -> dict[str, FileRecord]:
        """path -> cached record, for those of these (path, signature) pairs whose signature
        still matches. 500 paths per query: one query per file cost ~25 us each on 20,000 files,
        mostly GIL hand-offs."""
        out: dict[str, FileRecord] = {}
        signatures = dict(wanted)
        lookup: list[str] = []
        for path, signature in wanted:
            pending = self._pending.get((source, path))
            if pending is None:
                lookup.append(path)
            elif pending.signature == signature:
                out[path] = pending
        for start in range(0, len(lookup), 500):
            batch = [encode_path(p) for p in lookup[start : start + 500]]
            rows = self._store.db.execute(
                "SELECT f.path, f.signature, f.size, f.mtime_ns, f.mode, c.hash_key, c.digest, c.chunks "
                "FROM files f JOIN file_chunks c ON c.source = f.source AND c.path = f.path "
                f"WHERE f.source=? AND f.path IN ({','.join('?' * len(batch))})",
                (source, *batch),
            )
            found: dict[str, tuple[tuple[int, int, int], dict[str, str], dict[str, ChunkList]]] = {}
            for raw, signature, size, mtime_ns, mode, key, digest, blob in rows:
                path = decode_path(raw)
                if signature != signatures[path]:
                    continue
                meta, digests, chunks = found.setdefault(path, ((size, mtime_ns, mode), {}, {}))
                digests[key] = digest
                chunks[key] = _unpack(blob, _id_len(key))
            for path, (meta, digests, chunks) in found.items():
                out[path] = FileRecord(path, *meta, signatures[path], digests, chunks)
        return out

    def put(self, source: str, record: FileRecord) -> None:
        """Remember what reading ``record.path`` produced (replacing what was known of it)."""
        self._pending[(source, record.path)] = record
        self._store.buffered()

    def count(self, source: str) -> int:
        self._store.flush()
        return int(
            self._store.db.execute("SELECT count(*) FROM files WHERE source=?", (source,)).fetchone()[0]
        )

    def forget_except(self, source: str, keep: set[str]) -> None:
        """Drop records of files no longer present in the source."""
        self._store.flush()
        db = self._store.db
        gone = [
            raw
            for (raw,) in db.execute("SELECT path FROM files WHERE source=?", (source,))
            if decode_path(raw) not in keep
        ]
        for p in gone:
            db.execute("DELETE FROM files WHERE source=? AND path=?", (source, p))
            db.execute("DELETE FROM file_chunks WHERE source=? AND path=?", (source, p))
        self._store.touch(len(gone))

    # -- write batching (replicator.state.base.Buffer) ---------------------------------------

    def pending(self) -> int:
        return len(self._pending)

    def write(self) -> int:
        """Write the buffered records, many rows per statement (Core.insert)."""
        if not self._pending:
            return 0
        files = list(self._pending.items())
        self._pending = {}
        raw = [encode_path(r.path) for _, r in files]
        self._store.insert(
            "INSERT OR REPLACE INTO files VALUES",
            [
                (s, p, r.signature, r.size, r.mtime_ns, r.mode)
                for ((s, _), r), p in zip(files, raw, strict=True)
            ],
        )
        by_source: dict[str, list[bytes]] = {}
        for ((source, _), _), path in zip(files, raw, strict=True):
            by_source.setdefault(source, []).append(path)
        for source, paths in by_source.items():
            # Not "(source, path) IN (VALUES ...)": SQLite scans the whole table for that
            # (quadratic in the number of files; 20,000 files: ~0.3 s).
            for start in range(0, len(paths), 500):
                batch = paths[start : start + 500]
                self._store.db.execute(
                    f"DELETE FROM file_chunks WHERE source=? AND path IN ({','.join('?' * len(batch))})",
                    (source, *batch),
                )
        self._store.insert(
            "INSERT INTO file_chunks VALUES",
            [
                (s, p, k, r.digests[k], _pack(v))
                for ((s, _), r), p in zip(files, raw, strict=True)
                for k, v in r.chunks.items()
            ],
        )
        return len(files)
