"""The state store's database: opening, the one-process lock, write batching, and (until
they move to typed stores of their own) every table's rows."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from replicator.errors import ConfigError, ReplicatorError
from replicator.format.manifest import PackedAt
from replicator.log import get_logger
from replicator.paths import decode_path, encode_path
from replicator.read.pipeline import FileRecord
from replicator.state.schema import LISTED, SCHEMA, migrate

log = get_logger(__name__)

_SIZE = struct.Struct("<I")


@dataclass(frozen=True)
class RpoRow:
    """What the daemon leaves behind per source × target for a restart and for ``status``."""

    pending_since: float | None
    """Observation time of the oldest change the target lacks; None when caught up."""
    last_snapshot: float | None
    last_error: str | None
    breached: bool
    last_alert: float | None
    held: str | None = None
    """Why publishing waits for an operator (replicator.reconcile), or None."""


class StateLockedError(ReplicatorError):
    exit_code = 2


WRITE_BATCH = 1000
"""Rows buffered before they are written. Each sqlite3 call releases and re-takes the GIL;
while the pipeline's threads are busy that hand-off, not SQLite, cost ~100-250 us per
single-row statement (measured on 10,000 small files)."""


ChunkList = tuple[tuple[str, int], ...]
"""A file's chunks as (chunk id, length) in file order."""


def _pack(chunks: Iterable[tuple[str, int]]) -> bytes:
    return b"".join(bytes.fromhex(cid) + _SIZE.pack(size) for cid, size in chunks)


def _unpack(blob: bytes, id_len: int) -> tuple[tuple[str, int], ...]:
    step = id_len + _SIZE.size
    return tuple(
        (blob[i : i + id_len].hex(), _SIZE.unpack_from(blob, i + id_len)[0])
        for i in range(0, len(blob), step)
    )


def _id_len(hash_key: str) -> int:
    return 32 if hash_key == "blake3" else 16


