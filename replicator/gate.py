"""The consistency gate: which of a source's files may be published now.

For ``kind: checkpoint`` every top-level directory is a *checkpoint set* (``step-000200/``),
published only when complete: its ``complete_when.marker`` file exists and/or nothing in it
was modified for ``complete_when.quiet`` (judged by the newest modification time in the set,
so it works the same for POSIX files and S3 objects). Incomplete sets are held back whole:
no snapshot ever contains part of a set. Files directly at the top level are not part of a
set and pass as they are. Quiet files of incomplete sets may be *prestaged*: their chunks are
uploaded ahead of time, which makes nothing visible (only a manifest does) but means that
publishing a 780 GiB checkpoint after its marker appears sends only what was written last.
Datasets and embeddings pass whole; their debounce is the daemon's.

A set with a path the scan could not examine (an unreadable directory or file) is held back
too: whether it is complete is unknown. Held-back sets that an earlier snapshot holds are
carried forward by replicator.reconcile, so the gate never removes a published set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from replicator.config import SourceConfig
from replicator.format.manifest import SetInfo
from replicator.globs import compile_glob
from replicator.sources.base import SourceFile

SHARED_QUIET = 30.0
"""With ``shared`` instances on separate nodes, a node whose share of a set lacks the marker
declares its part once the set is quiet this long (unless ``complete_when.quiet`` says)."""
PRESTAGE_QUIET_NS = 2_000_000_000
"""A file of an incomplete set untouched for this long is probably finished: prestage it."""


@dataclass
class Selection:
    files: list[SourceFile] = field(default_factory=list)
    sets: list[SetInfo] = field(default_factory=list)
    held_back: dict[str, str] = field(default_factory=dict)
    """Incomplete set name -> why it is held back."""
    present: set[str] = field(default_factory=set)
    """Every set directory that holds anything on the primary, complete or not."""
    prestage: list[SourceFile] = field(default_factory=list)
    """Files of held-back sets that have been quiet for PRESTAGE_QUIET: the daemon uploads
    their chunks early (invisible until the set is published), so that when the marker
    appears only the last files remain to be sent."""
    recheck_at_ns: int | None = None
    """When the selection may change without any new event: a set held back only for its
    quiet period becomes publishable, or a file becomes quiet enough to prestage (the daemon
    sets a timer for it)."""

    def recheck_at(self, due_ns: int) -> None:
        self.recheck_at_ns = due_ns if self.recheck_at_ns is None else min(self.recheck_at_ns, due_ns)


def select(
    cfg: SourceConfig, files: list[SourceFile], now_ns: int, unreadable: Mapping[str, str] | None = None
) -> Selection:
    """``unreadable``: paths the scan could not examine (Listing.unreadable)."""
    if cfg.kind != "checkpoint":
        return Selection(files=list(files))
    rule = cfg.completion
    per_node = cfg.shared is not None and not cfg.shared.split
    marker = compile_glob(rule.marker) if rule.marker else None
    groups: dict[str, list[SourceFile]] = {}
    out = Selection()
    for f in files:
        top, sep, _ = f.path.partition("/")
        if sep:
            groups.setdefault(top, []).append(f)
        else:
            out.files.append(f)
    blind: dict[str, str] = {}
    for path, why in (unreadable or {}).items():
        top = path.partition("/")[0]
        blind.setdefault(top, f"cannot read {path}: {why}")
        groups.setdefault(top, [])
    out.present = set(groups)
    for name, members in sorted(groups.items()):
        if name in blind or not members:
            out.held_back[name] = blind.get(name, "empty")
            continue
        newest = max(f.mtime_ns for f in members)
        reasons = []
        quiet = rule.quiet
        if marker is not None and not any(marker.match(f.path.partition("/")[2]) for f in members):
            if not per_node:
                reasons.append(f"no {rule.marker} marker")
            elif quiet is None:
                # Node-local parts: the marker is on one node only; the others' parts are
                # complete when quiet, and the assembler requires the marker in some part.
                quiet = SHARED_QUIET
        if quiet is not None:
            quiet_for = (now_ns - newest) / 1e9
            if quiet_for < quiet:
                reasons.append(f"modified {max(quiet_for, 0):.1f}s ago (quiet period {quiet:g}s)")
                out.recheck_at(newest + int(quiet * 1e9))
        if reasons:
            out.held_back[name] = ", ".join(reasons)
            for f in members:
                if now_ns - f.mtime_ns >= PRESTAGE_QUIET_NS:
                    out.prestage.append(f)
                else:
                    out.recheck_at(f.mtime_ns + PRESTAGE_QUIET_NS)
            continue
        out.files.extend(members)
        out.sets.append(
            SetInfo(name=name, files=len(members), bytes=sum(f.size for f in members), newest_mtime_ns=newest)
        )
    out.files.sort(key=lambda f: f.path)
    return out
