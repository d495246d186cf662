"""``replicator sync``: one replication pass, every selected source to every selected target.

Per source: scan, build a candidate (:meth:`Replicator.build_candidate`), then publish it on
every target concurrently (:meth:`Replicator.publish`). A failing target is reported and the
others finish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from replicator.config import Config, SourceConfig
from replicator.engine import Replicator, SourceResult, TargetResult, stats_diff
from replicator.errors import ReplicatorError
from replicator.progress import ProgressSink


async def sync_source(
    rep: Replicator, cfg: SourceConfig, progress: ProgressSink | None = None
) -> SourceResult:
    assert rep.state is not None
    started = time.monotonic()
    result = SourceResult(cfg.name)
    before = rep.stats_snapshot()
    if rep.open_targets:
        files = await rep.scan(cfg)
        candidate = await rep.build_candidate(cfg, files, result, progress)
        # Names the source could not take are not in `files`: say so, never drop them silently.
        for path, why in rep.source(cfg).refused.items():
            result.skipped.setdefault(path, why)
        rep.state.forget_files_except(cfg.name, {f.path for f in files})
        rep.state.commit()
        outcomes = await asyncio.gather(*(rep.publish(t, cfg, candidate) for t in rep.open_targets))
        after = rep.stats_snapshot()
        for t, outcome in zip(rep.open_targets, outcomes, strict=True):
            outcome.uploads = stats_diff(after[t.config.name], before[t.config.name])
            result.targets.append(outcome)
    for name, err in rep.target_errors.items():
        result.targets.append(TargetResult(name, "failed", error=str(err)))
    result.seconds = time.monotonic() - started
    return result


async def run_sync(
    config: Config,
    *,
    sources: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    progress: ProgressSink | None = None,
) -> tuple[list[SourceResult], dict[str, ReplicatorError]]:
    """One pass; returns per-source results and the targets that could not be opened."""
    selected = [config.source(n) for n in sources] if sources else list(config.sources)
    async with Replicator(config, targets=targets) as rep:
        results = [await sync_source(rep, src, progress) for src in selected]
        return results, rep.target_errors
