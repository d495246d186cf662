"""Retention policies and the selection they make. Pure functions: no I/O and no clock.

A policy is a union of rules, each keeping some *items* and saying why (restic's ``forget``
policies, https://restic.readthedocs.io/en/stable/060_forget.html):

* ``keep_last: N``: the N newest items.
* ``keep_within: 7d``: every item at most that long older than the *newest item* (not than
  now, as restic does: a source that stopped producing does not age out of its own history).
* ``keep_hourly/daily/weekly/monthly/yearly: N``: for the N most recent hours (days, ISO
  weeks, months, years) that hold an item, the newest item of each. Calendar periods in UTC.
* ``keep_sets: [glob, ...]`` (checkpoint sources): every set whose name matches, forever
  (milestones such as ``step-*000``).

Items are snapshots for datasets and embeddings (time: the snapshot's creation, from its id)
and *checkpoint sets* for checkpoint sources (time: ``newest_mtime_ns``, when the trainer
last wrote the set, of the version retention would keep). For sets, the manifests kept are
the latest (the ref's) and, for each kept set, the newest manifest that holds it; a manifest
that could not be read is kept. A set is dropped only when no kept manifest holds it: sets go
whole, by decision, and never by accident (docs/FORMAT.md section 7).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from replicator.globs import compile_glob
from replicator.paths import one_line
from replicator.units import parse_duration


def _duration_text(value: object) -> str:
    """Keep the user's spelling (``7d``) for reasons; reject what is not a duration."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"invalid duration {value!r}: must be positive")
    return value.strip() if isinstance(value, str) else f"{value:g}s"


Count = Annotated[int | None, Field(None, ge=1)]


class RetentionPolicy(BaseModel):
    """What a target keeps of a source. Rules add up (a union); no rule: keep everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_last: Count = None
    keep_within: Annotated[str, BeforeValidator(_duration_text)] | None = None
    keep_hourly: Count = None
    keep_daily: Count = None
    keep_weekly: Count = None
    keep_monthly: Count = None
    keep_yearly: Count = None
    keep_sets: list[str] = Field(default_factory=list)
    """Checkpoint sources only: globs on set names (one path segment: ``*`` never crosses ``/``)."""

    @field_validator("keep_sets")
    @classmethod
    def _globs(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            if "/" in p:
                raise ValueError(f"keep_sets pattern {p!r}: a set name is one directory, without '/'")
            compile_glob(p)
        return patterns

    @property
    def is_empty(self) -> bool:
        rules = [self.keep_last, self.keep_within, self.keep_sets, *(n for _, n, _ in self.buckets())]
        return not any(rules)

    @property
    def within_seconds(self) -> float | None:
        return None if self.keep_within is None else parse_duration(self.keep_within)

    def buckets(self) -> list[tuple[str, int | None, Callable[[datetime], str]]]:
        """(rule name, count, the calendar period of a time), finest first."""
        return [
            ("hourly", self.keep_hourly, lambda t: t.strftime("%Y-%m-%dT%H")),
            ("daily", self.keep_daily, lambda t: t.strftime("%Y-%m-%d")),
            ("weekly", self.keep_weekly, _iso_week),
            ("monthly", self.keep_monthly, lambda t: t.strftime("%Y-%m")),
            ("yearly", self.keep_yearly, lambda t: t.strftime("%Y")),
        ]

    def describe(self) -> str:
        """One line for humans: ``keep_last 3, keep_daily 7, keep_sets step-*000``."""
        parts = [
            f"{name} {value}"
            for name, value in self.model_dump(exclude_defaults=True).items()
            if name != "keep_sets"
        ]
        parts += [f"keep_sets {p}" for p in self.keep_sets]
        return ", ".join(parts) or "keep everything"


def _iso_week(t: datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year}-W{week:02d}"


@dataclass(frozen=True)
class Item:
    """Something a policy counts: a snapshot (key: its id) or a checkpoint set (its name)."""

    key: str
    time: datetime


def select(items: Iterable[Item], policy: RetentionPolicy) -> dict[str, list[str]]:
    """The keys of the items ``policy`` keeps, each with the reasons it is kept."""
    # Newest first; equal times are ordered by key, so the choice never depends on input order.
    ordered = sorted(items, key=lambda i: (i.time, i.key), reverse=True)
    reasons: dict[str, list[str]] = {}

    def keep(item: Item, why: str) -> None:
        reasons.setdefault(item.key, []).append(why)

    if policy.keep_last:
        for item in ordered[: policy.keep_last]:
            keep(item, f"last {policy.keep_last}")
    within = policy.within_seconds
    if within is not None and ordered:
        try:
            horizon = ordered[0].time - timedelta(seconds=within)
        except OverflowError:  # a span longer than the calendar: everything is within it
            horizon = datetime.min.replace(tzinfo=UTC)
        for item in ordered:
            if item.time >= horizon:
                keep(item, f"within {policy.keep_within}")
    for name, count, period_of in policy.buckets():
        if not count:
            continue
        # Items are newest first, so each period's items are contiguous and its first is its
        # newest: keep that one, for the ``count`` most recent periods that hold any item.
        last: str | None = None
        kept = 0
        for item in ordered:
            if kept >= count:
                break
            period = period_of(item.time)
            if period != last:
                keep(item, f"{name} {period}")
                kept += 1
                last = period
    for pattern in policy.keep_sets:
        regex = compile_glob(pattern)
        for item in ordered:
            if regex.match(item.key):
                keep(item, f"keep_sets {pattern}")
    return reasons


# -- plans: what a target keeps of one source -------------------------------------------------

Summary = Mapping[str, int] | None
"""A snapshot's checkpoint sets (name -> newest_mtime_ns); None if it could not be read."""


