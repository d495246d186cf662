"""Recovery point tracking: how far each target's copy is behind its source, and alerts.

**Lag** (docs/METRICS.md) for a source × target is ``now`` minus the time the oldest change
*observed* on the source, and not yet durable in a published snapshot on that target, was
observed; 0 when caught up. It is computed continuously, not at publish time, so a source
that is written without pause shows a growing lag (issue 18: a file appended every 0.5 s
showed lag 0 for 40 s). A change of a dataset or embedding source is observed when the
daemon first sees it (an event, a rescan or an S3 listing); a change of a checkpoint source
when it makes a set publishable, since an incomplete set is not something a target could
hold yet. A change is then, in turn:

1. *unsubmitted*: seen, not yet taken into a round of the source worker;
2. *in a round*: the worker is building a candidate snapshot from it;
3. *pending* on each target: carried by a candidate, until that candidate (or a newer one)
   is durable there, or the target is found already identical.

A round that finds nothing new resolves its observations (the change was a no-op for the
replica); one that fails hands them back. The oldest observation per pair is kept in the
state store, so a restart does not reset lag while work is pending. Breaches go through
:class:`RpoMonitor`: one error-level event and webhook when a lag first exceeds its
objective, repeated at most every ``alerts.repeat`` while it lasts, and a ``resolved`` event
when it recovers; a publish held by the mass-deletion guard alerts the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from replicator import metrics
from replicator.alerts import WebhookNotifier
from replicator.config import Config
from replicator.log import get_logger
from replicator.state import StateStore
from replicator.state.rpo import RpoRow
from replicator.units import format_duration

log = get_logger(__name__)

Clock = Callable[[], float]
"""Unix time (``time.time``); tests pass a fake one."""


@dataclass
class Pending:
    seq: int
    """Candidate sequence number (per source); 0 for work left pending by a previous run."""
    observed_at: float
    bytes: int
    files: int


@dataclass
class PairState:
    source: str
    target: str
    rpo: float | None
    pending: list[Pending] = field(default_factory=list)
    last_snapshot_at: float | None = None
    last_error: str | None = None
    """The last publish problem on this pair (failed, deferred, superseded); cleared when a
    publish succeeds or the target answers again."""
    breached: bool = False
    last_alert_at: float | None = None
    deferred: bool = False
    """The budget holds this pair's pending work back."""
    held: str | None = None
    """Why a publish waits for an operator (the mass-deletion guard), or None."""
    held_alerted: bool = False
    damaged: dict[str, str] = field(default_factory=dict)
    """Checkpoint sets damaged on the primary, kept whole from an earlier snapshot."""


