"""The status page the daemon serves at ``/`` on ``listen``: per source × target the lag
against its RPO with a chart of the last hours, pending work, budgets, recent snapshots and
the last errors.

One self-contained HTML document: inline CSS and an SVG chart drawn here, no script, no
font, no image fetched from anywhere, so it works air-gapped (a Content-Security-Policy of
``default-src 'none'`` makes the browser hold it to that). Read-only, and it shows nothing
``/status`` does not: every name and message is HTML-escaped (source and target names,
paths and error messages are untrusted) and every message passes through the log redactor.

Lag history (:class:`History`: one sample per 30 s, the largest lag seen in it, for 6 h per
pair) is kept in memory and in the state store (replicator.state.lag), so a restarted daemon
still shows the last hours.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING

from replicator.log import REDACTOR
from replicator.units import format_duration, format_size

if TYPE_CHECKING:
    from replicator.rpo import LagTracker
    from replicator.state.lag import LagHistoryStore
    from replicator.status import PairStatus, StatusReport

INTERVAL = 30.0
"""Seconds per lag sample."""
WINDOW = 6 * 3600.0
"""How far back the chart reaches."""
KEEP = 20
"""Recent snapshots and errors listed."""

Pair = tuple[str, str]


@dataclass(frozen=True)
class SnapshotEvent:
    at: float
    source: str
    target: str
    snapshot: str


@dataclass(frozen=True)
class ErrorEvent:
    at: float
    source: str
    target: str
    message: str


class History:
    """What the page shows that a status report does not: lag over time, recent snapshots and
    errors. Bounded: ``window / interval`` samples per pair, ``keep`` events of each kind."""

    def __init__(
        self,
        interval: float = INTERVAL,
        window: float = WINDOW,
        keep: int = KEEP,
        *,
        store: LagHistoryStore | None = None,
        now: float | None = None,
    ) -> None:
        """With ``store``, the samples of the window before ``now`` are loaded from it, and
        each interval's sample is saved there once the interval is over."""
        self.interval, self.window = interval, window
        self.lag: dict[Pair, deque[tuple[float, float]]] = {}
        """Pair -> (start of the sample's interval, largest lag seen in it), oldest first."""
        self.snapshots: deque[SnapshotEvent] = deque(maxlen=keep)
        self.errors: deque[ErrorEvent] = deque(maxlen=keep)
        self._error: dict[Pair, str | None] = {}
        self.store = store
        if store is not None and now is not None:
            for pair, samples in store.load(now - window).items():
                self._ring(pair).extend(samples)

    def _ring(self, pair: Pair) -> deque[tuple[float, float]]:
        return self.lag.setdefault(pair, deque(maxlen=max(1, math.ceil(self.window / self.interval))))

    def add(self, source: str, target: str, now: float, lag: float, error: str | None = None) -> None:
        """One observation (the daemon's monitor makes one per pair every second). The largest
        lag of each interval is kept: a breach between two samples still shows."""
        ring = self._ring((source, target))
        start = now - now % self.interval
        if ring and ring[-1][0] == start:
            ring[-1] = (start, max(ring[-1][1], lag))
        else:
            if ring and self.store is not None:  # the previous interval is over: keep its sample
                self.store.add(source, target, *ring[-1], older_than=now - self.window)
            ring.append((start, lag))
        if error and error != self._error.get((source, target)):
            self.errors.append(ErrorEvent(now, source, target, REDACTOR.scrub(error)))
        self._error[(source, target)] = error

    def save(self) -> None:
        """Keep the samples of the intervals under way (the daemon stops)."""
        if self.store is not None:
            for (source, target), ring in self.lag.items():
                if ring:
                    self.store.add(source, target, *ring[-1])

    def sample(self, tracker: LagTracker, now: float) -> None:
        for pair in tracker.pairs.values():
            self.add(pair.source, pair.target, now, tracker.lag(pair, now), tracker.error(pair))

    def published(self, source: str, target: str, snapshot: str, at: float) -> None:
        self.snapshots.append(SnapshotEvent(at, source, target, snapshot))

    def series(self, source: str, target: str, now: float, current: float) -> list[tuple[float, float]]:
        """The pair's samples within the window, ending with ``current`` at ``now``."""
        points = [(t, v) for t, v in self.lag.get((source, target), ()) if t >= now - self.window and t < now]
        return [*points, (now, current)]


