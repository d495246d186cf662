"""Repair: send a target again the chunks it lost or holds damaged, from the primary's files.

``verify --repair`` runs after a verify that found missing or corrupt chunks. The snapshot
manifests name the files that hold each of them; every such file that the configured source
still has is read and chunked with the repository's own parameters (so the chunk ids come out
the same), and the chunks whose ids are among the damaged ones are uploaded as loose chunk
objects. A packed chunk is repaired the same way: readers serve a packed chunk from its loose
copy when the pack is missing or damaged (docs/FORMAT.md, 4.1). A file that changed on the
primary still repairs the chunks it shares with the old version (content addressing makes
any copy good). What cannot be repaired is said chunk by chunk, with why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from replicator.config import Config
from replicator.errors import RepositoryError, SourceError, TargetError
from replicator.log import get_logger
from replicator.read.pipeline import ChunkConsumer, ChunkPipeline, EncodedChunk
from replicator.repository import Repository, chunk_key
from replicator.sources import open_source
from replicator.state import StateStore

log = get_logger(__name__)


@dataclass
class RepairReport:
    repaired: list[str] = field(default_factory=list)
    """Chunk ids uploaded again."""
    unrepaired: dict[str, str] = field(default_factory=dict)
    """Chunk key -> why it could not be repaired."""

    @property
    def ok(self) -> bool:
        return not self.unrepaired


class _Resend(ChunkConsumer):
    """Uploads, as loose chunk objects, the chunks of a file that are still to repair."""

    def __init__(self, repo: Repository, todo: set[str], report: RepairReport) -> None:
        self.repo, self.key, self.todo, self.report = repo, repo.hash.key, todo, report

    def wants(self, ids: dict[str, str]) -> bool:
        return ids[self.key] in self.todo

    async def take(self, chunk: EncodedChunk) -> None:
        cid = chunk.ids[self.key]
        if cid in self.todo and chunk.stored is not None:
            await self.repo.put_chunk(cid, chunk.stored)
            self.todo.discard(cid)
            self.report.repaired.append(cid)


async def repair_chunks(
    repo: Repository, config: Config, damaged: Iterable[str], state: StateStore | None = None
) -> RepairReport:
    """Upload again, from the sources of ``config``, the chunks ``damaged`` (ids)."""
    todo = set(damaged)
    report = RepairReport()
    if not todo:
        return report
    holders = await _holders(repo, todo)
    why: dict[str, str] = {c: "no snapshot names a file that holds it" for c in todo if c not in holders}
    pipeline = ChunkPipeline(
        repo.config.chunking, config.compression, [repo.hash], memory_budget=config.memory_budget
    )
    sources = {s.name: s for s in config.sources}
    resend = _Resend(repo, todo, report)
    try:
        for (source_name, path), needed in sorted(_by_file(holders).items()):
            if not needed & todo:
                continue
            cfg = sources.get(source_name)
            if cfg is None:
                why.update((c, f"source {source_name} is not in the config") for c in needed & todo)
                continue
            source = open_source(cfg)
            try:
                file = await source.stat(path)
                if file is None:
                    why.update((c, f"{source_name}/{path} is gone from the source") for c in needed & todo)
                    continue
                await pipeline.read_file(source, file, resend)
                why.update((c, f"{source_name}/{path} changed on the source") for c in needed & todo)
            except SourceError as exc:
                why.update((c, f"{source_name}/{path}: {exc}") for c in needed & todo)
            finally:
                await source.close()
    finally:
        pipeline.close()
    if report.repaired:
        await repo.target.flush()
        if state is not None:
            state.chunks(repo.config.id).add_loose(report.repaired)
            state.commit()
        log.info("repair.uploaded", target=repo.target.name, chunks=len(report.repaired))
    report.unrepaired = {chunk_key(c): why.get(c, "not found in the source's files") for c in sorted(todo)}
    return report


async def _holders(repo: Repository, chunks: set[str]) -> dict[str, set[tuple[str, str]]]:
    """Chunk id -> the (source, path) of every file, in any snapshot, that holds it."""
    out: dict[str, set[tuple[str, str]]] = {}
    for source in await repo.list_sources():
        for sid in reversed(await repo.list_snapshots(source)):
            try:
                manifest = await repo.load_manifest(source, sid)
            except TargetError:
                raise
            except RepositoryError:
                continue  # verify has named it
            for f in manifest.files:
                for cid, _ in f.chunks:
                    if cid in chunks:
                        out.setdefault(cid, set()).add((source, f.path))
    return out


def _by_file(holders: dict[str, set[tuple[str, str]]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for cid, files in holders.items():
        for f in files:
            out.setdefault(f, set()).add(cid)
    return out
