"""Recovery point tracking: how far each target's copy is behind its source, and alerts.

**Lag** (docs/METRICS.md) for a source × target is ``now`` minus the time the oldest change
*observed* on the source, and not yet durable in a published snapshot on that target, was
observed; 0 when caught up. A change is observed when the daemon first sees it (an event, a
rescan or an S3 listing); for a checkpoint set that is the moment the set becomes complete,
since an incomplete set is not something a target could hold yet. Each candidate snapshot
carries the observation time of the changes it brings; publishing a candidate (or finding
the target already identical) makes every change up to it durable.

The oldest pending observation time is kept in the state store, so a restart does not reset
lag to 0 while work is still pending. Breaches go through :class:`RpoMonitor`: one
error-level event and webhook when a lag first exceeds its objective, repeated at most every
``alerts.repeat`` while it lasts, and a ``resolved`` event when it recovers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from replicator import metrics
from replicator.alerts import WebhookNotifier
from replicator.config import Config
from replicator.log import get_logger
from replicator.state import StateStore
from replicator.units import format_duration

log = get_logger(__name__)


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
    breached: bool = False
    last_alert_at: float | None = None
    deferred: bool = False
    """The budget holds this pair's pending work back."""

    def lag(self, now: float) -> float:
        return max(0.0, now - self.pending[0].observed_at) if self.pending else 0.0


class LagTracker:
    """Pending observations per source × target, persisted in the state store."""

    def __init__(self, config: Config, state: StateStore) -> None:
        self.state = state
        self.pairs: dict[tuple[str, str], PairState] = {}
        saved = state.load_rpo()
        for s in config.sources:
            for t in config.targets:
                pair = PairState(s.name, t.name, s.rpo_for(t.name))
                row = saved.get((s.name, t.name))
                if row is not None:
                    (
                        pending_since,
                        pair.last_snapshot_at,
                        pair.last_error,
                        pair.breached,
                        pair.last_alert_at,
                    ) = row
                    if pending_since is not None:
                        pair.pending.append(Pending(0, pending_since, 0, 0))
                self.pairs[(s.name, t.name)] = pair

    def save(self, pair: PairState) -> None:
        self.state.save_rpo(
            pair.source,
            pair.target,
            pair.pending[0].observed_at if pair.pending else None,
            pair.last_snapshot_at,
            pair.last_error,
            pair.breached,
            pair.last_alert_at,
        )

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

    def durable(self, source: str, target: str, seq: int, at: float) -> None:
        """Candidate ``seq`` (and so every change observed before it) is durable on ``target``."""
        pair = self.pairs[(source, target)]
        first = pair.pending[0].observed_at if pair.pending else None
        pair.pending = [p for p in pair.pending if p.seq > seq]
        pair.last_snapshot_at = at
        pair.last_error = None
        pair.deferred = False
        if first is not None:
            metrics.SNAPSHOT_DURATION.labels(source, target).observe(max(0.0, at - first))
        self.save(pair)

    def deferred(self, source: str, target: str, reason: str) -> None:
        pair = self.pairs[(source, target)]
        pair.deferred = True
        self.failed(source, target, reason)

    def failed(self, source: str, target: str, error: str) -> None:
        pair = self.pairs[(source, target)]
        if pair.last_error != error:
            pair.last_error = error
            self.save(pair)

    def pending_bytes(self, pair: PairState) -> tuple[int, int]:
        """Bytes and files still to deliver: the newest pending candidate's diff."""
        return (pair.pending[-1].bytes, pair.pending[-1].files) if pair.pending else (0, 0)


class RpoMonitor:
    """Turns lag into gauges, log events and webhook alerts (evaluated every second)."""

    def __init__(self, tracker: LagTracker, notifier: WebhookNotifier, repeat: float) -> None:
        self.tracker = tracker
        self.notifier = notifier
        self.repeat = repeat

    def evaluate(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for pair in self.tracker.pairs.values():
            labels = (pair.source, pair.target)
            lag = pair.lag(now)
            nbytes, files = self.tracker.pending_bytes(pair)
            metrics.RPO_LAG.labels(*labels).set(lag)
            metrics.PENDING_BYTES.labels(*labels).set(nbytes)
            metrics.PENDING_FILES.labels(*labels).set(files)
            if pair.last_snapshot_at is not None:
                metrics.LAST_SNAPSHOT.labels(*labels).set(pair.last_snapshot_at)
            if pair.rpo is None:
                continue
            metrics.RPO_OBJECTIVE.labels(*labels).set(pair.rpo)
            breached = lag > pair.rpo
            metrics.RPO_BREACHED.labels(*labels).set(1 if breached else 0)
            if breached and (not pair.breached or now - (pair.last_alert_at or 0) >= self.repeat):
                self._alert(pair, "breached", lag, now)
            elif not breached and pair.breached:
                self._alert(pair, "resolved", lag, now)

    def _alert(self, pair: PairState, what: str, lag: float, now: float) -> None:
        assert pair.rpo is not None
        pair.breached = what == "breached"
        pair.last_alert_at = now
        self.tracker.save(pair)
        if what == "breached":
            text = (
                f"replicator: {pair.source} -> {pair.target} is {format_duration(lag)} behind "
                f"(RPO {format_duration(pair.rpo)})"
                + (f"; last error: {pair.last_error}" if pair.last_error else "")
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
                "last_error": pair.last_error,
                "time": now,
                "text": text,
            }
        )
