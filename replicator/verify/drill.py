"""Restore drills: prove that training can resume from a secondary.

For each source the drill restores the chosen snapshot (default: the latest) from the
target into a scratch directory with the ordinary restore code (so every chunk and every
file is checked against its digest, and every path is confined to the scratch directory),
then checks the format of each known artifact (:mod:`replicator.verify.formats`) and, with
``load``, loads each checkpoint (DCP, safetensors, torch.save) with PyTorch (:mod:`.load`).

The report gives, per source: the snapshot and its age, what was restored, digest and
format failures, the measured restore throughput and the time a full restore of the
snapshot would take at that throughput (the recovery-time estimate), and the newest
checkpoint set whose every file restored and checked clean: where training resumes.
Scratch layout: ``<scratch>/<target>/<source>/``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from replicator.config import NAME_RE
from replicator.errors import NotFoundError, RepositoryError
from replicator.format.manifest import Manifest, now_utc
from replicator.log import get_logger
from replicator.progress import NoProgress, ProgressSink
from replicator.repository import Repository
from replicator.restore.core import restore_snapshot
from replicator.restore.local import LocalDestination
from replicator.verify.formats import FormatCheck, check_file
from replicator.verify.load import SetLoad, load_checkpoints

log = get_logger(__name__)

CHECKS_IN_PARALLEL = 4


@dataclass
class SourceDrill:
    source: str
    snapshot: str | None = None
    kind: str | None = None
    created: str | None = None
    age_seconds: float | None = None
    """How old the snapshot is: the data a failover to it would lose, at least."""
    restored_to: str | None = None
    files: int = 0
    bytes: int = 0
    restored_files: int = 0
    restored_bytes: int = 0
    already_present: int = 0
    """Files already correct in the scratch directory (a reused --scratch): digest-checked, not fetched."""
    restore_seconds: float = 0.0
    throughput_bytes_per_second: float | None = None
    rto_seconds: float | None = None
    """bytes / throughput: how long restoring this whole snapshot takes at the measured rate."""
    digest_failures: dict[str, str] = field(default_factory=dict)
    format_failures: dict[str, str] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    """Files checked per format (digest-only files are not counted here)."""
    notes: dict[str, str] = field(default_factory=dict)
    """Files whose format check was partial, and why."""
    loaded: int = 0
    """Checkpoints loaded with PyTorch (a DCP directory, a sharded safetensors checkpoint, a file)."""
    loads: list[SetLoad] = field(default_factory=list)
    """With ``load``: per checkpoint set, loaded, failed or skipped, and why."""
    sets: int = 0
    newest_restorable_set: str | None = None
    newest_restorable_set_age_seconds: float | None = None
    problems: list[str] = field(default_factory=list)
    """Source-level failures: no snapshot, unreadable manifest, no complete checkpoint set."""

    @property
    def ok(self) -> bool:
        loads_ok = all(s.status == "loaded" for s in self.loads)
        return loads_ok and not (self.problems or self.digest_failures or self.format_failures)


@dataclass
class DrillReport:
    repository: str
    scratch: str | None
    """Where files were restored; None when it was a temporary directory, removed afterwards."""
    load: bool
    sources: list[SourceDrill] = field(default_factory=list)
    rto_seconds: float | None = None
    """Sum over sources (they are restored one after another)."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.sources) and all(s.ok for s in self.sources)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON, with the verdicts (``ok``) of the drill and of each source."""
        out = asdict(self)
        out["ok"] = self.ok
        for src, row in zip(self.sources, out["sources"], strict=True):
            row["ok"] = src.ok
        return out


async def run_drill(
    repo: Repository,
    *,
    sources: Sequence[str] | None = None,
    snapshot: str | None = None,
    scratch: Path | None = None,
    load: bool = False,
    progress: ProgressSink | None = None,
) -> DrillReport:
    """Restore and check the chosen snapshot of every source (see module docstring).

    ``scratch`` None: a temporary directory, removed afterwards, so the restore skips its
    final flush to disk (durability is pointless for files about to be deleted); the measured
    throughput is then that of ``restore --no-sync``. A kept ``scratch`` is restored durably,
    flush included in the time, like ``replicator restore``. Target errors other than a
    missing object end the drill (the CLI exits 3 for an unreachable target)."""
    progress = progress or NoProgress()
    started = time.monotonic()
    report = DrillReport(repository=repo.target.url, scratch=str(scratch) if scratch else None, load=load)
    root = scratch if scratch is not None else Path(tempfile.mkdtemp(prefix="replicator-drill-"))
    try:
        for source in list(sources) if sources else await repo.list_sources():
            drill = SourceDrill(source)
            report.sources.append(drill)
            dest = root / repo.target.name / source
            await _drill_source(repo, drill, snapshot, dest, load, progress, sync=scratch is not None)
    finally:
        if scratch is None:
            await asyncio.to_thread(shutil.rmtree, root, True)
    rtos = [s.rto_seconds for s in report.sources]
    report.rto_seconds = sum(r for r in rtos if r is not None) if rtos and None not in rtos else None
    report.seconds = time.monotonic() - started
    return report