@dataclass
class SnapshotVerdict:
    snapshot: str
    keep: bool
    reasons: list[str] = field(default_factory=list)
    sets: list[str] | None = None
    """Checkpoint sources: the sets it holds (None: unreadable). Other sources: None."""


@dataclass
class SetVerdict:
    name: str
    newest_mtime_ns: int
    keep: bool
    holder: str
    """The newest snapshot that holds the set: the one that keeps it, if it is kept."""
    reasons: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """A policy applied to one source on one target: a verdict for every snapshot (oldest
    first) and, for checkpoint sources, for every set (newest first)."""

    policy: RetentionPolicy
    snapshots: list[SnapshotVerdict]
    sets: list[SetVerdict] = field(default_factory=list)

    @property
    def drop(self) -> list[str]:
        return [v.snapshot for v in self.snapshots if not v.keep]

    @property
    def keep(self) -> list[str]:
        return [v.snapshot for v in self.snapshots if v.keep]


def snapshot_time(snapshot_id: str) -> datetime:
    """The creation time in a snapshot id (``YYYYMMDDTHHMMSS.ffffffZ-<digest>``, FORMAT.md 5)."""
    return datetime.strptime(snapshot_id.split("-", 1)[0], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)


def plan_snapshots(ids: Sequence[str], latest: str, policy: RetentionPolicy) -> Plan:
    """Datasets and embeddings: the policy counts snapshots; the latest is always kept."""
    _check_latest(ids, latest)
    if policy.is_empty:
        return Plan(policy, [SnapshotVerdict(s, True, ["no policy"]) for s in ids])
    reasons = select([Item(s, snapshot_time(s)) for s in ids], policy)
    reasons.setdefault(latest, []).insert(0, "latest")
    return Plan(policy, [SnapshotVerdict(s, s in reasons, reasons.get(s, [])) for s in ids])


