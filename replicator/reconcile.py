"""Reconciling a candidate with a target's latest snapshot: a replica only ever gets better.

A target's latest snapshot is what a failover would restore. Before a candidate replaces it,
the candidate's manifest is compared with that snapshot (the target's own, so chunk ids and
pack locations are the target's):

* **Checkpoint sets are atomic in both directions.** A set of the previous snapshot is
  - replaced by the candidate's version when that version still holds every file the
    previous one did (a set that was rewritten or grew publishes as usual);
  - *carried forward* unchanged while its directory is still on the primary but the
    candidate has no complete version of it (held back by the consistency gate, or a file
    in it unreadable or changing), or the candidate's version lacks files the previous one
    had: the set is *damaged on the primary* (a cleanup script, a wiped volume, ``rm -r`` in
    progress), reported, and never published half-deleted;
  - removed, as a unit, once nothing of its directory is left on the primary.
* **Other files** (datasets, embeddings, files at the top of a checkpoint source) follow
  the primary file by file, except that a path the scan or the read could not examine this
  time (an unreadable directory or file, a file that kept changing) is carried forward from
  the previous snapshot: a file that cannot be read is not a deleted file (restic likewise
  reports "snapshot created, some files unreadable" rather than dropping them).
* **Mass deletions are held.** The share of the previous snapshot's files and bytes that
  the new one drops is reported; above the source's ``max_delete`` the publish waits for an
  operator (cf. rclone's ``--max-delete``): a wiped primary must not propagate.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from replicator.format.manifest import FileEntry, Manifest, PackedAt, SetInfo


def set_name(path: str) -> str | None:
    """The checkpoint set (top-level directory) a path belongs to, or None at the top level."""
    top, sep, _ = path.partition("/")
    return top if sep else None


@dataclass
class Reconciled:
    manifest: Manifest
    carried: dict[str, str] = field(default_factory=dict)
    """Set name or file path -> why it was carried forward from the previous snapshot."""
    damaged: dict[str, str] = field(default_factory=dict)
    """Set name -> what the primary lost of it (the set is among ``carried``)."""
    removed_files: int = 0
    removed_bytes: int = 0
    previous_files: int = 0
    previous_bytes: int = 0

    @property
    def deletion_share(self) -> float:
        """The larger of the shares of the previous snapshot's files and bytes dropped."""
        shares = [0.0]
        if self.previous_files:
            shares.append(self.removed_files / self.previous_files)
        if self.previous_bytes:
            shares.append(self.removed_bytes / self.previous_bytes)
        return max(shares)

    def deletion_summary(self) -> str:
        return (
            f"{self.removed_files} of {self.previous_files} files "
            f"({self.removed_bytes} of {self.previous_bytes} bytes, {self.deletion_share:.0%})"
        )


def _under(path: str, prefixes: Collection[str]) -> str | None:
    """The entry of ``prefixes`` that is ``path`` or one of its ancestor directories."""
    if path in prefixes:
        return path
    i = path.rfind("/")
    while i > 0:
        if path[:i] in prefixes:
            return path[:i]
        i = path.rfind("/", 0, i)
    return None


def reconcile(
    new: Manifest,
    previous: Manifest | None,
    *,
    present_sets: Collection[str] = (),
    held_back: Mapping[str, str] | None = None,
    unknown: Mapping[str, str] | None = None,
) -> Reconciled:
    """The manifest to publish in place of ``previous`` (see the module docstring).

    ``present_sets``: checkpoint set directories that hold anything on the primary now, complete
    or not; ``held_back``: why the gate held a set back; ``unknown``: paths (files or
    directories) that could not be examined this time, with why."""
    if previous is None:
        return Reconciled(new)
    result = Reconciled(new)
    files: dict[str, FileEntry] = {f.path: f for f in new.files}
    sets: dict[str, SetInfo] = {s.name: s for s in new.sets}
    carried = _carry_sets(previous, files, sets, present_sets, held_back or {}, result)
    carried += _carry_unknown(previous, files, unknown or {}, result)
    for f in carried:
        files[f.path] = f
    for f in previous.files:
        if f.path not in files:
            result.removed_files += 1
            result.removed_bytes += f.size
    result.previous_files = len(previous.files)
    result.previous_bytes = previous.total_bytes
    if carried:
        packed = dict(new.packed)
        for f in carried:
            for cid, _ in f.chunks:
                at: PackedAt | None = previous.packed.get(cid)
                if at is not None:
                    packed.setdefault(cid, at)
        result.manifest = Manifest.model_construct(
            **{
                **dict(new),
                "files": tuple(files[p] for p in sorted(files)),
                "sets": tuple(sets[n] for n in sorted(sets)),
                "packed": packed,
            }
        ).check_tree()
    return result


def _carry_sets(
    previous: Manifest,
    files: dict[str, FileEntry],
    sets: dict[str, SetInfo],
    present_sets: Collection[str],
    held_back: Mapping[str, str],
    result: Reconciled,
) -> list[FileEntry]:
    """Carry forward the sets of ``previous`` the new manifest must not replace (module
    docstring): their candidate files are taken out of ``files``, their SetInfo put back in
    ``sets``; returns their file entries, to add back."""
    previous_sets = {s.name: s for s in previous.sets}
    if not previous_sets:
        return []
    members: dict[str, list[FileEntry]] = {name: [] for name in previous_sets}
    for f in previous.files:
        name = set_name(f.path)
        if name is not None and name in members:
            members[name].append(f)
    now_members: dict[str, set[str]] = {}
    for path in files:
        name = set_name(path)
        if name is not None and name in previous_sets:
            now_members.setdefault(name, set()).add(path)
    carried: list[FileEntry] = []
    for name, info in previous_sets.items():
        old = members[name]
        if name in sets:
            missing = [f.path for f in old if f.path not in now_members.get(name, ())]
            if not missing:
                continue  # the candidate's version supersedes it
            why = f"{len(missing)} of {len(old)} files missing on the primary (e.g. {missing[0]!r})"
            result.damaged[name] = why
        elif name in present_sets:
            why = held_back.get(name, "incomplete on the primary")
        else:
            continue  # nothing of it is left on the primary: removed as a unit
        for path in now_members.get(name, ()):
            del files[path]
        carried += old
        sets[name] = info
        result.carried[name] = why
    return carried


def _carry_unknown(
    previous: Manifest, files: dict[str, FileEntry], unknown: Mapping[str, str], result: Reconciled
) -> list[FileEntry]:
    """The files of ``previous`` outside its sets that the candidate lacks because they
    could not be examined this time: carried forward, not deleted."""
    if not unknown:
        return []
    in_sets = {s.name for s in previous.sets}
    carried = []
    for f in previous.files:
        if f.path in files or set_name(f.path) in in_sets:
            continue
        where = _under(f.path, unknown)
        if where is not None:
            carried.append(f)
            result.carried[f.path] = unknown[where]
    return carried


def describe(items: Iterable[tuple[str, str]], limit: int = 3) -> str:
    """``a (why), b (why) and N more`` for log lines and CLI output."""
    pairs = list(items)
    text = ", ".join(f"{name} ({why})" for name, why in pairs[:limit])
    return text + (f" and {len(pairs) - limit} more" if len(pairs) > limit else "")
