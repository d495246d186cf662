"""``replicator run``: the long-running daemon (a systemd service or a Kubernetes sidecar).

One task group owns every background task:

* per source, a :class:`SourceWorker`: keeps an in-memory index of the source's files,
  fed by change events (or polling) and a periodic full rescan; after ``debounce`` of quiet
  it re-stats what changed and, if anything did, builds a candidate snapshot (reading changed
  files once, fanned out to all healthy targets) and hands it to every target's publisher;
* per target, a :class:`TargetPublisher`: publishes the newest candidate of each source on
  its target, independently of the other targets. A target that fails is probed with capped,
  jittered exponential backoff, indefinitely; when it answers again the publisher catches up
  (missing chunks are re-read from the source) — nothing is lost, and the other targets never
  wait for it. Targets that could not be opened at start are retried the same way.

Lifecycle: SIGTERM/SIGINT stop the watchers, let workers and publishers finish what is in
flight for up to ``shutdown_grace``, then exit 0. ``kill -9`` at any moment is safe: the
repository write order keeps every ref on a complete snapshot, and the next start re-lists
the targets (the previous run did not end cleanly) so chunks already uploaded are not sent
again. systemd gets READY=1, WATCHDOG=1 pings and STOPPING=1 (no-ops outside systemd).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from replicator import log as logging_setup
from replicator import status, systemd
from replicator.alerts import WebhookNotifier
from replicator.config import Config, SourceConfig, TargetConfig, load_config
from replicator.engine import Candidate, OpenTarget, Replicator, SourceResult
from replicator.errors import ConfigError, PermanentTargetError, ReplicatorError, SourceError
from replicator.http import HttpEndpoint
from replicator.repository import CONFIG_KEY
from replicator.rpo import LagTracker, RpoMonitor
from replicator.s3 import is_s3_url
from replicator.sources import SourceFile
from replicator.targets import RetryPolicy, backend_of
from replicator.watch import watch_posix

log = logging_setup.get_logger(__name__)

PERMANENT_ERROR_PAUSE = 300.0
"""Retry interval for errors a human must fix (credentials, missing bucket): the daemon keeps
checking, so a fix needs no restart, but it does not hammer the endpoint."""


@dataclass
class SourceWorker:
    """Watches one source and turns its changes into candidates for every publisher."""

    daemon: Daemon
    cfg: SourceConfig
    index: dict[str, SourceFile] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    full_rescan: bool = True
    last_change: float = 0.0
    first_change: float | None = None
    """Oldest change not yet taken into a round: bounds the debounce under constant writes."""
    last_candidate: Candidate | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    rescan_due: float = 0.0
    recheck_due: float | None = None
    retry_round: bool = False
    unsubmitted_since: float | None = None
    """Observation time of changes not yet carried by a candidate."""
    seq: int = 0

    def changed(self, paths: set[str] | None) -> None:
        """Watcher callback: these paths (None: anything) may have changed."""
        if paths is None:
            self.full_rescan = True
        else:
            self.dirty |= paths
        self.last_change = time.monotonic()
        if self.first_change is None:
            self.first_change = self.last_change
        self.wake.set()

    @property
    def polled(self) -> bool:
        return is_s3_url(self.cfg.url)

    async def run(self) -> None:
        stop = self.daemon.stopping
        if not self.polled:
            self.daemon.spawn(
                watch_posix(
                    Path(self.cfg.url.removeprefix("file://")),
                    self.changed,
                    stop,
                    poll=self.cfg.watch == "poll",
                    poll_interval=self.cfg.poll_interval,
                ),
                f"watch-{self.cfg.name}",
            )
        backoff = RetryPolicy(initial=1.0, max=60.0, give_up_after=None)
        failures = 0
        while not stop.is_set():
            await self._wait_for_work()
            if stop.is_set():
                break
            try:
                changed = await self._refresh_index()
                if changed or self.retry_round or self._recheck_passed():
                    await self._round()
                failures = 0
            except SourceError as exc:
                failures += 1
                log.error("source.failed", source=self.cfg.name, error=str(exc))
                self.full_rescan = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff.delay(failures))

    async def _wait_for_work(self) -> None:
        """Sleep until a change has been quiet for ``debounce``, or a timer is due."""
        while not self.daemon.stopping.is_set():
            now = time.monotonic()
            quiet = self.cfg.quiet_before_snapshot
            deadlines = [self.rescan_due]
            if self.dirty or (self.full_rescan and self.last_change):
                # Wait for `quiet` seconds without changes, but never more than 10x that (or
                # 30 s) after the first change: a file appended to forever must still be copied.
                latest = max(10 * quiet, 30.0) + (self.first_change or now)
                if now - self.last_change >= quiet or now >= latest:
                    return
                deadlines += [self.last_change + quiet, latest]
            if self.recheck_due is not None:
                deadlines.append(self.recheck_due)
            if self.retry_round:
                deadlines.append(now + self.cfg.quiet_before_snapshot + 1.0)
            if min(deadlines) <= now:
                return
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), min(deadlines) - now)

    def _recheck_passed(self) -> bool:
        return self.recheck_due is not None and time.monotonic() >= self.recheck_due

    async def _refresh_index(self) -> bool:
        """Bring the index up to date; True if any file was added, changed or removed."""
        changed = await self._apply_changes()
        if changed:
            # When the change was observed: the first event of this burst (or now, for a
            # rescan); kept until a candidate carries it (replicator.rpo).
            observed = time.time() - (time.monotonic() - (self.first_change or time.monotonic()))
            self.unsubmitted_since = min(self.unsubmitted_since or observed, observed)
        self.first_change = None
        return changed

    async def _apply_changes(self) -> bool:
        source = self.daemon.rep.source(self.cfg)
        now = time.monotonic()
        if self.full_rescan or now >= self.rescan_due:
            self.full_rescan = False
            self.dirty.clear()
            interval = self.cfg.poll_interval if self.polled else self.cfg.rescan_interval
            self.rescan_due = now + interval
            files = await self.daemon.rep.scan(self.cfg)
            fresh = {f.path: f for f in files}
            changed = fresh != self.index
            log.info(
                "source.rescanned",
                source=self.cfg.name,
                files=len(fresh),
                changed=changed,
                seconds=round(time.monotonic() - now, 3),
            )
            self.index = fresh
            assert self.daemon.rep.state is not None
            self.daemon.rep.state.forget_files_except(self.cfg.name, set(fresh))
            return changed
        dirty, self.dirty = self.dirty, set()
        changed = False
        for path in sorted(dirty):
            below = {p for p in self.index if p == path or p.startswith(path + "/")}
            found = {f.path: f for f in await source.scan_below(path)}
            for p in below - found.keys():
                del self.index[p]
                changed = True
            for p, f in found.items():
                if self.index.get(p) != f:
                    self.index[p] = f
                    changed = True
        return changed

    async def _round(self) -> None:
        rep = self.daemon.rep
        self.retry_round = False
        if not rep.open_targets:
            # Nothing to send to yet: try again once a target is attached, but let lag count
            # from now, under the number the next candidate will carry.
            self.retry_round = True
            if self.unsubmitted_since is not None:
                size = sum(f.size for f in self.index.values())
                for t in self.daemon.config.targets:
                    self.daemon.tracker.submitted(
                        self.cfg.name, t.name, self.seq + 1, self.unsubmitted_since, size, len(self.index)
                    )
            return
        result = SourceResult(self.cfg.name)
        files = sorted(self.index.values(), key=lambda f: f.path)
        candidate = await rep.build_candidate(self.cfg, files, result, prestage=True)
        self.recheck_due = None
        if candidate.recheck_at_ns is not None:
            self.recheck_due = time.monotonic() + max(0.0, (candidate.recheck_at_ns - time.time_ns()) / 1e9)
        if result.skipped:
            self.retry_round = True  # a file kept changing or was unreadable: look again soon
        if candidate.same_content(self.last_candidate):
            self.unsubmitted_since = None
            return
        self.seq += 1
        candidate = dataclasses.replace(
            candidate, seq=self.seq, observed_at=self.unsubmitted_since or time.time()
        )
        self.unsubmitted_since = None
        self.last_candidate = candidate
        log.info(
            "candidate.ready",
            source=self.cfg.name,
            files=result.files,
            read=result.files_read,
            bytes_read=result.bytes_read,
            held_back=sorted(result.held_back),
        )
        self.daemon.submit(candidate)


@dataclass
class TargetPublisher:
    """Publishes the newest candidate of every source on one target, retrying forever."""

    daemon: Daemon
    target: OpenTarget
    pending: dict[str, Candidate] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    delivered: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per source, path -> digest of the last snapshot durable on this target."""
    probe_error: ReplicatorError | None = None

    async def load_delivered(self) -> None:
        """What each source's latest snapshot on the target holds, to measure pending work."""
        for cfg in self.daemon.config.sources:
            with contextlib.suppress(ReplicatorError):
                latest = await self.target.repo.latest(cfg.name)
                if latest is not None:
                    manifest = await self.target.repo.load_manifest(cfg.name, latest)
                    self.delivered[cfg.name] = {f.path: f.digest for f in manifest.files}

    def submit(self, candidate: Candidate) -> None:
        self.pending[candidate.source] = candidate
        spec = self.target.repo.hash
        have = self.delivered.get(candidate.source, {})
        changed = [
            r
            for r in candidate.records
            if spec.key not in r.digests or have.get(r.path) != r.digests[spec.key]
        ]
        self.daemon.tracker.submitted(
            candidate.source, self.target.config.name, candidate.seq, candidate.observed_at,
            sum(r.size for r in changed), len(changed),
        )  # fmt: skip
        self.wake.set()

    async def run(self) -> None:
        cfg = self.target.config
        backoff = RetryPolicy(initial=cfg.retry.initial, max=cfg.retry.max, give_up_after=None)
        failures = 0
        while True:
            if not self.pending:
                if self.daemon.sources_done.is_set():
                    return
                self.wake.clear()
                await self.wake.wait()
                continue
            ok = await self._probe() if not self.target.uploader.healthy else True
            outcome = await self._publish_pending() if ok else "failed"
            if outcome == "deferred":
                # Waiting for budget: a new day, a raised budget (SIGHUP wakes us) or spend
                # freed by a change of prices. Look again at least every minute.
                wait = min(60.0, self.daemon.rep.budget.seconds_to_next_period())
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), wait)
            if outcome != "failed":
                failures = 0
                if self.daemon.sources_done.is_set() and outcome == "deferred":
                    return  # nothing more will be sent before we exit
                continue
            failures += 1
            delay = backoff.delay(failures)
            if isinstance(self.probe_error or self.target.uploader.error, PermanentTargetError):
                delay = max(delay, PERMANENT_ERROR_PAUSE)  # needs a human: report, don't spin
            log.info("target.backoff", target=cfg.name, seconds=round(delay, 2), attempt=failures)
            await asyncio.sleep(delay)

    async def _probe(self) -> bool:
        """One cheap request straight to the backend (no retry layer): is the target back?"""
        try:
            await backend_of(self.target.target).stat(CONFIG_KEY)
        except ReplicatorError as exc:
            log.debug("target.probe_failed", target=self.target.config.name, error=str(exc))
            self.probe_error = exc
            for source in self.pending:
                self.daemon.tracker.failed(source, self.target.config.name, str(exc))
            return False
        self.probe_error = None
        self.target.uploader.mark_healthy()
        self.daemon.reached.add(self.target.config.name)
        return True

    async def _publish_pending(self) -> str:
        """Try every pending candidate: "failed" if any failed, else "deferred" if the budget
        holds any back, else "ok"."""
        outcome = "ok"
        target = self.target.config.name
        for name, candidate in list(self.pending.items()):
            result = await self.daemon.rep.publish(self.target, self.daemon.config.source(name), candidate)
            if result.status == "failed":
                self.daemon.tracker.failed(name, target, result.error or "failed")
                outcome = "failed"
                continue
            if result.status == "deferred":
                self.daemon.tracker.deferred(name, target, result.error or "deferred by the budget")
                outcome = "deferred" if outcome == "ok" else outcome
                continue
            if result.status in ("published", "unchanged", "empty"):
                if result.status == "empty":
                    log.warning("source.empty_not_published", source=name, target=target)
                spec = self.target.repo.hash
                self.delivered[name] = {r.path: r.digests.get(spec.key, "") for r in candidate.records}
                self.daemon.tracker.durable(name, target, candidate.seq, time.time())
            if self.pending.get(name) is candidate:
                del self.pending[name]
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


