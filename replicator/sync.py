"""One replication pass: every selected source to every selected target.

:class:`Replicator` owns what a process keeps open — the state store, the targets with their
repositories and upload queues, the chunk pipeline. ``replicator sync`` uses it for one
pass; the daemon keeps one alive and calls :meth:`Replicator.sync_source` on changes.

A pass over a source: scan; pass the files through the consistency gate; reuse the cached
record of every unchanged file whose chunks each target already has; read the others once,
fanning their chunks out to all targets; then, per target and independently, wait until the
snapshot's chunks are durable and publish the manifest and the ref. A failing target is
reported and skipped; the others finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog

from replicator import gate
from replicator.config import Config, SourceConfig, TargetConfig
from replicator.errors import FileChangedError, ReplicatorError, SourceError, TargetError
from replicator.fanout import Uploader, UploadStats
from replicator.hashing import HashSpec
from replicator.manifest import Manifest, SetInfo, format_time, now_utc
from replicator.pipeline import ChunkPipeline, EncodedChunk, FileRecord
from replicator.progress import NoProgress, ProgressSink
from replicator.repository import Repository
from replicator.sources import Source, SourceFile, open_source
from replicator.state import StateStore
from replicator.targets import Target, open_target

log = structlog.get_logger(__name__)

READ_ATTEMPTS = 3
"""How often a file that keeps changing is re-read before it is skipped for this pass."""


@dataclass
class TargetResult:
    target: str
    status: Literal["published", "unchanged", "failed"]
    snapshot: str | None = None
    error: str | None = None
    uploads: UploadStats = field(default_factory=UploadStats)


@dataclass
class SourceResult:
    source: str
    files: int = 0
    bytes_total: int = 0
    files_read: int = 0
    bytes_read: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    held_back: dict[str, str] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.skipped and all(t.status != "failed" for t in self.targets)


@dataclass
class OpenTarget:
    config: TargetConfig
    target: Target
    repo: Repository
    uploader: Uploader


def content_key(manifest: Manifest) -> str:
    """Digest of what a snapshot holds, ignoring when it was taken: equal keys = no-op."""
    body = json.dumps(
        [manifest.kind, [f.model_dump(mode="json") for f in manifest.files], [s.name for s in manifest.sets]],
        separators=(",", ":"),
    )
    return HashSpec("blake3").digest(body.encode()).hex()


class Replicator:
    """Targets, repositories, upload queues, pipeline and state for one process."""

    def __init__(
        self, config: Config, *, targets: Sequence[str] | None = None, retry_forever: bool = False
    ) -> None:
        self.config = config
        self.target_configs = [config.target(n) for n in targets] if targets else list(config.targets)
        self.retry_forever = retry_forever
        self.open_targets: list[OpenTarget] = []
        self.target_errors: dict[str, ReplicatorError] = {}
        self.state: StateStore | None = None
        self.pipeline: ChunkPipeline | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Replicator:
        self.state = StateStore.open(self.config.state_dir)
        self._stack.callback(self.state.close)
        results = await asyncio.gather(*(self._open(t) for t in self.target_configs), return_exceptions=True)
        for cfg, res in zip(self.target_configs, results, strict=True):
            if isinstance(res, ReplicatorError):
                self.target_errors[cfg.name] = res
                log.error("target.unavailable", target=cfg.name, error=str(res))
            elif isinstance(res, BaseException):
                raise res
        if self.open_targets:
            self.pipeline = ChunkPipeline(
                self.config.chunking,
                self.config.compression,
                [t.repo.hash for t in self.open_targets],
                memory_budget=self.config.memory_budget,
            )
            self._stack.callback(self.pipeline.close)
        return self

    async def _open(self, cfg: TargetConfig) -> None:
        assert self.state is not None
        target = await open_target(cfg, retry_forever=self.retry_forever)
        try:
            repo = await Repository.open_or_create(
                target, algorithm=cfg.hash, chunking=self.config.chunking, compression=self.config.compression
            )
            if repo.config.chunking != self.config.chunking:
                log.warning(
                    "target.chunking_differs",
                    target=cfg.name,
                    hint="dedup against data written with other chunk sizes will be lower",
                )
            uploader = Uploader(cfg.name, repo, self.state, cfg.concurrency)
            await uploader.start()
        except BaseException:
            await target.close()
            raise
        self._stack.push_async_callback(target.close)
        self._stack.push_async_callback(uploader.close)
        self.open_targets.append(OpenTarget(cfg, target, repo, uploader))

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    # -- one pass over one source -----------------------------------------------------------

    async def sync_source(self, cfg: SourceConfig, progress: ProgressSink | None = None) -> SourceResult:
        assert self.state is not None
        progress = progress or NoProgress()
        started = time.monotonic()
        result = SourceResult(cfg.name)
        before = {t.config.name: dataclasses.replace(t.uploader.stats) for t in self.open_targets}
        live = [t for t in self.open_targets if t.uploader.failed is None]
        source = open_source(cfg)
        try:
            files = await source.scan()
            selection = gate.select(cfg, files, time.time_ns())
            result.held_back = selection.held_back
            skipped_by_scan = getattr(source, "skipped", [])
            records, to_read = self._plan(cfg.name, selection.files, live)
            progress.begin(f"{cfg.name}: reading", sum(f.size for f in to_read))
            read = await self._read_all(source, to_read, live, result, progress)
            progress.end()
        finally:
            await source.close()
        records.extend(read)
        records.sort(key=lambda r: r.path)
        self.state.forget_files_except(cfg.name, {f.path for f in files})
        self.state.commit()
        records, sets = _drop_incomplete_sets(records, selection.sets, result.skipped)
        result.files = len(records)
        result.bytes_total = sum(r.size for r in records)
        result.sets = [s.name for s in sets]
        if skipped_by_scan:
            log.warning("source.skipped_paths", source=cfg.name, count=len(skipped_by_scan))

        outcomes = await asyncio.gather(*(self._publish(t, cfg, records, sets) for t in self.open_targets))
        for t, outcome in zip(self.open_targets, outcomes, strict=True):
            outcome.uploads = _diff(t.uploader.stats, before[t.config.name])
            result.targets.append(outcome)
        for name, err in self.target_errors.items():
            result.targets.append(TargetResult(name, "failed", error=str(err)))
        result.seconds = time.monotonic() - started
        return result

    def _plan(
        self, source: str, files: list[SourceFile], live: list[OpenTarget]
    ) -> tuple[list[FileRecord], list[SourceFile]]:
        """Split files into cached records every live target can use, and files to read."""
        assert self.state is not None
        specs = [t.repo.hash for t in live]
        cached: list[FileRecord] = []
        to_read: list[SourceFile] = []
        for f in files:
            rec = self.state.get_file(source, f.path, f.signature)
            if (
                rec is not None
                and rec.covers(specs)
                and all(t.uploader.has_all(c for c, _ in rec.chunks[t.repo.hash.key]) for t in live)
            ):
                cached.append(rec)
            else:
                to_read.append(f)
        return cached, to_read

    async def _read_all(
        self,
        source: Source,
        files: list[SourceFile],
        live: list[OpenTarget],
        result: SourceResult,
        progress: ProgressSink,
    ) -> list[FileRecord]:
        assert self.pipeline is not None or not files
        records: list[FileRecord] = []
        queue: asyncio.Queue[SourceFile] = asyncio.Queue()
        for f in files:
            queue.put_nowait(f)

        async def sink(chunk: EncodedChunk) -> None:
            progress.advance(chunk.size)
            for t in live:
                await t.uploader.offer(chunk)

        async def worker() -> None:
            assert self.pipeline is not None and self.state is not None
            while not queue.empty():
                f = queue.get_nowait()
                for attempt in range(1, READ_ATTEMPTS + 1):
                    try:
                        rec = await self.pipeline.read_file(source, f, sink)
                    except FileChangedError as exc:
                        log.info(
                            "source.changed_while_read", source=source.name, path=f.path, attempt=attempt
                        )
                        if attempt == READ_ATTEMPTS:
                            result.skipped[f.path] = f"kept changing while read ({exc.message})"
                            break
                        refreshed = await source.stat(f.path)
                        if refreshed is None:
                            break  # deleted: simply not part of this snapshot
                        f = refreshed
                        continue
                    except SourceError as exc:
                        result.skipped[f.path] = exc.message
                        log.warning("source.unreadable", source=source.name, path=f.path, error=exc.message)
                        break
                    self.state.put_file(source.name, rec)
                    records.append(rec)
                    result.files_read += 1
                    result.bytes_read += rec.size
                    break

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        return records

    async def _publish(
        self, t: OpenTarget, cfg: SourceConfig, records: list[FileRecord], sets: list[SetInfo]
    ) -> TargetResult:
        assert self.state is not None
        name = t.config.name
        try:
            if t.uploader.failed is not None:
                raise t.uploader.failed
            spec = t.repo.hash
            entries = [r.entry(spec) for r in records if spec.key in r.chunks]
            manifest = Manifest(
                source=cfg.name,
                kind=cfg.kind,
                created=format_time(now_utc()),
                files=tuple(entries),
                sets=tuple(sets),
            )
            await t.uploader.wait_for(c for e in entries for c, _ in e.chunks)
            key = content_key(manifest)
            previous = self.state.get_published(t.repo.config.id, cfg.name)
            if previous is not None and previous[1] == key and await t.repo.latest(cfg.name) == previous[0]:
                return TargetResult(name, "unchanged", snapshot=previous[0])
            snapshot_id = await t.repo.publish(manifest)
            self.state.set_published(t.repo.config.id, cfg.name, snapshot_id, key)
            log.info(
                "snapshot.published", source=cfg.name, target=name, snapshot=snapshot_id, files=len(entries)
            )
            return TargetResult(name, "published", snapshot=snapshot_id)
        except TargetError as exc:
            log.error("snapshot.failed", source=cfg.name, target=name, error=str(exc))
            return TargetResult(name, "failed", error=str(exc))


def _drop_incomplete_sets(
    records: list[FileRecord], sets: list[SetInfo], skipped: dict[str, str]
) -> tuple[list[FileRecord], list[SetInfo]]:
    """A checkpoint set with an unreadable or ever-changing file is incomplete for this pass."""
    bad = {p.split("/", 1)[0] for p in skipped if "/" in p} & {s.name for s in sets}
    if not bad:
        return records, sets
    return [r for r in records if r.path.split("/", 1)[0] not in bad], [s for s in sets if s.name not in bad]


def _diff(after: UploadStats, before: UploadStats) -> UploadStats:
    return UploadStats(
        **{f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(UploadStats)}
    )


async def run_sync(
    config: Config,
    *,
    sources: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    progress: ProgressSink | None = None,
) -> tuple[list[SourceResult], dict[str, ReplicatorError]]:
    """``replicator sync``: one pass; returns per-source results and targets that failed to open."""
    selected = [config.source(n) for n in sources] if sources else list(config.sources)
    results = []
    async with Replicator(config, targets=targets) as rep:
        for src in selected:
            results.append(await rep.sync_source(src, progress))
        return results, rep.target_errors
