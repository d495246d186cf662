"""Every table of the state database, its schema version, and the way from each earlier
version to this one: the one place the database's shape is written down.

The typed stores (one module each in this package) say what their rows mean; their columns
are here, so that a migration and the tables it changes are read together.

``PRAGMA user_version`` holds the version. Version 0 is a new, empty database. An older
version is migrated step by step (:data:`MIGRATIONS`); a version this code does not know (a
downgrade) is dropped and created afresh: the store is a cache, and guessing at a newer
schema could trust claims it does not understand. tests/test_state.py opens a database of
every earlier version as that version's code created it.
"""

from __future__ import annotations

import sqlite3

from replicator.log import get_logger

log = get_logger(__name__)

SCHEMA_VERSION = 6

_LAG_HISTORY = """
CREATE TABLE IF NOT EXISTS lag_history (
    source TEXT NOT NULL, target TEXT NOT NULL, at REAL NOT NULL, lag REAL NOT NULL,
    PRIMARY KEY (source, target, at)) WITHOUT ROWID;
"""
"""Lag samples for the status page (replicator.state.lag)."""

_FILE_TABLES = """
CREATE TABLE IF NOT EXISTS files (
    source TEXT NOT NULL, path BLOB NOT NULL, signature TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, mode INTEGER NOT NULL,
    PRIMARY KEY (source, path)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS file_chunks (
    source TEXT NOT NULL, path BLOB NOT NULL, hash_key TEXT NOT NULL,
    digest TEXT NOT NULL, chunks BLOB NOT NULL,
    PRIMARY KEY (source, path, hash_key)) WITHOUT ROWID;
"""
"""The file cache (replicator.state.files)."""

MIGRATIONS = {
    # Version n -> n + 1, applied in turn.
    # 1 -> 2: pack locations (a packed chunk's row names its pack; loose chunks have NULLs).
    1: "ALTER TABLE chunks ADD COLUMN pack BLOB; ALTER TABLE chunks ADD COLUMN offset INTEGER; "
    "ALTER TABLE chunks ADD COLUMN length INTEGER;",
    # 2 -> 3: publishes held by the mass-deletion guard (replicator.reconcile).
    2: "ALTER TABLE rpo ADD COLUMN held TEXT;",
    # 3 -> 4: which process last confirmed a chunk is stored (ChunkIndex.unconfirmed).
    3: "ALTER TABLE chunks ADD COLUMN confirmed REAL;",
    # 4 -> 5: paths as BLOBs of their exact bytes (issue 17). The file cache is rebuilt by
    # reading the sources once more; what targets hold (chunks) is kept.
    4: "DROP TABLE IF EXISTS files; DROP TABLE IF EXISTS file_chunks;" + _FILE_TABLES,
    # 5 -> 6: lag history for the status page (replicator.page), which starts empty.
    5: _LAG_HISTORY,
}

SCHEMA = (
    _FILE_TABLES
    + _LAG_HISTORY
    + """
CREATE TABLE IF NOT EXISTS repos (
    repo TEXT PRIMARY KEY, target TEXT NOT NULL, listed_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    repo TEXT NOT NULL, id BLOB NOT NULL, pack BLOB, offset INTEGER, length INTEGER, confirmed REAL,
    PRIMARY KEY (repo, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rpo (
    source TEXT NOT NULL, target TEXT NOT NULL, pending_since REAL, last_snapshot REAL,
    last_error TEXT, breached INTEGER NOT NULL, last_alert REAL, held TEXT,
    PRIMARY KEY (source, target)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spend (
    target TEXT NOT NULL, day TEXT NOT NULL, bytes INTEGER NOT NULL, puts INTEGER NOT NULL,
    gets INTEGER NOT NULL, PRIMARY KEY (target, day)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS published (
    repo TEXT NOT NULL, source TEXT NOT NULL, snapshot TEXT NOT NULL, content TEXT NOT NULL,
    published_at REAL NOT NULL, PRIMARY KEY (repo, source)) WITHOUT ROWID;
"""
)
"""Every table as this version has it:

* ``files``, ``file_chunks``: the file cache (replicator.state.files);
* ``repos``, ``chunks``: what each repository holds (replicator.state.chunks);
* ``rpo``: recovery-point rows per source × target (replicator.state.rpo);
* ``spend``: request counts per target and UTC day (replicator.state.spend);
* ``published``: the last snapshot per repository and source (replicator.state.published);
* ``lag_history``: lag samples per source × target for the status page (replicator.state.lag);
* ``meta``: the run marker and the daemon's heartbeat (replicator.state.store)."""

LISTED = (
    "CREATE TEMP TABLE IF NOT EXISTS listed (repo TEXT NOT NULL, id BLOB NOT NULL, "
    "PRIMARY KEY (repo, id)) WITHOUT ROWID"
)
"""Scratch rows of a listing under way (replicator.state.chunks), per connection: never
migrated, gone when the process ends."""


def migrate(db: sqlite3.Connection) -> None:
    """Bring ``db`` to :data:`SCHEMA_VERSION`: migrate an older version, reset an unknown one,
    create what is missing. Raises sqlite3.DatabaseError for a damaged file."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    while version in MIGRATIONS:
        db.executescript(MIGRATIONS[version])
        version += 1
        db.execute(f"PRAGMA user_version={version}")
    if version not in (0, SCHEMA_VERSION):
        log.warning("state.schema_reset", found=version, expected=SCHEMA_VERSION)
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            db.execute(f'DROP TABLE "{table}"')
    db.executescript(SCHEMA)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