LIVE_SOURCE_FIELDS = ("priority", "rpo", "rpo_overrides")
LIVE_TARGET_FIELDS = ("cost", "budget")


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.monitor: RpoMonitor | None = None
        self.rep = Replicator(config, fail_fast=False)
        self.stopping = asyncio.Event()
        self.sources_done = asyncio.Event()
        """Set once stopping and every source worker has finished: no candidate can follow."""
        self.workers = {s.name: SourceWorker(self, s) for s in config.sources}
        self.publishers: dict[str, TargetPublisher] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.crashed = False
        self.reached: set[str] = set()
        """Targets reached at least once (readiness)."""
        self.notifier = WebhookNotifier(config.alerts)
        self._tracker: LagTracker | None = None
        self.http: HttpEndpoint | None = None

    @property
    def tracker(self) -> LagTracker:
        assert self._tracker is not None, "the tracker exists once the state store is open"
        return self._tracker

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

    def deferred_bytes(self) -> dict[tuple[str, str], int]:
        """(target, priority) -> bytes of pending work the budget holds back."""
        out: dict[tuple[str, str], int] = {}
        for pair in self.tracker.pairs.values():
            if pair.deferred:
                key = (pair.target, self.config.source(pair.source).effective_priority)
                out[key] = out.get(key, 0) + self.tracker.pending_bytes(pair)[0]
        return out

    def reload(self) -> None:
        """SIGHUP: re-read the config file and apply what can change live — budgets, costs,
        priorities, RPOs and alerts. Other changes are reported and wait for a restart."""
        if self.config_path is None:
            log.warning("config.reload_skipped", reason="no config file")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc))
            return
        merged, ignored = merge_live_settings(self.config, new)
        self.config = merged
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
            publisher.wake.set()  # a raised budget may release deferred work

    def unready(self) -> list[str]:
        return [f"target {t.name} not reached yet" for t in self.config.targets if t.name not in self.reached]

    def spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("daemon.task_crashed", task=task.get_name(), error=repr(exc), exc_info=exc)
            self.crashed = True
            self.stop()  # a bug: stop cleanly and let the supervisor restart us

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("daemon.stopping", grace=self.config.shutdown_grace)
            systemd.notify("STOPPING=1")
            self.stopping.set()
            for worker in self.workers.values():
                worker.wake.set()
            for publisher in self.publishers.values():
                publisher.wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        async with self.rep:
            assert self.rep.state is not None
            self._tracker = LagTracker(self.config, self.rep.state)
            self.rep.budget.on_exceeded = self.notifier.send
            if self.config.listen:
                self.http = HttpEndpoint(
                    self.config.listen,
                    status=lambda: status.from_tracker(self.tracker, self.rep.budget).to_json(),
                    unready=self.unready,
                )
                try:
                    await self.http.start()
                except OSError as exc:
                    raise ConfigError(f"listen {self.config.listen}: {exc.strerror or exc}") from None
            self.spawn(self._monitor(), "rpo-monitor")
            for t in self.rep.open_targets:
                await self._start_publisher(t)
            for name in list(self.rep.target_errors):
                self.spawn(self._attach_later(self.config.target(name)), f"attach-{name}")
            worker_tasks = [self.spawn(w.run(), f"source-{w.cfg.name}") for w in self.workers.values()]
            interval = systemd.watchdog_interval()
            if interval:
                self.spawn(self._watchdog(interval), "watchdog")
            systemd.notify("READY=1")
            log.info(
                "daemon.ready",
                sources=list(self.workers),
                targets=[t.config.name for t in self.rep.open_targets],
            )
            await self.stopping.wait()
            await self._drain(worker_tasks)
            await self.notifier.close()
            if self.http is not None:
                await self.http.stop()
        log.info("daemon.stopped")

    async def _start_publisher(self, t: OpenTarget) -> None:
        self.reached.add(t.config.name)
        publisher = TargetPublisher(self, t)
        await publisher.load_delivered()
        self.publishers[t.config.name] = publisher
        for worker in self.workers.values():
            if worker.last_candidate is not None and worker.last_candidate.covers(t.repo.hash):
                publisher.submit(worker.last_candidate)
        self.spawn(publisher.run(), f"publish-{t.config.name}")

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _attach_later(self, cfg: TargetConfig) -> None:
        backoff = RetryPolicy(initial=cfg.retry.initial, max=cfg.retry.max, give_up_after=None)
        attempt = 0
        while not self.stopping.is_set():
            await asyncio.sleep(backoff.delay(attempt))
            attempt += 1
            try:
                opened = await self.rep.attach(cfg)
            except ReplicatorError as exc:
                log.info("target.still_unavailable", target=cfg.name, error=str(exc), attempt=attempt)
                for s in self.config.sources:
                    self.tracker.failed(s.name, cfg.name, str(exc))
                if isinstance(exc, PermanentTargetError):
                    await self._pause(PERMANENT_ERROR_PAUSE)  # reported, not spun on
                continue
            log.info("target.attached", target=cfg.name)
            await self._start_publisher(opened)
            for worker in self.workers.values():
                worker.retry_round = True  # new ids may be needed for this target's hash
                worker.wake.set()
            return

    async def _monitor(self) -> None:
        """Every second: lag gauges and alerts; liveness heartbeat; state heartbeat every 10 s."""
        monitor = RpoMonitor(self.tracker, self.notifier, self.config.alerts.repeat)
        self.monitor = monitor
        beats = 0
        while True:
            monitor.evaluate()
            self.rep.ledger.flush()
            self.rep.budget.export(self.deferred_bytes())
            if self.http is not None:
                self.http.beat()
            if beats % 10 == 0 and self.rep.state is not None:
                self.rep.state.heartbeat()
            beats += 1
            if self.stopping.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 1.0)

    async def _watchdog(self, interval: float) -> None:
        while not self.stopping.is_set():
            systemd.notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    async def _drain(self, worker_tasks: list[asyncio.Task[None]]) -> None:
        """Let in-flight rounds and publications finish within the grace period: first the
        source workers (a round under way ends in a candidate), then the publishers, which
        publish what the workers handed them before they return."""
        deadline = time.monotonic() + self.config.shutdown_grace
        workers = [t for t in worker_tasks if not t.done()]
        if workers:
            await asyncio.wait(workers, timeout=max(0.0, deadline - time.monotonic()))
        self.sources_done.set()
        for publisher in self.publishers.values():
            publisher.wake.set()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        leftovers = [t for t in self._tasks if not t.done()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        if leftovers:
            log.warning("daemon.grace_expired", cancelled=sorted(t.get_name() for t in leftovers))


class DaemonCrashedError(ReplicatorError):
    """A background task failed unexpectedly; the daemon stopped so that it can be restarted."""


async def run_daemon(config: Config, config_path: Path | None = None) -> None:
    daemon = Daemon(config, config_path)
    await daemon.run()
    if daemon.crashed:
        raise DaemonCrashedError(
            "a background task crashed (see the log); exiting so the supervisor restarts us"
        )
