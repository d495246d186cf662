"""The replication engine shared by ``replicator sync`` (one pass) and ``replicator run`` (daemon).

:class:`Replicator` owns what a process keeps open: the state store, the sources, the
targets with their repositories and upload queues, and the chunk pipeline. Work happens in
two steps that the one-pass and the continuous drivers schedule differently:

1. :meth:`Replicator.build_candidate` turns a source's current files into a *candidate*
   snapshot: the consistency gate picks what may be published, unchanged files reuse their
   cached records, and changed files are read once with their chunks fanned out to every
   healthy target.
2. :meth:`Replicator.publish` puts a candidate on one target, independently of the others:
   it waits until the candidate's chunks are durable there — re-reading from the source any
   chunk the target missed while it was slow or down (*catch-up*) — then writes the manifest
   and the ref, and applies retention. A candidate whose files changed since it was built is
   *superseded*: a newer one is on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from replicator import gate, metrics
from replicator.budget import Budget, Clock, Ledger, TargetBudget, utc_now
from replicator.config import Config, Priority, SourceConfig, TargetConfig
from replicator.errors import (
    ConfigError,
    FileChangedError,
    PermanentTargetError,
    ReplicatorError,
    RepositoryError,
    SourceError,
    TargetError,
    TargetUnreachableError,
)
from replicator.fanout import FAILING_GRACE, FanOut, Uploader, UploadStats
from replicator.format.manifest import (
    Manifest,
    PackedAt,
    SetInfo,
    encode_manifest,
    format_time,
    manifest_json,
    now_utc,
)
from replicator.hashing import HashSpec
from replicator.log import get_logger
from replicator.progress import NoProgress, ProgressSink
from replicator.read.pipeline import ChunkPipeline, FileRecord
from replicator.reconcile import describe, reconcile, set_name
from replicator.repository import Repository, RepositoryNotFoundError, chunk_key, pack_key
from replicator.retention import apply as retention
from replicator.shared.publish import SharedCache, publish_shared
from replicator.shared.split import mine
from replicator.sources import Listing, Source, SourceFile, open_source
from replicator.state import StateStore
from replicator.targets import RetryingTarget, Target, TargetHealth, open_target, retry_policy, unwrap
from replicator.targets.wrappers import TokenBucket

log = get_logger(__name__)

REF_BYTES = 128
"""About what a ref object weighs (a JSON line): budgeted with its manifest."""
ATTACH_SETTLE = 2.0
"""See :meth:`Replicator.attach_all`."""
READ_ATTEMPTS = 3
"""How often a file that keeps changing is re-read before it is skipped for this pass."""
GC_ATTEMPTS = 3
"""How often a publish starts again because a garbage collection deleted chunks it needs."""
SMALL_BATCH_FILES = 64
SMALL_BATCH_BYTES = 8 << 20
"""Small files are read and encoded in batches of up to this many files / bytes."""


@dataclass
class TargetResult:
    target: str
    status: Literal[
        "published", "unchanged", "empty", "failed", "superseded", "deferred", "held",
        "contributed", "waiting",
    ]  # fmt: skip
    """``contributed``: this instance's parts of a shared source are written (another instance
    publishes); ``waiting``: what is complete is published, and some sets wait for parts."""
    snapshot: str | None = None
    error: str | None = None
    uploads: UploadStats = field(default_factory=UploadStats)
    carried: dict[str, str] = field(default_factory=dict)
    """Sets and files kept from the target's previous snapshot, and why (replicator.reconcile)."""
    damaged: dict[str, str] = field(default_factory=dict)
    """Checkpoint sets damaged on the primary, kept whole from the previous snapshot."""
    unreachable: bool = False
    """The failure is that the target could not be contacted at all."""
    permanent: bool = False
    """The failure needs a human (PermanentTargetError): retrying it changes nothing."""
    deleted_files: int = 0
    """Files of the target's previous snapshot this one no longer holds."""


CREATOR_POLL = 1.0
"""Seconds between looks for a repository another instance creates (one GET of config.json)."""

DONE = ("published", "unchanged", "empty", "contributed", "waiting")
"""Outcomes that are not failures (a set waiting for other instances' parts is incomplete,
like a set the gate holds back, not failed)."""


