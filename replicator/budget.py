"""Egress-cost budgets: a spend ledger, paced allowances and priorities (docs/BUDGET.md).

**Ledger.** Every request a target actually receives is counted where it happens (the
MeteredTarget wrapper): bytes uploaded, PUT-class requests (PUT, LIST), GET-class requests
(GET, HEAD). Counts are kept per target and UTC day in the state store, exact to the byte and
the request, and flushed every half second and at exit. Dollars are derived from the counts
and the target's ``cost`` prices.

**Pacing.** A monthly budget is spread over the rest of the month: today's allowance is
``(month budget - spent before today) / days left, today included`` — a burst on day 1 can
spend only day 1's share, and what a quiet day leaves is carried forward. With
``usd_per_day`` too, the smaller allowance wins; a month's total never exceeds its budget.

**Priorities.** Lower priorities stop first, keeping headroom for more important work that
arrives later the same day: ``low`` may use up to 70 % of today's allowance, ``normal`` 85 %,
``high`` and ``critical`` 100 %. Past the allowance, ``soft`` mode keeps critical work
flowing (and alerts once per period); ``hard`` mode stops all sending. Deferred work is never
dropped: it stays pending (its lag grows, RPO alerts fire) and resumes when a new day or month
begins or when the budget is raised (SIGHUP reloads it).

A global ``budget`` applies the same rules to the sum of all targets' spend.

**Admission.** Sending is admitted explicitly, by whoever is about to send: the upload queue
before each chunk or pack (replicator.fanout) and the publisher before a manifest and its
ref (replicator.engine), through a :class:`TargetBudget`. An admitted request holds a
*reservation* of its cost until it is made, so concurrent uploads cannot all pass the check
before any is counted (hard mode never overshoots by more than what is in flight at once).
The metering wrapper (replicator.targets.wrappers.MeteredTarget) only records what was sent
(Budget.record), which ends the reservation of the request it recognises.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from replicator import metrics
from replicator.config import PRIORITIES, BudgetConfig, Config, CostConfig, Priority
from replicator.log import get_logger
from replicator.state import StateStore
from replicator.state.spend import Spent

log = get_logger(__name__)

HEADROOM: dict[str, float] = {"low": 0.70, "normal": 0.85, "high": 1.0, "critical": 1.0}
GLOBAL = "*"
"""The scope name of the global budget (and its ledger view: every target summed)."""
GIB = 1 << 30
PUT_CLASS = {"put", "list"}
GET_CLASS = {"get", "stat"}

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Usage:
    bytes: int = 0
    puts: int = 0
    gets: int = 0

    def usd(self, cost: CostConfig) -> float:
        return (
            self.bytes / GIB * cost.egress_usd_per_gib
            + self.puts / 1000 * cost.put_usd_per_1k
            + self.gets / 1000 * cost.get_usd_per_1k
        )

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.bytes + other.bytes, self.puts + other.puts, self.gets + other.gets)


class Ledger:
    """Request counts per target and UTC day; persistent, exact. Per-day totals are loaded
    from the state store once and then kept up to date in memory, so budget checks on the
    hot path cost no database round trip."""

    def __init__(self, state: StateStore, targets: list[str], clock: Clock = utc_now) -> None:
        self.state = state
        self.targets = targets
        self.clock = clock
        self._days: dict[tuple[str, str], Usage] = {}
        self._unsaved: dict[tuple[str, str], Usage] = {}

    def _day(self, target: str, day: str) -> Usage:
        key = (target, day)
        if key not in self._days:
            self._days[key] = Usage(*self.state.spend.total(target, day, day))
        return self._days[key]

    def record(self, target: str, op: str, nbytes: int = 0) -> None:
        """One request ``op`` to ``target`` carrying ``nbytes`` of upload (MeteredTarget)."""
        day = self.clock().strftime("%Y-%m-%d")
        for u in (self._day(target, day), self._unsaved.setdefault((target, day), Usage())):
            u.bytes += nbytes
            u.puts += op in PUT_CLASS
            u.gets += op in GET_CLASS

    def flush(self) -> None:
        for (target, day), u in self._unsaved.items():
            self.state.spend.add(target, day, Spent(u.bytes, u.puts, u.gets))
        if self._unsaved:
            self._unsaved.clear()
            self.state.commit()

    def usage(self, target: str, first: date, last: date) -> Usage:
        """Counts for one target over the inclusive day range."""
        total = Usage()
        day = first
        while day <= last:
            total = total + self._day(target, day.isoformat())
            day += timedelta(days=1)
        return total


@dataclass
class Allowance:
    """One scope's position in the current period."""

    scope: str
    mode: str
    spent_today: float
    spent_month: float
    today: float
    """Today's paced allowance in USD (inf without a limit)."""
    month_limit: float

    @property
    def remaining_today(self) -> float:
        return max(0.0, self.today - self.spent_today)

    @property
    def remaining_month(self) -> float:
        return max(0.0, self.month_limit - self.spent_month)


