"""What the commands print: each command's result object as lines of text, or as JSON.

The library returns result objects (``sync``'s per-source results, a plan, snapshot rows, a
restore outcome, verifications); :mod:`replicator.cli` prints them through these functions.
``status`` renders with :func:`replicator.status.render`, next to the daemon's view it shares.

Start-up time counts: this module is imported by every command, so it imports only light
helpers; the result types are named for the type checker alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from replicator.paths import display_path, one_line
from replicator.units import format_duration, format_size, plural

if TYPE_CHECKING:
    from replicator.config_check import ConfigReport
    from replicator.contents import Change, Listing, SnapshotDiff
    from replicator.engine import SourceResult, TargetResult
    from replicator.gc.prune import PruneResult
    from replicator.gc.stats import TargetStats
    from replicator.plan import Plan, TargetPlan
    from replicator.repository import SnapshotRow
    from replicator.restore.run import RestoreOutcome
    from replicator.retention.apply import ForgetReport
    from replicator.shared.report import PartsReport
    from replicator.verify.drill import DrillReport, SourceDrill
    from replicator.verify.load import SetLoad
    from replicator.verify.run import TargetVerification


def to_json(data: Any) -> str:
    """``data`` as indented JSON; dataclasses become objects, anything else unknown a string."""

    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        return str(o)

    return json.dumps(data, default=default, indent=2)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


# -- prune ------------------------------------------------------------------------------------


def prune_lines(results: Sequence[PruneResult]) -> list[str]:
    out: list[str] = []
    for r in results:
        would = "would be " if r.dry_run else ""
        out += [
            f"{r.target}: {r.manifests} manifests of {r.sources} sources reference "
            f"{r.live_objects} objects ({format_size(r.live_bytes)})",
            f"  {would}deleted: {r.deleted_objects} objects, {format_size(r.deleted_bytes)} reclaimed",
            f"  {would}planned: {r.planned_objects} unreferenced objects ({format_size(r.planned_bytes)}), "
            "deleted by a run after the grace period",
            f"  {would}repacked: {plural(r.repacked_packs, 'sparse pack')} superseded, "
            f"{plural(r.repacked_chunks, 'live chunk')} ({format_size(r.repacked_bytes)}) copied out "
            "as loose objects",
            f"  unreferenced: {r.garbage_objects} objects ({format_size(r.garbage_bytes)}); "
            f"plans waiting: {r.waiting_plans}",
            f"  live data: {format_size(r.referenced_bytes)} of chunks referenced, "
            f"{format_size(r.live_bytes)} stored for them",
        ]
        if r.repack_damaged:
            out.append(
                f"  warning: {plural(r.repack_damaged, 'damaged chunk')} in sparse packs not copied; "
                "their packs are kept (run `replicator verify --read-data --repair`)"
            )
        if r.deferred:
            out.append(f"  deferred: {r.deferred}")
        if r.missing:
            out.append(f"  warning: {r.missing} referenced objects are missing (run `replicator verify`)")
        if r.upgraded:
            out.append("  repository upgraded to version 2: writers older than garbage collection refuse it")
        out += [f"  note: {one_line(n)}" for n in r.notes]
        out.append(f"  took {format_duration(r.seconds)}")
    return out


# -- stats ------------------------------------------------------------------------------------

NO_STORAGE_PRICE = "storage cost: not configured (set the target's cost.storage_usd_per_gib_month)"


def _objects(n: int, nbytes: int) -> str:
    return f"{format_size(nbytes)} in {plural(n, 'object')}"


def stats_lines(results: Sequence[TargetStats]) -> list[str]:
    return [line for r in results for line in _stats_target_lines(r)]


def _stats_target_lines(r: TargetStats) -> list[str]:
    stored = ", ".join(f"{p.rstrip('/')} {_objects(u.objects, u.bytes)}" for p, u in r.stored.items())
    out = [
        f"{r.target} ({r.url}): {plural(r.snapshots, 'snapshot')} of {plural(r.sources, 'source')}",
        f"  stored: {_objects(r.total_objects, r.total_bytes)} ({stored})",
        f"  live: {_objects(r.live_objects, r.live_bytes)}; reclaimable by prune: "
        f"{_objects(r.reclaimable_objects, r.reclaimable_bytes)}",
        f"  logical: {format_size(r.logical_bytes)} in all snapshots, "
        f"{format_size(r.unique_logical_bytes)} unique, stored as {format_size(r.unique_stored_bytes)}: "
        f"dedup {ratio(r.logical_bytes, r.unique_logical_bytes)}, "
        f"compression {ratio(r.unique_logical_bytes, r.unique_stored_bytes)}",
    ]
    if r.storage_usd_per_month is None or r.reclaimable_usd_per_month is None:
        out.append(f"  {NO_STORAGE_PRICE}")
    else:
        out.append(
            f"  storage cost: ${r.storage_usd_per_month:.4f}/month at ${r.storage_usd_per_gib_month}"
            f"/GiB-month (reclaimable: ${r.reclaimable_usd_per_month:.4f}/month)"
        )
    for s in r.per_snapshot:
        out.append(
            f"  {s.source} {s.snapshot}: {plural(s.files, 'file')}, {format_size(s.logical_bytes)}; "
            f"unique {_objects(s.unique_objects, s.unique_bytes)}"
        )
    if r.missing_objects:
        out.append(f"  warning: {r.missing_objects} referenced objects are missing (run `replicator verify`)")
    if r.foreign_objects:
        foreign = f"{r.foreign_objects} objects under chunks/ or packs/"
        out.append(f"  note: {foreign} are not named as the format names them (not counted)")
    out.append(f"  took {format_duration(r.seconds)}")
    return out


# -- sync -------------------------------------------------------------------------------------


def sync_lines(results: Sequence[SourceResult]) -> list[str]:
    """Per source: what was scanned and read, what was left out and why; per target, what
    happened to it."""
    lines = []
    for r in results:
        line = (
            f"{r.source}: {plural(r.files, 'file')}, {format_size(r.bytes_total)}; "
            f"read {plural(r.files_read, 'file')}, "
            f"{format_size(r.bytes_read)} in {format_duration(r.seconds)}"
        )
        if not r.scanned:
            line = f"{r.source}: not scanned: no target could be opened"
        elif r.seconds and r.bytes_read:
            line += f" ({format_size(r.bytes_read / r.seconds)}/s)"
        lines.append(line)
        for name, why in sorted(r.held_back.items()):
            lines.append(f"  held back {display_path(name)}: {one_line(why)}")
        for path, why in sorted(r.skipped.items()):
            lines.append(f"  unreadable {display_path(path)}: {one_line(why)}")
        for path, why in sorted(r.ignored.items()):
            lines.append(f"  not replicated {display_path(path)}: {one_line(why)}")
        for t in r.targets:
            lines += _sync_target_lines(r, t)
    return lines


def _sync_target_lines(r: SourceResult, t: TargetResult) -> list[str]:
    lines = []
    for name, why in sorted(t.damaged.items()):
        lines.append(
            f"  -> {t.target}: DAMAGED on the primary: {display_path(name)}: {one_line(why)}; "
            "its last complete version stays published"
        )
    for name, why in sorted(t.carried.items()):
        if name not in t.damaged:
            shown = f"{display_path(name)} ({one_line(why)})"
            lines.append(f"  -> {t.target}: kept from the previous snapshot: {shown}")
    if t.status == "failed":
        return [*lines, f"  -> {t.target}: FAILED: {t.error}"]
    if t.status == "held":
        return [
            *lines,
            f"  -> {t.target}: HELD: {t.error}; nothing published. Check the primary, then "
            "run again with --allow-deletes (or raise max_delete)",
        ]
    if t.status == "deferred":
        return [*lines, f"  -> {t.target}: DEFERRED: {t.error}; it resumes when the budget allows"]
    if t.status == "empty":
        return [*lines, f"  -> {t.target}: nothing to publish (no complete files); nothing written"]
    if t.status == "waiting":
        published = f"published {t.snapshot}; " if t.snapshot else ""
        lines.append(f"  -> {t.target}: {published}WAITING for other instances' parts: {t.error}")
        return lines
    if t.status == "contributed":
        done = "parts written; the assembler publishes each set once all parts are in"
        return [*lines, f"  -> {t.target}: {done}"]
    u = t.uploads
    return [
        *lines,
        f"  -> {t.target}: {t.status} {t.snapshot}; new {format_size(u.bytes_new)}, "
        f"sent {format_size(u.bytes_sent)}, dedup {ratio(r.bytes_read, u.bytes_new)}, "
        f"compression {ratio(u.bytes_new, u.bytes_sent)}",
    ]


# -- plan -------------------------------------------------------------------------------------


def plan_lines(result: Plan) -> list[str]:
    lines = [
        f"scanned {plural(result.files, 'file')} ({format_size(result.bytes_scanned)}); "
        f"read {result.files_read} "
        f"changed files ({format_size(result.bytes_read)}) in {format_duration(result.seconds)}"
    ]
    for t in result.targets:
        when = (
            f", {format_duration(t.seconds_at_cap)} at max_bandwidth" if t.seconds_at_cap is not None else ""
        )
        new = "" if t.exists else " (new repository)"
        lines.append(
            f"-> {t.target}{new}: send {format_size(t.bytes)} in {plural(t.chunks, 'chunk')}, "
            f"{t.puts} PUT/LIST + "
            f"{t.gets} GET requests, ${t.cost_usd:.4f} (egress ${t.egress_usd:.4f}, requests "
            f"${t.requests_usd:.4f}){when}"
        )
        lines += _plan_storage_lines(t)
        for s in t.sources:
            verdict = "" if s.budget_allows else "  DEFERRED by budget"
            size = format_size(s.bytes)
            lines.append(f"   {s.source} ({s.priority}): {size}, {s.puts} PUTs, ${s.cost_usd:.4f}{verdict}")
    for b in result.budgets:
        spent, allowed = b.spent_today_usd, b.allowance_today_usd
        lines.append(f"budget {b.scope} ({b.mode}): today ${spent:.4f} spent of ${allowed:.4f}")
    for path, why in sorted(result.skipped.items()):
        lines.append(f"  skipped {display_path(path)}: {one_line(why)}")
    return lines


def _plan_storage_lines(t: TargetPlan) -> list[str]:
    if t.stored_bytes_after is None:
        return [f"   storage: {one_line(t.storage_note or 'unknown')}"]
    retained = f"{format_size(t.stored_bytes_after)} retained after this sync"
    if t.storage_usd_per_month is None or t.storage_usd_per_month_after is None:
        return [f"   {retained}; {NO_STORAGE_PRICE}"]
    return [
        f"   {retained}: ${t.storage_usd_per_month_after:.4f}/month of storage "
        f"(this sync adds ${t.storage_usd_per_month:.4f}/month)"
    ]


# -- snapshots and restore --------------------------------------------------------------------


def snapshot_lines(rows: Sequence[SnapshotRow]) -> list[str]:
    """One line per snapshot, ``*`` marking each source's latest."""
    if not rows:
        return ["no snapshots"]
    lines = []
    for row in rows:
        mark = "*" if row.latest else " "
        sets = f"  sets: {', '.join(map(display_path, row.sets))}" if row.sets else ""
        lines.append(
            f"{mark} {row.source:<16} {row.snapshot}  {row.files:>6} files {format_size(row.bytes):>11}{sets}"
        )
    return lines


