"""``replicator sync``: one replication pass, every selected source to every selected target.

Targets are opened at once (:meth:`Replicator.attach_all`). Per source: scan, build a
candidate (:meth:`Replicator.build_candidate`), then publish it on every target concurrently
(:meth:`Replicator.publish`). A failing target is reported and the others finish; one that
cannot be reached gives up after ``retry.command_give_up_after``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from replicator.config import Config, SourceConfig
from replicator.engine import Candidate, OpenTarget, Replicator, SourceResult, TargetResult, stats_diff
from replicator.errors import ReplicatorError, TargetUnreachableError
from replicator.fanout import UploadStats
from replicator.progress import ProgressSink


async def sync_source(
    rep: Replicator, cfg: SourceConfig, progress: ProgressSink | None = None, *, allow_deletes: bool = False
) -> SourceResult:
    """One pass of one source. Each target is published as soon as its chunks are in: a target
    that opened late (still trying when reading began: :meth:`Replicator.attach_all`) is
    published when it opens, from a second read of what the first did not send it."""
    assert rep.state is not None
    started = time.monotonic()
    result = SourceResult(cfg.name)
    before = rep.stats_snapshot()
    targets = list(rep.open_targets)
    late, rep.opening = rep.opening, {}
    outcomes: dict[str, TargetResult] = {}
    if targets or late:
        listing = await rep.scan(cfg)
        result.scanned = True
        result.ignored = listing.ignored
        candidate = await rep.build_candidate(
            cfg, listing.files, result, progress, unreadable=listing.unreadable
        )
        rep.state.files.forget_except(cfg.name, {f.path for f in listing.files})
        rep.state.commit()

        async def publish(t: OpenTarget, c: Candidate) -> None:
            outcomes[t.config.name] = await rep.publish(t, cfg, c, allow_deletes=allow_deletes)

        async def publish_late(task: asyncio.Task[OpenTarget | None]) -> None:
            opened = await task
            if opened is None:
                return  # it failed: recorded in rep.target_errors
            c = candidate
            if not c.covers(opened.repo.hash):  # its repository's chunk ids need a read of their own
                c = await rep.build_candidate(
                    cfg, listing.files, SourceResult(cfg.name), unreadable=listing.unreadable
                )
            await publish(opened, c)

        await asyncio.gather(*(publish(t, candidate) for t in targets), *map(publish_late, late.values()))
    after = rep.stats_snapshot()
    for t in rep.target_configs:
        outcome = outcomes.get(t.name)
        if outcome is not None:
            outcome.uploads = stats_diff(after[t.name], before.get(t.name, UploadStats()))
            result.targets.append(outcome)
        elif t.name in rep.target_errors:
            err = rep.target_errors[t.name]
            unreachable = isinstance(err, TargetUnreachableError)
            result.targets.append(TargetResult(t.name, "failed", error=str(err), unreachable=unreachable))
    result.seconds = time.monotonic() - started
    return result


async def run_sync(
    config: Config,
    *,
    sources: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    progress: ProgressSink | None = None,
    allow_deletes: bool = False,
) -> tuple[list[SourceResult], dict[str, ReplicatorError]]:
    """One pass; returns per-source results and the targets that could not be opened."""
    selected = [config.source(n) for n in sources] if sources else list(config.sources)
    async with Replicator(config, targets=targets) as rep:
        await rep.attach_all()
        results = [await sync_source(rep, src, progress, allow_deletes=allow_deletes) for src in selected]
        return results, rep.target_errors
