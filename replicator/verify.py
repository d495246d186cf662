"""Verify: prove a repository copy is whole.

Structural check (always): the config parses; every ref points at an existing snapshot; every
manifest matches the digest in its id and parses as a safe manifest; every chunk a manifest
references exists, as a loose object or inside a pack long enough to hold it. With
``read_data`` (a fraction, 1.0 = all), referenced chunks are also downloaded, decoded and
re-hashed. Every problem names the object it concerns.

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
from replicator.manifest import PackedAt
from replicator.progress import NoProgress, ProgressSink
from replicator.repository import Repository, ref_key, snapshot_key, stored_key
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
    """Loose chunk objects."""
    packs_stored: int = 0
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
    # (chunk id, pack location or None for a loose object) -> first "snapshot:path" needing it
    referenced: dict[tuple[str, PackedAt | None], str] = {}

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
                    referenced.setdefault((cid, manifest.packed.get(cid)), f"{source}/{sid}:{entry.path}")

    loose = {cid: size async for cid, size in repo.list_chunks()}
    packs = {pack_id: size async for pack_id, size in repo.list_packs()}
    report.chunks_referenced = len({cid for cid, _ in referenced})
    report.chunks_stored = len(loose)
    report.packs_stored = len(packs)
    report.chunks_unreferenced = len(loose.keys() - {cid for cid, at in referenced if at is None})
    present: dict[tuple[str, PackedAt | None], int] = {}  # -> stored bytes
    missing: list[str] = []
    for ref, needed_by in sorted(referenced.items(), key=lambda item: item[0][0]):
        cid, at = ref
        problem = _absent(ref, loose, packs)
        if problem is None:
            present[ref] = loose[cid] if at is None else at[2]
        else:
            report.problems.append(Problem(stored_key(cid, at), f"{problem} (needed by {needed_by})"))
            missing.append(cid)

    corrupt: list[str] = []
    if read_data:
        refs = list(present)
        count = len(refs) if read_data >= 1 else max(1, round(len(refs) * read_data)) if refs else 0
        sample = random.Random(seed).sample(refs, count) if count < len(refs) else refs
        progress.begin("reading chunks", sum(present[r] for r in sample))
        corrupt = await _read_chunks(repo, sample, present, report, progress)
        progress.end()

    if state is not None and (missing or corrupt):
        state.forget_chunks(repo.config.id, [*missing, *corrupt])
        log.warning("state.chunks_forgotten", target=repo.target.name, count=len(missing) + len(corrupt))
    report.seconds = time.monotonic() - started
    return report


def _absent(ref: tuple[str, PackedAt | None], loose: dict[str, int], packs: dict[str, int]) -> str | None:
    """Why a referenced chunk cannot be read from the listed objects; None if it can."""
    cid, at = ref
    if at is None:
        if cid not in loose:
            return "chunk is missing"
        return "chunk object is empty" if loose[cid] == 0 else None
    pack_id, offset, length = at
    if pack_id not in packs:
        return "pack is missing"
    if offset + length > packs[pack_id]:
        return f"pack is {packs[pack_id]} bytes, chunk ends at {offset + length}"
    return None


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
    repo: Repository,
    refs: list[tuple[str, PackedAt | None]],
    stored: dict[tuple[str, PackedAt | None], int],
    report: VerifyReport,
    progress: ProgressSink,
) -> list[str]:
    queue = list(reversed(refs))
    corrupt: list[str] = []

    async def worker() -> None:
        while queue:
            ref = queue.pop()
            cid, at = ref
            try:
                await repo.get_chunk(cid, at)
            except IntegrityError as exc:
                corrupt.append(cid)
                report.problems.append(Problem(stored_key(cid, at), exc.message))
            except NotFoundError:
                corrupt.append(cid)
                report.problems.append(Problem(stored_key(cid, at), "chunk disappeared while verifying"))
            except TargetError:
                raise
            report.chunks_read += 1
            report.bytes_read += stored[ref]
            progress.advance(stored[ref])

    await asyncio.gather(*(worker() for _ in range(READ_PARALLELISM)))
    return corrupt