async def _drill_source(
    repo: Repository,
    drill: SourceDrill,
    snapshot: str | None,
    dest: Path,
    load: bool,
    progress: ProgressSink,
    *,
    sync: bool,
) -> None:
    if not NAME_RE.match(drill.source):
        drill.problems.append(f"{drill.source!r} is not a valid source name")
        return
    try:
        sid = await repo.resolve(drill.source, snapshot)
        manifest = await repo.load_manifest(drill.source, sid)
    except NotFoundError:
        drill.problems.append(f"snapshot manifest of {drill.source} is missing")
        return
    except RepositoryError as exc:
        drill.problems.append(str(exc))
        return
    drill.snapshot, drill.kind, drill.created = sid, manifest.kind, manifest.created
    drill.age_seconds = (now_utc() - manifest.created_at).total_seconds()
    drill.files, drill.bytes, drill.sets = len(manifest.files), manifest.total_bytes, len(manifest.sets)
    drill.restored_to = str(dest)

    result = await restore_snapshot(repo, manifest, dest, progress=progress, sync=sync)
    drill.restored_files, drill.restored_bytes = result.files, result.bytes
    drill.already_present, drill.restore_seconds = result.skipped_existing, result.seconds
    drill.digest_failures = dict(result.failures)
    if result.bytes and result.seconds > 0:
        drill.throughput_bytes_per_second = result.bytes_per_second
        drill.rto_seconds = drill.bytes / result.bytes_per_second
    elif not drill.bytes:
        drill.rto_seconds = 0.0

    await _check_formats(LocalDestination(dest, repo.hash), manifest, drill)
    if load:
        sizes = {f.path: f.size for f in manifest.files}
        sets = {s.name for s in manifest.sets}
        drill.loads = await asyncio.to_thread(
            load_checkpoints, dest, sizes, sets, drill.digest_failures.keys()
        )
        drill.loaded = sum(c.status == "loaded" for s in drill.loads for c in s.checkpoints)
    _newest_restorable_set(manifest, drill)
    log.info("drill.source", source=drill.source, snapshot=sid, ok=drill.ok)


async def _check_formats(reader: LocalDestination, manifest: Manifest, drill: SourceDrill) -> None:
    sizes = {f.path: f.size for f in manifest.files}
    todo = [f.path for f in manifest.files if f.path not in drill.digest_failures]
    lock = asyncio.Semaphore(CHECKS_IN_PARALLEL)

    def check(path: str) -> FormatCheck | None:
        # Opened without following symlinks, like the restore wrote it.
        fd = reader.open_regular(path)
        with os.fdopen(fd, "rb") as f:
            return check_file(f, path, sizes)

    async def one(path: str) -> None:
        async with lock:
            try:
                result = await asyncio.to_thread(check, path)
            except OSError as exc:
                drill.format_failures[path] = f"cannot read the restored file: {exc.strerror or exc}"
                return
        if result is None:
            return
        drill.formats[result.format] = drill.formats.get(result.format, 0) + 1
        if result.problem is not None:
            drill.format_failures[path] = f"{result.format}: {result.problem}"
        elif result.note is not None:
            drill.notes[path] = f"{result.format}: {result.note}"

    try:
        await asyncio.gather(*(one(p) for p in todo))
    finally:
        await reader.close()


def _newest_restorable_set(manifest: Manifest, drill: SourceDrill) -> None:
    bad = drill.digest_failures.keys() | drill.format_failures.keys()
    unloaded = {s.set for s in drill.loads if s.status != "loaded"}
    for info in sorted(manifest.sets, key=lambda s: (s.newest_mtime_ns, s.name), reverse=True):
        members = [f.path for f in manifest.files if f.path.startswith(info.name + "/")]
        if len(members) == info.files and info.name not in unloaded and not any(p in bad for p in members):
            drill.newest_restorable_set = info.name
            drill.newest_restorable_set_age_seconds = time.time() - info.newest_mtime_ns / 1e9
            return
    if manifest.kind == "checkpoint":
        why = "no checkpoint set in the snapshot" if not manifest.sets else "no checkpoint set restored clean"
        drill.problems.append(f"{why}: training cannot resume from this snapshot")
