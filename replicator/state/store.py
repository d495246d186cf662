"""The core of the state store: the database, its lock, write batching and the run marker.

:class:`StateStore` opens ``state_dir/state.db`` (SQLite, WAL), holds ``state_dir/lock`` so
that one process at a time uses it, brings the schema up to date (replicator.state.schema),
and hands out the typed stores that read and write the rows (module docstring of
replicator.state). It is used from the event-loop thread only.

Writes are batched: a typed store that buffers rows registers as a :class:`Buffer`; the
store writes every buffer when together they hold WRITE_BATCH rows, before a read that needs
them (:meth:`StateStore.flush`), and at each commit. Rows are written many per statement
(:meth:`StateStore.insert`). A transaction is always open; it is committed every ~5,000 rows
written, and by the stores whose contract says so.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from replicator.errors import ConfigError, ReplicatorError
from replicator.log import get_logger
from replicator.state.base import Buffer
from replicator.state.chunks import ChunkIndex
from replicator.state.files import FileCache
from replicator.state.lag import LagHistoryStore
from replicator.state.published import PublishedSnapshots
from replicator.state.rpo import RpoStore
from replicator.state.schema import SCHEMA, migrate
from replicator.state.spend import SpendStore

log = get_logger(__name__)

WRITE_BATCH = 1000
"""Rows buffered before they are written. Each sqlite3 call releases and re-takes the GIL;
while the pipeline's threads are busy that hand-off, not SQLite, cost ~100-250 us per
single-row statement (measured on 10,000 small files)."""
COMMIT_EVERY = 5000
"""Rows written before the open transaction is committed."""


class StateLockedError(ReplicatorError):
    exit_code = 2


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
    """The state database of one ``state_dir`` (module docstring). Typed stores: :attr:`files`,
    :attr:`published`, :attr:`rpo`, :attr:`spend`, and :meth:`chunks` per repository."""

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
        self._buffers: list[Buffer] = []
        self.started = time.time()
        """When this process opened the store: chunks confirmed since are its own doing."""
        self._indexes: dict[str, ChunkIndex] = {}
        self.files = FileCache(self)
        self.published = PublishedSnapshots(self)
        self.rpo = RpoStore(self)
        self.lag_history = LagHistoryStore(self)
        self.spend = SpendStore(self)

    def chunks(self, repo: str) -> ChunkIndex:
        """What the repository with id ``repo`` is known to hold; one object per repository, so
        that every user of it sees the same prefetch caches and buffered claims."""
        index = self._indexes.get(repo)
        if index is None:
            index = self._indexes[repo] = ChunkIndex(self, repo)
        return index

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

    # -- run marker and liveness (the meta table) ----------------------------------------------

    def begin_run(self) -> bool:
        """Mark the store as in use; return False if the previous run did not end cleanly."""
        row = self.db.execute("SELECT value FROM meta WHERE key='clean'").fetchone()
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', '0')")
        self.commit()
        return row is None or row[0] == "1"

    def end_run(self) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', '1')")
        self.commit()

    def heartbeat(self) -> None:
        """The daemon is alive and watching (``replicator status`` uses it when it is not)."""
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('heartbeat', ?)", (str(time.time()),))
        self.commit()

    def last_heartbeat(self) -> float | None:
        row = self.db.execute("SELECT value FROM meta WHERE key='heartbeat'").fetchone()
        return float(row[0]) if row else None

    # -- write batching ---------------------------------------------------------------------

    def register(self, buffer: Buffer) -> None:
        """Have the store write ``buffer``'s rows in its batches (module docstring)."""
        self._buffers.append(buffer)

    def buffered(self) -> None:
        """A buffer took rows: write every buffer once they hold WRITE_BATCH."""
        if sum(b.pending() for b in self._buffers) >= WRITE_BATCH:
            self.flush()
            if self._dirty >= COMMIT_EVERY:
                self.commit()

    def flush(self) -> None:
        """Write every buffered row (before a read that must see them all)."""
        for buffer in self._buffers:
            self._dirty += buffer.write()

    def touch(self, n: int = 1) -> None:
        """``n`` rows were written directly (not buffered): commit once many were."""
        self._dirty += n
        if self._dirty >= COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        self.flush()
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")
        self._dirty = 0

    def insert(self, head: str, rows: Sequence[tuple[object, ...]], tail: str = "") -> None:
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
        self.flush()
        self.db.execute("COMMIT")
        self.db.close()
        os.close(self._lock_fd)
