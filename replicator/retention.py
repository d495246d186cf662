"""Retention: which snapshot manifests of a source a target keeps (``keep_last``).

* Datasets and embeddings: the newest ``keep_last`` snapshots.
* Checkpoint sources: ``keep_last`` counts *checkpoint sets*, not snapshots. The sets kept
  are the ``keep_last`` newest (by the modification time of their newest file) among every
  set any snapshot of the source holds; each is kept by the newest snapshot that holds it.
  A manifest is deleted only when it is neither the latest nor such a holder, so every set
  it holds is either held by a retained snapshot too, or older than the ``keep_last`` newest
  sets: retention removes sets deliberately and whole, never the last copy of a kept one.

Only manifests are deleted here; chunks are never removed by retention (``replicator prune``
deletes what no manifest references any more: replicator.gc). Safety rules: a
listing that does not show the snapshot just published is not trusted with deletions
(restic#4612); a manifest that cannot be read is kept, never deleted on a guess; a failure
is logged and retried after the next publish (the publish itself has succeeded).
"""

from __future__ import annotations

from replicator.config import SourceConfig
from replicator.errors import ReplicatorError, RepositoryError, TargetError
from replicator.log import get_logger
from replicator.repository import Repository

log = get_logger(__name__)

Summary = dict[str, int] | None
"""A snapshot's checkpoint sets (name -> newest file's mtime_ns); None if unreadable."""
SummaryCache = dict[str, Summary]
"""Snapshot id -> summary: manifests are immutable, so each is read once per process."""


def retained(ids: list[str], latest: str, keep: int, summaries: dict[str, Summary]) -> set[str]:
    """The snapshots (of ``ids``, oldest first) a checkpoint source keeps (module docstring)."""
    keep_ids = {latest} | {i for i in ids if summaries.get(i) is None}
    newest: dict[str, tuple[int, str]] = {}
    """set name -> (mtime of its newest file, the newest snapshot holding it)"""
    for sid in ids:  # oldest first: later snapshots overwrite the holder
        for name, mtime in (summaries.get(sid) or {}).items():
            seen = newest.get(name)
            newest[name] = (max(mtime, seen[0]) if seen else mtime, sid)
    kept = sorted(newest, key=lambda n: (newest[n][0], n), reverse=True)[:keep]
    return keep_ids | {newest[name][1] for name in kept}


async def apply(repo: Repository, cfg: SourceConfig, latest: str, cache: SummaryCache) -> list[str]:
    """Delete the snapshot manifests of ``cfg``'s source that ``keep_last`` does not retain;
    return their ids."""
    assert cfg.keep_last is not None
    source, target = cfg.name, repo.target.name
    try:
        ids = await repo.list_snapshots(source)
        if latest not in ids:
            # A listing that misses what we just wrote is not to be trusted with deletions
            # (restic#4612): keep everything and try again next time.
            log.warning("retention.suspicious_listing", source=source, target=target)
            return []
        if cfg.kind == "checkpoint":
            for sid in ids:
                if sid not in cache:
                    cache[sid] = await _summary(repo, source, sid)
            keep = retained(ids, latest, cfg.keep_last, cache)
        else:
            keep = {latest, *ids[-cfg.keep_last :]}
        doomed = [i for i in ids if i not in keep]
        for sid in doomed:
            await repo.delete_snapshot(source, sid)
            cache.pop(sid, None)
            log.info("retention.deleted", source=source, target=target, snapshot=sid)
        return doomed
    except ReplicatorError as exc:
        log.warning("retention.failed", source=source, target=target, error=str(exc))
        return []


async def _summary(repo: Repository, source: str, snapshot_id: str) -> Summary:
    try:
        manifest = await repo.load_manifest(source, snapshot_id)
    except TargetError:
        raise
    except RepositoryError as exc:
        log.warning("retention.unreadable_manifest", source=source, snapshot=snapshot_id, error=str(exc))
        return None
    return {s.name: s.newest_mtime_ns for s in manifest.sets}
