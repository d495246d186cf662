"""Verify: prove a repository copy is whole.

Structural check (always): the config parses; every ref points at an existing snapshot; every
manifest matches the digest in its id and parses as a safe manifest; every chunk a manifest
references exists, as a loose object or inside a pack long enough to hold it; a one-chunk
file's digest is its chunk's id. With ``read_data``, referenced chunks are also downloaded,
decoded and re-hashed: all of them (1.0), file by file, each file's chunks re-assembled in
order and hashed against the file's digest (a manifest whose digest and chunk list disagree
would otherwise pass here and fail only at restore: issue 18); or a random sample of that
fraction of the chunks. Every problem names the object it concerns.

Verify is also how the local state store learns that a target lost chunks: missing ones are
dropped from its presence cache so the next sync uploads them again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from replicator.errors import IntegrityError, NotFoundError, RepositoryError
from replicator.format.chunks import Buffer
from replicator.format.manifest import PackedAt
from replicator.log import get_logger
from replicator.memory import ByteBudget
from replicator.progress import NoProgress, ProgressSink
from replicator.repository import Repository, ref_key, snapshot_key, stored_key
from replicator.state import StateStore

log = get_logger(__name__)

READ_PARALLELISM = 16


@dataclass
class Problem:
    key: str
    message: str
    chunk: str | None = None
    """The id of the chunk it is about, when it is about one (a repair can fix those)."""


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
    damaged: list[str] = field(default_factory=list)
    """Ids of referenced chunks found missing or corrupt (what ``verify --repair`` sends again)."""
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
    """Check ``repo`` (see module docstring): every snapshot of ``sources`` (default: all), or
    only ``snapshot``; with ``read_data`` 1.0 every chunk and file, below 1.0 a random sample
    of that fraction of the chunks (``seed`` makes it repeatable). Chunks found missing or
    corrupt are forgotten by ``state``'s presence cache."""
    progress = progress or NoProgress()
    started = time.monotonic()
    report = VerifyReport(repository=repo.target.url)
    names = list(sources) if sources else await repo.list_sources()
    referenced, files = await _references(repo, names, snapshot, report)
    present, missing = await _stored(repo, referenced, report)
    corrupt: list[str] = []
    if read_data:
        corrupt = await _read_data(repo, read_data, files, present, report, progress, seed)
    report.damaged = sorted({*missing, *corrupt})
    if state is not None and (missing or corrupt):
        state.chunks(repo.config.id).forget([*missing, *corrupt])
        log.warning("state.chunks_forgotten", target=repo.target.name, count=len(missing) + len(corrupt))
    report.seconds = time.monotonic() - started
    return report


ChunkRef = tuple[str, PackedAt | None]
"""A chunk id and where it is stored: its pack location, or None for a loose object."""
Referenced = dict[ChunkRef, str]
"""Chunk -> the first "source/snapshot:path" that needs it."""
MultiChunkFiles = dict[tuple[str, tuple[ChunkRef, ...]], str]
"""The contents of files of several chunks: (digest, chunks in order) -> the first "source/snapshot:path"."""


async def _references(
    repo: Repository, names: list[str], snapshot: str | None, report: VerifyReport
) -> tuple[Referenced, MultiChunkFiles]:
    """Load the manifests to check; what they reference. A manifest that is missing or does
    not parse, and a one-chunk file whose digest is not its chunk's id, are problems."""
    referenced: Referenced = {}
    files: MultiChunkFiles = {}
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
                where = f"{source}/{sid}:{entry.path}"
                refs = tuple((cid, manifest.packed.get(cid)) for cid, _ in entry.chunks)
                for ref in refs:
                    referenced.setdefault(ref, where)
                if len(refs) == 1 and refs[0][0] != entry.digest:
                    report.problems.append(Problem(where, "digest differs from its only chunk's id"))
                if len(refs) > 1:
                    files.setdefault((entry.digest, refs), where)
    return referenced, files


async def _stored(
    repo: Repository, referenced: Referenced, report: VerifyReport
) -> tuple[dict[ChunkRef, int], list[str]]:
    """List the stored chunks and packs: (referenced chunks present -> their stored bytes,
    ids of those missing). Each missing one is a problem naming what needs it."""
    loose = {cid: size async for cid, size in repo.list_chunks()}
    packs = {pack_id: size async for pack_id, size in repo.list_packs()}
    report.chunks_referenced = len({cid for cid, _ in referenced})
    report.chunks_stored = len(loose)
    report.packs_stored = len(packs)
    # A loose copy of a packed chunk is not unreferenced: it serves when the pack is gone
    # (repair, or a pack superseded by prune: docs/FORMAT.md 10.2).
    report.chunks_unreferenced = len(loose.keys() - {cid for cid, _ in referenced})
    present: dict[ChunkRef, int] = {}
    missing: list[str] = []
    for ref, needed_by in sorted(referenced.items(), key=lambda item: item[0][0]):
        cid, at = ref
        problem = _absent(ref, loose, packs)
        if problem is None:
            present[ref] = loose[cid] if at is None else at[2]
        else:
            report.problems.append(Problem(stored_key(cid, at), f"{problem} (needed by {needed_by})", cid))
            missing.append(cid)
    return present, missing


