"""The state store's database across schema versions: every earlier version still opens,
keeping what the targets hold; a newer one is reset; a damaged file is set aside.

The CREATE statements below are those each version's code wrote (git history of
replicator/state.py), not derived from today's schema: a migration is tested against the
databases users have."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from replicator.page import History
from replicator.state import SCHEMA_VERSION, StateStore
from replicator.state.published import Published
from replicator.state.rpo import RpoRow
from replicator.state.spend import Spent

_UNCHANGED = """
CREATE TABLE files (
    source TEXT NOT NULL, path TEXT NOT NULL, signature TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, mode INTEGER NOT NULL,
    PRIMARY KEY (source, path)) WITHOUT ROWID;
CREATE TABLE file_chunks (
    source TEXT NOT NULL, path TEXT NOT NULL, hash_key TEXT NOT NULL,
    digest TEXT NOT NULL, chunks BLOB NOT NULL,
    PRIMARY KEY (source, path, hash_key)) WITHOUT ROWID;
CREATE TABLE repos (
    repo TEXT PRIMARY KEY, target TEXT NOT NULL, listed_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE spend (
    target TEXT NOT NULL, day TEXT NOT NULL, bytes INTEGER NOT NULL, puts INTEGER NOT NULL,
    gets INTEGER NOT NULL, PRIMARY KEY (target, day)) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE published (
    repo TEXT NOT NULL, source TEXT NOT NULL, snapshot TEXT NOT NULL, content TEXT NOT NULL,
    published_at REAL NOT NULL, PRIMARY KEY (repo, source)) WITHOUT ROWID;
"""
_RPO = """
CREATE TABLE rpo (
    source TEXT NOT NULL, target TEXT NOT NULL, pending_since REAL, last_snapshot REAL,
    last_error TEXT, breached INTEGER NOT NULL, last_alert REAL{held},
    PRIMARY KEY (source, target)) WITHOUT ROWID;
"""
_CHUNKS = """
CREATE TABLE chunks (
    repo TEXT NOT NULL, id BLOB NOT NULL{columns},
    PRIMARY KEY (repo, id)) WITHOUT ROWID;
"""
_PACKED = ", pack BLOB, offset INTEGER, length INTEGER"
OLD_SCHEMAS = {
    1: _UNCHANGED + _RPO.format(held="") + _CHUNKS.format(columns=""),
    2: _UNCHANGED + _RPO.format(held="") + _CHUNKS.format(columns=_PACKED),
    3: _UNCHANGED + _RPO.format(held=", held TEXT") + _CHUNKS.format(columns=_PACKED),
    4: _UNCHANGED + _RPO.format(held=", held TEXT") + _CHUNKS.format(columns=_PACKED + ", confirmed INTEGER"),
    5: _UNCHANGED.replace("path TEXT", "path BLOB")
    + _RPO.format(held=", held TEXT")
    + _CHUNKS.format(columns=_PACKED + ", confirmed REAL"),
}
"""Schema versions 1 to 5 (the move to paths as BLOBs, 4 -> 5: tests/test_names.py)."""

LOOSE, PACKED, PACK = "01" * 16, "02" * 16, "0a" * 16


def old_store(path: Path, version: int) -> None:
    """A state database as version ``version`` left it: a listed repository with a loose chunk
    (and, from version 2, a packed one), a file, an RPO row, a day's spend, a published
    snapshot, and a clean end of run."""
    with contextlib.closing(sqlite3.connect(path / "state.db")) as db, db:
        db.executescript(OLD_SCHEMAS[version])
        db.execute("INSERT INTO files VALUES ('s', 'a.bin', 'sig', 1, 2, 420)")
        db.execute("INSERT INTO repos VALUES ('repo', 't', 1.0)")
        columns = len(db.execute("SELECT * FROM chunks").description)
        db.execute(f"INSERT INTO chunks VALUES ('repo', x'{LOOSE}'{', NULL' * (columns - 2)})")
        if version >= 2:
            packed = (f"x'{PACKED}'", f"x'{PACK}'", "0", "10", *["NULL"] * (columns - 5))
            db.execute(f"INSERT INTO chunks VALUES ('repo', {', '.join(packed)})")
        held = ", 'held'" if version >= 3 else ""
        db.execute(f"INSERT INTO rpo VALUES ('s', 't', 5.0, 4.0, 'boom', 1, 3.0{held})")
        db.execute("INSERT INTO spend VALUES ('t', '2026-12-01', 100, 2, 3)")
        db.execute("INSERT INTO published VALUES ('repo', 's', 'snap', 'key', 1.0)")
        db.execute("INSERT INTO meta VALUES ('clean', '1')")
        db.execute(f"PRAGMA user_version={version}")


@pytest.mark.parametrize("version", sorted(OLD_SCHEMAS))
def test_a_state_store_of_each_earlier_version_opens_keeping_what_targets_hold(
    tmp_path: Path, version: int
) -> None:
    old_store(tmp_path, version)
    state = StateStore.open(tmp_path)
    try:
        assert state.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert not [p for p in tmp_path.iterdir() if "corrupt" in p.name], "migrated, not rebuilt"
        assert state.begin_run(), "the previous run ended cleanly"
        chunks = state.chunks("repo")
        assert chunks.listed
        expected = {LOOSE: None, **({PACKED: (PACK, 0, 10)} if version >= 2 else {})}
        assert chunks.stored([LOOSE, PACKED]) == expected
        assert chunks.unconfirmed([LOOSE]) == {LOOSE: None}, "confirmed by nobody yet"
        held = "held" if version >= 3 else None
        assert state.rpo.load() == {
            ("s", "t"): RpoRow(
                pending_since=5.0,
                last_snapshot=4.0,
                last_error="boom",
                breached=True,
                last_alert=3.0,
                held=held,
            )
        }
        assert state.spend.total("t", "2026-12-01", "2026-12-01") == Spent(100, 2, 3)
        assert state.published.get("repo", "s") == Published("snap", "key")
        if version < 5:
            assert state.files.count("s") == 0, "the file cache is rebuilt by reading the sources"
        else:
            assert state.files.count("s") == 1, "a file cache of BLOB paths is kept"
        assert state.lag_history.load(0.0) == {}, "the status page's lag history starts empty"
        state.lag_history.add("s", "t", 30.0, 2.5)
        assert state.lag_history.load(0.0) == {("s", "t"): [(30.0, 2.5)]}
    finally:
        state.close()


def test_the_status_pages_lag_history_survives_a_restart(tmp_path: Path) -> None:
    """Samples of finished intervals are saved as the daemon goes, the one under way when it
    stops; a restart loads the window's worth, and samples older than the window go."""
    state = StateStore.open(tmp_path)
    try:
        h = History(interval=30, window=300, store=state.lag_history, now=0.0)
        t0 = 1_000_020.0  # an interval starts here
        h.add("s", "t", t0 - 600, 99.0)  # long before the window of what follows
        for i in range(12):
            h.add("s", "t", t0 + 10 * i, float(i))  # 4 intervals: 0..2, 3..5, 6..8, 9..11
        h.save()
    finally:
        state.close()
    state = StateStore.open(tmp_path)
    try:
        now = t0 + 120
        h = History(interval=30, window=300, store=state.lag_history, now=now)
        assert list(h.lag[("s", "t")]) == [(t0, 2.0), (t0 + 30, 5.0), (t0 + 60, 8.0), (t0 + 90, 11.0)]
        h.add("s", "t", now, 1.0)  # the interval after
        assert h.series("s", "t", now + 1, 1.0)[0] == (t0, 2.0)
        saved = state.db.execute("SELECT min(at) FROM lag_history").fetchone()[0]
        assert saved >= now - 300, "samples older than the window are not dropped"
    finally:
        state.close()


def test_a_state_store_of_a_newer_version_is_reset(tmp_path: Path) -> None:
    """A downgrade: this code cannot know what a newer schema means, so it starts over (the
    targets are listed again) rather than guess."""
    old_store(tmp_path, 4)
    with contextlib.closing(sqlite3.connect(tmp_path / "state.db")) as db, db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    state = StateStore.open(tmp_path)
    try:
        assert state.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert not state.chunks("repo").listed
        assert state.chunks("repo").stored([LOOSE]) == {}
    finally:
        state.close()


def test_a_damaged_state_file_is_set_aside_and_rebuilt(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"not a database" * 100)
    state = StateStore.open(tmp_path)
    try:
        assert not state.chunks("repo").listed
        (aside,) = [p.name for p in tmp_path.iterdir() if "corrupt" in p.name]
        assert aside.startswith("state.db.corrupt-")
    finally:
        state.close()