class Budget:
    """Decides whether a target may spend now, for work of a given priority."""

    def __init__(self, config: Config, ledger: Ledger, clock: Clock = utc_now) -> None:
        self.ledger = ledger
        self.clock = clock
        self.reconfigure(config)
        self._open: dict[str, list[Reservation]] = {}
        """Target -> admitted requests not yet made (their cost counts as spent)."""
        self._alerted: set[tuple[str, str]] = set()
        self.on_exceeded: Callable[[dict[str, object]], None] | None = None
        """Called once per scope and day when soft mode lets critical work past the budget."""

    def reconfigure(self, config: Config) -> None:
        """Apply new prices and limits (SIGHUP)."""
        self.costs = {t.name: t.cost for t in config.targets}
        self.limits: dict[str, BudgetConfig] = {t.name: t.budget for t in config.targets if t.budget}
        if config.budget is not None:
            self.limits[GLOBAL] = config.budget

    @property
    def active(self) -> bool:
        return bool(self.limits)

    def spent(self, scope: str, first: date, last: date) -> float:
        targets = list(self.costs) if scope == GLOBAL else [scope]
        return sum(self.ledger.usage(t, first, last).usd(self.costs[t]) for t in targets)

    def allowance(self, scope: str) -> Allowance | None:
        limit = self.limits.get(scope)
        if limit is None:
            return None
        now = self.clock()
        today = now.date()
        month_start = today.replace(day=1)
        days = calendar.monthrange(now.year, now.month)[1]
        spent_today = self.spent(scope, today, today)
        spent_month = self.spent(scope, month_start, today)
        allowances = []
        if limit.usd_per_month is not None:
            before_today = spent_month - spent_today
            allowances.append(max(0.0, limit.usd_per_month - before_today) / (days - now.day + 1))
        if limit.usd_per_day is not None:
            allowances.append(limit.usd_per_day)
        return Allowance(
            scope,
            limit.mode,
            spent_today,
            spent_month,
            min(allowances),
            limit.usd_per_month if limit.usd_per_month is not None else float("inf"),
        )

    def allows(self, target: str, priority: Priority, cost: float = 0.0) -> bool:
        """May ``target`` spend ``cost`` more USD now on work of ``priority``? Reservations of
        requests admitted and not yet made count as spent."""
        for scope in (target, GLOBAL):
            a = self.allowance(scope)
            if a is None:
                continue
            cost_now = cost + self._reserved(None if scope == GLOBAL else scope)
            within_day = a.spent_today + cost_now <= HEADROOM[priority] * a.today
            within_month = a.spent_month + cost_now <= a.month_limit
            if within_day and within_month:
                continue
            if a.mode == "soft" and priority == "critical":
                self._alert_once(a)
                continue
            return False
        return True

    def reserve(self, target: str, priority: Priority, nbytes: int, puts: int = 1) -> Reservation | None:
        """Admit a request of ``nbytes`` (and ``puts`` PUT-class requests) to ``target`` for
        work of ``priority``: its cost is reserved until :meth:`Reservation.release`. None:
        the budget defers it."""
        cost = self.cost_of(target, nbytes, puts)
        if not self.allows(target, priority, cost):
            return None
        reservation = Reservation(self, target, cost, nbytes)
        self._open.setdefault(target, []).append(reservation)
        return reservation

    def _reserved(self, target: str | None) -> float:
        """USD of admitted requests not yet made, for one target or all (None)."""
        scopes = self._open.values() if target is None else [self._open.get(target, [])]
        return sum(r.cost for rs in scopes for r in rs)

    def record(self, target: str, op: str, nbytes: int = 0) -> None:
        """The MeteredTarget hook: one request made, into the ledger. A PUT of exactly the size
        a reservation was made for is that reservation's request: it now counts as spent in
        the ledger, so the reservation stops counting (no double count)."""
        self.ledger.record(target, op, nbytes)
        if op == "put":
            for reservation in self._open.get(target, ()):
                if reservation.nbytes == nbytes:
                    reservation.release()
                    break

    def cost_of(self, target: str, nbytes: int, puts: int = 1) -> float:
        return Usage(nbytes, puts, 0).usd(self.costs[target])

    def for_target(self, target: str) -> TargetBudget:
        return TargetBudget(self, target)

    def _alert_once(self, a: Allowance) -> None:
        key = (a.scope, self.clock().strftime("%Y-%m-%d"))
        if key not in self._alerted:
            self._alerted.add(key)
            log.error(
                "budget.exceeded",
                scope=a.scope,
                spent_today=round(a.spent_today, 4),
                allowance=round(a.today, 4),
                hint="soft mode: critical work continues past the budget",
            )
            if self.on_exceeded is not None:
                scope = "all targets" if a.scope == GLOBAL else a.scope
                self.on_exceeded(
                    {
                        "event": "budget.exceeded",
                        "scope": a.scope,
                        "spent_today_usd": round(a.spent_today, 6),
                        "allowance_today_usd": round(a.today, 6),
                        "text": f"replicator: budget for {scope} exceeded today (${a.spent_today:.2f} of "
                        f"${a.today:.2f}); soft mode lets critical work continue",
                    }
                )

    def export(self, deferred: dict[tuple[str, str], int]) -> list[Allowance]:
        """Update the budget gauges; ``deferred`` maps (target, priority) to held-back bytes.
        Returns the allowances for reports."""
        report = []
        for scope in sorted(self.limits):
            a = self.allowance(scope)
            assert a is not None
            label = "all" if scope == GLOBAL else scope
            metrics.SPEND_USD.labels(label, "day").set(a.spent_today)
            metrics.SPEND_USD.labels(label, "month").set(a.spent_month)
            metrics.BUDGET_REMAINING_USD.labels(label, "day").set(a.remaining_today)
            if a.month_limit != float("inf"):
                metrics.BUDGET_REMAINING_USD.labels(label, "month").set(a.remaining_month)
            report.append(a)
        for target in self.costs:
            for priority in PRIORITIES:
                metrics.DEFERRED_BYTES.labels(target, priority).set(deferred.get((target, priority), 0))
        return report

    def seconds_to_next_period(self) -> float:
        """Until the next UTC midnight: allowances are recomputed then."""
        now = self.clock()
        tomorrow = datetime(now.year, now.month, now.day, tzinfo=UTC).timestamp() + 86400
        return max(1.0, tomorrow - now.timestamp())


@dataclass(eq=False)
class Reservation:
    """The cost of one admitted request, counted as spent until the request is made (it is
    then in the ledger: Budget.record) or abandoned (:meth:`release`). A context manager:
    ``with reservation: await put(...)``."""

    budget: Budget
    target: str
    cost: float
    nbytes: int
    """The request's body size, by which Budget.record recognises it."""

    def release(self) -> None:
        pending = self.budget._open.get(self.target, [])
        if self in pending:
            pending.remove(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class TargetBudget:
    """The budget as one target's senders see it (the upload queue, the publisher)."""

    budget: Budget
    target: str

    def allows(self, priority: Priority, nbytes: int = 0) -> bool:
        """Would a request of ``nbytes`` be admitted now? (A cheap early check: nothing reserved.)"""
        return self.budget.allows(
            self.target, priority, self.budget.cost_of(self.target, nbytes) if nbytes else 0.0
        )

    def reserve(self, priority: Priority, nbytes: int, puts: int = 1) -> Reservation | None:
        return self.budget.reserve(self.target, priority, nbytes, puts)
