"""Applying retention to a target: after each publish (the daemon, ``sync``) and on demand
(``replicator forget``). Both plan with :mod:`replicator.retention.policy`, so they agree.

Only manifests are deleted here; chunks and packs are never removed by retention
(``replicator prune`` deletes what no manifest references any more: replicator.gc). Safety
rules (docs/FORMAT.md section 7):

* a listing that does not show the latest snapshot (the one just published, or the one the
  ref names) is not trusted with deletions (restic#4612): nothing is deleted;
* a manifest that cannot be read is kept, never deleted on a guess;
* the manifest the ref points at is never deleted;
* a failure is logged (daemon) or reported (``forget``); the daemon tries again after its
  next publish, and the publish itself has succeeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from replicator import metrics
from replicator.config import Config, SourceConfig
from replicator.errors import ReplicatorError, RepositoryError, TargetError, TargetUnreachableError
from replicator.log import get_logger
from replicator.repository import Repository
from replicator.retention.policy import Plan, RetentionPolicy, Summary, plan_sets, plan_snapshots

log = get_logger(__name__)

SummaryCache = dict[str, Summary]
"""Snapshot id -> its sets (None: unreadable). Manifests are immutable: each is read once per
process, except that an unreadable one is read again by the next plan (it may have been a
passing fault of the target, which raises instead: only a manifest that was fetched and found
bad is recorded as None)."""


class ListingMissesLatestError(RepositoryError):
    """The listing of a source's manifests does not show its latest snapshot."""


async def plan(
    repo: Repository,
    source: str,
    kind: str,
    policy: RetentionPolicy,
    latest: str,
    cache: SummaryCache | None = None,
) -> Plan:
    """What ``policy`` keeps and drops of ``source`` on ``repo``, whose latest is ``latest``.
    Reads the listing and, for checkpoint sources, every manifest not in ``cache``."""
    cache = {} if cache is None else cache
    ids = await repo.list_snapshots(source)
    if latest not in ids:
        raise ListingMissesLatestError(
            f"the listing of snapshots/{source}/ does not show the latest snapshot {latest}",
            hint="an eventually consistent or failing listing; nothing was deleted, try again later",
        )
    if kind != "checkpoint" or policy.is_empty:
        return plan_snapshots(ids, latest, policy)
    for sid in ids:
        if cache.get(sid) is None:
            cache[sid] = await _summary(repo, source, sid)
    return plan_sets(ids, latest, cache, policy)


async def delete(
    repo: Repository, source: str, doomed: Sequence[str], cache: SummaryCache, done: list[str] | None = None
) -> list[str]:
    """Delete the manifests ``doomed``, in order, appending each to ``done`` once deleted;
    return ``done``. Stops at the first failure (raised): what was deleted before it stays
    deleted, and ``done`` says exactly what that is."""
    done = [] if done is None else done
    for sid in doomed:
        await repo.delete_snapshot(source, sid)
        cache.pop(sid, None)
        done.append(sid)
        metrics.SNAPSHOTS_FORGOTTEN.labels(source, repo.target.name).inc()
        log.info("retention.deleted", source=source, target=repo.target.name, snapshot=sid)
    return done


async def apply(
    repo: Repository, cfg: SourceConfig, policy: RetentionPolicy, latest: str, cache: SummaryCache
) -> list[str]:
    """After a publish of ``latest``: delete the manifests of ``cfg``'s source that ``policy``
    does not keep; return their ids. Never raises: a failure is logged and retried after the
    next publish."""
    target = repo.target.name
    try:
        result = await plan(repo, cfg.name, cfg.kind, policy, latest, cache)
        return await delete(repo, cfg.name, result.drop, cache)
    except ListingMissesLatestError:
        metrics.RETENTION_FAILURES.labels(cfg.name, target).inc()
        log.warning("retention.suspicious_listing", source=cfg.name, target=target)
        return []
    except ReplicatorError as exc:
        metrics.RETENTION_FAILURES.labels(cfg.name, target).inc()
        log.warning("retention.failed", source=cfg.name, target=target, error=str(exc))
        return []


async def _summary(repo: Repository, source: str, snapshot_id: str) -> Summary:
    try:
        manifest = await repo.load_manifest(source, snapshot_id)
    except TargetError:
        raise  # the target failed, not the manifest: the plan fails and nothing is deleted
    except RepositoryError as exc:
        log.warning("retention.unreadable_manifest", source=source, snapshot=snapshot_id, error=str(exc))
        return None
    return {s.name: s.newest_mtime_ns for s in manifest.sets}


