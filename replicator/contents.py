"""Look inside a repository before restoring: what one snapshot holds (``replicator ls``) and
what changed between two (``replicator diff``). Only manifests are read (each authenticated
by the digest in its id); no chunk is fetched.

Files are compared by digest: a file whose bytes are the same but whose mode or mtime differ
is not "changed". For a checkpoint source, a file belongs to the checkpoint set named by its
top-level directory, if the snapshot lists that set; a diff is then grouped per set, and a
set is added or removed when only one snapshot lists it.

Names are surrogateescape strs (:mod:`replicator.paths`); JSON output carries them as the
manifest does (``path`` plus ``path_b64`` for a name that is not UTF-8), text output through
:func:`~replicator.paths.display_path`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from replicator.config import TargetConfig
from replicator.format.manifest import FileEntry, Manifest
from replicator.globs import PathFilter
from replicator.repository import Repository, open_repository
from replicator.restore.run import path_json


@dataclass
class ListedFile:
    path: str
    size: int
    mode: int
    mtime_ns: int
    digest: str
    set: str | None = None
    """The checkpoint set it belongs to (checkpoint sources); None otherwise."""

    def to_json(self) -> dict[str, Any]:
        doc = {**path_json(self.path), "size": self.size, "mode": self.mode, "mtime_ns": self.mtime_ns}
        doc |= {"digest": self.digest, "set": _name_json(self.set)}
        return doc


@dataclass
class Listing:
    """``replicator ls``: the files of one snapshot (those the globs select), by path."""

    source: str
    snapshot: str
    kind: str
    created: str
    files: list[ListedFile]
    sets: list[str] = field(default_factory=list)
    """Every checkpoint set of the snapshot (also those no selected file belongs to)."""

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "snapshot": self.snapshot,
            "kind": self.kind,
            "created": self.created,
            "sets": [_name_json(s) for s in self.sets],
            "files": [f.to_json() for f in self.files],
            "total_files": len(self.files),
            "total_bytes": self.bytes,
        }


@dataclass
class Change:
    """One file added, removed or changed between two snapshots."""

    path: str
    change: str
    """``added``, ``removed`` or ``changed`` (another digest)."""
    size: int
    """Its size in the newer snapshot (in the older one for a removed file)."""
    old_size: int | None = None
    """For a changed file: its size in the older snapshot."""
    set: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {**path_json(self.path), "change": self.change, "size": self.size}
        if self.old_size is not None:
            doc["old_size"] = self.old_size
        return doc | {"set": _name_json(self.set)}


@dataclass
class Tally:
    """Counts and bytes of one kind of change (bytes: of the newer version; of the older for
    removed files)."""

    files: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.files += 1
        self.bytes += size


@dataclass
class SetDiff:
    """A checkpoint set's part of a diff; ``name`` None gathers files outside any set."""

    name: str | None
    status: str
    """``added`` (only the newer snapshot lists it), ``removed``, or ``changed``."""
    changes: list[Change] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": _name_json(self.name),
            "status": self.status,
            "changes": [c.to_json() for c in self.changes],
        }


@dataclass
class SnapshotDiff:
    """``replicator diff``: what changed from snapshot ``old`` to snapshot ``new``."""

    source: str
    kind: str
    old: str
    new: str
    changes: list[Change]
    """Every change, by path."""
    sets: list[SetDiff]
    """For a checkpoint source: the changes grouped per set (only sets with changes), in set
    order, files outside any set last. Empty for other kinds."""
    unchanged: Tally = field(default_factory=Tally)

    def totals(self) -> dict[str, Tally]:
        out = {k: Tally() for k in ("added", "removed", "changed")}
        for c in self.changes:
            out[c.change].add(c.size)
        return out | {"unchanged": self.unchanged}

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "old": self.old,
            "new": self.new,
            "changes": [c.to_json() for c in self.changes],
            "sets": [s.to_json() for s in self.sets],
            "totals": {k: {"files": t.files, "bytes": t.bytes} for k, t in self.totals().items()},
        }


