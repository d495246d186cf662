"""What one repository is known to hold: the chunk claims deduplication relies on.

Rows (``chunks``, ``repos``; replicator.state.schema): per repository (by its id, not the
target's name: two targets naming one repository share what is known of it) each chunk id
known to be stored, where it is when inside a pack object (pack id, offset, length; NULLs
for a loose chunk object), and when the claim was last *confirmed* (the chunk uploaded, or
seen in a listing); and per repository when it was last listed in full.

The claims are a cache, never the truth about a target. A repository this store has never
listed is listed before it is trusted, and a publish relies only on claims confirmed by this
process (or within the target's ``confirm_window``): replicator.presence decides when
to list and how to confirm; this module keeps the answers.

Look-ups are the hot path of a sync: a chunk offered to a target is looked up once per
target. :meth:`ChunkIndex.prefetch` looks many up in one query and keeps the answers in
memory (the prefetch caches); claims added are buffered (visible at once) and written in the
store's batches.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

from replicator.format.manifest import PackedAt
from replicator.state.base import Core
from replicator.state.schema import LISTED

PREFETCH_LIMIT = 100_000
"""Ids a prefetch cache holds (per repository and answer) before it starts again, empty."""


class ChunkIndex:
    """The chunk claims of one repository (module docstring).

    Contract: :meth:`has` and :meth:`stored` answer from claims added (buffered or written),
    minus those forgotten; a claim added is confirmed as of when it is written; a listing
    (:meth:`begin_listing`, :meth:`add_listed`, :meth:`end_listing`) replaces every claim the
    listing disproves and confirms the rest. Listings of different repositories may run at
    once; two of the same repository may not."""

    def __init__(self, store: Core, repo: str) -> None:
        self._store = store
        self.repo = repo
        """The repository's id (its config object)."""
        self._pending: dict[str, PackedAt | None] = {}
        """Claims added and not yet written (a pack location, or None for a loose chunk)."""
        self._absent: set[str] = set()
        """Chunk ids the database was asked about in one batch (:meth:`prefetch`) and does not
        hold. Valid until the next write of this repository's claims, which clears it."""
        self._present: set[str] = set()
        """Likewise, the ids it does hold; valid until claims are forgotten."""
        store.register(self)

    # -- what is known ------------------------------------------------------------------------

    def has(self, chunk_id: str) -> bool:
        if chunk_id in self._pending or chunk_id in self._present:
            return True
        if chunk_id in self._absent:
            return False
        row = self._store.db.execute(
            "SELECT 1 FROM chunks WHERE repo=? AND id=?", (self.repo, bytes.fromhex(chunk_id))
        ).fetchone()
        return row is not None

    def prefetch(self, chunk_ids: Sequence[str]) -> None:
        """Look up many chunk ids in one query, so that :meth:`has` answers them from
        memory. Each sqlite3 call releases the GIL and, while the pipeline's threads are busy,
        waits to get it back: one call per chunk cost ~80 us per small file."""
        for known in (self._absent, self._present):
            if len(known) > PREFETCH_LIMIT:
                known.clear()
        found = {cid for cid, _ in self._select(chunk_ids)}
        self._absent.update(c for c in chunk_ids if c not in found)
        self._present.update(found)

    def stored(self, chunk_ids: Iterable[str]) -> dict[str, PackedAt | None]:
        """Which of these chunks are stored, and where: a pack location, or None for a loose
        object. 500 ids per query (one per chunk cost ~4 us each on 20,000 chunks)."""
        self._store.flush()
        return dict(self._select(list(dict.fromkeys(chunk_ids))))

    def _select(
        self, chunk_ids: Sequence[str], unconfirmed_since: float | None = None
    ) -> Iterator[tuple[str, PackedAt | None]]:
        """The written claims among ``chunk_ids`` (not the buffered ones), with where they
        are; only those not confirmed since ``unconfirmed_since`` if given. 500 ids per query
        (SQLite's limit on host parameters)."""
        where, extra = (
            ("", ())
            if unconfirmed_since is None
            else (" AND coalesce(confirmed, 0) < ?", (unconfirmed_since,))
        )
        for start in range(0, len(chunk_ids), 500):
            batch = chunk_ids[start : start + 500]
            query = (
                f"SELECT id, pack, offset, length FROM chunks WHERE repo=?{where} "
                f"AND id IN ({','.join('?' * len(batch))})"
            )
            for cid, pack, offset, length in self._store.db.execute(
                query, (self.repo, *extra, *map(bytes.fromhex, batch))
            ):
                yield cid.hex(), None if pack is None else (pack.hex(), offset, length)

    def count(self) -> int:
        """Claims held, loose and packed."""
        self._store.flush()
        row = self._store.db.execute("SELECT count(*) FROM chunks WHERE repo=?", (self.repo,))
        return int(row.fetchone()[0])

    def count_packs(self) -> int:
        """Pack objects the claims name."""
        self._store.flush()
        row = self._store.db.execute(
            "SELECT count(DISTINCT pack) FROM chunks WHERE repo=? AND pack IS NOT NULL", (self.repo,)
        )
        return int(row.fetchone()[0])

    # -- claims added and withdrawn -----------------------------------------------------------

    def add_loose(self, chunk_ids: Iterable[str]) -> None:
        """Record loose chunk objects as stored."""
        for cid in chunk_ids:
            self._pending.setdefault(cid, None)
        self._store.buffered()

    def add_packed(self, chunks: Iterable[tuple[str, PackedAt]]) -> None:
        """Record chunks stored inside pack objects, with where they are. A chunk already known
        keeps its first location (any stored copy serves)."""
        for cid, at in chunks:
            self._pending.setdefault(cid, at)
        self._store.buffered()

    def forget(self, chunk_ids: Iterable[str]) -> None:
        """These chunks are not (or no longer) stored."""
        self._store.flush()
        self._absent.clear()
        self._present.clear()
        self._store.db.executemany(
            "DELETE FROM chunks WHERE repo=? AND id=?", [(self.repo, bytes.fromhex(c)) for c in chunk_ids]
        )
        self._store.commit()

    def forget_packs(self, pack_ids: Iterable[str]) -> None:
        """Every chunk stored in these packs is no longer stored (a collector deleted them)."""
        self._store.flush()
        self._absent.clear()
        self._present.clear()
        self._store.db.executemany(
            "DELETE FROM chunks WHERE repo=? AND pack=?", [(self.repo, bytes.fromhex(p)) for p in pack_ids]
        )
        self._store.commit()

    # -- confirmation -------------------------------------------------------------------------

    def unconfirmed(self, chunk_ids: Iterable[str], window: float = 0.0) -> dict[str, PackedAt | None]:
        """Those of these chunks claimed stored but confirmed neither by this process (since
        the store was opened) nor within the last ``window`` seconds, and where they would be."""
        since = min(self._store.started, time.time() - window)
        self._store.flush()
        return dict(self._select(list(dict.fromkeys(chunk_ids)), unconfirmed_since=since))

    def confirm(self, chunk_ids: Iterable[str]) -> None:
        """These chunks were found stored just now."""
        self._store.flush()
        now = time.time()
        self._store.db.executemany(
            "UPDATE chunks SET confirmed=? WHERE repo=? AND id=?",
            [(now, self.repo, bytes.fromhex(c)) for c in chunk_ids],
        )

    # -- listings -------------------------------------------------------------------------------

    @property
    def listed(self) -> bool:
        """Has this store ever listed the repository in full (and so may trust its claims)?"""
        row = self._store.db.execute("SELECT 1 FROM repos WHERE repo=?", (self.repo,)).fetchone()
        return row is not None

    def mark_listed(self, target: str) -> None:
        self._store.db.execute(
            "INSERT OR REPLACE INTO repos VALUES (?,?,?)", (self.repo, target, time.time())
        )
        self._store.commit()

    def begin_listing(self) -> None:
        """Start replacing the claims with a listing of the repository: :meth:`add_listed` for
        what it lists, then :meth:`end_listing`. The listed ids wait in a temporary table, not
        in memory (a repository can hold millions of chunks), under the repository's id:
        targets are opened, and listed, at once."""
        self._store.flush()
        self._store.db.execute(LISTED)
        self._store.db.execute("DELETE FROM temp.listed WHERE repo=?", (self.repo,))

    def add_listed(self, chunk_ids: Sequence[str]) -> None:
        """Loose chunk objects the listing found: stored."""
        self._list(chunk_ids)
        self.add_loose(chunk_ids)

    def end_listing(self, packs: Iterable[str]) -> None:
        """Forget the chunks the listing did not show: loose ones it did not list, packed ones
        whose pack (of ``packs``, those listed) it did not list. What is left is confirmed."""
        self._store.flush()
        db, repo = self._store.db, self.repo
        unlisted = "NOT IN (SELECT id FROM temp.listed WHERE repo=?)"
        db.execute(f"DELETE FROM chunks WHERE repo=? AND pack IS NULL AND id {unlisted}", (repo, repo))
        db.execute("DELETE FROM temp.listed WHERE repo=?", (repo,))
        self._list(packs)
        db.execute(f"DELETE FROM chunks WHERE repo=? AND pack IS NOT NULL AND pack {unlisted}", (repo, repo))
        db.execute("DELETE FROM temp.listed WHERE repo=?", (repo,))
        db.execute("UPDATE chunks SET confirmed=? WHERE repo=?", (time.time(), repo))
        self._absent.clear()
        self._present.clear()
        self._store.commit()

    def _list(self, ids: Iterable[str]) -> None:
        rows = [(self.repo, bytes.fromhex(i)) for i in ids]
        self._store.db.executemany("INSERT OR IGNORE INTO temp.listed VALUES (?,?)", rows)

    # -- write batching (replicator.state.base.Buffer) ---------------------------------------

    def pending(self) -> int:
        return len(self._pending)

    def write(self) -> int:
        """Write the buffered claims, many rows per statement (Core.insert), confirmed now."""
        if not self._pending:
            return 0
        claims, self._pending = self._pending, {}
        self._absent.clear()
        now, repo = time.time(), self.repo
        self._store.insert(
            "INSERT INTO chunks VALUES",
            [
                (repo, bytes.fromhex(c), None, None, None, now)
                if at is None
                else (repo, bytes.fromhex(c), bytes.fromhex(at[0]), at[1], at[2], now)
                for c, at in claims.items()
            ],
            # A chunk already known keeps its first location (any stored copy serves).
            tail="ON CONFLICT (repo, id) DO UPDATE SET confirmed = excluded.confirmed",
        )
        return len(claims)