class LagTracker:
    """Observations per source and pending candidates per source × target, persisted in the
    state store."""

    def __init__(self, config: Config, state: StateStore, clock: Clock = time.time) -> None:
        self.state = state
        self.clock = clock
        self.pairs: dict[tuple[str, str], PairState] = {}
        self.unsubmitted: dict[str, float] = {}
        """Source -> oldest change observed and not yet taken into a round."""
        self.in_round: dict[str, float] = {}
        """Source -> oldest change of the round being built."""
        self.target_errors: dict[str, str] = {}
        """Target -> why it is failing now (cleared when it answers)."""
        saved = state.rpo.load()
        for s in config.sources:
            for t in config.targets:
                pair = PairState(s.name, t.name, s.rpo_for(t.name))
                row = saved.get((s.name, t.name))
                if row is not None:
                    pair.last_snapshot_at, pair.last_error = row.last_snapshot, row.last_error
                    pair.breached, pair.last_alert_at, pair.held = row.breached, row.last_alert, row.held
                    if row.pending_since is not None:
                        pair.pending.append(Pending(0, row.pending_since, 0, 0))
                self.pairs[(s.name, t.name)] = pair
        for pair in self.pairs.values():
            metrics.DELETION_HELD.labels(pair.source, pair.target).set(1 if pair.held else 0)

    # -- observations ------------------------------------------------------------------------

    def oldest(self, pair: PairState) -> float | None:
        """When the oldest change ``pair``'s target lacks was observed; None when caught up."""
        times = [t for t in (self.unsubmitted.get(pair.source), self.in_round.get(pair.source)) if t]
        if pair.pending:
            times.append(pair.pending[0].observed_at)
        return min(times) if times else None

    def lag(self, pair: PairState, now: float) -> float:
        oldest = self.oldest(pair)
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def observed(self, source: str, at: float) -> None:
        """A change was observed on ``source`` at ``at``: every target lacks it from then."""
        first = source not in self.unsubmitted
        self.unsubmitted[source] = min(self.unsubmitted.get(source, at), at)
        if first:
            self._save_source(source)

    def begin_round(self, source: str) -> float | None:
        """The source worker starts a round: it takes every observation so far. Returns the
        oldest, which the round's candidate carries."""
        taken = self.unsubmitted.pop(source, None)
        if taken is not None:
            self.in_round[source] = taken
        return self.in_round.get(source)

    def end_round(self, source: str, *, failed: bool = False) -> None:
        """The round submitted its candidate (or found nothing new): its observations are
        carried by pending candidates now, or resolved. A failed round hands them back."""
        taken = self.in_round.pop(source, None)
        if failed and taken is not None:
            self.unsubmitted[source] = min(self.unsubmitted.get(source, taken), taken)
        else:
            self._save_source(source)

    def submitted(
        self, source: str, target: str, seq: int, observed_at: float, nbytes: int, files: int
    ) -> None:
        """A candidate with changes observed at ``observed_at`` is on its way to ``target``."""
        pair = self.pairs[(source, target)]
        if pair.pending and pair.pending[-1].seq == seq:  # the same candidate again: keep the oldest time
            observed_at = min(observed_at, pair.pending[-1].observed_at)
            pair.pending[-1] = Pending(seq, observed_at, nbytes, files)
            return
        pair.pending.append(Pending(seq, observed_at, nbytes, files))
        if len(pair.pending) == 1:
            self.save(pair)

    # -- outcomes ----------------------------------------------------------------------------

    def durable(
        self, source: str, target: str, seq: int, at: float, damaged: dict[str, str] | None = None
    ) -> None:
        """Candidate ``seq`` (and so every change observed before it) is durable on ``target``."""
        pair = self.pairs[(source, target)]
        first = pair.pending[0].observed_at if pair.pending else None
        pair.pending = [p for p in pair.pending if p.seq > seq]
        pair.last_snapshot_at = at
        pair.last_error = None
        pair.deferred = False
        pair.damaged = damaged or {}
        self._hold(pair, None)
        metrics.DAMAGED_SETS.labels(source, target).set(len(pair.damaged))
        if first is not None:
            metrics.SNAPSHOT_DURATION.labels(source, target).observe(max(0.0, at - first))
        self.save(pair)

    def deferred(self, source: str, target: str, reason: str) -> None:
        pair = self.pairs[(source, target)]
        pair.deferred = True
        self.failed(source, target, reason)

    def held(self, source: str, target: str, reason: str) -> None:
        """A publish waits for an operator (the mass-deletion guard)."""
        pair = self.pairs[(source, target)]
        self._hold(pair, reason)
        self.failed(source, target, reason)

    def _hold(self, pair: PairState, reason: str | None) -> None:
        if pair.held != reason:
            pair.held = reason
            pair.held_alerted = pair.held_alerted and reason is not None
            metrics.DELETION_HELD.labels(pair.source, pair.target).set(1 if reason else 0)
            self.save(pair)

    def failed(self, source: str, target: str, error: str) -> None:
        pair = self.pairs[(source, target)]
        if pair.last_error != error:
            pair.last_error = error
            self.save(pair)

    def target_failed(self, target: str, error: str) -> None:
        """The target itself fails (cannot be opened, probed or written)."""
        self.target_errors[target] = error

    def target_ok(self, target: str) -> None:
        """The target answers again: errors it caused are history."""
        if self.target_errors.pop(target, None) is None:
            return
        for pair in self.pairs.values():
            if pair.target == target and pair.last_error and not pair.held and not pair.deferred:
                pair.last_error = None
                self.save(pair)

    def error(self, pair: PairState) -> str | None:
        """What an operator should read first: the target's own failure, else the pair's."""
        return self.target_errors.get(pair.target) or pair.last_error

    def pending_bytes(self, pair: PairState) -> tuple[int, int]:
        """Bytes and files still to deliver: the newest pending candidate's diff."""
        return (pair.pending[-1].bytes, pair.pending[-1].files) if pair.pending else (0, 0)

    # -- persistence -------------------------------------------------------------------------

    def save(self, pair: PairState) -> None:
        self.state.rpo.save(
            pair.source,
            pair.target,
            RpoRow(
                pending_since=self.oldest(pair),
                last_snapshot=pair.last_snapshot_at,
                last_error=self.error(pair),
                breached=pair.breached,
                last_alert=pair.last_alert_at,
                held=pair.held,
            ),
        )

    def _save_source(self, source: str) -> None:
        for pair in self.pairs.values():
            if pair.source == source:
                self.save(pair)