def parts_lines(r: PartsReport) -> list[str]:
    """Per set of a shared source: complete, or waiting with whose parts and why; then the
    instances and how long since each last wrote its member object."""
    lines = [f"{r.source} on {r.target}: {r.instances} instances"]
    for s in r.sets:
        if s.state == "complete":
            lines.append(f"  {display_path(s.name)}: complete ({s.files} files, {format_size(s.bytes)})")
            continue
        waited = f" for {format_duration(s.waited)}" if s.waited is not None else ""
        missing = f"; missing: {', '.join(s.missing)}" if s.missing else ""
        lines.append(f"  {display_path(s.name)}: WAITING{waited}: in: {', '.join(s.have) or 'none'}{missing}")
        lines += [f"    {one_line(why)}" for why in s.reasons]
    for name, age in sorted(r.members.items()):
        seen = "never" if age is None else f"{format_duration(age)} ago"
        silent = "  SILENT" if name in r.silent else ""
        lines.append(f"  instance {name}: last heard {seen}{silent}")
    return lines


def restore_line(outcome: RestoreOutcome, dest: str) -> str:
    """What was restored into ``dest`` (as the user wrote it), how fast; with a dry run, what
    would be."""
    res = outcome.result
    conflicts = f", {len(res.replaced)} replaced" if res.replaced else ""
    if res.kept:
        conflicts += f", {len(res.kept)} existing kept, not restored"
    if res.dry_run:
        return (
            f"dry run: would restore {plural(res.files, 'file')}, {format_size(res.bytes)} from "
            f"{outcome.source}/{outcome.snapshot} into {one_line(dest)} ({len(res.created)} new"
            f"{conflicts}, {res.skipped_existing} already up to date); nothing was written"
        )
    rate = f" ({format_size(res.bytes_per_second)}/s)" if res.bytes else ""
    return (
        f"restored {plural(res.files, 'file')}, {format_size(res.bytes)} "
        f"from {outcome.source}/{outcome.snapshot} "
        f"into {one_line(dest)} in {format_duration(res.seconds)}{rate} "
        f"({res.skipped_existing} already up to date{conflicts})"
    )


