"""Where everything stands: per source × target, the last snapshot, lag against the RPO,
pending work and the last error. Served by the daemon at ``/status`` and printed by
``replicator status``.

With a daemon running, ``replicator status`` asks it over HTTP. Without one, it reads the
state store (pending observations the daemon left behind) and the targets (each source's
latest snapshot), and scans the sources for changes no snapshot holds yet. Such changes were
never observed, so their lag is estimated conservatively from the moment the daemon was last
seen alive (its heartbeat) — an overestimate, the safe side for alerting.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from replicator import gate
from replicator.budget import GLOBAL, Budget, Ledger
from replicator.config import Config, SourceConfig, TargetConfig
from replicator.errors import ReplicatorError
from replicator.format.manifest import Manifest
from replicator.repository import Repository
from replicator.rpo import LagTracker
from replicator.sources import open_source
from replicator.state import StateStore
from replicator.state.rpo import RpoRow
from replicator.targets import open_target
from replicator.units import format_duration, format_size, format_usd, plural


@dataclass
class PairStatus:
    source: str
    target: str
    last_snapshot: str | None
    lag_seconds: float
    rpo_seconds: float | None
    breached: bool
    pending_bytes: int
    pending_files: int
    last_error: str | None
    deferred: bool = False
    """The budget holds this pending work back."""
    held: str | None = None
    """Why publishing waits for an operator (a mass deletion on the primary), or None."""
    damaged: dict[str, str] = field(default_factory=dict)
    """Checkpoint sets damaged on the primary, kept whole from an earlier snapshot."""


@dataclass
class BudgetStatus:
    scope: str
    """A target name, or "all" for the global budget."""
    mode: str
    spent_today_usd: float
    allowance_today_usd: float
    spent_month_usd: float
    month_limit_usd: float | None


@dataclass
class StatusReport:
    generated: str
    daemon_running: bool
    pairs: list[PairStatus] = field(default_factory=list)
    budgets: list[BudgetStatus] = field(default_factory=list)
    config_fingerprint: str | None = None
    """Identifies the configuration the daemon runs (config_fingerprint)."""
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.breached or p.held for p in self.pairs)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StatusReport:
        return cls(
            doc["generated"],
            doc["daemon_running"],
            [PairStatus(**p) for p in doc["pairs"]],
            [BudgetStatus(**b) for b in doc.get("budgets", [])],
            doc.get("config_fingerprint"),
            list(doc.get("warnings", [])),
        )


def config_fingerprint(config: Config) -> str:
    """What makes two processes the same replicator: its state, sources and targets. Lets
    ``status`` tell its own daemon from another one answering on ``listen``. Secrets are
    masked in the dump, and only a digest leaves the process."""
    doc = config.model_dump_json(include={"state_dir", "sources", "targets"})
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def budget_rows(budget: Budget) -> list[BudgetStatus]:
    rows = []
    for scope in sorted(budget.limits):
        a = budget.allowance(scope)
        assert a is not None
        rows.append(
            BudgetStatus(
                "all" if scope == GLOBAL else scope,
                a.mode,
                round(a.spent_today, 6),
                round(a.today, 6),
                round(a.spent_month, 6),
                None if a.month_limit == float("inf") else a.month_limit,
            )
        )
    return rows


def from_tracker(
    tracker: LagTracker, budget: Budget, fingerprint: str | None = None, now: float | None = None
) -> StatusReport:
    """The daemon's live view."""
    now = tracker.clock() if now is None else now
    report = StatusReport(
        _iso(now) or "", daemon_running=True, budgets=budget_rows(budget), config_fingerprint=fingerprint
    )
    for pair in tracker.pairs.values():
        lag = tracker.lag(pair, now)
        nbytes, files = tracker.pending_bytes(pair)
        report.pairs.append(
            PairStatus(
                pair.source,
                pair.target,
                _iso(pair.last_snapshot_at),
                round(lag, 3),
                pair.rpo,
                pair.rpo is not None and lag > pair.rpo,
                nbytes,
                files,
                tracker.error(pair),
                pair.deferred,
                pair.held,
                dict(pair.damaged),
            )
        )
    return report