class RpoMonitor:
    """Turns lag into gauges, log events and webhook alerts (evaluated every second)."""

    def __init__(self, tracker: LagTracker, notifier: WebhookNotifier, repeat: float) -> None:
        self.tracker = tracker
        self.notifier = notifier
        self.repeat = repeat

    def evaluate(self, now: float | None = None) -> None:
        now = self.tracker.clock() if now is None else now
        for pair in self.tracker.pairs.values():
            labels = (pair.source, pair.target)
            lag = self.tracker.lag(pair, now)
            nbytes, files = self.tracker.pending_bytes(pair)
            metrics.RPO_LAG.labels(*labels).set(lag)
            metrics.PENDING_BYTES.labels(*labels).set(nbytes)
            metrics.PENDING_FILES.labels(*labels).set(files)
            if pair.last_snapshot_at is not None:
                metrics.LAST_SNAPSHOT.labels(*labels).set(pair.last_snapshot_at)
            if pair.held and not pair.held_alerted:
                self._held(pair, now)
            if pair.rpo is None:
                continue
            metrics.RPO_OBJECTIVE.labels(*labels).set(pair.rpo)
            breached = lag > pair.rpo
            metrics.RPO_BREACHED.labels(*labels).set(1 if breached else 0)
            if breached and (not pair.breached or now - (pair.last_alert_at or 0) >= self.repeat):
                self._alert(pair, "breached", lag, now)
            elif not breached and pair.breached:
                self._alert(pair, "resolved", lag, now)

    def _held(self, pair: PairState, now: float) -> None:
        pair.held_alerted = True
        text = (
            f"replicator: {pair.source} -> {pair.target}: publishing is HELD: {pair.held}. Check the "
            f"primary; if the deletion is intended, run `replicator release -s {pair.source}`."
        )
        log.error("deletion.held", source=pair.source, target=pair.target, reason=pair.held)
        self.notifier.send(
            {
                "event": "deletion.held",
                "source": pair.source,
                "target": pair.target,
                "reason": pair.held,
                "time": now,
                "text": text,
            }
        )

    def _alert(self, pair: PairState, what: str, lag: float, now: float) -> None:
        assert pair.rpo is not None
        pair.breached = what == "breached"
        pair.last_alert_at = now
        self.tracker.save(pair)
        error = self.tracker.error(pair)
        if what == "breached":
            text = (
                f"replicator: {pair.source} -> {pair.target} is {format_duration(lag)} behind "
                f"(RPO {format_duration(pair.rpo)})" + (f"; last error: {error}" if error else "")
            )
            log.error("rpo.breached", source=pair.source, target=pair.target, lag=round(lag, 1), rpo=pair.rpo)
        else:
            rpo = format_duration(pair.rpo)
            text = f"replicator: {pair.source} -> {pair.target} is back within its RPO ({rpo})"
            log.info("rpo.resolved", source=pair.source, target=pair.target, rpo=pair.rpo)
        self.notifier.send(
            {
                "event": f"rpo.{what}",
                "source": pair.source,
                "target": pair.target,
                "lag_seconds": round(lag, 3),
                "rpo_seconds": pair.rpo,
                "last_error": error,
                "time": now,
                "text": text,
            }
        )