RESTORE_LIST_LIMIT = 50
"""Names listed per kind in a real restore's text output (--json lists all of them)."""


def restore_conflict_lines(outcome: RestoreOutcome) -> list[str]:
    """Per file, what was done to a name DEST already held (replaced, or kept with
    ``--overwrite never``); with a dry run, also the new files. Shown before the summary."""
    res = outcome.result
    verb = ("would replace", "would keep", "would create") if res.dry_run else ("replaced", "kept", "")
    kinds = [(verb[0], res.replaced), (verb[1], res.kept), (verb[2], res.created)]
    lines = []
    for word, paths in kinds:
        limit = len(paths) if res.dry_run else RESTORE_LIST_LIMIT
        lines += [f"  {word} {display_path(p)}" for p in sorted(paths)[:limit]]
        if len(paths) > limit:
            lines.append(f"  ... {len(paths) - limit} more {word} (--json lists every one)")
    return lines


def restore_failure_lines(outcome: RestoreOutcome) -> list[str]:
    """The files that could not be restored, and why (for stderr)."""
    return [
        f"  FAILED {display_path(p)}: {one_line(why)}" for p, why in sorted(outcome.result.failures.items())
    ]


# -- verify -----------------------------------------------------------------------------------


def verify_lines(rows: Sequence[TargetVerification]) -> list[str]:
    """Per target: the verdict and counts, every bad object, what was repaired, the drill."""
    lines = []
    for row in rows:
        rep = row.verify
        snaps = sum(len(v) for v in rep.sources.values())
        verdict = "OK" if rep.ok else plural(len(rep.problems), "PROBLEM")
        lines.append(
            f"{rep.repository}: {verdict}: {plural(len(rep.sources), 'source')}, "
            f"{plural(snaps, 'snapshot')}, "
            f"{plural(rep.files, 'file')}, "
            f"{plural(rep.chunks_referenced, 'chunk')} referenced "
            f"({rep.chunks_stored} loose objects, {rep.packs_stored} packs), "
            f"{rep.chunks_read} read ({format_size(rep.bytes_read)}) in {format_duration(rep.seconds)}"
        )
        lines += [f"  BAD {one_line(p.key)}: {one_line(p.message)}" for p in rep.problems]
        if row.repair is not None:
            lines.append(f"  repaired {len(row.repair.repaired)} of {len(rep.damaged)} damaged chunks")
            for key, why in row.repair.unrepaired.items():
                lines.append(f"  NOT REPAIRED {one_line(key)}: {one_line(why)}")
        if row.drill is not None:
            lines += drill_lines(row.drill)
    return lines