async def _read_data(
    repo: Repository,
    fraction: float,
    files: MultiChunkFiles,
    present: dict[ChunkRef, int],
    report: VerifyReport,
    progress: ProgressSink,
    seed: int | None,
) -> list[str]:
    """Download, decode and re-hash chunks; the ids of those found corrupt or gone."""
    if fraction < 1:
        chunks = list(present)
        count = max(1, round(len(chunks) * fraction)) if chunks else 0
        sample = random.Random(seed).sample(chunks, count) if count < len(chunks) else chunks
        progress.begin("reading chunks", sum(present[r] for r in sample))
        corrupt = await _read_chunks(repo, sample, present, report, progress)
        progress.end()
        return corrupt
    # Every chunk, and every multi-chunk file re-assembled: the chunks of those files are read
    # in order (a chunk shared by two different files is read for each); the rest one by one.
    whole = [(d, refs, where) for (d, refs), where in files.items() if all(r in present for r in refs)]
    in_files = {r for _, refs, _ in whole for r in refs}
    single = [r for r in present if r not in in_files]
    total = sum(present[r] for r in single) + sum(present[r] for _, refs, _ in whole for r in refs)
    progress.begin("reading chunks", total)
    corrupt = await _read_files(repo, whole, present, report, progress)
    corrupt += await _read_chunks(repo, single, present, report, progress)
    progress.end()
    return corrupt


def _absent(ref: tuple[str, PackedAt | None], loose: dict[str, int], packs: dict[str, int]) -> str | None:
    """Why a referenced chunk cannot be read from the listed objects; None if it can."""
    cid, at = ref
    if at is None:
        if cid not in loose:
            return "chunk is missing"
        return "chunk object is empty" if loose[cid] == 0 else None
    pack_id, offset, length = at
    if loose.get(cid):
        return None  # a loose copy serves it whatever its pack's state (repair writes these)
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


FILE_WINDOW_BYTES = 256 << 20
"""Stored bytes read ahead of the file being hashed (verify's memory bound)."""


async def _read_files(
    repo: Repository,
    files: list[tuple[str, tuple[ChunkRef, ...], str]],
    stored: dict[ChunkRef, int],
    report: VerifyReport,
    progress: ProgressSink,
) -> list[str]:
    """Read the chunks of ``files`` in order, READ_PARALLELISM at a time and at most
    FILE_WINDOW_BYTES ahead of the file being hashed; check each chunk and each file's
    digest. Returns the ids of chunks found corrupt or gone."""
    corrupt: list[str] = []
    bad: set[ChunkRef] = set()
    budget = ByteBudget(FILE_WINDOW_BYTES)
    loop = asyncio.get_running_loop()
    slots: list[list[asyncio.Future[Buffer | None] | None]] = [
        [loop.create_future() for _ in refs] for _, refs, _ in files
    ]
    work = deque((i, j) for i, (_, refs, _) in enumerate(files) for j in range(len(refs)))

    in_order = asyncio.Lock()

    async def reader() -> None:
        while True:
            # Memory is taken in the order the hasher needs the chunks: a later chunk that fits
            # must not overtake an earlier one waiting for room, or the window can fill with
            # chunks the hasher cannot reach, and nothing frees it (verify hung).
            async with in_order:
                if not work:
                    return
                i, j = work.popleft()
                ref, future = files[i][1][j], slots[i][j]
                assert future is not None
                await budget.acquire(stored[ref])
            try:
                future.set_result(await _get(repo, ref, stored, report, corrupt, bad))
            except BaseException as exc:
                budget.release(stored[ref])
                future.set_exception(exc)
                raise

    async def hasher() -> None:
        for i, (digest, refs, where) in enumerate(files):
            h = repo.hash.hasher()
            whole = True
            for j, ref in enumerate(refs):
                future = slots[i][j]
                assert future is not None
                slots[i][j] = None  # its bytes are dropped once hashed: bounded memory
                data = await future
                budget.release(stored[ref])
                progress.advance(stored[ref])
                if data is None:
                    whole = False
                else:
                    h.update(data)
            if whole and h.digest().hex() != digest:
                report.problems.append(Problem(where, "file digest differs from its re-assembled chunks"))

    tasks = [asyncio.create_task(reader()) for _ in range(READ_PARALLELISM)]
    try:
        await asyncio.gather(hasher(), *tasks)
    finally:
        for task in tasks:
            task.cancel()
    return corrupt


async def _get(
    repo: Repository,
    ref: ChunkRef,
    stored: dict[ChunkRef, int],
    report: VerifyReport,
    corrupt: list[str],
    bad: set[ChunkRef],
) -> Buffer | None:
    """One chunk's bytes, checked; None (and a problem, once per chunk) if it is bad."""
    cid, at = ref
    try:
        data = await repo.get_chunk(cid, at)
    except IntegrityError as exc:
        data, problem = None, exc.message
    except NotFoundError:
        data, problem = None, "chunk disappeared while verifying"
    report.chunks_read += 1
    report.bytes_read += stored[ref]
    if data is None and ref not in bad:
        bad.add(ref)
        corrupt.append(cid)
        report.problems.append(Problem(stored_key(cid, at), problem, cid))
    return data


async def _read_chunks(
    repo: Repository,
    refs: list[tuple[str, PackedAt | None]],
    stored: dict[tuple[str, PackedAt | None], int],
    report: VerifyReport,
    progress: ProgressSink,
) -> list[str]:
    queue = list(reversed(refs))
    corrupt: list[str] = []
    bad: set[ChunkRef] = set()

    async def worker() -> None:
        while queue:
            ref = queue.pop()
            await _get(repo, ref, stored, report, corrupt, bad)
            progress.advance(stored[ref])

    await asyncio.gather(*(worker() for _ in range(READ_PARALLELISM)))
    return corrupt
