"""Verify: prove a repository copy is whole.

Structural check (always): the config parses; every ref points at an existing snapshot; every
manifest matches the digest in its id and parses as a safe manifest; every chunk a manifest
references exists. With ``read_data`` (a fraction, 1.0 = all), referenced chunks are also
downloaded, decoded and re-hashed. Every problem names the object it concerns.

Verify is also how the local state store learns that a target lost chunks: missing ones are
dropped from its presence cache so the next sync uploads them again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from replicator.errors import IntegrityError, NotFoundError, RepositoryError, TargetError
from replicator.log import get_logger
from replicator.progress import NoProgress, ProgressSink
from replicator.repository import Repository, chunk_key, ref_key, snapshot_key
from replicator.state import StateStore

log = get_logger(__name__)

READ_PARALLELISM = 16


@dataclass
class Problem:
    key: str
    message: str


@dataclass
class VerifyReport:
    repository: str
    sources: dict[str, list[str]] = field(default_factory=dict)
    """Source -> snapshot ids checked."""
    files: int = 0
    chunks_referenced: int = 0
    chunks_stored: int = 0
    chunks_unreferenced: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify_repository(
    repo: Repository,
    *,
    sources: Sequence[str] | None = None,
    snapshot: str | None = None,
    read_data: float | None = None,
    progress: ProgressSink | None = None,
    state: StateStore | None = None,
    seed: int | None = None,
) -> VerifyReport:
    progress = progress or NoProgress()
    started = time.monotonic()
    report = VerifyReport(repository=repo.target.url)
    names = list(sources) if sources else await repo.list_sources()
    referenced: dict[str, str] = {}  # chunk id -> first "snapshot:path" that needs it

    for source in names:
        ids = await _snapshots_to_check(repo, source, snapshot, report)
        report.sources[source] = ids
        for sid in ids:
            key = snapshot_key(source, sid)
            try:
                manifest = await repo.load_manifest(source, sid)
            except NotFoundError:
                report.problems.append(Problem(key, "snapshot manifest is missing"))
                continue
            except RepositoryError as exc:
                report.problems.append(Problem(key, exc.message))
                continue
            report.files += len(manifest.files)
            for entry in manifest.files:
                for cid, _ in entry.chunks:
                    referenced.setdefault(cid, f"{source}/{sid}:{entry.path}")

    stored: dict[str, int] = {}
    async for cid, size in repo.list_chunks():
        stored[cid] = size
    report.chunks_referenced = len(referenced)
    report.chunks_stored = len(stored)
    report.chunks_unreferenced = len(stored.keys() - referenced.keys())
    missing = sorted(referenced.keys() - stored.keys())
    for cid in missing:
        report.problems.append(Problem(chunk_key(cid), f"chunk is missing (needed by {referenced[cid]})"))
    for cid in sorted(referenced.keys() & stored.keys()):
        if stored[cid] == 0:
            report.problems.append(Problem(chunk_key(cid), "chunk object is empty"))

    corrupt: list[str] = []
    if read_data:
        present = sorted(referenced.keys() & stored.keys())
        count = len(present) if read_data >= 1 else max(1, round(len(present) * read_data)) if present else 0
        sample = random.Random(seed).sample(present, count) if count < len(present) else present
        progress.begin("reading chunks", sum(stored[c] for c in sample))
        corrupt = await _read_chunks(repo, sample, stored, report, progress)
        progress.end()

    if state is not None and (missing or corrupt):
        state.forget_chunks(repo.config.id, [*missing, *corrupt])
        log.warning("state.chunks_forgotten", target=repo.target.name, count=len(missing) + len(corrupt))
    report.seconds = time.monotonic() - started
    return report


async def _snapshots_to_check(
    repo: Repository, source: str, snapshot: str | None, report: VerifyReport
) -> list[str]:
    all_ids = await repo.list_snapshots(source)
    try:
        latest = await repo.latest(source)
    except RepositoryError as exc:
        report.problems.append(Problem(ref_key(source), exc.message))
        latest = None
    if latest is not None and latest not in all_ids:
        report.problems.append(Problem(ref_key(source), f"ref points at missing snapshot {latest}"))
    if snapshot is None:
        return all_ids
    try:
        return [await repo.resolve(source, snapshot)]
    except RepositoryError as exc:
        report.problems.append(Problem(f"snapshots/{source}/", exc.message))
        return []


async def _read_chunks(
    repo: Repository, ids: list[str], stored: dict[str, int], report: VerifyReport, progress: ProgressSink
) -> list[str]:
    queue = list(reversed(ids))
    corrupt: list[str] = []

    async def worker() -> None:
        while queue:
            cid = queue.pop()
            try:
                await repo.get_chunk(cid)
            except IntegrityError as exc:
                corrupt.append(cid)
                report.problems.append(Problem(chunk_key(cid), exc.message))
            except NotFoundError:
                corrupt.append(cid)
                report.problems.append(Problem(chunk_key(cid), "chunk disappeared while verifying"))
            except TargetError:
                raise
            report.chunks_read += 1
            report.bytes_read += stored[cid]
            progress.advance(stored[cid])

    await asyncio.gather(*(worker() for _ in range(READ_PARALLELISM)))
    return corrupt