def drill_lines(report: DrillReport) -> list[str]:
    where = report.scratch or "a temporary directory (removed)"
    rto = format_duration(report.rto_seconds) if report.rto_seconds is not None else "unknown"
    lines = [
        f"restore drill: {'PASS' if report.ok else 'FAIL'}: "
        f"{plural(len(report.sources), 'source')} restored into "
        f"{where} in {format_duration(report.seconds)}; RTO estimate {rto}"
    ]
    if not report.sources:
        lines.append("  no source has a snapshot in this repository: nothing to resume from")
    for s in report.sources:
        lines += _source_drill_lines(s, report.load)
    return lines


def _source_drill_lines(s: SourceDrill, load: bool) -> list[str]:
    if s.snapshot is None:
        return [f"  {s.source}: FAIL: {'; '.join(s.problems)}"]
    rate = format_size(s.throughput_bytes_per_second) + "/s" if s.throughput_bytes_per_second else "-"
    s_rto = format_duration(s.rto_seconds) if s.rto_seconds is not None else "unknown"
    checked = ", ".join(f"{n} {k}" for k, n in sorted(s.formats.items())) or "none"
    checkpoints = sum(len(x.checkpoints) for x in s.loads)
    loaded = f"; loaded with torch: {s.loaded} of {plural(checkpoints, 'checkpoint')}" if load else ""
    lines = [
        f"  {s.source}: {'PASS' if s.ok else 'FAIL'}: snapshot {s.snapshot} "
        f"(age {format_duration(max(s.age_seconds or 0, 0))}), "
        f"{plural(s.files, 'file')}, {format_size(s.bytes)}",
        f"    restored {plural(s.restored_files, 'file')} in {format_duration(s.restore_seconds)} at {rate}"
        f" ({s.already_present} already present); RTO estimate {s_rto}",
        f"    digest failures {len(s.digest_failures)}, format failures {len(s.format_failures)}; "
        f"formats checked: {checked}{loaded}",
    ]
    if s.newest_restorable_set is not None:
        age = format_duration(max(s.newest_restorable_set_age_seconds or 0, 0))
        shown = display_path(s.newest_restorable_set)
        lines.append(f"    newest restorable checkpoint set: {shown} (written {age} ago)")
    lines += [
        f"    DIGEST FAILED {display_path(p)}: {one_line(why)}"
        for p, why in sorted(s.digest_failures.items())
    ]
    lines += [
        f"    FORMAT FAILED {display_path(p)}: {one_line(why)}"
        for p, why in sorted(s.format_failures.items())
    ]
    lines += [f"    FAILED: {one_line(why)}" for why in s.problems]
    lines += [_set_load_line(x) for x in s.loads]
    return lines