async def from_daemon(listen: str) -> StatusReport | None:
    """Ask a running daemon; None if nothing answers at ``listen`` within 5 s."""
    import aiohttp  # ~140 ms to import: `plan` imports this module only for budget_rows

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as session,
            session.get(f"http://{listen}/status") as resp,
        ):
            if resp.status != 200:
                return None
            return StatusReport.from_json(await resp.json())
    except (aiohttp.ClientError, TimeoutError, OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


async def offline(config: Config) -> StatusReport:
    """Status without a daemon: state store + targets + a scan of each source."""
    now = time.time()
    state = StateStore.open(config.state_dir, read_only=True)
    try:
        saved = state.rpo.load()
        heartbeat = state.last_heartbeat()
        budgets = budget_rows(Budget(config, Ledger(state, [t.name for t in config.targets])))
    finally:
        state.close()
    report = StatusReport(_iso(now) or "", daemon_running=False, budgets=budgets)
    current, scan_errors = await _scan_sources(config)
    for t in config.targets:
        manifests, target_error = await _latest_manifests(config, t)
        for s in config.sources:
            row = saved.get((s.name, t.name), RpoRow())
            manifest, now_files = manifests.get(s.name), current.get(s.name, {})
            pair = _offline_pair(s, t.name, row, manifest, now_files, now, heartbeat)
            pair.last_error = target_error or scan_errors.get(s.name) or pair.last_error
            report.pairs.append(pair)
    return report


Signatures = dict[str, tuple[int, int]]
"""Path -> (size, mtime_ns): what tells a changed file."""


async def _scan_sources(config: Config) -> tuple[dict[str, Signatures], dict[str, str]]:
    """Each source's files as a pass would select them now, and the sources that failed to scan."""
    current: dict[str, Signatures] = {}
    scan_errors: dict[str, str] = {}
    for s in config.sources:
        source = open_source(s)
        try:
            listing = await source.scan()
            files = gate.select(s, listing.files, time.time_ns(), listing.unreadable).files
            current[s.name] = {f.path: (f.size, f.mtime_ns) for f in files}
        except ReplicatorError as exc:
            scan_errors[s.name] = str(exc)
        finally:
            await source.close()
    return current, scan_errors


async def _latest_manifests(config: Config, t: TargetConfig) -> tuple[dict[str, Manifest | None], str | None]:
    """Each source's latest manifest on target ``t`` (giving up on it after 5 s), or why not."""
    manifests: dict[str, Manifest | None] = {}
    try:
        target = await open_target(
            t.model_copy(update={"retry": t.retry.model_copy(update={"give_up_after": 5.0})})
        )
        try:
            repo = await Repository.open(target)
            for s in config.sources:
                sid = await repo.latest(s.name)
                manifests[s.name] = await repo.load_manifest(s.name, sid) if sid else None
        finally:
            await target.close()
    except ReplicatorError as exc:
        return manifests, str(exc)
    return manifests, None


def _offline_pair(
    s: SourceConfig,
    target: str,
    row: RpoRow,
    manifest: Manifest | None,
    now_files: Signatures,
    now: float,
    heartbeat: float | None,
) -> PairStatus:
    """One pair from what the state store saved, the target's latest manifest and a scan.
    Changes no snapshot holds and the daemon never observed count from its last heartbeat."""
    pending_since, last_snapshot = row.pending_since, row.last_snapshot
    have = {f.path: (f.size, f.mtime_ns) for f in manifest.files} if manifest else {}
    changed = [p for p, sig in now_files.items() if have.get(p) != sig]
    changed += [p for p in have if p not in now_files]
    if last_snapshot is None and manifest is not None:
        last_snapshot = manifest.created_at.timestamp()
    lag = 0.0
    if pending_since is not None:
        lag = now - pending_since
    elif changed:
        seen = heartbeat or last_snapshot or now
        lag = now - seen
    rpo = s.rpo_for(target)
    return PairStatus(
        s.name,
        target,
        _iso(last_snapshot),
        round(max(lag, 0.0), 3),
        rpo,
        rpo is not None and lag > rpo,
        sum(now_files.get(p, (0, 0))[0] for p in changed),
        len(changed),
        row.last_error,
        held=row.held,
    )


def render(report: StatusReport) -> str:
    rows = [("SOURCE", "TARGET", "LAST SNAPSHOT", "LAG", "RPO", "PENDING", "STATE / LAST ERROR")]
    for p in report.pairs:
        state = "BREACHED" if p.breached else "ok"
        if p.held:
            state = ("BREACHED, " if p.breached else "") + "HELD (replicator release to publish)"
        if p.deferred:
            state += " (deferred by budget)"
        if p.damaged:
            state += f" [{len(p.damaged)} set(s) damaged on the primary, last complete version kept: "
            state += ", ".join(sorted(p.damaged)) + "]"
        if p.last_error:
            state += f": {p.last_error}"
        rows.append(
            (
                p.source,
                p.target,
                p.last_snapshot or "never",
                format_duration(p.lag_seconds),
                format_duration(p.rpo_seconds) if p.rpo_seconds is not None else "-",
                f"{format_size(p.pending_bytes)} / {plural(p.pending_files, 'file')}",
                state,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    where = (
        "from the running daemon" if report.daemon_running else "no daemon running: from state and targets"
    )
    for b in report.budgets:
        usd = format_usd
        month = f"{usd(b.spent_month_usd)} of {usd(b.month_limit_usd)}" if b.month_limit_usd else "-"
        lines.append(
            f"budget {b.scope} ({b.mode}): today {usd(b.spent_today_usd)} of {usd(b.allowance_today_usd)} "
            f"(paced), month {month}"
        )
    warnings = [f"warning: {w}" for w in report.warnings]
    return "\n".join([*warnings, f"status at {report.generated} ({where})", *lines])


async def gather_status(config: Config) -> StatusReport:
    """Ask the daemon on ``listen`` if it serves this configuration; else read state and targets."""
    warnings = []
    if config.listen:
        live = await from_daemon(config.listen)
        if live is not None and live.config_fingerprint == config_fingerprint(config):
            return live
        if live is not None:
            warnings.append(
                f"the daemon answering on {config.listen} runs another configuration; "
                "showing this configuration's state and targets instead"
            )
    report = await offline(config)
    report.warnings += warnings
    return report
