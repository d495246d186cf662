"""The last snapshot this state store saw published, per repository and source: a publish
whose manifest has the same content as the last one (and whose ref still names it) writes
nothing (replicator.engine).

Rows (``published``; replicator.state.schema): repository id, source, snapshot id, the
content key of its manifest (replicator.engine.content_key), and when it was published.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from replicator.state.base import Core


class Published(NamedTuple):
    snapshot: str
    """The snapshot's id in the repository."""
    content: str
    """The content key of its manifest: equal keys, same files and sets."""


class PublishedSnapshots:
    """The last published snapshot per (repository id, source). Contract: :meth:`set` is
    committed before it returns (a publish is rare, and a crash must not forget it)."""

    def __init__(self, store: Core) -> None:
        self._store = store

    def get(self, repo: str, source: str) -> Published | None:
        row = self._store.db.execute(
            "SELECT snapshot, content FROM published WHERE repo=? AND source=?", (repo, source)
        ).fetchone()
        return Published(row[0], row[1]) if row else None

    def set(self, repo: str, source: str, snapshot: str, content: str) -> None:
        self._store.db.execute(
            "INSERT OR REPLACE INTO published VALUES (?,?,?,?,?)",
            (repo, source, snapshot, content, time.time()),
        )
        self._store.commit()