def _set_load_line(x: SetLoad) -> str:
    """One checkpoint set's load: what loaded, or the first checkpoint that did not and why."""
    head = f"    load {display_path(x.set)}: "
    if x.status != "loaded":
        return head + f"{'FAILED' if x.status == 'failed' else 'skipped'}: {one_line(x.reason or '')}"
    formats = ", ".join(sorted({c.format for c in x.checkpoints}))
    objects = f", {plural(x.objects, 'object')}" if x.objects else ""
    notes = "".join(f"; {c.path}: {one_line(c.note)}" for c in x.checkpoints if c.note)
    return (
        head + f"loaded: {plural(len(x.checkpoints), 'checkpoint')} ({formats}), "
        f"{plural(x.tensors, 'tensor')}{objects}, {format_size(x.bytes)}{notes}"
    )


# -- forget -----------------------------------------------------------------------------------


def forget_lines(report: ForgetReport) -> list[str]:
    """``replicator forget`` as text: per target and source, each snapshot kept (with why) or
    dropped, each checkpoint set kept (with why) or dropped, and what was deleted."""
    lines = []
    for e in report.entries:
        head = f"{e.target} / {e.source} ({e.kind}; {e.policy})"
        if e.status == "nothing":
            lines.append(f"{head}: no snapshots")
            continue
        if e.plan is None:
            lines.append(f"{head}: FAILED: {e.error}")
            continue
        lines.append(f"{head}:")
        for v in e.plan.snapshots:
            if v.keep:
                lines.append(f"  keep {v.snapshot}  {', '.join(v.reasons)}")
            else:
                held = f"  (sets {', '.join(map(display_path, v.sets))})" if v.sets else ""
                lines.append(f"  drop {v.snapshot}{held}")
        for s in e.plan.sets:
            why = f"  {', '.join(s.reasons)}" if s.keep else ""
            lines.append(f"  {'keep' if s.keep else 'drop'} set {display_path(s.name)}{why}")
        kept, dropped = len(e.plan.keep), len(e.plan.drop)
        if report.dry_run:
            lines.append(f"  {kept} kept, {dropped} to drop (dry run: nothing deleted)")
        else:
            lines.append(f"  {kept} kept, {len(e.deleted)} of {dropped} deleted")
        if e.error:
            lines.append(f"  FAILED: {e.error}")
    return lines


