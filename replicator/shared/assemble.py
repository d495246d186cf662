"""Assembly: which checkpoint sets the instances' parts complete (docs/FORMAT.md §11.3).

Pure: parts and member objects in (as read from the repository, with the store's modification
time of each), sets out. A set is complete when

* a part from each of the ``instances`` instances is in, all written with that same count
  (and, splitting a directory, each instance's number appears once);
* no path is in two parts with different contents;
* if the source has a completion ``marker``, some part holds it;
* every file a self-describing file names (a part's ``needs``) is in some part, at least as
  long as it says.

Anything else is *waiting*, with the reasons, the instances in and missing, and since when.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from replicator.config import SharedConfig
from replicator.format.manifest import FileEntry, PackedAt, SetInfo
from replicator.format.parts import Member, Part
from replicator.globs import compile_glob

SILENT_HEARTBEATS = 3
"""A member object older than this many heartbeats means its instance is not running."""


@dataclass
class Waiting:
    """A set some parts are in for, but not yet complete."""

    name: str
    reasons: list[str]
    have: list[str]
    """Instances whose part is in."""
    missing: list[str]
    """Instances known (by their member objects) whose part is not in."""
    since: float | None
    """Store time the first part of it was written (Unix seconds)."""

    def age(self, now: float | None) -> float | None:
        return None if now is None or self.since is None else max(0.0, now - self.since)

    def describe(self, now: float | None) -> str:
        age = self.age(now)
        waited = f" for {age:.0f}s" if age is not None else ""
        return f"{self.name}: waiting{waited}: {'; '.join(self.reasons)}"


@dataclass
class Assembly:
    sets: list[SetInfo] = field(default_factory=list)
    files: list[FileEntry] = field(default_factory=list)
    packed: dict[str, PackedAt] = field(default_factory=dict)
    waiting: dict[str, Waiting] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)
    """Sets some instance sees on its primary (complete or not)."""
    held: dict[str, str] = field(default_factory=dict)
    """Sets an instance holds its part of back, and why."""
    silent: dict[str, float] = field(default_factory=dict)
    """Instances whose member object is older than SILENT_HEARTBEATS heartbeats: age (s)."""
    members: dict[str, float | None] = field(default_factory=dict)
    """Every instance with a member object -> its age (s)."""


Stamped = tuple[Part, float | None]


def assemble(
    parts: Sequence[Stamped],
    members: Mapping[str, tuple[Member, float | None]],
    cfg: SharedConfig,
    marker: str | None,
    now: float | None,
) -> Assembly:
    """``now``: the store's time (a fresh object's modification time), for ages."""
    out = Assembly()
    _members(out, members, cfg, now)
    by_set: dict[str, dict[str, Stamped]] = {}
    stale: dict[str, int] = {}
    for part, mtime in parts:
        if part.instances != cfg.instances or (cfg.split and (part.index or 0) >= cfg.instances):
            # Written before the number of instances changed (or by a misconfigured one): a
            # re-split rewrites the parts that count; these never complete a set.
            stale[part.set.name] = stale.get(part.set.name, 0) + 1
            continue
        by_set.setdefault(part.set.name, {})[part.instance] = (part, mtime)
    match = compile_glob(marker) if marker else None
    for name in sorted(stale.keys() - by_set.keys()):
        out.waiting[name] = Waiting(name, [_stale(stale[name], cfg)], [], sorted(members), None)
    for name, got in sorted(by_set.items()):
        reasons = _check(got, cfg, match, marker)
        if reasons and name in stale:
            reasons.append(_stale(stale[name], cfg))
        if reasons:
            times = [m for _, m in got.values() if m is not None]
            out.waiting[name] = Waiting(
                name,
                reasons,
                sorted(got),
                sorted(i for i in members if i not in got),
                min(times) if times else None,
            )
            continue
        _take(out, name, [p for p, _ in got.values()])
    out.files.sort(key=lambda f: f.path)
    return out


def _members(
    out: Assembly, members: Mapping[str, tuple[Member, float | None]], cfg: SharedConfig, now: float | None
) -> None:
    for instance, (member, mtime) in members.items():
        age = None if now is None or mtime is None else max(0.0, now - mtime)
        out.members[instance] = age
        if age is not None and age > SILENT_HEARTBEATS * cfg.heartbeat:
            out.silent[instance] = age
        for s in member.sets:
            out.present.add(s.name)
            if not s.declared and s.reason:
                out.held.setdefault(s.name, f"{instance}: {s.reason}")


def _check(got: Mapping[str, Stamped], cfg: SharedConfig, match: object, marker: str | None) -> list[str]:
    reasons: list[str] = []
    parts = [p for p, _ in got.values()]
    if len(got) < cfg.instances:
        reasons.append(f"{len(got)} of {cfg.instances} instances' parts are in")
    if cfg.split:
        indexes = [p.index for p in parts]
        if None in indexes or len(set(indexes)) != len(indexes):
            reasons.append("two parts claim the same share of the split (or none)")
    files: dict[str, tuple[str, FileEntry]] = {}
    for p in parts:
        for f in p.files:
            seen = files.setdefault(f.path, (p.instance, f))
            if seen[1].digest != f.digest:
                reasons.append(f"{f.path} differs between {seen[0]} and {p.instance}")
    if marker is not None and not any(
        match.match(path.partition("/")[2])  # type: ignore[attr-defined]
        for path in files
    ):
        reasons.append(f"no part holds the {marker} marker")
    for p in parts:
        for path, size in sorted(p.needs.items()):
            have = files.get(path)
            if have is None:
                reasons.append(f"{p.instance}'s description names {path}, which no part holds")
            elif have[1].size < size:
                reasons.append(f"{path} is {have[1].size} bytes in {have[0]}'s part; needs {size}")
    return reasons


def _stale(n: int, cfg: SharedConfig) -> str:
    return f"{n} part(s) written for another number of instances than {cfg.instances} (ignored)"


def _take(out: Assembly, name: str, parts: list[Part]) -> None:
    files: dict[str, FileEntry] = {}
    for p in parts:
        for f in p.files:
            files.setdefault(f.path, f)
            for cid, _ in f.chunks:
                if cid in p.packed:
                    out.packed.setdefault(cid, p.packed[cid])
    out.files.extend(files.values())
    out.sets.append(
        SetInfo(
            name=name,
            files=len(files),
            bytes=sum(f.size for f in files.values()),
            newest_mtime_ns=max((p.set.newest_mtime_ns for p in parts), default=0),
        )
    )