@dataclass
class SourceResult:
    source: str
    files: int = 0
    bytes_total: int = 0
    files_read: int = 0
    bytes_read: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    """Paths that could not be read or examined this pass, and why: the snapshot is
    incomplete (what an earlier snapshot holds of them is carried forward)."""
    ignored: dict[str, str] = field(default_factory=dict)
    """Entries not replicated by design (symbolic links, special files), and why."""
    vanished: list[str] = field(default_factory=list)
    """Files deleted between the scan and their read."""
    held_back: dict[str, str] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    seconds: float = 0.0
    scanned: bool = False
    """The source was scanned: False when no target could be opened (the counts say nothing)."""

    @property
    def ok(self) -> bool:
        return not self.skipped and all(t.status in DONE for t in self.targets)

    @property
    def exit_code(self) -> int:
        """0 done; 4 published but incomplete (files unreadable); 3 a target could not be
        reached; 1 anything else failed or was held (README, "Exit codes")."""
        failed = [t for t in self.targets if t.status not in DONE]
        if any(not t.unreachable for t in failed):
            return 1
        if failed:
            return 3
        return 4 if self.skipped else 0


@dataclass(frozen=True)
class Candidate:
    """A snapshot of one source, read and chunked, ready to be published on any target."""

    source: str
    kind: Literal["checkpoint", "dataset", "embedding"]
    records: tuple[FileRecord, ...]
    sets: tuple[SetInfo, ...]
    created: str
    recheck_at_ns: int | None = None
    """See :attr:`replicator.gate.Selection.recheck_at_ns`."""
    seq: int = 0
    """The daemon numbers each source's candidates (replicator.rpo)."""
    observed_at: float = 0.0
    """When the oldest change this candidate brings was observed (Unix time)."""
    present_sets: frozenset[str] = frozenset()
    """Checkpoint set directories on the primary, complete or not (replicator.reconcile)."""
    held_back: tuple[tuple[str, str], ...] = ()
    """Sets the gate held back, and why."""
    unknown: tuple[tuple[str, str], ...] = ()
    """Paths that could not be examined or read this time, and why: carried forward."""

    def covers(self, spec: HashSpec) -> bool:
        """Whether every record has chunk ids for ``spec`` (a target attached later may need more)."""
        return all(spec.key in r.chunks for r in self.records)

    def same_content(self, other: Candidate | None) -> bool:
        return other is not None and self._content() == other._content()

    def _content(self) -> tuple[object, ...]:
        return (self.records, self.sets, self.present_sets, self.unknown)

    def chunk_ids(self, spec: HashSpec) -> list[str]:
        return [c for r in self.records for c, _ in r.chunks[spec.key]]

    def manifest(self, spec: HashSpec, packed: dict[str, PackedAt] | None = None) -> Manifest:
        """The manifest for a repository with ``spec``; ``packed`` says where packed chunks are."""
        # Built from validated parts (records from a source scan, validated sets), so only the
        # whole-tree check runs again: re-validating 20,000 entries took ~30 ms.
        manifest = Manifest.model_construct(
            source=self.source,
            kind=self.kind,
            created=self.created,
            files=tuple(r.entry(spec) for r in self.records),
            sets=self.sets,
            packed=packed or {},
        )
        return manifest.check_tree()


@dataclass
class OpenTarget:
    config: TargetConfig
    target: Target
    repo: Repository
    uploader: Uploader
    budget: TargetBudget | None
    """What the budget lets this target spend (None: no budget)."""
    latest: dict[str, tuple[str, Manifest]] = field(default_factory=dict)
    """Per source, the latest snapshot this process wrote or read (replicator.reconcile)."""
    summaries: retention.SummaryCache = field(default_factory=dict)
    """What each snapshot holds, for retention (manifests are immutable)."""
    shared: dict[str, SharedCache] = field(default_factory=dict)
    """Per shared source, what this process knows of its parts here (replicator.shared)."""


def content_key(manifest: Manifest) -> str:
    """Digest of what a snapshot holds, ignoring when it was taken: equal keys = no-op."""
    body = (
        manifest_json(manifest, include={"kind", "files"})
        + json.dumps([s.name for s in manifest.sets]).encode()
    )
    return HashSpec("blake3").digest(body).hex()