def holder_pid(state_dir: Path) -> int | None:
    """The pid of the process that holds ``state_dir`` (a running daemon or command), or None."""
    try:
        fd = os.open(state_dir / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class StateStore:
    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        if read_only:
            # A reader beside a running daemon (replicator status): no lock, no writes.
            self._lock_fd = -1
            if path.exists():
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            else:
                self.db = sqlite3.connect(":memory:", isolation_level=None)
                self.db.executescript(SCHEMA)
        else:
            self._lock_fd = self._lock(path.with_name("lock"))
            self.db = self._connect()
        self._dirty = 0
        self.started = time.time()
        """When this process opened the store: chunks confirmed since are its own doing."""
        self._pending_files: dict[tuple[str, str], FileRecord] = {}
        self._pending_chunks: dict[str, dict[str, PackedAt | None]] = {}
        self._absent: dict[str, set[str]] = {}
        """Per repository, chunk ids the database was asked about in one batch (:meth:`prefetch`)
        and does not hold. Valid until the next write to the chunks table, which clears it."""
        self._present: dict[str, set[str]] = {}
        """Likewise, the ids it does hold; valid until chunks are forgotten."""

    @classmethod
    def open(cls, state_dir: Path, *, read_only: bool = False) -> StateStore:
        if read_only:
            return cls(state_dir / "state.db", read_only=True)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state_dir {state_dir}: cannot create ({exc.strerror})") from None
        return cls(state_dir / "state.db")

    @staticmethod
    def _lock(path: Path) -> int:
        """One process per state directory: two writers would each trust a cache the other changes."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateLockedError(
                f"state_dir {path.parent} is in use by another replicator process (pid {holder})",
                hint="stop it, or give this command another state_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd

    def begin_run(self) -> bool:
        """Mark the store as in use; return False if the previous run did not end cleanly."""
        row = self.db.execute("SELECT value FROM meta WHERE key='clean'").fetchone()
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', '0')")
        self.commit()
        return row is None or row[0] == "1"

    def end_run(self) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', '1')")
        self.commit()

    def _connect(self) -> sqlite3.Connection:
        try:
            db = self._init(sqlite3.connect(self.path, isolation_level=None))
        except sqlite3.DatabaseError as exc:
            # A cache must never stop the daemon: set the damaged file aside and rebuild.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("state.rebuild", path=str(self.path), error=str(exc), moved_to=str(aside))
            for suffix in ("", "-wal", "-shm"):
                p = Path(f"{self.path}{suffix}")
                if p.exists():
                    p.rename(f"{aside}{suffix}")
            db = self._init(sqlite3.connect(self.path, isolation_level=None))
        return db

    @staticmethod
    def _init(db: sqlite3.Connection) -> sqlite3.Connection:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
        db.execute("PRAGMA busy_timeout=5000")
        migrate(db)
        db.execute("BEGIN")
        return db

    def commit(self) -> None:
        self._flush()
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")
        self._dirty = 0

    def _touch(self, n: int = 1) -> None:
        self._dirty += n
        if self._dirty >= 5000:
            self.commit()

    def _buffered(self) -> None:
        if len(self._pending_files) + sum(map(len, self._pending_chunks.values())) >= WRITE_BATCH:
            self._flush()
            if self._dirty >= 5000:
                self.commit()

    def _flush(self) -> None:
        """Write buffered rows, many per statement (see WRITE_BATCH and :meth:`_rows`)."""
        files, chunks = list(self._pending_files.items()), self._pending_chunks
        self._pending_files, self._pending_chunks = {}, {}
        if chunks:
            self._absent.clear()
        if files:
            raw = [encode_path(r.path) for _, r in files]
            self._rows(
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
                    self.db.execute(
                        f"DELETE FROM file_chunks WHERE source=? AND path IN ({','.join('?' * len(batch))})",
                        (source, *batch),
                    )
            self._rows(
                "INSERT INTO file_chunks VALUES",
                [
                    (s, p, k, r.digests[k], _pack(v))
                    for ((s, _), r), p in zip(files, raw, strict=True)
                    for k, v in r.chunks.items()
                ],
            )
        now = time.time()
        for repo, ids in chunks.items():
            self._rows(
                "INSERT INTO chunks VALUES",
                [
                    (repo, bytes.fromhex(c), None, None, None, now)
                    if at is None
                    else (repo, bytes.fromhex(c), bytes.fromhex(at[0]), at[1], at[2], now)
                    for c, at in ids.items()
                ],
                # A chunk already known keeps its first location (any stored copy serves).
                tail="ON CONFLICT (repo, id) DO UPDATE SET confirmed = excluded.confirmed",
            )
        self._dirty += len(files) + sum(map(len, chunks.values()))

    def _rows(self, head: str, rows: Sequence[tuple[object, ...]], tail: str = "") -> None:
        """``head (?,..),(?,..),.. tail`` with up to 200 rows per statement. executemany steps
        once per row, and each step releases the GIL and waits to get it back while the
        pipeline's threads are busy: one statement per row cost ~50 us per small file."""
        for start in range(0, len(rows), 200):
            batch = rows[start : start + 200]
            values = ",".join([f"({','.join('?' * len(batch[0]))})"] * len(batch))
            self.db.execute(f"{head} {values} {tail}", [v for row in batch for v in row])

    def close(self) -> None:
        if self.read_only:
            self.db.close()
            return
        self._flush()
        self.db.execute("COMMIT")
        self.db.close()
        os.close(self._lock_fd)

    # -- files --------------------------------------------------------------------------------

    def get_files(self, source: str, wanted: Sequence[tuple[str, str]]) -> dict[str, FileRecord]:
        """path -> cached record, for those of these (path, signature) pairs whose signature
        still matches. 500 paths per query: one query per file cost ~25 us each on 20,000 files,
        mostly GIL hand-offs."""
        out: dict[str, FileRecord] = {}
        signatures = dict(wanted)
        lookup: list[str] = []
        for path, signature in wanted:
            pending = self._pending_files.get((source, path))
            if pending is None:
                lookup.append(path)
            elif pending.signature == signature:
                out[path] = pending
        for start in range(0, len(lookup), 500):
            batch = [encode_path(p) for p in lookup[start : start + 500]]
            rows = self.db.execute(
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

    def put_file(self, source: str, record: FileRecord) -> None:
        self._pending_files[(source, record.path)] = record
        self._buffered()

    def count_files(self, source: str) -> int:
        self._flush()
        return int(self.db.execute("SELECT count(*) FROM files WHERE source=?", (source,)).fetchone()[0])

    def forget_files_except(self, source: str, keep: set[str]) -> None:
        """Drop records of files no longer present in the source."""
        self._flush()
        gone = [
            raw
            for (raw,) in self.db.execute("SELECT path FROM files WHERE source=?", (source,))
            if decode_path(raw) not in keep
        ]
        for p in gone:
            self.db.execute("DELETE FROM files WHERE source=? AND path=?", (source, p))
            self.db.execute("DELETE FROM file_chunks WHERE source=? AND path=?", (source, p))
        self._touch(len(gone))

    # -- chunk presence -----------------------------------------------------------------------

    def repo_listed(self, repo: str) -> bool:
        return self.db.execute("SELECT 1 FROM repos WHERE repo=?", (repo,)).fetchone() is not None

    def mark_repo_listed(self, repo: str, target: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO repos VALUES (?,?,?)", (repo, target, time.time()))
        self.commit()

    def forget_repo(self, repo: str) -> None:
        self._flush()
        self._absent.clear()
        self._present.clear()
        self.db.execute("DELETE FROM repos WHERE repo=?", (repo,))
        self.db.execute("DELETE FROM chunks WHERE repo=?", (repo,))
        self.db.execute("DELETE FROM published WHERE repo=?", (repo,))
        self.commit()

    def begin_listing(self, repo: str) -> None:
        """Start replacing what is known of ``repo``'s chunks with a listing of the repository:
        :meth:`add_listed` for what it lists, then :meth:`end_listing`. The listed ids wait in
        a temporary table, not in memory (a repository can hold millions of chunks), under the
        repository's id: targets are opened, and listed, at once."""
        self._flush()
        self.db.execute(LISTED)
        self.db.execute("DELETE FROM temp.listed WHERE repo=?", (repo,))

    def add_listed(self, repo: str, chunk_ids: Sequence[str]) -> None:
        """Loose chunk objects the listing found: stored."""
        self._list(repo, chunk_ids)
        self.add_chunks(repo, chunk_ids)

    def end_listing(self, repo: str, packs: Iterable[str]) -> None:
        """Forget the chunks the listing did not show: loose ones it did not list, packed ones
        whose pack it did not list."""
        self._flush()
        unlisted = "NOT IN (SELECT id FROM temp.listed WHERE repo=?)"
        self.db.execute(f"DELETE FROM chunks WHERE repo=? AND pack IS NULL AND id {unlisted}", (repo, repo))
        self.db.execute("DELETE FROM temp.listed WHERE repo=?", (repo,))
        self._list(repo, packs)
        self.db.execute(
            f"DELETE FROM chunks WHERE repo=? AND pack IS NOT NULL AND pack {unlisted}", (repo, repo)
        )
        self.db.execute("DELETE FROM temp.listed WHERE repo=?", (repo,))
        self.db.execute(
            "UPDATE chunks SET confirmed=? WHERE repo=?", (time.time(), repo)
        )  # what is left exists
        self._absent.clear()
        self._present.clear()
        self.commit()

    def _list(self, repo: str, ids: Iterable[str]) -> None:
        rows = [(repo, bytes.fromhex(i)) for i in ids]
        self.db.executemany("INSERT OR IGNORE INTO temp.listed VALUES (?,?)", rows)

    def has_chunk(self, repo: str, chunk_id: str) -> bool:
        if chunk_id in self._pending_chunks.get(repo, ()):
            return True
        if chunk_id in self._present.get(repo, ()):
            return True
        if chunk_id in self._absent.get(repo, ()):
            return False
        return (
            self.db.execute(
                "SELECT 1 FROM chunks WHERE repo=? AND id=?", (repo, bytes.fromhex(chunk_id))
            ).fetchone()
            is not None
        )

    def prefetch(self, repo: str, chunk_ids: Sequence[str]) -> None:
        """Look up many chunk ids in one query, so that :meth:`has_chunk` answers them from
        memory. Each sqlite3 call releases the GIL and, while the pipeline's threads are busy,
        waits to get it back: one call per chunk cost ~80 us per small file."""
        absent = self._absent.setdefault(repo, set())
        present = self._present.setdefault(repo, set())
        for known in (absent, present):
            if len(known) > 100_000:
                known.clear()
        found = {cid for cid, _ in self._select_chunks(repo, chunk_ids)}
        absent.update(c for c in chunk_ids if c not in found)
        present.update(found)

    def _select_chunks(self, repo: str, chunk_ids: Sequence[str]) -> Iterator[tuple[str, PackedAt | None]]:
        """The stored ones of ``chunk_ids`` (as written, not pending), with where they are;
        500 per query (SQLite's limit on host parameters)."""
        for start in range(0, len(chunk_ids), 500):
            batch = chunk_ids[start : start + 500]
            query = (
                "SELECT id, pack, offset, length FROM chunks "
                f"WHERE repo=? AND id IN ({','.join('?' * len(batch))})"
            )
            for cid, pack, offset, length in self.db.execute(query, (repo, *map(bytes.fromhex, batch))):
                yield cid.hex(), None if pack is None else (pack.hex(), offset, length)

    def add_chunks(self, repo: str, chunk_ids: Iterable[str]) -> None:
        """Record loose chunk objects as stored."""
        pending = self._pending_chunks.setdefault(repo, {})
        for cid in chunk_ids:
            pending.setdefault(cid, None)
        self._buffered()

    def add_packed(self, repo: str, chunks: Iterable[tuple[str, PackedAt]]) -> None:
        """Record chunks stored inside pack objects, with where they are. A chunk already known
        keeps its first location (any stored copy serves)."""
        pending = self._pending_chunks.setdefault(repo, {})
        for cid, at in chunks:
            pending.setdefault(cid, at)
        self._buffered()

    def unconfirmed(self, repo: str, chunk_ids: Iterable[str], since: float) -> dict[str, PackedAt | None]:
        """Those of these chunks the store claims are stored but nobody confirmed (uploaded
        them, or saw them in a listing) since ``since`` (Unix time), and where they would be."""
        self._flush()
        ids = list(dict.fromkeys(chunk_ids))
        out: dict[str, PackedAt | None] = {}
        for start in range(0, len(ids), 500):
            batch = ids[start : start + 500]
            query = (
                "SELECT id, pack, offset, length FROM chunks WHERE repo=? AND coalesce(confirmed, 0) < ? "
                f"AND id IN ({','.join('?' * len(batch))})"
            )
            for cid, pack, offset, length in self.db.execute(
                query, (repo, since, *map(bytes.fromhex, batch))
            ):
                out[cid.hex()] = None if pack is None else (pack.hex(), offset, length)
        return out

    def confirm_chunks(self, repo: str, chunk_ids: Iterable[str]) -> None:
        """These chunks were found stored just now."""
        self._flush()
        self.db.executemany(
            "UPDATE chunks SET confirmed=? WHERE repo=? AND id=?",
            [(time.time(), repo, bytes.fromhex(c)) for c in chunk_ids],
        )

    def count_packs(self, repo: str) -> int:
        self._flush()
        row = self.db.execute(
            "SELECT count(DISTINCT pack) FROM chunks WHERE repo=? AND pack IS NOT NULL", (repo,)
        )
        return int(row.fetchone()[0])

    def stored(self, repo: str, chunk_ids: Iterable[str]) -> dict[str, PackedAt | None]:
        """Which of these chunks are stored, and where: a pack location, or None for a loose
        object. 500 ids per query (one per chunk cost ~4 us each on 20,000 chunks)."""
        self._flush()
        return dict(self._select_chunks(repo, list(dict.fromkeys(chunk_ids))))

    def forget_chunks(self, repo: str, chunk_ids: Iterable[str]) -> None:
        self._flush()
        self._absent.clear()
        self._present.clear()
        self.db.executemany(
            "DELETE FROM chunks WHERE repo=? AND id=?", [(repo, bytes.fromhex(c)) for c in chunk_ids]
        )
        self.commit()

    def count_chunks(self, repo: str) -> int:
        self._flush()
        return int(self.db.execute("SELECT count(*) FROM chunks WHERE repo=?", (repo,)).fetchone()[0])

    # -- recovery point (replicator.rpo) ----------------------------------------------------------

    def load_rpo(self) -> dict[tuple[str, str], RpoRow]:
        rows = self.db.execute(
            "SELECT source, target, pending_since, last_snapshot, last_error, breached, last_alert, held "
            "FROM rpo"
        )
        return {(r[0], r[1]): RpoRow(r[2], r[3], r[4], bool(r[5]), r[6], r[7]) for r in rows}

    def save_rpo(self, source: str, target: str, row: RpoRow) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO rpo VALUES (?,?,?,?,?,?,?,?)",
            (
                source,
                target,
                row.pending_since,
                row.last_snapshot,
                row.last_error,
                int(row.breached),
                row.last_alert,
                row.held,
            ),
        )
        self.commit()

    # -- spend ledger (replicator.budget) ---------------------------------------------------------

    def add_spend(self, target: str, day: str, nbytes: int, puts: int, gets: int) -> None:
        self.db.execute(
            "INSERT INTO spend VALUES (?,?,?,?,?) ON CONFLICT (target, day) DO UPDATE SET "
            "bytes = bytes + excluded.bytes, puts = puts + excluded.puts, gets = gets + excluded.gets",
            (target, day, nbytes, puts, gets),
        )

    def spend(self, target: str | None, first_day: str, last_day: str) -> tuple[int, int, int]:
        """(bytes, puts, gets) of one target, or of all (None), over an inclusive day range."""
        where = "day BETWEEN ? AND ?" + ("" if target is None else " AND target = ?")
        args = (first_day, last_day) if target is None else (first_day, last_day, target)
        row = self.db.execute(
            "SELECT coalesce(sum(bytes),0), coalesce(sum(puts),0), coalesce(sum(gets),0) "
            f"FROM spend WHERE {where}",
            args,
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def heartbeat(self) -> None:
        """The daemon is alive and watching (``replicator status`` uses it when it is not)."""
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('heartbeat', ?)", (str(time.time()),))
        self.commit()

    def last_heartbeat(self) -> float | None:
        row = self.db.execute("SELECT value FROM meta WHERE key='heartbeat'").fetchone()
        return float(row[0]) if row else None

    # -- published snapshots ------------------------------------------------------------------

    def get_published(self, repo: str, source: str) -> tuple[str, str] | None:
        row = self.db.execute(
            "SELECT snapshot, content FROM published WHERE repo=? AND source=?", (repo, source)
        )
        found = row.fetchone()
        return (found[0], found[1]) if found else None

    def set_published(self, repo: str, source: str, snapshot: str, content: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO published VALUES (?,?,?,?,?)",
            (repo, source, snapshot, content, time.time()),
        )
        self.commit()
