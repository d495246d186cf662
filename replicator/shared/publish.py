"""Publishing a shared source on one target: contribute parts, then (the assembler) assemble.

Every instance, once its candidate's chunks are durable on the target, writes a part for
each checkpoint set it declared complete and keeps its member object alive, inside the
garbage collector's publish window like a manifest (parts are roots of the mark, FORMAT
§10/§11). The assembler then lists ``parts/<source>/``, assembles the sets every instance's
part completes (:mod:`replicator.shared.assemble`), and publishes them with the files outside
sets from its own candidate, through the same reconcile, deletion guard, write and retention
as a single instance. Sets still waiting are reported with who is missing and since when;
while any waits, the outcome is ``waiting`` so that the daemon keeps measuring the lag.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from replicator import metrics
from replicator.config import SharedConfig, SourceConfig
from replicator.errors import NotFoundError, RepositoryError, SourceError
from replicator.format.manifest import Manifest, PackedAt, SetInfo, format_time, now_utc
from replicator.format.parts import (
    Member,
    MemberSet,
    Part,
    encode,
    member_key,
    parse_key,
    parse_member,
    parse_part,
    part_key,
)
from replicator.hashing import HashSpec
from replicator.log import get_logger
from replicator.paths import display_path
from replicator.read.chunking import fill
from replicator.reconcile import set_name
from replicator.shared.assemble import Assembly, assemble
from replicator.shared.describe import MAX_DESCRIPTION, describes, needs

if TYPE_CHECKING:
    from replicator.engine import Candidate, OpenTarget, Replicator, TargetResult
    from replicator.repository import Repository

log = get_logger(__name__)


@dataclass
class SharedCache:
    """What one process knows of a shared source on one target (per OpenTarget)."""

    written: dict[str, str] | None = None
    """Own part key -> digest of what was written (None: not listed yet)."""
    member_digest: str = ""
    member_at: float = float("-inf")
    """When the member object was last written (monotonic)."""
    read: dict[str, tuple[int, float | None, Part | Member | None]] = field(default_factory=dict)
    """Key -> (size, mtime, parsed) of the parts and members read, to read only what changed."""
    reported: dict[str, str] = field(default_factory=dict)
    """Set -> the waiting message last logged (log on change only)."""
    overdue: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)


def _digest(doc: Part | Member) -> str:
    return HashSpec("blake3").digest(doc.model_dump_json(exclude={"created"}).encode()).hex()


async def publish_shared(
    rep: Replicator,
    t: OpenTarget,
    cfg: SourceConfig,
    candidate: Candidate,
    stored: Mapping[str, PackedAt | None],
    allow_deletes: bool,
) -> TargetResult | None:
    """Contribute, and assemble if this instance is the assembler. None: a collector deleted
    chunks of ours meanwhile; the caller makes them durable again and calls again."""
    from replicator.engine import TargetResult, object_keys

    shared = cfg.shared
    assert shared is not None
    cache = t.shared.setdefault(cfg.name, SharedCache())
    packed = {c: at for c, at in stored.items() if at is not None}
    own = candidate.manifest(t.repo.hash, packed)
    parts = await _parts(rep, cfg, shared, candidate, own, t.repo.config.id)
    member = _member(cfg, shared, candidate, own, t.repo.config.id)
    await t.repo.upgrade_for_parts()
    await t.repo.check_unchanged()
    async with t.uploader.window() as window:
        if window.lost(object_keys(stored)):
            return None
        window.check()
        changed = await _write_own(t, cfg, shared, cache, parts, member)
    if not shared.is_assembler:
        # Every heartbeat publishes again: only a change is worth an info line.
        (log.info if changed else log.debug)(
            "parts.contributed", source=cfg.name, target=t.config.name, sets=len(parts), changed=changed
        )
        return TargetResult(t.config.name, "contributed")
    return await _assemble_and_publish(rep, t, cfg, shared, cache, candidate, own, allow_deletes)


# -- contributing ----------------------------------------------------------------------------


async def _parts(
    rep: Replicator, cfg: SourceConfig, shared: SharedConfig, candidate: Candidate, own: Manifest, rep_id: str
) -> list[Part]:
    by_set: dict[str, list[int]] = {}
    for i, f in enumerate(own.files):
        name = set_name(f.path)
        if name is not None:
            by_set.setdefault(name, []).append(i)
    out = []
    for info in candidate.sets:
        files = tuple(own.files[i] for i in by_set.get(info.name, []))
        chunks = {c for f in files for c, _ in f.chunks}
        wanted: dict[str, int] = {}
        for f in files:
            if describes(f.path):
                wanted.update(await _needs(rep, cfg, f.path))
        out.append(
            Part(
                repository=rep_id,
                source=cfg.name,
                instance=shared.instance,
                instances=shared.instances,
                index=shared.index if shared.split else None,
                created=candidate.created,
                set=SetInfo(
                    name=info.name,
                    files=len(files),
                    bytes=sum(f.size for f in files),
                    newest_mtime_ns=max((f.mtime_ns for f in files), default=info.newest_mtime_ns),
                ),
                files=files,
                packed={c: at for c, at in own.packed.items() if c in chunks},
                needs=wanted,
            )
        )
    return out


async def _needs(rep: Replicator, cfg: SourceConfig, path: str) -> dict[str, int]:
    """What a describing file in our own source names. A file that does not parse (torn, or
    not what its name says) names nothing it can be checked by: it is logged, and the set
    then rests on the other rules (every instance's part, the marker)."""
    source = rep.source(cfg)
    try:
        found = await source.stat(path)
        if found is None or found.size > MAX_DESCRIPTION:
            return {}

        def read() -> bytes:
            handle = source.open(found)
            try:
                buf = bytearray(found.size)
                got = fill(handle, memoryview(buf))
                source.confirm(found, handle)
                return bytes(buf[:got])
            finally:
                handle.close()

        data = await asyncio.to_thread(read)
    except (SourceError, OSError) as exc:
        log.warning("parts.description_unreadable", source=cfg.name, path=display_path(path), error=str(exc))
        return {}
    from replicator.verify.formats import FormatProblem  # numpy, only where a description is

    try:
        return needs(path, data)
    except FormatProblem as exc:
        log.warning("parts.description_unreadable", source=cfg.name, path=display_path(path), error=str(exc))
        return {}


def _member(
    cfg: SourceConfig, shared: SharedConfig, candidate: Candidate, own: Manifest, rep_id: str
) -> Member:
    counts: dict[str, tuple[int, int, int]] = {}
    for f in own.files:
        name = set_name(f.path)
        if name is not None:
            n, size, newest = counts.get(name, (0, 0, 0))
            counts[name] = (n + 1, size + f.size, max(newest, f.mtime_ns))
    held = dict(candidate.held_back)
    declared = {s.name for s in candidate.sets}
    sets = []
    for name in sorted(candidate.present_sets):
        n, size, newest = counts.get(name, (0, 0, 0))
        sets.append(
            MemberSet(
                name=name,
                files=n,
                bytes=size,
                newest_mtime_ns=newest,
                declared=name in declared,
                reason=None if name in declared else held.get(name, "held back"),
            )
        )
    return Member(
        repository=rep_id,
        source=cfg.name,
        instance=shared.instance,
        instances=shared.instances,
        index=shared.index if shared.split else None,
        created=candidate.created,
        sets=tuple(sets),
    )


async def _write_own(
    t: OpenTarget,
    cfg: SourceConfig,
    shared: SharedConfig,
    cache: SharedCache,
    parts: list[Part],
    member: Member,
) -> bool:
    """Write what changed of our parts, delete our parts of sets no longer declared, and keep
    the member object alive. Whether any part was written or deleted."""
    target = t.repo.target
    if cache.written is None:
        cache.written = {}
        async for info in target.list(f"parts/{cfg.name}/{shared.instance}/"):
            parsed = parse_key(info.key)
            if parsed is not None and not parsed[2]:
                cache.written[info.key] = ""
    keep, changed = set(), False
    for part in parts:
        key, digest = part_key(cfg.name, shared.instance, part.set.name), _digest(part)
        keep.add(key)
        if cache.written.get(key) != digest:
            await target.put(key, encode(part))
            cache.written[key], changed = digest, True
    for key in [k for k in cache.written if k not in keep]:
        await target.delete(key)
        del cache.written[key]
        changed = True
    digest = _digest(member)
    if digest != cache.member_digest or time.monotonic() - cache.member_at >= shared.heartbeat:
        await target.put(member_key(cfg.name, shared.instance), encode(member))
        cache.member_digest, cache.member_at = digest, time.monotonic()
    await target.flush()
    return changed


# -- assembling ------------------------------------------------------------------------------


async def read_parts(
    repo: Repository, source: str, cache: SharedCache
) -> tuple[list[tuple[Part, float | None]], dict[str, tuple[Member, float | None]], float | None]:
    """Every part and member object of ``source`` in ``repo`` (one listing; only new or changed
    objects are read), and the store's time now (the newest modification time listed)."""
    target = repo.target
    parts: list[tuple[Part, float | None]] = []
    members: dict[str, tuple[Member, float | None]] = {}
    now: float | None = None
    seen = set()
    async for info in target.list(f"parts/{source}/"):
        parsed = parse_key(info.key)
        if parsed is None:
            continue
        seen.add(info.key)
        if info.mtime is not None:
            now = info.mtime if now is None else max(now, info.mtime)
        known = cache.read.get(info.key)
        if known is None or known[:2] != (info.size, info.mtime):
            known = (info.size, info.mtime, await _read_one(repo, info.key, parsed[2]))
            cache.read[info.key] = known
        doc = known[2]
        if isinstance(doc, Part) and doc.source == source and doc.instance == parsed[1]:
            parts.append((doc, info.mtime))
        elif isinstance(doc, Member) and doc.source == source and doc.instance == parsed[1]:
            members[doc.instance] = (doc, info.mtime)
    for key in [k for k in cache.read if k not in seen]:
        del cache.read[key]
    return parts, members, now


async def _read_one(repo: Repository, key: str, is_member: bool) -> Part | Member | None:
    """Parts are untrusted input: one that cannot be read or parsed counts as absent (its set
    waits for it), and is logged."""
    try:
        raw = await repo.target.get(key)
        return parse_member(raw, where=key) if is_member else parse_part(raw, where=key)
    except NotFoundError:
        return None
    except RepositoryError as exc:
        log.warning("parts.unreadable", target=repo.target.name, key=key, error=str(exc))
        return None


async def _assemble_and_publish(
    rep: Replicator,
    t: OpenTarget,
    cfg: SourceConfig,
    shared: SharedConfig,
    cache: SharedCache,
    candidate: Candidate,
    own: Manifest,
    allow_deletes: bool,
) -> TargetResult | None:
    parts, members, now = await read_parts(t.repo, cfg.name, cache)
    assembly = assemble(parts, members, shared, cfg.completion.marker, now, t.repo.config.id)
    _report(t, cfg, shared, cache, assembly, now)
    root = [f for f in own.files if set_name(f.path) is None]
    files = sorted([*root, *assembly.files], key=lambda f: f.path)
    used = {c for f in files for c, _ in f.chunks}
    packed = {c: at for c, at in {**assembly.packed, **own.packed}.items() if c in used}
    manifest = Manifest.model_construct(
        source=cfg.name, kind=cfg.kind, created=format_time(now_utc()), files=tuple(files),
        sets=tuple(assembly.sets), packed=packed,
    ).check_tree()  # fmt: skip
    waiting = {name: w.describe(now) for name, w in assembly.waiting.items()}
    held = {**dict(candidate.held_back), **assembly.held, **waiting}
    present = set(candidate.present_sets) | assembly.present | set(assembly.waiting)
    result = await rep.publish_manifest(
        t, cfg, manifest, present=present, held_back=held, unknown=dict(candidate.unknown),
        allow_deletes=allow_deletes,
    )  # fmt: skip
    if result is not None and result.status in ("published", "unchanged", "empty") and assembly.waiting:
        result.status = "waiting"
        result.error = "; ".join(list(waiting.values())[:3])
    return result


def _report(
    t: OpenTarget,
    cfg: SourceConfig,
    shared: SharedConfig,
    cache: SharedCache,
    assembly: Assembly,
    now: float | None,
) -> None:
    """Log waiting sets when what they wait for changes, overdue ones once; set the gauges."""
    target = t.config.name
    for name, w in assembly.waiting.items():
        message = "; ".join(w.reasons)
        if cache.reported.get(name) != message:
            cache.reported[name] = message
            log.info("set.waiting_for_parts", source=cfg.name, target=target, set=name,
                     have=w.have, missing=w.missing, reasons=w.reasons)  # fmt: skip
        age = w.age(now)
        if age is not None and age > shared.deadline and name not in cache.overdue:
            cache.overdue.add(name)
            log.error("set.parts_overdue", source=cfg.name, target=target, set=name, seconds=round(age),
                      have=w.have, missing=w.missing, reasons=w.reasons)  # fmt: skip
    for name in [n for n in cache.reported if n not in assembly.waiting]:
        del cache.reported[name]
        cache.overdue.discard(name)
    for instance, age in assembly.silent.items():
        if instance not in cache.silent:
            log.warning(
                "parts.instance_silent", source=cfg.name, target=target, instance=instance,
                seconds=round(age), hint="its node or daemon is down: sets wait for its parts",
            )  # fmt: skip
    for instance in cache.silent - assembly.silent.keys():
        log.info("parts.instance_back", source=cfg.name, target=target, instance=instance)
    cache.silent = set(assembly.silent)
    oldest = max((w.age(now) or 0.0 for w in assembly.waiting.values()), default=0.0)
    metrics.SETS_WAITING.labels(cfg.name, target).set(len(assembly.waiting))
    metrics.SET_WAIT_SECONDS.labels(cfg.name, target).set(oldest)
    metrics.SETS_OVERDUE.labels(cfg.name, target).set(
        sum(1 for w in assembly.waiting.values() if (w.age(now) or 0.0) > shared.deadline)
    )
    metrics.INSTANCES_SILENT.labels(cfg.name, target).set(len(assembly.silent))