def _name_json(name: str | None) -> Any:
    """A set name for JSON: None, a str, or (not UTF-8) ``{"path", "path_b64"}``."""
    if name is None:
        return None
    doc = path_json(name)
    return doc["path"] if len(doc) == 1 else doc


def set_of(manifest: Manifest) -> dict[str, str | None]:
    """path -> the checkpoint set the file belongs to (its top-level directory, if the
    manifest lists that set), for every file."""
    names = {s.name for s in manifest.sets}
    out: dict[str, str | None] = {}
    for f in manifest.files:
        top = f.path.split("/", 1)[0] if "/" in f.path else None
        out[f.path] = top if top in names else None
    return out


async def _load(repo: Repository, source: str, snapshot: str | None) -> tuple[str, Manifest]:
    sid = await repo.resolve(source, snapshot)
    return sid, await repo.load_manifest(source, sid)


async def list_snapshot(
    target: TargetConfig, source: str, snapshot: str | None = None, globs: Sequence[str] = ()
) -> Listing:
    """The files of ``source``'s snapshot ``snapshot`` (an id, a unique prefix, 'latest' or
    None for the latest) in ``target``'s repository, sorted by path; with ``globs``, only the
    files they select (as ``restore --include`` would)."""
    async with open_repository(target) as repo:
        sid, manifest = await _load(repo, source, snapshot)
    keep = PathFilter(globs) if globs else None
    sets = set_of(manifest)
    files = [
        ListedFile(f.path, f.size, f.mode, f.mtime_ns, f.digest, sets[f.path])
        for f in sorted(manifest.files, key=lambda f: f.path)
        if keep is None or keep(f.path)
    ]
    return Listing(source, sid, manifest.kind, manifest.created, files, [s.name for s in manifest.sets])


async def diff_snapshots(target: TargetConfig, source: str, old: str, new: str) -> SnapshotDiff:
    """What changed in ``source`` from snapshot ``old`` to snapshot ``new`` (each an id, a
    unique prefix or 'latest')."""
    async with open_repository(target) as repo:
        old_id, before = await _load(repo, source, old)
        new_id, after = await _load(repo, source, new)
    return compare(source, old_id, before, new_id, after)


def compare(source: str, old_id: str, before: Manifest, new_id: str, after: Manifest) -> SnapshotDiff:
    """The diff of two manifests of one source (see :class:`SnapshotDiff`)."""
    a: dict[str, FileEntry] = {f.path: f for f in before.files}
    b: dict[str, FileEntry] = {f.path: f for f in after.files}
    sets_a, sets_b = set_of(before), set_of(after)
    changes: list[Change] = []
    unchanged = Tally()
    for path in sorted(a.keys() | b.keys()):
        old_f, new_f = a.get(path), b.get(path)
        if old_f is None:
            assert new_f is not None
            changes.append(Change(path, "added", new_f.size, set=sets_b[path]))
        elif new_f is None:
            changes.append(Change(path, "removed", old_f.size, set=sets_a[path]))
        elif old_f.digest != new_f.digest:
            changes.append(Change(path, "changed", new_f.size, old_f.size, set=sets_b[path]))
        else:
            unchanged.add(new_f.size)
    kind = after.kind
    grouped: list[SetDiff] = []
    if kind == "checkpoint" or before.kind == "checkpoint":
        names_a, names_b = [s.name for s in before.sets], [s.name for s in after.sets]
        by_set: dict[str | None, list[Change]] = {}
        for c in changes:
            by_set.setdefault(c.set, []).append(c)
        for name in [*sorted(set(names_a) | set(names_b)), None]:
            mine = by_set.get(name, [])
            if name is not None and name not in names_b:
                status = "removed"
            elif name is not None and name not in names_a:
                status = "added"
            else:
                status = "changed"
            if mine or status != "changed":
                grouped.append(SetDiff(name, status, mine))
    return SnapshotDiff(source, kind, old_id, new_id, changes, grouped, unchanged)
