"""``replicator run``: the long-running daemon (a systemd service or a Kubernetes sidecar).

One task group owns every background task, each *supervised*: an unexpected exception (a
bug) is logged with its traceback, counted (``replicator_task_failures_total``) and the task
restarted after a backoff, so one bad file or source never takes the process down:

* per source, a :class:`SourceWorker`: keeps an in-memory index of the source's files, fed
  by change events (or polling) and a periodic full rescan; after ``debounce`` of quiet (at
  most ``max_delay`` after the first change) it re-stats what changed and, if anything did,
  builds a candidate snapshot (reading changed files once, fanned out to all healthy
  targets) and hands it to every target's publisher;
* per target, an *attacher* that opens it (the repository, its listing), retried with capped
  backoff forever, and then a :class:`TargetPublisher`: publishes the newest candidate of each
  source on its target, independently of the other targets. A failing target is probed with
  capped, jittered backoff (at most every ``PROBE_MAX`` seconds, so a target that returns
  catches up within seconds, without a new change); its publisher then catches up (missing
  chunks are re-read from the source, after fresh work) — nothing is lost, and the other
  targets never wait for it;
* per target with ``prune: {every, grace}``, a garbage collector run every ``every`` beside
  the publishers (``Daemon._prune_schedule``);
* the RPO monitor, the source watchers and the systemd watchdog.

Start-up never waits for a target: the HTTP endpoint, lag tracking and alerts are up before
any target is contacted, and a target that is down at start is reported like one that fails
later. ``/readyz`` answers 200 once at least one target is open.

Lifecycle: SIGTERM/SIGINT stop the watchers and attachers at once, let workers and
publishers finish what is in flight for up to ``shutdown_grace`` (a publisher whose target is
failing makes one last attempt, no more), then exit 0. ``kill -9`` at any moment is safe:
the repository write order keeps every ref on a complete snapshot, and the next start
re-lists the targets (the previous run did not end cleanly) so chunks already uploaded are
not sent again. systemd gets READY=1, WATCHDOG=1 pings and STOPPING=1 (no-ops elsewhere).

SIGHUP re-reads the config file and applies what can change live (LIVE_SOURCE_FIELDS,
LIVE_TARGET_FIELDS, budgets, alerts), and picks up releases of publishes held by the
mass-deletion guard (``replicator release``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from replicator import log as logging_setup
from replicator import metrics, page, release, status, systemd
from replicator.alerts import WebhookNotifier
from replicator.backends import source_backend
from replicator.config import Config, PruneSchedule, SourceConfig, TargetConfig, load_config
from replicator.engine import Candidate, OpenTarget, Replicator, SourceResult
from replicator.errors import (
    ConfigError,
    GcBusyError,
    GcRefusedError,
    PermanentTargetError,
    ReplicatorError,
    SourceError,
    TargetUnreachableError,
)
from replicator.gc.prune import PruneOptions, prune_target
from replicator.http import HttpEndpoint
from replicator.repository import CONFIG_KEY
from replicator.retry import RetryPolicy, pause
from replicator.rpo import LagTracker, RpoMonitor
from replicator.sources import SourceFile
from replicator.targets import TargetHealth, backend_of

log = logging_setup.get_logger(__name__)

PERMANENT_ERROR_PAUSE = 300.0
"""Retry interval for errors a human must fix (credentials, missing bucket): the daemon keeps
checking, so a fix needs no restart, but it does not hammer the endpoint."""
PROBE_MAX = 5.0
"""Longest pause between probes of a failing target: recovery within seconds of its return."""
PROBE_TIMEOUT = 10.0
"""A probe that gets no answer in this long has failed (the target's own timeout may be long)."""
UNREADABLE_RETRY_MAX = 60.0
"""Longest pause before a source worker looks again at files it could not read."""
PRUNE_RECHECK = 5.0
"""Longest sleep of a target's prune schedule before it reads its settings again (SIGHUP)."""
PRUNE_JITTER_MAX = 300.0
SLOW_BACKOFF = RetryPolicy(initial=1.0, max=60.0, give_up_after=None)
"""Pause before a background task that failed unexpectedly is started again."""


def probe_backoff(cfg: TargetConfig) -> RetryPolicy:
    """Pauses between attempts to reach a failing target: its retry settings, capped at PROBE_MAX."""
    return RetryPolicy(initial=cfg.retry.initial, max=min(cfg.retry.max, PROBE_MAX), give_up_after=None)


class LiveConfig:
    """The one owner of the running configuration: every worker and publisher reads settings
    through it, so a SIGHUP reaches all of them at once (a copy kept by a worker once made it
    admit chunks at an old priority while publishing at the new one)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def source(self, name: str) -> SourceConfig:
        return self.config.source(name)

    def reload(self, new: Config) -> list[str]:
        """Take the live-reloadable settings of ``new``; return the changes that need a restart."""
        self.config, ignored = merge_live_settings(self.config, new)
        return ignored


@dataclass
class SourceWorker:
    """Watches one source and turns its changes into candidates for every publisher."""

    name: str
    live: LiveConfig
    rep: Replicator
    tracker: LagTracker
    submit: Callable[[Candidate], None]
    stopping: asyncio.Event
    index: dict[str, SourceFile] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    """Paths the scans could not examine: unknown, not deleted (replicator.reconcile)."""
    dirty: set[str] = field(default_factory=set)
    full_rescan: bool = True
    last_change: float = 0.0
    first_change: float | None = None
    """Oldest change not yet taken into a round (monotonic): bounds the debounce under
    constant writes (``max_delay``)."""
    last_candidate: Candidate | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    rescan_due: float = 0.0
    recheck_due: float | None = None
    retry_due: float | None = None
    """When to run a round even without a change (monotonic), or None."""
    unreadable_rounds: int = 0
    seq: int = 0

    @property
    def cfg(self) -> SourceConfig:
        return self.live.source(self.name)

    def changed(self, paths: set[str] | None) -> None:
        """Watcher callback: these paths (None: anything) may have changed."""
        if paths is None:
            self.full_rescan = True
        else:
            self.dirty |= paths
        self.last_change = time.monotonic()
        if self.first_change is None:
            self.first_change = self.last_change
        if self.cfg.kind != "checkpoint":
            # A dataset's change is pending from now; a checkpoint's only once it completes a
            # set (replicator.rpo), which the round decides.
            self.tracker.observed(self.name, self.tracker.clock())
        self.wake.set()

    def request_round(self, delay: float = 0.0) -> None:
        """Run a round in ``delay`` seconds even without a change (a target was attached, a
        publisher's candidate went stale, a file could not be read)."""
        due = time.monotonic() + delay
        self.retry_due = due if self.retry_due is None else min(self.retry_due, due)
        self.wake.set()

    @property
    def polled(self) -> bool:
        """Listed every ``poll_interval`` (S3), not watched (directories): its backend says."""
        return source_backend(self.cfg).watch is None

    async def watch(self) -> None:
        """Feed :meth:`changed` from the source backend's watcher, if it has one."""
        cfg = self.cfg
        watch = source_backend(cfg).watch
        if watch is not None:
            await watch(cfg, self.changed, self.stopping)

    async def run(self) -> None:
        backoff = SLOW_BACKOFF.backoff()
        self.full_rescan = True  # also after a restart by the supervisor
        while not self.stopping.is_set():
            await self._wait_for_work()
            if self.stopping.is_set():
                break
            try:
                changed = await self._refresh_index()
                if changed or self._due(self.retry_due) or self._due(self.recheck_due):
                    await self._round()
                backoff.reset()
            except SourceError as exc:
                log.error("source.failed", source=self.name, error=str(exc))
                metrics.SOURCE_ERRORS.labels(self.name, "scan_failed").inc()
                self.full_rescan = True
                await backoff.wait(self.stopping)

    async def _wait_for_work(self) -> None:
        """Sleep until a change has been quiet for ``debounce``, or a timer is due."""
        while not self.stopping.is_set():
            now = time.monotonic()
            cfg = self.cfg
            quiet = cfg.quiet_before_snapshot
            deadlines = [self.rescan_due]
            if self.dirty or (self.full_rescan and self.last_change):
                # Wait for `quiet` seconds without changes, but never more than max_delay after
                # the first change: a file appended to forever must still be copied.
                latest = cfg.max_delay + (self.first_change or now)
                if now - self.last_change >= quiet or now >= latest:
                    return
                deadlines += [self.last_change + quiet, latest]
            deadlines += [t for t in (self.recheck_due, self.retry_due) if t is not None]
            if min(deadlines) <= now:
                return
            self.wake.clear()
            await pause(min(deadlines) - now, self.wake)

    @staticmethod
    def _due(when: float | None) -> bool:
        return when is not None and time.monotonic() >= when

    async def _refresh_index(self) -> bool:
        """Bring the index up to date; True if any file was added, changed or removed."""
        first = self.first_change
        self.first_change = None
        changed = await self._apply_changes()
        if changed:
            # When the change was observed: the first event of this burst (or now, for a
            # rescan). Datasets were counted from the event already (SourceWorker.changed).
            observed = self.tracker.clock() - (time.monotonic() - (first or time.monotonic()))
            self.tracker.observed(self.name, observed)
        return changed

    async def _apply_changes(self) -> bool:
        cfg = self.cfg
        now = time.monotonic()
        if self.full_rescan or now >= self.rescan_due:
            self.full_rescan = False
            self.dirty.clear()
            interval = cfg.poll_interval if self.polled else cfg.rescan_interval
            self.rescan_due = now + interval
            listing = await self.rep.scan(cfg)
            fresh = {f.path: f for f in listing.files}
            changed = fresh != self.index or listing.unreadable != self.unreadable
            log.info(
                "source.rescanned",
                source=self.name,
                files=len(fresh),
                unreadable=len(listing.unreadable),
                changed=changed,
                seconds=round(time.monotonic() - now, 3),
            )
            self.index, self.unreadable = fresh, dict(listing.unreadable)
            assert self.rep.state is not None
            self.rep.state.files.forget_except(self.name, set(fresh))
            return changed
        source = self.rep.source(cfg)
        dirty, self.dirty = self.dirty, set()
        changed = False
        for path in sorted(dirty):
            listing = await source.scan_below(path)
            below = {p for p in self.index if p == path or p.startswith(path + "/")}
            found = {f.path: f for f in listing.files}
            for p in below - found.keys():
                del self.index[p]
                changed = True
            for p, f in found.items():
                if self.index.get(p) != f:
                    self.index[p] = f
                    changed = True
            stale = {p for p in self.unreadable if p == path or p.startswith(path + "/")}
            if stale != listing.unreadable.keys():
                changed = True
            for p in stale:
                del self.unreadable[p]
            self.unreadable.update(listing.unreadable)
        return changed

    async def _round(self) -> None:
        self.retry_due = None
        if not self.rep.open_targets:
            # Nothing to send to yet: observations stay pending (lag grows on every target)
            # until a target is attached, which asks for a round.
            return
        cfg = self.cfg
        observed = self.tracker.begin_round(self.name)
        try:
            result = SourceResult(self.name)
            files = sorted(self.index.values(), key=lambda f: f.path)
            candidate = await self.rep.build_candidate(
                cfg, files, result, unreadable=self.unreadable, prestage=True
            )
        except BaseException:
            self.tracker.end_round(self.name, failed=True)
            raise
        self.recheck_due = None
        if candidate.recheck_at_ns is not None:
            self.recheck_due = time.monotonic() + max(0.0, (candidate.recheck_at_ns - time.time_ns()) / 1e9)
        if result.skipped:
            # Something could not be read (it kept changing, or a permission): look again soon,
            # then less and less often while it lasts.
            self.unreadable_rounds += 1
            delay = min(
                UNREADABLE_RETRY_MAX, (cfg.quiet_before_snapshot + 1.0) * 2 ** (self.unreadable_rounds - 1)
            )
            self.request_round(delay)
        else:
            self.unreadable_rounds = 0
        if candidate.same_content(self.last_candidate):
            self.tracker.end_round(self.name)
            return
        self.seq += 1
        candidate = dataclasses.replace(
            candidate, seq=self.seq, observed_at=observed if observed is not None else self.tracker.clock()
        )
        self.last_candidate = candidate
        log.info(
            "candidate.ready",
            source=self.name,
            files=result.files,
            read=result.files_read,
            bytes_read=result.bytes_read,
            held_back=sorted(result.held_back),
            unreadable=sorted(result.skipped),
        )
        self.submit(candidate)
        self.tracker.end_round(self.name)


@dataclass
class TargetPublisher:
    """Publishes the newest candidate of every source on one target, retrying forever."""

    target: OpenTarget
    live: LiveConfig
    rep: Replicator
    tracker: LagTracker
    sources_done: asyncio.Event
    """Set once stopping and every source worker has finished: no candidate can follow."""
    request_round: Callable[[str], None]
    approvals: dict[str, set[str]]
    """Source -> targets that may still publish a mass deletion an operator released."""
    pending: dict[str, Candidate] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    delivered: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per source, path -> digest of the last snapshot durable on this target."""
    probe_error: ReplicatorError | None = None
    needs_human: bool = False
    """The last round failed with a PermanentTargetError: retried only after a long pause."""
    history: page.History = field(default_factory=page.History)
    """Where published snapshots are listed for the status page."""
    idle_shared: dict[str, Candidate] = field(default_factory=dict)
    """Shared sources' last candidates, done: published again every ``shared.heartbeat``, to
    keep this instance's member object alive and (the assembler) to find new parts."""

    @property
    def name(self) -> str:
        return self.target.config.name

    async def load_delivered(self) -> None:
        """What each source's latest snapshot on the target holds, to measure pending work."""
        for cfg in self.live.config.sources:
            with contextlib.suppress(ReplicatorError):
                latest = await self.target.repo.latest(cfg.name)
                if latest is not None:
                    manifest = await self.target.repo.load_manifest(cfg.name, latest)
                    self.delivered[cfg.name] = {f.path: f.digest for f in manifest.files}

    def submit(self, candidate: Candidate) -> None:
        self.pending[candidate.source] = candidate
        self.idle_shared.pop(candidate.source, None)
        spec = self.target.repo.hash
        have = self.delivered.get(candidate.source, {})
        changed = [
            r
            for r in candidate.records
            if spec.key not in r.digests or have.get(r.path) != r.digests[spec.key]
        ]
        self.tracker.submitted(
            candidate.source, self.name, candidate.seq, candidate.observed_at,
            sum(r.size for r in changed), len(changed),
        )  # fmt: skip
        self.wake.set()

    async def run(self) -> None:
        cfg = self.target.config
        backoff = probe_backoff(cfg).backoff()
        relist_due = time.monotonic() + cfg.relist_interval
        while True:
            if not self.pending:
                if self.sources_done.is_set():
                    return
                self.wake.clear()
                heartbeat = self._heartbeat()
                await pause(min(relist_due, heartbeat) - time.monotonic(), self.wake)
                if not self.pending and time.monotonic() >= heartbeat:
                    self.pending.update(self.idle_shared)
                    self.idle_shared.clear()
                if not self.pending and time.monotonic() < relist_due:
                    continue
            ok = await self._probe() if not self.target.uploader.healthy else True
            if ok and time.monotonic() >= relist_due:
                ok = await self._relist()
                relist_due = time.monotonic() + cfg.relist_interval
            if not self.pending:
                continue
            outcome = await self._publish_pending() if ok else "failed"
            if self.sources_done.is_set() and outcome != "ok":
                return  # draining: one last attempt, then nothing more will be sent
            if outcome == "ok":
                backoff.reset()
                continue
            if outcome == "waiting":
                # Deferred by the budget (a new day, a raised budget or new prices release it)
                # or held for an operator (SIGHUP after `replicator release`): look again on a
                # wake-up, at least every minute.
                backoff.reset()
                budget = self.rep.budget.seconds_to_next_period()
                wait = min(60.0, budget, self._heartbeat() - time.monotonic())
            else:
                wait = backoff.next_delay()
                if self.needs_human or isinstance(
                    self.probe_error or self.target.uploader.error, PermanentTargetError
                ):
                    wait = max(wait, PERMANENT_ERROR_PAUSE)  # needs a human: report, don't spin
                log.info("target.backoff", target=self.name, seconds=round(wait, 2), attempt=backoff.failures)
            self.wake.clear()
            await pause(wait, self.wake)

    def _heartbeat(self) -> float:
        """When the next shared source's heartbeat is due (monotonic; inf: none is shared)."""
        beats = [s.shared.heartbeat for s in self.live.config.sources if s.shared is not None]
        return time.monotonic() + min(beats) if beats else float("inf")

    async def _relist(self) -> bool:
        """The scheduled reconciliation of the state's chunk claims (``relist_interval``)."""
        try:
            await self.target.uploader.presence.relist()
        except ReplicatorError as exc:
            log.warning("target.relist_failed", target=self.name, error=str(exc))
            return False
        return True

    async def _probe(self) -> bool:
        """One cheap request straight to the backend (no retry layer): is the target back?
        Bounded by PROBE_TIMEOUT, so a hung target does not delay noticing its return."""
        try:
            try:
                await asyncio.wait_for(backend_of(self.target.target).stat(CONFIG_KEY), PROBE_TIMEOUT)
            except TimeoutError:
                raise TargetUnreachableError(
                    f"no answer to a probe within {PROBE_TIMEOUT:g}s", target=self.name, operation="stat"
                ) from None
        except ReplicatorError as exc:
            log.debug("target.probe_failed", target=self.name, error=str(exc))
            self.probe_error = exc
            self.tracker.target_failed(self.name, str(exc))
            return False
        self.probe_error = None
        self.target.uploader.mark_healthy()
        self.tracker.target_ok(self.name)
        return True

    async def _publish_pending(self) -> str:
        """Try every pending candidate: "failed" if any failed, else "waiting" if the budget or
        an operator holds any back, else "ok"."""
        outcome = "ok"
        self.needs_human = False
        for source, candidate in list(self.pending.items()):
            allow = self.name in self.approvals.get(source, ())
            result = await self.rep.publish(
                self.target, self.live.source(source), candidate, allow_deletes=allow
            )
            if result.status == "failed":
                self.tracker.failed(source, self.name, result.error or "failed")
                self.needs_human |= result.permanent
                outcome = "failed"
                continue
            if result.status in ("deferred", "held", "waiting"):
                if result.status == "deferred":
                    self.tracker.deferred(source, self.name, result.error or "deferred by the budget")
                elif result.status == "held":
                    self.tracker.held(source, self.name, result.error or "held")
                else:  # sets wait for other instances' parts: not durable, the lag grows
                    self.tracker.failed(source, self.name, f"waiting for parts: {result.error}")
                outcome = "waiting" if outcome == "ok" else outcome
                continue
            if result.status == "superseded":
                # A newer candidate is usually on its way; ask for one in case it is not (a
                # file this one names is gone from the primary, and no event said so).
                self.tracker.failed(source, self.name, f"superseded: {result.error}")
                self.request_round(source)
            else:  # published, unchanged, empty
                if result.status == "empty":
                    log.warning("source.empty_not_published", source=source, target=self.name)
                spec = self.target.repo.hash
                self.delivered[source] = {r.path: r.digests.get(spec.key, "") for r in candidate.records}
                self.tracker.durable(source, self.name, candidate.seq, self.tracker.clock(), result.damaged)
                if result.status == "published" and result.snapshot:
                    self.history.published(source, self.name, result.snapshot, self.tracker.clock())
                metrics.CARRIED_ENTRIES.labels(source, self.name).set(len(result.carried))
                self.approvals.get(source, set()).discard(self.name)
            if self.pending.get(source) is candidate:
                del self.pending[source]
                if self.live.source(source).shared is not None:
                    self.idle_shared[source] = candidate  # published again each heartbeat
        return outcome


M = TypeVar("M", SourceConfig, TargetConfig)


def _merge_items(what: str, old: list[M], new: list[M], live: tuple[str, ...]) -> tuple[list[M], list[str]]:
    by_name = {x.name: x for x in new}
    merged, ignored = [], []
    for item in old:
        fresh = by_name.get(item.name)
        if fresh is None:
            ignored.append(f"{what}.{item.name} removed")
            merged.append(item)
            continue
        if fresh.model_copy(update={k: getattr(item, k) for k in live}) != item:
            ignored.append(f"{what}.{item.name}")
        merged.append(item.model_copy(update={k: getattr(fresh, k) for k in live}))
    known = {x.name for x in old}
    ignored += [f"{what}.{x.name} added" for x in new if x.name not in known]
    return merged, ignored


def merge_live_settings(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``old`` with the live-reloadable settings of ``new``, and the names of other changes."""
    sources, ignored_s = _merge_items("sources", old.sources, new.sources, LIVE_SOURCE_FIELDS)
    targets, ignored_t = _merge_items("targets", old.targets, new.targets, LIVE_TARGET_FIELDS)
    update = {"sources": sources, "targets": targets, "budget": new.budget, "alerts": new.alerts}
    return old.model_copy(update=update), ignored_s + ignored_t


LIVE_SOURCE_FIELDS = (
    "priority",
    "rpo",
    "rpo_overrides",
    "max_delete",
    "keep_last",
    "retention",
    "retention_overrides",
    "max_delay",
)
LIVE_TARGET_FIELDS = ("cost", "budget", "prune")

T = TypeVar("T")


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.live = LiveConfig(config)
        self.config_path = config_path
        self.fingerprint = status.config_fingerprint(config)
        self.monitor: RpoMonitor | None = None
        self.rep = Replicator(config, interactive=False)
        self.stopping = asyncio.Event()
        self.sources_done = asyncio.Event()
        """Set once stopping and every source worker has finished: no candidate can follow."""
        self.workers: dict[str, SourceWorker] = {}
        self.publishers: dict[str, TargetPublisher] = {}
        self.approvals: dict[str, set[str]] = {}
        self.started = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self.notifier = WebhookNotifier(config.alerts)
        self._tracker: LagTracker | None = None
        self.http: HttpEndpoint | None = None
        self.history = page.History()
        """Lag over the last hours, recent snapshots and errors, for the status page (the lag
        history is loaded from the state store once it is open)."""

    @property
    def config(self) -> Config:
        return self.live.config

    @property
    def tracker(self) -> LagTracker:
        assert self._tracker is not None, "the tracker exists once the state store is open"
        return self._tracker

    # -- tasks -------------------------------------------------------------------------------

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]], *, restart: bool = True) -> None:
        """Run ``factory()`` as a task of the daemon's task group. With ``restart``, an
        unexpected exception is logged, counted, and the task started again after a backoff
        (module docstring); a task that returns is done."""
        assert self._group is not None
        self._tasks[name] = self._group.create_task(self._supervise(name, factory, restart), name=name)

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]], restart: bool) -> None:
        backoff = SLOW_BACKOFF.backoff()
        while True:
            try:
                await factory()
                return
            except Exception as exc:
                metrics.TASK_FAILURES.labels(name).inc()
                if not restart or self.stopping.is_set():
                    log.error("daemon.task_failed", task=name, error=repr(exc), exc_info=exc)
                    return
                delay = backoff.next_delay()
                log.error(
                    "daemon.task_failed", task=name, error=repr(exc), restart_in=round(delay, 2), exc_info=exc
                )
                if await pause(delay, self.stopping):
                    return

    # -- candidates, approvals, reload ---------------------------------------------------------

    def submit(self, candidate: Candidate) -> None:
        """Hand a new candidate to every target: its publisher, or just the lag tracker for a
        target that is not attached yet (its lag must grow too)."""
        for t in self.config.targets:
            publisher = self.publishers.get(t.name)
            if publisher is not None:
                publisher.submit(candidate)
            else:
                size = sum(r.size for r in candidate.records)
                self.tracker.submitted(
                    candidate.source,
                    t.name,
                    candidate.seq,
                    candidate.observed_at,
                    size,
                    len(candidate.records),
                )

    def request_round(self, source: str) -> None:
        worker = self.workers.get(source)
        if worker is not None:
            worker.request_round()

    def deferred_bytes(self) -> dict[tuple[str, str], int]:
        """(target, priority) -> bytes of pending work the budget holds back."""
        out: dict[tuple[str, str], int] = {}
        for pair in self.tracker.pairs.values():
            if pair.deferred:
                key = (pair.target, self.config.source(pair.source).effective_priority)
                out[key] = out.get(key, 0) + self.tracker.pending_bytes(pair)[0]
        return out

    def take_releases(self) -> None:
        """Operators' releases of held publishes (``replicator release`` wrote them)."""
        for source in release.take(self.config.state_dir, [s.name for s in self.config.sources]):
            self.approvals[source] = {t.name for t in self.config.targets}
            log.warning("deletion.released", source=source)
            for publisher in self.publishers.values():
                publisher.wake.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config file and apply what can change live — budgets, costs,
        priorities, RPOs, retention, the deletion guard and alerts; other changes are reported
        and wait for a restart. Then take any releases of held publishes."""
        self.take_releases()
        if self.config_path is None:
            log.warning("config.reload_skipped", reason="no config file")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc))
            return
        ignored = self.live.reload(new)
        merged = self.config
        self.rep.config = merged
        self.rep.budget.reconfigure(merged)
        for s in merged.sources:
            for t in merged.targets:
                pair = self.tracker.pairs.get((s.name, t.name))
                if pair is not None:
                    pair.rpo = s.rpo_for(t.name)
        self.notifier.reconfigure(merged.alerts)
        if self.monitor is not None:
            self.monitor.repeat = merged.alerts.repeat
        logging_setup.REDACTOR.add(merged.secret_values())
        log.info("config.reloaded", needs_restart=ignored)
        for publisher in self.publishers.values():
            publisher.wake.set()  # a raised budget or max_delete may release waiting work

    def status_json(self) -> dict[str, object]:
        return status.from_tracker(self.tracker, self.rep.budget, self.fingerprint).to_json()

    def status_page(self) -> str:
        now = self.tracker.clock()
        report = status.from_tracker(self.tracker, self.rep.budget, self.fingerprint, now)
        return page.render(report, self.history, now)

    def unready(self) -> list[str]:
        """Why ``/readyz`` is not 200: ready once started with at least one target open."""
        if not self.started:
            return ["starting"]
        if self.publishers:
            return []
        return [f"no target open yet ({', '.join(t.name for t in self.config.targets)})"]

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("daemon.stopping", grace=self.config.shutdown_grace)
            systemd.notify("STOPPING=1")
            self.stopping.set()
            for worker in self.workers.values():
                worker.wake.set()
            for publisher in self.publishers.values():
                publisher.wake.set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        async with self.rep:
            assert self.rep.state is not None
            self._tracker = LagTracker(self.config, self.rep.state)
            self.history = page.History(store=self.rep.state.lag_history, now=self.tracker.clock())
            metrics.initialize([s.name for s in self.config.sources], [t.name for t in self.config.targets])
            self.rep.budget.on_exceeded = self.notifier.send
            if self.config.listen:
                self.http = HttpEndpoint(
                    self.config.listen,
                    status=lambda: status.from_tracker(
                        self.tracker, self.rep.budget, self.fingerprint
                    ).to_json(),
                    unready=self.unready,
                    page=self.status_page,
                )
                try:
                    await self.http.start()
                except OSError as exc:
                    raise ConfigError(f"listen {self.config.listen}: {exc.strerror or exc}") from None
            self.take_releases()
            try:
                async with asyncio.TaskGroup() as group:
                    self._group = group
                    self._start_tasks()
                    await self.stopping.wait()
                    await self._drain()
            finally:
                self._group = None
                if self.monitor is not None:
                    self.monitor.evaluate()
                self.history.save()
                self.rep.ledger.flush()
                await self.notifier.close()
                if self.http is not None:
                    await self.http.stop()
        log.info("daemon.stopped")

    def _start_tasks(self) -> None:
        self.spawn("monitor", self._monitor)
        for t in self.config.targets:
            self.spawn(f"attach-{t.name}", functools.partial(self._attach, t))
        for s in self.config.sources:
            worker = SourceWorker(s.name, self.live, self.rep, self.tracker, self.submit, self.stopping)
            self.workers[s.name] = worker
            self.spawn(f"watch-{s.name}", worker.watch)
            self.spawn(f"source-{s.name}", worker.run)
        for t in self.config.targets:
            self.spawn(f"prune-{t.name}", functools.partial(self._prune_schedule, t.name))
        interval = systemd.watchdog_interval()
        if interval:
            self.spawn("watchdog", lambda: self._watchdog(interval))
        self.started = True
        systemd.notify("READY=1")
        log.info("daemon.ready", sources=list(self.workers), targets=[t.name for t in self.config.targets])

    async def _attach(self, cfg: TargetConfig) -> None:
        """Open the target, retrying forever with capped backoff, then start its publisher.
        Its health is followed from the first attempt (status, metrics, alerts)."""
        backoff = probe_backoff(cfg).backoff()
        name, tracker = cfg.name, self.tracker
        health = TargetHealth(name)
        health.listeners.append(
            lambda ok: tracker.target_ok(name) if ok else tracker.target_failed(name, str(health.last_error))
        )
        while not self.stopping.is_set():
            try:
                opened = await self.rep.attach(cfg, health)
            except ReplicatorError as exc:
                delay = backoff.next_delay()
                log.warning("target.unavailable", target=cfg.name, error=str(exc), attempt=backoff.failures)
                self.tracker.target_failed(cfg.name, str(exc))
                permanent = isinstance(exc, PermanentTargetError)  # reported, not spun on
                await pause(PERMANENT_ERROR_PAUSE if permanent else delay, self.stopping)
                continue
            log.info("target.attached", target=cfg.name, attempts=backoff.failures + 1)
            self.tracker.target_ok(cfg.name)
            await self._start_publisher(opened)
            return

    async def _start_publisher(self, t: OpenTarget) -> None:
        name = t.config.name
        publisher = TargetPublisher(
            t,
            self.live,
            self.rep,
            self.tracker,
            self.sources_done,
            self.request_round,
            self.approvals,
            history=self.history,
        )
        await publisher.load_delivered()
        self.publishers[name] = publisher
        for worker in self.workers.values():
            if worker.last_candidate is not None and worker.last_candidate.covers(t.repo.hash):
                publisher.submit(worker.last_candidate)
            else:
                worker.request_round()  # a round builds chunk ids for this target's hash too
        self.spawn(f"publish-{name}", publisher.run)

    async def _monitor(self) -> None:
        """Every second: lag gauges and alerts; liveness heartbeat; state heartbeat every 10 s."""
        monitor = RpoMonitor(self.tracker, self.notifier, self.config.alerts.repeat)
        self.monitor = monitor
        beats = 0
        while not self.stopping.is_set():
            monitor.evaluate()
            self.history.sample(self.tracker, self.tracker.clock())
            self.rep.ledger.flush()
            self.rep.budget.export(self.deferred_bytes())
            if self.http is not None:
                self.http.beat()
            if beats % 10 == 0 and self.rep.state is not None:
                self.rep.state.heartbeat()
            beats += 1
            await pause(1.0, self.stopping)

    async def _prune_schedule(self, name: str) -> None:
        """``prune: {every, grace}``: run ``replicator prune`` on the target every ``every``
        (the first run one interval after start), jittered so that daemons started together do
        not collect at once. It runs beside the publishers (the gc protocol lets writers
        publish during a run) and on its own connection; whatever happens to it is logged and
        counted, never raised, so replication never notices. The settings are read again at
        each wake-up, so SIGHUP can add, change or remove the schedule."""
        due: float | None = None
        current: PruneSchedule | None = None
        while not self.stopping.is_set():
            schedule = self.config.target(name).prune
            if schedule != current:
                current = schedule
                due = None if schedule is None else time.monotonic() + _jittered(schedule.every)
            now = time.monotonic()
            if due is None or now < due:
                # Wake at least every PRUNE_RECHECK to notice a reloaded schedule.
                wait = PRUNE_RECHECK if due is None else min(PRUNE_RECHECK, due - now)
                await pause(wait, self.stopping)
                continue
            assert schedule is not None
            await self._prune_once(self.config.target(name), schedule)
            due = time.monotonic() + _jittered(schedule.every)

    async def _prune_once(self, cfg: TargetConfig, schedule: PruneSchedule) -> None:
        name = cfg.name
        log.info("prune.started", target=name, grace=schedule.grace)
        started = time.monotonic()
        try:
            result = await prune_target(
                cfg, PruneOptions(grace=schedule.grace, repack_below=schedule.repack_below)
            )
        except Exception as exc:  # a bug in prune must not take replication down either
            outcome = (
                "busy"
                if isinstance(exc, GcBusyError)
                else "refused"
                if isinstance(exc, GcRefusedError)
                else "failed"
            )
            seconds = time.monotonic() - started
            metrics.PRUNE_RUNS.labels(name, outcome).inc()
            metrics.PRUNE_DURATION.labels(name).set(seconds)
            unexpected = not isinstance(exc, ReplicatorError)
            log.error(
                "prune.failed",
                target=name,
                outcome=outcome,
                error=str(exc) if not unexpected else repr(exc),
                seconds=round(seconds, 3),
                exc_info=exc if unexpected else None,
            )
            return
        seconds = time.monotonic() - started
        metrics.PRUNE_RUNS.labels(name, "success").inc()
        metrics.PRUNE_DURATION.labels(name).set(seconds)
        metrics.PRUNE_RECLAIMED_BYTES.labels(name).inc(result.deleted_bytes)
        metrics.PRUNE_DELETED_OBJECTS.labels(name).inc(result.deleted_objects)
        metrics.PRUNE_LAST_SUCCESS.labels(name).set(time.time())
        log.info(
            "prune.finished",
            target=name,
            deleted_objects=result.deleted_objects,
            deleted_bytes=result.deleted_bytes,
            planned_objects=result.planned_objects,
            garbage_bytes=result.garbage_bytes,
            deferred=result.deferred,
            seconds=round(seconds, 3),
        )

    async def _watchdog(self, interval: float) -> None:
        while not self.stopping.is_set():
            systemd.notify("WATCHDOG=1")
            await pause(interval, self.stopping)

    async def _drain(self) -> None:
        """Let in-flight rounds and publications finish within the grace period: first the
        source workers (a round under way ends in a candidate), then the publishers, which
        publish what the workers handed them before they return. Everything else (watchers,
        attachers still trying, the monitor) stops at once."""
        deadline = time.monotonic() + self.config.shutdown_grace
        keep = {f"source-{n}" for n in self.workers} | {f"publish-{t.name}" for t in self.config.targets}
        for name, task in self._tasks.items():
            if name not in keep and name != "watchdog":
                task.cancel()
        workers = [t for n, t in self._tasks.items() if n.startswith("source-") and not t.done()]
        if workers:
            await asyncio.wait(workers, timeout=max(0.0, deadline - time.monotonic()))
        self.sources_done.set()
        for publisher in self.publishers.values():
            publisher.wake.set()
        pending = [t for n, t in self._tasks.items() if n in keep and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        leftovers = [t for t in self._tasks.values() if not t.done()]
        for task in leftovers:
            task.cancel()
        cancelled = sorted(t.get_name() for t in leftovers if t.get_name() in keep)
        if cancelled:
            log.warning("daemon.grace_expired", cancelled=cancelled)


def _jittered(every: float) -> float:
    """``every`` plus up to 10 % (at most PRUNE_JITTER_MAX seconds) of random delay."""
    return every + random.uniform(0.0, min(0.1 * every, PRUNE_JITTER_MAX))


class DaemonCrashedError(ReplicatorError):
    """The daemon's task group failed (a bug outside any supervised task)."""


async def run_daemon(config: Config, config_path: Path | None = None) -> None:
    daemon = Daemon(config, config_path)
    try:
        await daemon.run()
    except ExceptionGroup as group:  # the task group itself failed: a bug outside any task
        first = group.exceptions[0]
        log.error("daemon.crashed", error=repr(first), exc_info=first)
        raise DaemonCrashedError(
            f"the daemon failed unexpectedly ({first!r}; see the log); exiting so the supervisor restarts it"
        ) from None