# -- replicator forget --------------------------------------------------------------------------

ForgetStatus = Literal["ok", "nothing", "failed", "unreachable"]


@dataclass
class ForgetEntry:
    """One source on one target."""

    target: str
    source: str
    kind: str
    policy: str
    """The policy in words (``keep_last 3, keep_daily 7``)."""
    status: ForgetStatus = "ok"
    """ok: planned (and, without --dry-run, applied); nothing: the target holds no snapshot of
    the source; failed / unreachable: see ``error``, and nothing more was deleted."""
    latest: str | None = None
    plan: Plan | None = None
    deleted: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        verdicts = self.plan.snapshots if self.plan else []
        return {
            "target": self.target,
            "source": self.source,
            "kind": self.kind,
            "policy": self.policy,
            "status": self.status,
            "latest": self.latest,
            "keep": [
                {"snapshot": v.snapshot, "reasons": v.reasons, "sets": v.sets} for v in verdicts if v.keep
            ],
            "drop": [{"snapshot": v.snapshot, "sets": v.sets} for v in verdicts if not v.keep],
            "sets": [
                {
                    "name": s.name,
                    "newest_mtime_ns": s.newest_mtime_ns,
                    "keep": s.keep,
                    "holder": s.holder,
                    "reasons": s.reasons,
                }
                for s in (self.plan.sets if self.plan else [])
            ],
            "deleted": self.deleted,
            "error": self.error,
        }


@dataclass
class ForgetReport:
    dry_run: bool
    entries: list[ForgetEntry] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 all done; 3 a target could not be reached; 1 anything else failed (the worst wins)."""
        statuses = {e.status for e in self.entries}
        return 1 if "failed" in statuses else 3 if "unreachable" in statuses else 0

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "entries": [e.to_json() for e in self.entries]}


async def forget(
    config: Config,
    *,
    sources: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    dry_run: bool = False,
) -> ForgetReport:
    """Apply each selected source's retention policy on each selected target (``--dry-run``:
    only plan). Targets are handled one after another, so the report's order is stable; a
    target that fails is reported and the others are still handled."""
    from replicator.targets import open_target

    source_cfgs = [config.source(s) for s in sources] if sources else list(config.sources)
    target_cfgs = [config.target(t) for t in targets] if targets else list(config.targets)
    report = ForgetReport(dry_run)
    for tcfg in target_cfgs:
        entries = [
            ForgetEntry(tcfg.name, s.name, s.kind, s.retention_for(tcfg.name).describe()) for s in source_cfgs
        ]
        report.entries += entries
        try:
            t = await open_target(tcfg)
        except ReplicatorError as exc:
            _fail_all(entries, exc)
            continue
        try:
            repo = await Repository.open(t)
            for entry, scfg in zip(entries, source_cfgs, strict=True):
                if any(e.status == "unreachable" for e in entries):
                    # Each request would wait out the retry budget again: say so at once.
                    _fail_all([entry], TargetUnreachableError("not tried: the target could not be reached"))
                    continue
                await _forget_one(repo, scfg, scfg.retention_for(tcfg.name), entry, dry_run)
        except ReplicatorError as exc:
            _fail_all(entries, exc)
        finally:
            await t.close()
    return report


async def _forget_one(
    repo: Repository, cfg: SourceConfig, policy: RetentionPolicy, entry: ForgetEntry, dry_run: bool
) -> None:
    try:
        entry.latest = latest = await repo.latest(cfg.name)
        if latest is None:
            entry.status = "nothing"
            if await repo.list_snapshots(cfg.name):
                # Manifests but no ref: a first publish cut short. Which one is the latest is
                # not known, so none may go.
                entry.status = "failed"
                entry.error = f"source {cfg.name} has manifests but no ref; nothing deleted"
            return
        cache: SummaryCache = {}
        entry.plan = await plan(repo, cfg.name, cfg.kind, policy, latest, cache)
        if not dry_run:
            await delete(repo, cfg.name, entry.plan.drop, cache, entry.deleted)
    except ReplicatorError as exc:
        _fail_all([entry], exc)


def _fail_all(entries: list[ForgetEntry], exc: ReplicatorError) -> None:
    for e in entries:
        e.status = "unreachable" if isinstance(exc, TargetUnreachableError) else "failed"
        e.error = str(exc)
