"""The spend ledger's rows: requests each target actually received, per UTC day, exact to
the byte and the request (replicator.budget counts them and prices them; this module only
keeps them).

Rows (``spend``; replicator.state.schema): target, day (``YYYY-MM-DD``), bytes uploaded,
PUT-class and GET-class requests.
"""

from __future__ import annotations

from typing import NamedTuple

from replicator.state.base import Core


class Spent(NamedTuple):
    bytes: int
    puts: int
    gets: int


class SpendStore:
    """Request counts per target and day. Contract: :meth:`add` adds to the day's counts (it
    never replaces them) and is durable after the store's next commit."""

    def __init__(self, store: Core) -> None:
        self._store = store

    def add(self, target: str, day: str, spent: Spent) -> None:
        self._store.db.execute(
            "INSERT INTO spend VALUES (?,?,?,?,?) ON CONFLICT (target, day) DO UPDATE SET "
            "bytes = bytes + excluded.bytes, puts = puts + excluded.puts, gets = gets + excluded.gets",
            (target, day, *spent),
        )

    def total(self, target: str | None, first_day: str, last_day: str) -> Spent:
        """What one target, or all (None), spent over an inclusive range of days."""
        where = "day BETWEEN ? AND ?" + ("" if target is None else " AND target = ?")
        args = (first_day, last_day) if target is None else (first_day, last_day, target)
        row = self._store.db.execute(
            "SELECT coalesce(sum(bytes),0), coalesce(sum(puts),0), coalesce(sum(gets),0) "
            f"FROM spend WHERE {where}",
            args,
        ).fetchone()
        return Spent(int(row[0]), int(row[1]), int(row[2]))