class Replicator:
    """Targets, repositories, upload queues, sources, pipeline and state for one process.

    ``interactive``: a one-shot command, whose requests give up after
    ``retry.command_give_up_after`` and whose targets count as failed after that long; else
    the daemon, whose targets turn unhealthy after FAILING_GRACE of failures and are probed
    and caught up by their publishers."""

    def __init__(
        self,
        config: Config,
        *,
        targets: Sequence[str] | None = None,
        interactive: bool = True,
        clock: Clock = utc_now,
    ) -> None:
        self.config = config
        self.clock = clock
        self.target_configs = [config.target(n) for n in targets] if targets else list(config.targets)
        self.interactive = interactive
        self.open_targets: list[OpenTarget] = []
        self.target_errors: dict[str, ReplicatorError] = {}
        self.opening: dict[str, asyncio.Task[OpenTarget | None]] = {}
        """Targets still being opened by :meth:`attach_all` after it returned."""
        self.state: StateStore | None = None
        self.pipeline: ChunkPipeline | None = None
        self.recovered_from_crash = False
        self.ledger: Ledger
        self.budget: Budget
        self._sources: dict[str, Source] = {}
        self._stack = contextlib.AsyncExitStack()
        self._fresh_reads = 0
        self._fresh_idle = asyncio.Event()
        self._fresh_idle.set()
        self._catch_up_bandwidth = (
            TokenBucket(config.catch_up_bandwidth) if config.catch_up_bandwidth else None
        )

    async def __aenter__(self) -> Replicator:
        """Open the state store and the pipeline; targets are opened by :meth:`attach_all`
        (one-shot commands) or one by one (the daemon), so that none waits for another."""
        try:
            self.state = StateStore.open(self.config.state_dir)
            self._stack.callback(self.state.close)
            self.recovered_from_crash = not self.state.begin_run()
            self.ledger = Ledger(self.state, [t.name for t in self.config.targets], self.clock)
            self._stack.callback(self.ledger.flush)
            self.budget = Budget(self.config, self.ledger, self.clock)
            if self.recovered_from_crash:
                log.warning("state.unclean_shutdown", hint="re-listing targets before trusting the cache")
            self.pipeline = ChunkPipeline(
                self.config.chunking, self.config.compression, memory_budget=self.config.memory_budget
            )
            self._stack.callback(self.pipeline.close)
            self._stack.push_async_callback(self._stop_opening)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def attach_all(self) -> None:
        """Open every selected target at once (one-shot commands). Returns when all are open or
        have failed (``target_errors``), or ATTACH_SETTLE seconds after the first one opened:
        a target still trying then goes on in :attr:`opening`, so a dead one never delays the
        others (issue 18: ``sync`` published a healthy target only after ~300 s)."""
        tasks = [
            asyncio.create_task(self._attach_or_record(cfg), name=f"attach-{cfg.name}")
            for cfg in self.target_configs
        ]
        pending: set[asyncio.Task[OpenTarget | None]] = set(tasks)
        first_open: float | None = None
        while pending:
            timeout = None if first_open is None else max(0.0, first_open + ATTACH_SETTLE - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            for task in done:
                if task.exception() is not None:  # a ConfigError (a missing AWS profile) or a bug
                    for other in pending:
                        other.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                task.result()  # raised here, not later
            if first_open is None and any(task.result() is not None for task in done):
                first_open = time.monotonic()
        for cfg, task in zip(self.target_configs, tasks, strict=True):
            if not task.done():
                log.info("target.still_opening", target=cfg.name)
                self.opening[cfg.name] = task

    async def _attach_or_record(self, cfg: TargetConfig) -> OpenTarget | None:
        try:
            return await self.attach(cfg)
        except ConfigError:
            raise  # the config needs fixing (a missing AWS profile): the command stops, exit 2
        except ReplicatorError as exc:
            self.target_errors[cfg.name] = exc
            log.error("target.unavailable", target=cfg.name, error=str(exc))
            return None

    async def _stop_opening(self) -> None:
        for task in self.opening.values():
            task.cancel()
        await asyncio.gather(*self.opening.values(), return_exceptions=True)

    async def attach(self, cfg: TargetConfig, health: TargetHealth | None = None) -> OpenTarget:
        """Open a target, its repository and its upload queue (again, for one that failed to
        open before). Raises ReplicatorError if the target cannot be used now, after at most
        ``retry.command_give_up_after`` per request. ``health``: see :func:`open_target`.

        Once open, a daemon's target retries each request for ``retry.give_up_after``."""
        assert self.state is not None and self.pipeline is not None
        target = await open_target(cfg, on_request=self.budget.record, health=health)
        try:
            repo = await self._open_repository(target, cfg)
            if repo.config.chunking != self.config.chunking:
                log.warning(
                    "target.chunking_differs",
                    target=cfg.name,
                    hint="dedup against data written with other chunk sizes will be lower",
                )
            budget = self.budget.for_target(cfg.name) if self.budget.active else None
            uploader = Uploader(
                cfg.name,
                repo,
                self.state,
                cfg.concurrency,
                budget=budget,
                failing_grace=cfg.retry.command_give_up_after if self.interactive else FAILING_GRACE,
                confirm_window=cfg.confirm_window,
            )
            await uploader.start(relist=self.recovered_from_crash)
        except BaseException:
            await target.close()
            raise
        retrying = unwrap(target, RetryingTarget)
        if retrying is not None and not self.interactive:
            retrying.policy = retry_policy(cfg, interactive=False)
        self._stack.push_async_callback(target.close)
        self._stack.push_async_callback(uploader.close)
        opened = OpenTarget(cfg, target, repo, uploader, budget)
        self.pipeline.add_spec(repo.hash)
        self.open_targets.append(opened)
        self.target_errors.pop(cfg.name, None)
        return opened

    async def _open_repository(self, target: Target, cfg: TargetConfig) -> Repository:
        """Open the target's repository, or create it unless another instance does (then a
        one-shot command waits for it up to ``retry.command_give_up_after``; the daemon's
        attach loop retries on its own)."""
        creator = self._creator()
        give_up = time.monotonic() + (cfg.retry.command_give_up_after if self.interactive else 0.0)
        while True:
            try:
                return await Repository.open_or_create(
                    target,
                    algorithm=cfg.hash,
                    chunking=self.config.chunking,
                    compression=self.config.compression,
                    creator=creator,
                )
            except RepositoryNotFoundError:
                if time.monotonic() >= give_up:
                    raise
                await asyncio.sleep(CREATOR_POLL)

    def _creator(self) -> str | None:
        """Who creates a repository this process does not find: None (this process), or the
        assembler of a shared source this process is another instance of. Only one instance
        of a set creates it: the others would race it with their own hash seeds."""
        for source in self.config.sources:
            shared = source.shared
            if shared is not None and not shared.is_assembler:
                return f"{shared.assembler_name}, the assembler of source {source.name},"
        return None

    async def __aexit__(self, *exc: object) -> None:
        for source in self._sources.values():
            await source.close()
        if self.state is not None:
            self.state.end_run()
        await self._stack.aclose()

    def source(self, cfg: SourceConfig) -> Source:
        if cfg.name not in self._sources:
            self._sources[cfg.name] = open_source(cfg)
        return self._sources[cfg.name]

    async def scan(self, cfg: SourceConfig) -> Listing:
        """The source's files (:meth:`Source.scan`), starting the pipeline's helper processes
        during the scan if it finds enough new small files (:meth:`ChunkPipeline.helper_starter`)."""
        assert self.state is not None and self.pipeline is not None
        state, source = self.state, self.source(cfg)
        return await source.scan(self.pipeline.helper_starter(source, lambda: state.files.count(cfg.name)))

    # -- step 1: candidates -----------------------------------------------------------------

    async def build_candidate(
        self,
        cfg: SourceConfig,
        files: list[SourceFile],
        result: SourceResult,
        progress: ProgressSink | None = None,
        *,
        unreadable: Mapping[str, str] | None = None,
        prestage: bool = False,
    ) -> Candidate:
        """Gate, then read what changed (fanned out to every healthy target); never raises for
        one bad file: it is skipped (and its checkpoint set held back) and named in ``result``.
        ``unreadable``: what the scan could not examine (Listing.unreadable).

        With ``prestage``, quiet files of incomplete checkpoint sets are read and uploaded too,
        but left out of the candidate (see :mod:`replicator.gate`)."""
        progress = progress or NoProgress()
        unreadable = unreadable or {}
        result.skipped.update(unreadable)
        selection = gate.select(cfg, files, time.time_ns(), unreadable)
        if cfg.shared is not None and cfg.shared.split:  # every instance gates all, reads its share
            selection.files = [f for f in selection.files if mine(cfg.shared, f.path)]
            selection.prestage = [f for f in selection.prestage if mine(cfg.shared, f.path)]
        result.held_back = selection.held_back
        healthy = [t for t in self.open_targets if t.uploader.healthy]
        records, to_read = self._plan(cfg.name, selection.files, healthy)
        progress.begin(f"{cfg.name}: reading", sum(f.size for f in to_read))
        self._fresh_reads += 1
        self._fresh_idle.clear()
        try:
            priority = cfg.effective_priority
            records += await self._read_all(self.source(cfg), to_read, healthy, priority, result, progress)
            if prestage and selection.prestage:
                early = self._plan(cfg.name, selection.prestage, healthy)[1]
                if early:
                    staged = await self._read_all(
                        self.source(cfg), early, healthy, priority, SourceResult(cfg.name), progress
                    )
                    log.info("source.prestaged", source=cfg.name, files=len(staged))
        finally:
            progress.end()
            self._fresh_reads -= 1
            if not self._fresh_reads:
                self._fresh_idle.set()
        records.sort(key=lambda r: r.path)
        records, sets = _drop_incomplete_sets(records, selection.sets, result, result.held_back)
        result.files = len(records)
        result.bytes_total = sum(r.size for r in records)
        result.sets = [s.name for s in sets]
        return Candidate(
            cfg.name,
            cfg.kind,
            tuple(records),
            tuple(sets),
            format_time(now_utc()),
            selection.recheck_at_ns,
            present_sets=frozenset(selection.present),
            held_back=tuple(sorted(result.held_back.items())),
            unknown=tuple(sorted(result.skipped.items())),
        )

    def _plan(
        self, source: str, files: list[SourceFile], healthy: list[OpenTarget]
    ) -> tuple[list[FileRecord], list[SourceFile]]:
        """Split files into cached records every healthy target can use, and files to read."""
        assert self.state is not None and self.pipeline is not None
        known = self.state.files.get(source, [(f.path, f.signature) for f in files])
        specs = self.pipeline.specs
        usable = {p: r for p, r in known.items() if r.covers(specs)}
        for t in healthy:  # one lookup for all their chunks, not one per chunk
            t.uploader.prefetch([c for r in usable.values() for c, _ in r.chunks[t.repo.hash.key]])
        return split_cached(
            files,
            usable,
            lambda rec: all(t.uploader.has_all(c for c, _ in rec.chunks[t.repo.hash.key]) for t in healthy),
        )

    async def _read_all(
        self,
        source: Source,
        files: list[SourceFile],
        targets: list[OpenTarget],
        priority: Priority,
        result: SourceResult,
        progress: ProgressSink,
    ) -> list[FileRecord]:
        assert self.pipeline is not None
        pipeline = self.pipeline
        records: list[FileRecord] = []
        small = [f for f in files if pipeline.is_small(f)]
        readers = pipeline.expect_small_files(source, len(small))
        queue: list[SourceFile | list[SourceFile]] = [f for f in files if not pipeline.is_small(f)]
        queue += _batches(small)
        queue.reverse()

        fanout = FanOut([t.uploader for t in targets], priority, progress=progress)
        files_read = metrics.READ_FILES.labels(source.name)  # looked up once, not per file
        bytes_read = metrics.READ_BYTES.labels(source.name)

        def done(rec: FileRecord) -> None:
            assert self.state is not None
            self.state.files.put(source.name, rec)
            records.append(rec)
            result.files_read += 1
            result.bytes_read += rec.size
            files_read.inc()
            bytes_read.inc(rec.size)

        async def worker() -> None:
            while queue:
                work = queue.pop()
                if isinstance(work, SourceFile):
                    rec = await self._read_one(source, work, fanout, result)
                    if rec is not None:
                        done(rec)
                    continue
                for f, got in zip(work, await pipeline.read_small_files(source, work, fanout), strict=True):
                    if isinstance(got, FileRecord):
                        done(got)
                    elif isinstance(got, FileChangedError):  # retried alone, like any changing file
                        again = await self._read_one(source, f, fanout, result)
                        if again is not None:
                            done(again)
                    else:
                        self._unreadable(source, f, got, result)

        await asyncio.gather(*(worker() for _ in range(readers)))
        return records

    async def _read_one(
        self, source: Source, f: SourceFile, fanout: FanOut, result: SourceResult
    ) -> FileRecord | None:
        assert self.pipeline is not None and self.state is not None
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                rec = await self.pipeline.read_file(source, f, fanout)
            except FileChangedError as exc:
                metrics.SOURCE_ERRORS.labels(source.name, "changed_while_read").inc()
                log.info("source.changed_while_read", source=source.name, path=f.path, attempt=attempt)
                if attempt == READ_ATTEMPTS:
                    result.skipped[f.path] = f"kept changing while read ({exc.message})"
                    return None
                try:
                    refreshed = await source.stat(f.path)
                except SourceError as err:
                    self._unreadable(source, f, err, result)
                    return None
                if refreshed is None:
                    # Deleted: not part of this snapshot (a checkpoint set that lost it is
                    # incomplete for this pass: see _drop_incomplete_sets).
                    result.vanished.append(f.path)
                    return None
                f = refreshed
                continue
            except SourceError as exc:
                self._unreadable(source, f, exc, result)
                return None
            return rec
        return None

    @staticmethod
    def _unreadable(source: Source, f: SourceFile, exc: SourceError, result: SourceResult) -> None:
        metrics.SOURCE_ERRORS.labels(source.name, "unreadable").inc()
        result.skipped[f.path] = exc.message
        log.warning("source.unreadable", source=source.name, path=f.path, error=exc.message)

    # -- step 2: publishing -----------------------------------------------------------------

    async def publish(
        self, t: OpenTarget, cfg: SourceConfig, candidate: Candidate, *, allow_deletes: bool = False
    ) -> TargetResult:
        """Make ``candidate`` the latest snapshot of its source on ``t`` (see module docstring),
        in three steps: its chunks durable there (:meth:`_chunks_durable`), its manifest
        reconciled with the target's latest snapshot (:meth:`_reconciled`: sets and files the
        primary damaged or could not show are carried forward; a publish that would drop more
        than ``max_delete`` of it is *held* unless ``allow_deletes``), then written
        (:meth:`_write`)."""
        name = t.config.name
        if not candidate.covers(t.repo.hash):
            return TargetResult(name, "superseded", error="built before this target was attached")
        priority = cfg.effective_priority
        if t.budget is not None and not t.budget.allows(priority):
            return self._deferred(t, cfg)
        try:
            for _ in range(GC_ATTEMPTS):
                stored = await self._chunks_durable(t, cfg, candidate)
                if isinstance(stored, TargetResult):
                    return stored
                if cfg.shared is not None:
                    result = await publish_shared(self, t, cfg, candidate, stored, allow_deletes)
                else:
                    packed = {c: at for c, at in stored.items() if at is not None}
                    result = await self.publish_manifest(
                        t, cfg, candidate.manifest(t.repo.hash, packed),
                        present=candidate.present_sets, held_back=dict(candidate.held_back),
                        unknown=dict(candidate.unknown), allow_deletes=allow_deletes, own=object_keys(stored),
                    )  # fmt: skip
                if result is not None:
                    return result
                log.info("snapshot.gc_collected_chunks", source=cfg.name, target=name)
            raise TargetError(
                f"garbage collection deleted chunks this snapshot needs {GC_ATTEMPTS} times in a row",
                target=name,
                hint="it is published on the next attempt",
                retryable=True,
            )
        except TargetError as exc:
            log.error("snapshot.failed", source=cfg.name, target=name, error=str(exc))
            return TargetResult(
                name,
                "failed",
                error=str(exc),
                unreachable=isinstance(exc, TargetUnreachableError),
                permanent=isinstance(exc, PermanentTargetError),
            )

    @staticmethod
    def _deferred(t: OpenTarget, cfg: SourceConfig) -> TargetResult:
        priority = cfg.effective_priority
        log.info("snapshot.deferred", source=cfg.name, target=t.config.name, priority=priority)
        return TargetResult(t.config.name, "deferred", error=f"budget: {priority} work is deferred")

    async def _chunks_durable(
        self, t: OpenTarget, cfg: SourceConfig, candidate: Candidate
    ) -> dict[str, PackedAt | None] | TargetResult:
        """Wait until every chunk of ``candidate`` is durable on ``t`` (confirming what the
        state claims, catching up what is missing); where each is (a pack location, or None:
        loose). Or why not: superseded (a file changed since it was read) or deferred (the
        budget ran out part way). Raises TargetError if the target fails."""
        ids = list(dict.fromkeys(candidate.chunk_ids(t.repo.hash)))
        deferred_before = t.uploader.stats.chunks_deferred
        await t.uploader.settle(ids)
        await t.uploader.presence.confirm(ids)  # never name a chunk the target lost behind our back
        stored = t.uploader.stored(ids)
        if len(stored) == len(ids):
            return stored
        if t.uploader.error is not None:
            # Failing: report it. The daemon's publisher catches up once a probe says the
            # target answers again (re-reading now would only fail again).
            raise t.uploader.error
        changed = await self._catch_up(t, cfg, candidate)
        if changed is not None:
            return TargetResult(t.config.name, "superseded", error=f"{changed} changed since it was read")
        await t.uploader.settle(ids)
        stored = t.uploader.stored(ids)
        still = [c for c in ids if c not in stored]
        if not still:
            return stored
        if t.uploader.error is None and t.uploader.stats.chunks_deferred > deferred_before:
            return self._deferred(t, cfg)  # the budget ran out part way: the rest waits
        raise t.uploader.error or TargetError(
            f"{len(still)} chunks could not be uploaded", target=t.config.name
        )

    async def publish_manifest(
        self,
        t: OpenTarget,
        cfg: SourceConfig,
        manifest: Manifest,
        *,
        present: Collection[str],
        held_back: dict[str, str],
        unknown: dict[str, str],
        allow_deletes: bool,
        own: Sequence[str] = (),
    ) -> TargetResult | None:
        """Reconcile ``manifest`` (chunks durable) with the target's latest snapshot and write
        it, unless unchanged, empty or held. None: the collector deleted some of ``own`` (the
        objects this process uploaded for it) before the window; they must be sent again."""
        outcome, merged, latest_id = await self._reconciled(
            t, cfg, manifest, present, held_back, unknown, allow_deletes
        )
        if merged is None or self._unchanged(t, cfg, merged, latest_id, outcome):
            return outcome
        # The writer's rule of the garbage-collection protocol (docs/FORMAT.md 10.3): no
        # collector deletes while the manifest is written, and chunks a collector deleted
        # before are sent again first. (What the reconciled manifest carries forward, the
        # latest manifest references: a collector keeps it.)
        await t.repo.check_unchanged()
        async with t.uploader.window() as window:
            if window.lost(own):
                return None
            window.check()
            return await self._write(t, cfg, merged, outcome)

    async def _reconciled(
        self,
        t: OpenTarget,
        cfg: SourceConfig,
        manifest: Manifest,
        present: Collection[str],
        held_back: dict[str, str],
        unknown: dict[str, str],
        allow_deletes: bool,
    ) -> tuple[TargetResult, Manifest | None, str | None]:
        """The manifest to publish (replicator.reconcile), the outcome so far, and the id of the
        target's latest snapshot; no manifest when there is nothing to publish (empty) or the
        deletion guard holds it."""
        name = t.config.name
        latest_id, previous = await self._latest_manifest(t, cfg.name)
        merged = reconcile(
            manifest, previous, present_sets=frozenset(present), held_back=held_back, unknown=unknown
        )
        outcome = TargetResult(name, "published", carried=merged.carried, damaged=merged.damaged)
        if merged.damaged:
            log.warning(
                "set.damaged_on_primary",
                source=cfg.name,
                target=name,
                sets=describe(merged.damaged.items()),
                hint="the last complete version stays published until the set directory is removed",
            )
        if not merged.manifest.files:
            # Never publish "nothing": a wiped primary, or one between deleting its old
            # checkpoint and completing the next, must not become a target's latest snapshot.
            return TargetResult(name, "empty", error="no complete files to publish"), None, latest_id
        if merged.deletion_share > cfg.max_delete and not allow_deletes:
            outcome.status = "held"
            outcome.error = (
                f"would delete {merged.deletion_summary()} of the latest snapshot, more than "
                f"max_delete {cfg.max_delete:.0%}"
            )
            log.error("snapshot.deletion_held", source=cfg.name, target=name, error=outcome.error)
            return outcome, None, latest_id
        outcome.deleted_files = merged.removed_files
        return outcome, merged.manifest, latest_id

    def _unchanged(
        self,
        t: OpenTarget,
        cfg: SourceConfig,
        manifest: Manifest,
        latest_id: str | None,
        outcome: TargetResult,
    ) -> bool:
        """Whether the target already holds this content as its latest snapshot (then
        ``outcome`` says so, and nothing is written)."""
        assert self.state is not None
        known = self.state.published.get(t.repo.config.id, cfg.name)
        if known is not None and known.content == content_key(manifest) and latest_id == known.snapshot:
            log.info("snapshot.unchanged", source=cfg.name, target=t.config.name, snapshot=known.snapshot)
            outcome.status, outcome.snapshot = "unchanged", known.snapshot
            return True
        return False

    async def _write(
        self, t: OpenTarget, cfg: SourceConfig, manifest: Manifest, outcome: TargetResult
    ) -> TargetResult:
        """Write the manifest and the ref, then apply retention."""
        assert self.state is not None
        key = content_key(manifest)
        stored = encode_manifest(manifest)
        reservation = None
        if t.budget is not None:  # the manifest and the ref: two PUTs
            reservation = t.budget.reserve(cfg.effective_priority, len(stored) + REF_BYTES, puts=2)
            if reservation is None:
                return self._deferred(t, cfg)
        try:
            snapshot_id = await t.repo.publish(manifest, stored)
        finally:
            if reservation is not None:
                reservation.release()
        t.latest[cfg.name] = (snapshot_id, manifest)
        self.state.published.set(t.repo.config.id, cfg.name, snapshot_id, key)
        log.info(
            "snapshot.published",
            source=cfg.name,
            target=t.config.name,
            snapshot=snapshot_id,
            files=len(manifest.files),
            carried=len(outcome.carried),
            deleted_files=outcome.deleted_files,
        )
        policy = cfg.retention_for(t.config.name)
        if not policy.is_empty:
            await retention.apply(t.repo, cfg, policy, snapshot_id, t.summaries)
        outcome.snapshot = snapshot_id
        return outcome

    async def _latest_manifest(self, t: OpenTarget, source: str) -> tuple[str | None, Manifest | None]:
        """The id and manifest of the source's latest snapshot on ``t`` (cached: manifests are
        immutable, so only the ref is read again). A manifest that cannot be parsed is logged
        and treated as absent: refusing to publish would leave the target stuck on it."""
        latest_id = await t.repo.latest(source)
        if latest_id is None:
            return None, None
        cached = t.latest.get(source)
        if cached is not None and cached[0] == latest_id:
            return cached
        try:
            manifest = await t.repo.load_manifest(source, latest_id)
        except TargetError:
            raise
        except RepositoryError as exc:
            log.error("snapshot.previous_unreadable", source=source, target=t.config.name, error=str(exc))
            return latest_id, None
        t.latest[source] = (latest_id, manifest)
        return latest_id, manifest

    async def _catch_up(self, t: OpenTarget, cfg: SourceConfig, candidate: Candidate) -> str | None:
        """Re-read from the source the files whose chunks ``t`` lacks, offering them to ``t``
        only. Returns the path of a file that changed meanwhile (candidate superseded).

        Catch-up never delays fresh work: each file waits until no candidate is being read,
        and its reads are paced at ``catch_up_bandwidth``, so a target returning from an
        outage does not slow down the targets that are current (issue 18). The pause sits
        between files and in the time-bounded pacing only, never while holding chunk memory
        that a fresh read might wait for."""
        assert self.pipeline is not None
        spec = t.repo.hash
        source = self.source(cfg)
        bucket = self._catch_up_bandwidth
        fanout = FanOut(
            [t.uploader], cfg.effective_priority, pace=bucket.take if bucket is not None else None
        )

        for rec in candidate.records:
            if not t.uploader.missing(c for c, _ in rec.chunks[spec.key]):
                continue
            await self._fresh_idle.wait()
            current = SourceFile(rec.path, rec.size, rec.mtime_ns, rec.mode, rec.signature)
            try:
                again = await self.pipeline.read_file(source, current, fanout)
            except (FileChangedError, SourceError):
                return rec.path
            metrics.READ_FILES.labels(source.name).inc()  # every read of the primary counts
            metrics.READ_BYTES.labels(source.name).inc(again.size)
            if again.digests[spec.key] != rec.digests[spec.key]:
                return rec.path
            if t.uploader.error is not None:
                raise t.uploader.error
        return None

    def stats_snapshot(self) -> dict[str, UploadStats]:
        return {t.config.name: dataclasses.replace(t.uploader.stats) for t in self.open_targets}


def object_keys(stored: Mapping[str, PackedAt | None]) -> list[str]:
    """The chunk and pack objects a manifest naming these chunks references."""
    return list({chunk_key(c) if at is None else pack_key(at[0]) for c, at in stored.items()})


def stats_diff(after: UploadStats, before: UploadStats) -> UploadStats:
    return UploadStats(
        **{f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(UploadStats)}
    )


def split_cached(
    files: list[SourceFile], known: Mapping[str, FileRecord], held: Callable[[FileRecord], bool]
) -> tuple[list[FileRecord], list[SourceFile]]:
    """The planning step ``sync`` and ``plan`` share: files whose record from the file cache
    (``known``: same path and signature) every target ``held`` all the chunks of are not read
    again; the rest are read."""
    cached: list[FileRecord] = []
    to_read: list[SourceFile] = []
    for f in files:
        rec = known.get(f.path)
        if rec is not None and held(rec):
            cached.append(rec)
        else:
            to_read.append(f)
    return cached, to_read


def _batches(files: list[SourceFile]) -> list[list[SourceFile]]:
    """Group small files, in order, into batches of SMALL_BATCH_FILES / SMALL_BATCH_BYTES."""
    out: list[list[SourceFile]] = []
    size = 0
    for f in files:
        if not out or len(out[-1]) == SMALL_BATCH_FILES or size + f.size > SMALL_BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(f)
        size += f.size
    return out


def _drop_incomplete_sets(
    records: list[FileRecord], sets: list[SetInfo], result: SourceResult, held_back: dict[str, str]
) -> tuple[list[FileRecord], list[SetInfo]]:
    """A checkpoint set with an unreadable, ever-changing or vanished file is incomplete for
    this pass (and held back, with the reason)."""
    names = {s.name for s in sets}
    bad: dict[str, str] = {}
    problems = [*result.skipped.items(), *((p, "vanished while it was read") for p in result.vanished)]
    for path, why in problems:
        name = set_name(path)
        if name in names:
            bad.setdefault(name, f"cannot read {path}: {why}")
    if not bad:
        return records, sets
    held_back.update(bad)
    return [r for r in records if set_name(r.path) not in bad], [s for s in sets if s.name not in bad]
