"""Mark: every object key the repository's snapshot manifests and parts reference.

The live set is the evidence deletions rest on, so every doubt is a refusal
(GcRefusedError), never a smaller set: an object under ``refs/``, ``snapshots/`` or ``parts/``
that is not a well-formed ref, manifest or part key, a part that cannot be read, a ref whose
manifest the listing does not show, or a manifest that cannot be read, authenticated (the
digest in its id) or validated (replicator.format.manifest) stops the collector before it
deletes anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from replicator.config import NAME_RE
from replicator.errors import GcRefusedError, NotFoundError, RepositoryError
from replicator.format.manifest import FileEntry, Manifest, PackedAt
from replicator.format.parts import parse_key, parse_part
from replicator.progress import NoProgress, ProgressSink
from replicator.repository import Repository, chunk_key, is_snapshot_id, pack_key

_SUFFIX = ".json.zst"


@dataclass
class Marks:
    live: set[str] = field(default_factory=set)
    """Keys of the chunk objects and packs some manifest references."""
    copies: set[str] = field(default_factory=set)
    """Loose keys of packed chunks: usually absent, but a loose copy (``verify --repair``)
    may be what keeps a chunk readable when its pack is damaged (FORMAT.md 4.1), so kept."""
    manifests: int = 0
    manifest_bytes: int = 0
    """Stored bytes of those manifests (as listed)."""
    sources: int = 0
    parts: int = 0

    def keeps(self, key: str) -> bool:
        return key in self.live or key in self.copies


class ManifestVisitor(Protocol):
    """Sees every manifest the mark reads (``replicator stats``: one read serves both).
    ``restart`` comes before each attempt: what an abandoned attempt showed must be dropped."""

    def restart(self) -> None: ...
    def visit(self, source: str, snapshot_id: str, manifest: Manifest, stored: int) -> None: ...


MARK_ATTEMPTS = 3


class _Vanished(Exception):
    """A listed manifest was deleted before it was read (a writer's retention)."""


async def mark(
    repo: Repository,
    progress: ProgressSink | None = None,
    *,
    concurrency: int = 8,
    visitor: ManifestVisitor | None = None,
) -> Marks:
    """Refs, then one listing of ``snapshots/``, then every manifest it shows. A manifest
    deleted between the listing and its read (retention, by a writer that published a newer
    one after the listing) starts the whole mark again: the newer manifest must be read too."""
    for attempt in range(1, MARK_ATTEMPTS + 1):
        try:
            if visitor is not None:
                visitor.restart()
            return await _mark(repo, progress or NoProgress(), concurrency, visitor)
        except _Vanished as exc:
            if attempt == MARK_ATTEMPTS:
                raise GcRefusedError(
                    "manifests keep disappearing while they are read", key=str(exc), hint=_HINT
                ) from None
    raise AssertionError("unreachable")


async def _parts(repo: Repository, marks: Marks) -> None:
    """Parts (several instances, one source: FORMAT.md §11) are roots like manifests: read
    first, so that a part deleted after its set was published is covered by the manifest
    listing that follows. A part deleted before it is read is skipped (see above)."""
    async for info in repo.target.list("parts/"):
        parsed = parse_key(info.key)
        if parsed is None or not NAME_RE.match(parsed[0]):
            raise GcRefusedError("unrecognized object under parts/", key=info.key, hint=_HINT)
        if parsed[2]:
            continue  # a member object names no chunks
        try:
            part = parse_part(await repo.target.get(info.key), where=info.key)
        except NotFoundError:
            continue
        except RepositoryError as exc:
            raise GcRefusedError(f"cannot read a part ({exc.message})", key=info.key, hint=_HINT) from None
        marks.parts += 1
        _refer(marks, part.files, part.packed)


def _refer(marks: Marks, files: Iterable[FileEntry], packed: Mapping[str, PackedAt]) -> None:
    for f in files:
        for cid, _ in f.chunks:
            at = packed.get(cid)
            if at is None:
                marks.live.add(chunk_key(cid))
            else:
                marks.live.add(pack_key(at[0]))
                marks.copies.add(chunk_key(cid))


async def _read_refs(repo: Repository) -> dict[str, str]:
    """Source -> the snapshot its ref names."""
    refs: dict[str, str] = {}
    async for info in repo.target.list("refs/"):
        parts = info.key.split("/")
        if len(parts) != 3 or parts[2] != "latest" or not NAME_RE.match(parts[1]):
            raise GcRefusedError("unrecognized object under refs/", key=info.key, hint=_HINT)
        try:
            latest = await repo.latest(parts[1])
        except RepositoryError as exc:
            raise GcRefusedError(exc.message, key=info.key, hint=_HINT) from None
        if latest is not None:
            refs[parts[1]] = latest
    return refs


async def _list_manifests(repo: Repository) -> dict[tuple[str, str], int]:
    """(source, snapshot id) -> stored size, for every manifest the listing shows."""
    sizes: dict[tuple[str, str], int] = {}
    async for info in repo.target.list("snapshots/"):
        parts = info.key.split("/")
        name = parts[-1]
        if (
            len(parts) != 3
            or not NAME_RE.match(parts[1])
            or not name.endswith(_SUFFIX)
            or not is_snapshot_id(name[: -len(_SUFFIX)])
        ):
            raise GcRefusedError("unrecognized object under snapshots/", key=info.key, hint=_HINT)
        sizes[parts[1], name[: -len(_SUFFIX)]] = info.size
    return sizes


async def _mark(
    repo: Repository, progress: ProgressSink, concurrency: int, visitor: ManifestVisitor | None
) -> Marks:
    # Parts, then refs, then the manifests: a manifest is written before the ref that names
    # it, so a ref read earlier names a manifest the later listing must show.
    roots = Marks()
    await _parts(repo, roots)
    refs = await _read_refs(repo)
    sizes = await _list_manifests(repo)
    found = list(sizes)
    for source, sid in refs.items():
        if (source, sid) not in sizes:
            raise GcRefusedError(
                f"the ref names snapshot {sid}, which the listing of snapshots/ does not show",
                key=f"refs/{source}/latest",
                hint="the listing is incomplete or the repository is damaged; run `replicator verify`",
            )
    marks = Marks(
        live=roots.live,
        copies=roots.copies,
        manifests=len(found),
        manifest_bytes=sum(sizes.values()),
        sources=len({s for s, _ in found} | set(refs)),
        parts=roots.parts,
    )
    sem = asyncio.Semaphore(concurrency)
    progress.begin("reading manifests", sum(sizes.values()))

    async def one(source: str, sid: str) -> None:
        async with sem:
            try:
                manifest = await repo.load_manifest(source, sid)
            except NotFoundError:
                raise _Vanished(f"snapshots/{source}/{sid}{_SUFFIX}") from None
            except RepositoryError as exc:  # damaged, forged or unknown version: never guess
                raise GcRefusedError(
                    f"cannot read a manifest ({exc.message})",
                    key=f"snapshots/{source}/{sid}{_SUFFIX}",
                    hint="fix or delete it (replicator verify) before pruning",
                ) from None
        _refer(marks, manifest.files, manifest.packed)
        if visitor is not None:
            visitor.visit(source, sid, manifest, sizes[source, sid])
        progress.advance(sizes[source, sid])

    tasks = [asyncio.ensure_future(one(s, i)) for s, i in found]
    try:
        await asyncio.gather(*tasks)
    finally:
        # On a failure the other reads stop here: none may reach a later attempt's visitor.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress.end()
    marks.copies -= marks.live
    return marks


_HINT = "nothing was deleted; garbage collection trusts only a repository it fully understands"