# -- rendering -------------------------------------------------------------------------------

CHART_W, CHART_H = 300, 60


def chart(points: list[tuple[float, float]], rpo: float | None, breached: bool) -> str:
    """An inline SVG line chart of lag over time, with the RPO as a dashed line."""
    t0, t1 = points[0][0], points[-1][0]
    span = max(t1 - t0, 60.0)
    top = max([v for _, v in points] + [rpo or 0.0]) * 1.3 or 1.0  # room for the label above

    def xy(t: float, v: float) -> str:
        return f"{(t - t1 + span) / span * CHART_W:.1f},{CHART_H - v / top * CHART_H:.1f}"

    line = " ".join(xy(t, v) for t, v in points)
    area = f"{xy(t1 - span, 0) if len(points) == 1 else xy(t0, 0)} {line} {xy(t1, 0)}"
    cls = "breached" if breached else "ok"
    title = f"lag over the last {format_duration(span)}: max {format_duration(max(v for _, v in points))}"
    parts = [
        f'<svg class="chart {cls}" data-points="{len(points)}" width="{CHART_W}" height="{CHART_H}" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" role="img" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f'<polygon class="area" points="{area}"/>',
        f'<polyline class="lag" points="{line}"/>',
    ]
    if rpo is not None:
        y = CHART_H - rpo / top * CHART_H
        parts.append(f'<line class="rpo" x1="0" x2="{CHART_W}" y1="{y:.1f}" y2="{y:.1f}"/>')
    last = xy(*points[-1]).split(",")
    parts.append(f'<circle class="now" cx="{last[0]}" cy="{last[1]}" r="2.5"/>')
    peak = format_duration(max(v for _, v in points))
    parts.append(f'<text class="axis" x="3" y="10">max {peak}</text>')
    parts.append(f'<text class="axis" x="3" y="{CHART_H - 3}">-{format_duration(span)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _text(value: str | None) -> str:
    """Untrusted text, ready for HTML: secrets masked, then escaped."""
    return escape(REDACTOR.scrub(value or ""))


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _state(p: PairStatus) -> tuple[str, str]:
    """(css class, words) for a pair."""
    if p.held:
        return "breached", "HELD (replicator release to publish)"
    if p.breached:
        return "breached", "BREACHED"
    if p.deferred:
        return "warn", "deferred by budget"
    if p.last_error:
        return "warn", "retrying"
    return "ok", "ok"


def _pair_row(p: PairStatus, history: History, now: float) -> str:
    cls, words = _state(p)
    rpo = format_duration(p.rpo_seconds) if p.rpo_seconds is not None else "none"
    detail = []
    if p.held:
        detail.append(f"held: {_text(p.held)}")
    if p.damaged:
        detail.append(
            f"{len(p.damaged)} set(s) damaged on the primary, kept: " + _text(", ".join(sorted(p.damaged)))
        )
    if p.last_error:
        detail.append(f'<span class="error">{_text(p.last_error)}</span>')
    return (
        f'<tr class="pair {cls}" data-source="{escape(p.source)}" data-target="{escape(p.target)}">'
        f"<td>{escape(p.source)}</td><td>{escape(p.target)}</td>"
        f'<td class="num"><b>{format_duration(p.lag_seconds)}</b> / {rpo}</td>'
        f"<td>{chart(history.series(p.source, p.target, now, p.lag_seconds), p.rpo_seconds, p.breached)}</td>"
        f'<td class="when">{escape(p.last_snapshot or "never")}</td>'
        f'<td class="num">{format_size(p.pending_bytes)}<br>{p.pending_files} file(s)</td>'
        f'<td><span class="badge {cls}">{words}</span> {"<br>".join(detail)}</td></tr>'
    )


STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#1d2330;
background:#f6f7f9}
h1{font-size:20px;margin:0 0 .2em}h2{font-size:16px;margin:1.4em 0 .4em}
.meta{color:#5b6475}.when{white-space:nowrap}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:.45em .7em;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:middle}
th{background:#eef0f4;font-weight:600}.num{text-align:right;white-space:nowrap}
.badge{display:inline-block;padding:.1em .5em;border-radius:.8em;font-size:12px;font-weight:600}
.badge.ok{background:#d9f2e1;color:#17643a}.badge.warn{background:#fff0c7;color:#7a5300}
.badge.breached{background:#fbd9d9;color:#9b1c1c}.error{color:#9b1c1c;font-family:monospace;font-size:12px}
svg.chart{background:#fbfcfd;border:1px solid #e3e6eb}
svg .lag{fill:none;stroke:#2f6fde;stroke-width:1.5}svg .area{fill:#2f6fde22;stroke:none}
svg.breached .lag{stroke:#d12f2f}svg.breached .area{fill:#d12f2f22}
svg .axis{font-size:9px;fill:#5b6475}
svg .rpo{stroke:#d12f2f;stroke-dasharray:4 3;stroke-width:1}svg .now{fill:#1d2330}
.empty{color:#5b6475;font-style:italic}footer{margin-top:2em;color:#5b6475;font-size:12px}
"""


def render(report: StatusReport, history: History, now: float) -> str:
    overall = "ok" if report.ok else "breached"
    verdict = "all within RPO" if report.ok else "RPO breached or publishing held"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="refresh" content="30">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>replicator: {verdict}</title><style>{STYLE}</style></head><body>",
        f'<h1>replicator <span class="badge {overall}" id="overall">{verdict}</span></h1>',
        f'<p class="meta">status at {escape(report.generated)}; configuration '
        f"{escape(report.config_fingerprint or '-')}. Refreshes every 30 s.</p>",
    ]
    out += [f'<p class="badge warn">{_text(w)}</p>' for w in report.warnings]
    out.append("<h2>Sources × targets</h2>")
    out.append(
        '<table id="pairs"><tr><th>Source</th><th>Target</th><th>Lag / RPO</th>'
        f"<th>Lag, up to the last {format_duration(history.window)}</th>"
        "<th>Last snapshot</th><th>Pending</th>"
        "<th>State / last error</th></tr>"
    )
    out += [_pair_row(p, history, now) for p in report.pairs]
    out.append("</table>")

    out.append("<h2>Budgets</h2>")
    if report.budgets:
        out.append(
            '<table id="budgets"><tr><th>Scope</th><th>Mode</th><th>Today</th><th>Allowance today</th>'
            "<th>This month</th><th>Month limit</th></tr>"
        )
        for b in report.budgets:
            limit = f"${b.month_limit_usd:,.2f}" if b.month_limit_usd is not None else "none"
            out.append(
                f"<tr><td>{escape(b.scope)}</td><td>{escape(b.mode)}</td>"
                f'<td class="num">${b.spent_today_usd:,.4f}</td>'
                f'<td class="num">${b.allowance_today_usd:,.4f}</td>'
                f'<td class="num">${b.spent_month_usd:,.4f}</td><td class="num">{limit}</td></tr>'
            )
        out.append("</table>")
    else:
        out.append('<p class="empty">No budget configured.</p>')

    out.append("<h2>Recent snapshots</h2>")
    if history.snapshots:
        out.append(
            '<table id="snapshots"><tr><th>Published</th><th>Source</th><th>Target</th><th>Snapshot</th></tr>'
        )
        for s in reversed(history.snapshots):
            out.append(
                f"<tr><td>{_when(s.at)}</td><td>{escape(s.source)}</td><td>{escape(s.target)}</td>"
                f"<td><code>{escape(s.snapshot)}</code></td></tr>"
            )
        out.append("</table>")
    else:
        out.append('<p class="empty">None published since the daemon started.</p>')

    out.append("<h2>Recent errors</h2>")
    if history.errors:
        out.append('<table id="errors"><tr><th>Seen</th><th>Source</th><th>Target</th><th>Error</th></tr>')
        for e in reversed(history.errors):
            out.append(
                f"<tr><td>{_when(e.at)}</td><td>{escape(e.source)}</td><td>{escape(e.target)}</td>"
                f'<td class="error">{_text(e.message)}</td></tr>'
            )
        out.append("</table>")
    else:
        out.append('<p class="empty">None since the daemon started.</p>')

    out.append(
        f"<footer>Lag history: one sample per {format_duration(history.interval)}, the largest lag "
        f"seen in it, for {format_duration(history.window)}, kept in the state store. Snapshots and "
        "errors: since the daemon started. "
        "The same data: /status (JSON), /metrics (Prometheus).</footer></body></html>"
    )
    return "\n".join(out)