# -- config check -----------------------------------------------------------------------------


def config_check_lines(report: ConfigReport) -> list[str]:
    """The verdict, every problem, the sources and targets, and each online check."""
    if report.problems:
        n = len(report.problems)
        lines = [f"{report.path}: INVALID: {n} problem{'s' if n > 1 else ''}"]
        return lines + [f"  {one_line(p)}" for p in report.problems]
    sources = sum(e.kind == "source" for e in report.endpoints)
    targets = len(report.endpoints) - sources
    verdict = "valid" if not report.online else ("OK" if report.ok else "FAILED")
    lines = [f"{report.path}: {verdict}: {plural(sources, 'source')}, {plural(targets, 'target')}"]
    width = max((len(e.name) for e in report.endpoints), default=0)
    for e in report.endpoints:
        settings = ", ".join(f"{k}: {v}" for k, v in e.settings.items())
        lines.append(
            f"  {e.kind} {e.name:<{width}}  {one_line(e.url)}" + (f"  ({settings})" if settings else "")
        )
    for c in report.checks:
        if c.ok:
            lines.append(f"  {c.subject}: {c.check} ok" + (f" ({one_line(c.error)})" if c.error else ""))
        else:
            lines.append(f"  {c.subject}: {c.check} FAILED: {one_line(c.error or 'unknown error')}")
    return lines


# -- ls and diff ------------------------------------------------------------------------------


def _mtime(ns: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


def listing_lines(listing: Listing) -> list[str]:
    """A header, then one line per file (``-rw-r--r--  SIZE  MTIME  PATH``); for a checkpoint
    source, files under a line per checkpoint set, those outside any set last."""
    import stat

    head = (
        f"{listing.source}/{listing.snapshot} ({listing.kind}, {listing.created}): "
        f"{plural(len(listing.files), 'file')}, {format_size(listing.bytes)}"
    )
    lines = [head]
    groups: dict[str | None, list[str]] = {}
    sizes: dict[str | None, int] = {}
    for f in listing.files:
        row = f"{stat.filemode(0o100000 | f.mode)} {format_size(f.size):>11}  {_mtime(f.mtime_ns)}  "
        groups.setdefault(f.set, []).append(row + display_path(f.path))
        sizes[f.set] = sizes.get(f.set, 0) + f.size
    if listing.kind != "checkpoint":
        return lines + groups.get(None, [])
    for name in [*listing.sets, None]:
        rows = groups.get(name)
        if not rows:
            continue
        title = f"set {display_path(name)}" if name is not None else "not in a checkpoint set"
        lines.append(f"{title}: {plural(len(rows), 'file')}, {format_size(sizes[name])}")
        lines += ["  " + r for r in rows]
    return lines


_MARK = {"added": "+", "removed": "-", "changed": "M"}


def _change_line(c: Change) -> str:
    size = format_size(c.size)
    if c.old_size is not None:
        size = f"{format_size(c.old_size)} -> {size}"
    return f"{_MARK[c.change]} {display_path(c.path)}  ({size})"


def diff_lines(result: SnapshotDiff) -> list[str]:
    """``+``/``-``/``M`` per file (grouped per set for a checkpoint source), then totals."""
    lines = [f"{result.source}: {result.old} -> {result.new}"]
    if result.sets:
        for s in result.sets:
            title = f"set {display_path(s.name)}" if s.name is not None else "not in a checkpoint set"
            size = format_size(sum(c.size for c in s.changes))
            lines.append(f"{title} ({s.status}): {plural(len(s.changes), 'file')}, {size}")
            lines += ["  " + _change_line(c) for c in s.changes]
    else:
        lines += [_change_line(c) for c in result.changes]
    t = result.totals()
    lines.append("totals: " + ", ".join(f"{v.files} {k} ({format_size(v.bytes)})" for k, v in t.items()))
    return lines
