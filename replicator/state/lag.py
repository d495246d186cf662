"""Lag history for the status page (replicator.page): one sample per source × target and
interval, the largest lag seen in it, kept for the page's window, so that a restarted daemon
still shows the last hours.

Rows (``lag_history``; replicator.state.schema): source, target, the start of the interval
(Unix time), the lag in seconds.
"""

from __future__ import annotations

from replicator.state.base import Core


class LagHistoryStore:
    """Contract: :meth:`add` is committed before it returns (a few rows a minute)."""

    def __init__(self, store: Core) -> None:
        self._store = store

    def add(
        self, source: str, target: str, at: float, lag: float, *, older_than: float | None = None
    ) -> None:
        """Keep one sample (replacing one of the same interval); drop the samples before
        ``older_than``, if given."""
        db = self._store.db
        db.execute("INSERT OR REPLACE INTO lag_history VALUES (?,?,?,?)", (source, target, at, lag))
        if older_than is not None:
            db.execute("DELETE FROM lag_history WHERE at < ?", (older_than,))
        self._store.commit()

    def load(self, since: float) -> dict[tuple[str, str], list[tuple[float, float]]]:
        """The samples from ``since`` on, per (source, target), oldest first."""
        out: dict[tuple[str, str], list[tuple[float, float]]] = {}
        rows = self._store.db.execute(
            "SELECT source, target, at, lag FROM lag_history WHERE at >= ? ORDER BY source, target, at",
            (since,),
        )
        for source, target, at, lag in rows:
            out.setdefault((source, target), []).append((at, lag))
        return out