def plan_sets(
    ids: Sequence[str], latest: str, summaries: Mapping[str, Summary], policy: RetentionPolicy
) -> Plan:
    """Checkpoint sources: the policy counts sets (module docstring). ``ids`` oldest first;
    ``summaries`` says what each holds (a missing or None entry: unreadable, so kept).

    A set is dated by its newest version. Dropping the snapshot of that version can leave an
    older one held by a kept snapshot, dated differently, and change what a period-based rule
    chooses (found by the forget-twice property test). So the plan is made again on what it
    leaves until it drops nothing more: forgetting twice never drops more than once."""
    plan = _plan_sets_once(ids, latest, summaries, policy)
    dropped: dict[str, SnapshotVerdict] = {}
    while plan.drop:
        dropped.update((v.snapshot, v) for v in plan.snapshots if not v.keep)
        left = [i for i in ids if i not in dropped]
        again = _plan_sets_once(left, latest, {i: summaries.get(i) for i in left}, policy)
        if not again.drop:
            break
        plan = again
    else:
        return plan
    # ``again`` is the fixed point: its verdicts for what is left, the earlier ones for what
    # went; sets held only by dropped snapshots are listed as not kept.
    current = {v.snapshot: v for v in again.snapshots}
    snapshots = [current.get(i) or dropped[i] for i in ids]
    listed = {v.name for v in again.sets}
    gone = [
        SetVerdict(v.name, v.newest_mtime_ns, False, v.holder)
        for v in _plan_sets_once(ids, latest, summaries, policy).sets
        if v.name not in listed
    ]
    sets = sorted([*again.sets, *gone], key=lambda v: (v.newest_mtime_ns, v.name), reverse=True)
    return Plan(policy, snapshots, sets)


def _plan_sets_once(
    ids: Sequence[str], latest: str, summaries: Mapping[str, Summary], policy: RetentionPolicy
) -> Plan:
    _check_latest(ids, latest)
    holder: dict[str, tuple[str, int]] = {}
    """set name -> (the newest snapshot holding it, the set's newest_mtime_ns there)"""
    for sid in ids:  # oldest first: later snapshots replace the holder
        for name, mtime in (summaries.get(sid) or {}).items():
            holder[name] = (sid, mtime)
    everything = policy.is_empty
    chosen = {} if everything else select(_set_items(holder), policy)
    reasons: dict[str, list[str]] = {latest: ["latest"]}
    for sid in ids:
        if summaries.get(sid) is None:
            reasons.setdefault(sid, []).append("unreadable: kept")
        elif everything:
            reasons.setdefault(sid, []).append("no policy")
    for name in sorted(chosen, key=lambda n: (holder[n][1], n), reverse=True):
        reasons.setdefault(holder[name][0], []).append(f"holds kept set {one_line(name)}")
    verdicts = [
        SnapshotVerdict(sid, sid in reasons, reasons.get(sid, []), _names(summaries.get(sid))) for sid in ids
    ]
    kept_holding: dict[str, str] = {}
    """set name -> the newest kept snapshot holding it (any version)"""
    for v in verdicts:
        if v.keep:
            for name in v.sets or ():
                kept_holding[name] = v.snapshot
    sets = []
    for name, (sid, mtime) in sorted(holder.items(), key=lambda kv: (kv[1][1], kv[0]), reverse=True):
        why = list(chosen.get(name, []))
        if sid == latest:
            why.insert(0, "in latest")
        elif everything:
            why.append("no policy")
        elif not why and name in kept_holding:
            why.append(f"also in kept snapshot {kept_holding[name]}")
        sets.append(SetVerdict(name, mtime, name in kept_holding, sid, why))
    return Plan(policy, verdicts, sets)


def _set_items(holder: Mapping[str, tuple[str, int]]) -> list[Item]:
    return [Item(name, ns_to_time(mtime)) for name, (_, mtime) in holder.items()]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_S, _MAX_S = -62_000_000_000, 253_000_000_000
"""Seconds from the epoch that datetime can hold with room to spare (years ~5 to ~9987)."""


def ns_to_time(ns: int) -> datetime:
    """A manifest's ``mtime_ns`` as a UTC time; absurd values (manifests are untrusted) are
    clamped instead of failing the whole plan."""
    seconds, rest = divmod(ns, 1_000_000_000)
    if not _MIN_S <= seconds <= _MAX_S:
        return _EPOCH + timedelta(seconds=min(max(seconds, _MIN_S), _MAX_S))
    return _EPOCH + timedelta(seconds=seconds, microseconds=rest // 1000)


def _names(summary: Summary) -> list[str] | None:
    return None if summary is None else sorted(summary)


def _check_latest(ids: Sequence[str], latest: str) -> None:
    if latest not in ids:
        # The callers refuse such a listing before planning (restic#4612); reaching here is a bug.
        raise ValueError(f"the latest snapshot {latest} is not among the snapshots listed")
