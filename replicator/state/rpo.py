"""Recovery-point rows: what the daemon leaves behind per source × target, so that a restart
does not reset lag while work is pending, and ``replicator status`` can report without a
daemon (replicator.rpo computes them; this module only keeps them).

Rows (``rpo``; replicator.state.schema): one per (source, target), the fields of
:class:`RpoRow`.
"""

from __future__ import annotations

from dataclasses import dataclass

from replicator.state.base import Core


@dataclass(frozen=True, kw_only=True)
class RpoRow:
    """What the daemon leaves behind per source × target for a restart and for ``status``."""

    pending_since: float | None = None
    """Observation time of the oldest change the target lacks; None when caught up."""
    last_snapshot: float | None = None
    """When the last snapshot was published there (Unix time)."""
    last_error: str | None = None
    """Why the last publish did not happen, or the target's own failure; None when fine."""
    breached: bool = False
    """The lag exceeded the RPO at the last evaluation."""
    last_alert: float | None = None
    """When a breach was last alerted."""
    held: str | None = None
    """Why publishing waits for an operator (replicator.reconcile), or None."""


class RpoStore:
    """The saved :class:`RpoRow` per (source, target). Contract: :meth:`save` is committed
    before it returns."""

    def __init__(self, store: Core) -> None:
        self._store = store

    def load(self) -> dict[tuple[str, str], RpoRow]:
        """Every saved row, by (source, target)."""
        rows = self._store.db.execute(
            "SELECT source, target, pending_since, last_snapshot, last_error, breached, last_alert, held "
            "FROM rpo"
        )
        return {
            (source, target): RpoRow(
                pending_since=pending_since,
                last_snapshot=last_snapshot,
                last_error=last_error,
                breached=bool(breached),
                last_alert=last_alert,
                held=held,
            )
            for source, target, pending_since, last_snapshot, last_error, breached, last_alert, held in rows
        }

    def save(self, source: str, target: str, row: RpoRow) -> None:
        self._store.db.execute(
            "INSERT OR REPLACE INTO rpo (source, target, pending_since, last_snapshot, last_error, "
            "breached, last_alert, held) VALUES (?,?,?,?,?,?,?,?)",
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
        self._store.commit()
