"""The collector: ``replicator prune`` on one repository (docs/FORMAT.md section 10).

One run does, under the advisory lock ``gc/lock``:

* **phase 2** for every plan older than ``grace``: put the ``deleting`` flag, and unless a
  live writer intent is listed after it, mark from the manifests that exist now, list
  ``chunks/`` and ``packs/``, and delete the plan's candidates that are still unreferenced
  and were not written again since the plan (modification time older than the plan's). The
  record of what it deletes is written before the first deletion; the plan and the flag are
  deleted last.
* **phase 1**: every unreferenced object not already in a waiting plan goes into a new plan.
  Nothing is deleted.

So an object is deleted only after two marks at least ``grace`` apart both found it
unreferenced, and a ``kill -9`` at any point leaves only unreferenced objects deleted (or a
plan, record or flag that the next run or the lease's expiry clears).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from replicator.config import TargetConfig
from replicator.errors import (
    AlreadyExistsError,
    GcBusyError,
    GcRefusedError,
    NotFoundError,
    RepositoryError,
    TargetError,
)
from replicator.gc.mark import Marks, mark
from replicator.gc.protocol import (
    DELETING,
    LOCK_KEY,
    LOCK_LEASE,
    PLANS,
    RECORD_RETENTION,
    RECORDS,
    WRITER_LEASE,
    GcListing,
    Heartbeat,
    age,
    alive,
    decode_keys,
    encode_keys,
    is_object_key,
    list_gc,
    new_run_id,
    server_now,
)
from replicator.log import get_logger
from replicator.progress import NoProgress, ProgressSink
from replicator.repository import Repository
from replicator.targets import open_target
from replicator.targets.base import ObjectInfo, Target

log = get_logger(__name__)

DEFAULT_GRACE = 3600.0


@dataclass(frozen=True)
class PruneOptions:
    grace: float = DEFAULT_GRACE
    """A candidate is deleted only by a run at least this long after the plan naming it."""
    dry_run: bool = False
    lock_lease: float = LOCK_LEASE
    writer_lease: float = WRITER_LEASE
    record_retention: float = RECORD_RETENTION
    concurrency: int = 16


@dataclass
class PruneResult:
    target: str
    dry_run: bool = False
    sources: int = 0
    manifests: int = 0
    live_objects: int = 0
    live_bytes: int = 0
    """Chunk objects and packs some manifest references, and their stored bytes."""
    garbage_objects: int = 0
    garbage_bytes: int = 0
    """Unreferenced objects left after this run (deleted by a later run once planned)."""
    deleted_objects: int = 0
    deleted_bytes: int = 0
    """Deleted by this run (with ``--dry-run``: would be)."""
    planned_objects: int = 0
    planned_bytes: int = 0
    """Candidates this run put in a new plan (with ``--dry-run``: would)."""
    waiting_plans: int = 0
    """Plans younger than ``grace``, deleted from by a later run."""
    deferred: str | None = None
    """Why phase 2 did not delete this time (writers were publishing)."""
    missing: int = 0
    """Referenced objects the listing does not show (``replicator verify`` tells more)."""
    upgraded: bool = False
    """config.json was raised to repository version 2 by this run."""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


async def prune(
    repo: Repository, options: PruneOptions | None = None, progress: ProgressSink | None = None
) -> PruneResult:
    """Run both phases once on ``repo``. Raises GcRefusedError (nothing deleted) when the
    evidence is not trustworthy, GcBusyError when another collector holds the lock, and
    TargetError when the target fails (deletions already made were all of unreferenced
    objects, announced in a record)."""
    opts = options or PruneOptions()
    progress = progress or NoProgress()
    started = time.monotonic()
    result = PruneResult(repo.target.name, dry_run=opts.dry_run)
    lock = None if opts.dry_run else await _acquire_lock(repo.target, opts.lock_lease)
    try:
        if lock is not None:
            result.upgraded = await repo.upgrade_for_gc()
        await _run(repo, opts, progress, result, lock)
    finally:
        if lock is not None:
            await _release_lock(repo.target, lock)
    result.seconds = round(time.monotonic() - started, 3)
    log.info("gc.pruned", **{k: v for k, v in result.to_json().items() if k != "notes"})
    return result


class _Evidence:
    """The marks and the listing of chunks/ and packs/, taken once per run."""

    def __init__(self, repo: Repository, progress: ProgressSink) -> None:
        self.repo, self.progress = repo, progress
        self.marks: Marks | None = None
        self.objects: dict[str, ObjectInfo] = {}

    async def get(self) -> tuple[Marks, dict[str, ObjectInfo]]:
        if self.marks is None:
            marks = await mark(self.repo, self.progress)
            objects: dict[str, ObjectInfo] = {}
            for prefix in ("chunks/", "packs/"):
                async for info in self.repo.target.list(prefix):
                    if is_object_key(info.key):  # foreign keys are not ours to delete
                        objects[info.key] = info
            if marks.manifests == 0 and marks.parts == 0 and objects:
                raise GcRefusedError(
                    f"no snapshot manifest found, yet {len(objects)} chunk objects and packs exist",
                    key="snapshots/",
                    hint="a listing that comes back empty is not evidence that everything is unused; "
                    "nothing was deleted",
                )
            self.marks, self.objects = marks, objects
        return self.marks, self.objects


async def _run(
    repo: Repository, opts: PruneOptions, progress: ProgressSink, result: PruneResult, lock: Heartbeat | None
) -> None:
    target = repo.target
    run_id = new_run_id()
    gc = await list_gc(target)
    now = await server_now(target, LOCK_KEY) if lock is not None else time.time()
    plans: dict[str, tuple[ObjectInfo, list[str]]] = {}
    for pid, info in gc.plans.items():
        try:
            plans[pid] = (info, decode_keys("plan", await target.get(info.key), where=info.key))
        except NotFoundError:
            continue  # another collector finished it meanwhile
        except RepositoryError as exc:  # never delete on a plan we cannot read: drop it
            result.notes.append(f"ignored {exc}")
            if lock is not None:
                await target.delete(info.key)
    due = {pid: p for pid, p in plans.items() if age(p[0], now) >= opts.grace}
    waiting = {pid: p for pid, p in plans.items() if pid not in due}
    evidence = _Evidence(repo, progress)

    if due and not await _phase2(repo, opts, progress, result, evidence, due, run_id):
        waiting.update(due)  # deferred: they stay, and their candidates are not planned again

    # Phase 1: plan what is unreferenced now and not already waiting in a plan.
    marks, objects = await evidence.get()
    planned = {k for _, keys in waiting.values() for k in keys}
    live = [info for k, info in objects.items() if marks.keeps(k)]
    garbage = {k: info for k, info in objects.items() if not marks.keeps(k)}
    new = sorted(k for k in garbage if k not in planned)
    if new and lock is not None:
        await target.put(f"{PLANS}{run_id}.json", encode_keys("plan", new))
        await target.flush()
    result.sources, result.manifests = marks.sources, marks.manifests
    result.live_objects, result.live_bytes = len(live), sum(i.size for i in live)
    result.garbage_objects, result.garbage_bytes = len(garbage), sum(i.size for i in garbage.values())
    result.planned_objects, result.planned_bytes = len(new), sum(garbage[k].size for k in new)
    result.waiting_plans = len(waiting) + (1 if new else 0)
    result.missing = len(marks.live - objects.keys())
    if lock is not None:
        await _housekeeping(target, await list_gc(target), opts)


async def _phase2(
    repo: Repository,
    opts: PruneOptions,
    progress: ProgressSink,
    result: PruneResult,
    evidence: _Evidence,
    due: dict[str, tuple[ObjectInfo, list[str]]],
    run_id: str,
) -> bool:
    """Delete the due plans' doomed objects (with ``dry_run``: only count them, and take them
    out of the evidence as a real run would). False if writers made it wait."""
    target = repo.target
    flag = None
    if not opts.dry_run:
        # The flag first, then the writers' intents (docs/FORMAT.md 10.4): a writer that put its
        # intent after this listing sees the flag and waits.
        flag = Heartbeat(target, f"{DELETING}{run_id}", "collector", opts.writer_lease)
        await flag.write()
        flag.start()
    try:
        if flag is not None:
            now = await server_now(target, flag.key)
            gc = await list_gc(target)
            busy = [w for w in gc.writers.values() if await alive(target, w, now, opts.writer_lease)]
            if busy:
                result.deferred = f"{len(busy)} writer(s) publishing; the due plans wait for the next run"
                return False
        marks, objects = await evidence.get()
        doomed: dict[str, int] = {}
        for plan_info, keys in due.values():
            for key in keys:
                info = objects.get(key)
                if (
                    info is not None
                    and not marks.keeps(key)
                    and info.mtime is not None
                    and plan_info.mtime is not None
                    and info.mtime < plan_info.mtime  # written again since the plan: keep
                ):
                    doomed[key] = info.size
        result.deleted_objects, result.deleted_bytes = len(doomed), sum(doomed.values())
        if flag is not None and doomed:
            # Announced before done: a writer that cached any of these learns it from here.
            await target.put(f"{RECORDS}{run_id}.json", encode_keys("record", doomed))
            await target.flush()
            await _delete(target, doomed, flag, opts.concurrency, progress)
        if flag is not None:
            for info, _ in due.values():
                await target.delete(info.key)
            await target.flush()
        for key in doomed:
            objects.pop(key, None)
        return True
    finally:
        if flag is not None:
            await flag.stop()


async def _delete(
    target: Target, doomed: dict[str, int], flag: Heartbeat, concurrency: int, progress: ProgressSink
) -> None:
    sem = asyncio.Semaphore(concurrency)
    progress.begin("deleting unreferenced objects", sum(doomed.values()))

    async def one(key: str, size: int) -> None:
        async with sem:
            if not flag.fresh():
                # Writers may already judge the flag dead and start publishing: stop deleting.
                raise GcRefusedError(
                    "the deleting flag could not be kept fresh; stopped deleting", key=flag.key
                )
            await target.delete(key)
            progress.advance(size)

    try:
        await asyncio.gather(*(one(k, n) for k, n in doomed.items()))
    finally:
        progress.end()


async def _housekeeping(target: Target, gc: GcListing, opts: PruneOptions) -> None:
    """Expire old deletion records, and intents and flags whose holders died long ago."""
    now = max((i.mtime for i in gc.infos.values() if i.mtime is not None), default=None)
    if now is None:
        return
    expired: Iterable[ObjectInfo] = [
        *(i for i in gc.records.values() if age(i, now) > opts.record_retention),
        *(i for i in gc.writers.values() if age(i, now) > 2 * opts.writer_lease),
        *(i for i in gc.deleting.values() if age(i, now) > 2 * opts.writer_lease),
    ]
    for info in expired:
        await target.delete(info.key)


async def _acquire_lock(target: Target, lease: float) -> Heartbeat:
    """Take ``gc/lock`` (GcBusyError if another collector's is alive). Advisory: safety does
    not depend on it (two collectors at once are safe, docs/FORMAT.md 10.5), so on servers that
    ignore conditional writes a check-then-write race is tolerated."""
    lock = Heartbeat(target, LOCK_KEY, "collector", lease)
    info = await target.stat(LOCK_KEY)
    if info is not None:
        probe = f"gc/deleted/{new_run_id()}.probe"  # a key no kind of gc object uses
        await target.put(probe, b"")
        try:
            now = await server_now(target, probe)
        finally:
            await target.delete(probe)
        if await alive(target, info, now, lease):
            raise GcBusyError(
                f"another prune holds {LOCK_KEY} (last renewed {max(0.0, age(info, now)):.0f}s ago)",
                key=LOCK_KEY,
                hint=f"wait for it; a lock not renewed for {lease:.0f}s, or whose process on this "
                "host has died, is taken over",
            )
        await target.delete(LOCK_KEY)
    try:
        await target.put(LOCK_KEY, lock.body, if_absent=True)
    except AlreadyExistsError:
        raise GcBusyError(f"another prune took {LOCK_KEY} just now", key=LOCK_KEY) from None
    lock.written_at = time.monotonic()
    if await target.get(LOCK_KEY) != lock.body:  # a server without conditional writes
        raise GcBusyError(f"another prune took {LOCK_KEY} just now", key=LOCK_KEY)
    lock.start()
    return lock


async def _release_lock(target: Target, lock: Heartbeat) -> None:
    await lock.stop(delete=False)
    with contextlib.suppress(TargetError):
        if await target.get(LOCK_KEY) == lock.body:  # never release a lock taken over from us
            await target.delete(LOCK_KEY)


async def run_prune(
    cfgs: Sequence[TargetConfig], options: PruneOptions | None = None, progress: ProgressSink | None = None
) -> list[PruneResult]:
    """``replicator prune``: each target in turn; the first refusal or failure ends it."""
    return [await prune_target(cfg, options, progress) for cfg in cfgs]


async def prune_target(
    cfg: TargetConfig, options: PruneOptions | None = None, progress: ProgressSink | None = None
) -> PruneResult:
    """Open the repository at ``cfg`` and :func:`prune` it."""
    target = await open_target(cfg)
    try:
        return await prune(await Repository.open(target), options, progress)
    finally:
        await target.close()
