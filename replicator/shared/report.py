"""``replicator parts``: what each instance of a shared source has contributed, from any host.

Reads the parts and member objects of a source in a repository (nothing is written) and
applies the assembler's rule to them, so an operator sees per set which instances' parts are
in, which are missing and since when, and per instance when it last said it was alive.
Without the source's config, the number of instances is taken from the parts themselves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from replicator.config import SharedConfig, SourceConfig, TargetConfig
from replicator.errors import ConfigError
from replicator.repository import open_repository
from replicator.shared.assemble import assemble
from replicator.shared.publish import SharedCache, read_parts


@dataclass
class SetReport:
    name: str
    state: str
    """``complete`` (every part is in: published, or about to be) or ``waiting``."""
    have: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    waited: float | None = None
    files: int = 0
    bytes: int = 0


@dataclass
class PartsReport:
    target: str
    source: str
    instances: int
    members: dict[str, float | None] = field(default_factory=dict)
    """Instance -> seconds since its member object was written."""
    silent: list[str] = field(default_factory=list)
    sets: list[SetReport] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


async def parts_report(tcfg: TargetConfig, source: str, scfg: SourceConfig | None) -> PartsReport:
    """ConfigError if the repository holds no part of ``source`` and its config does not say
    it is shared (there is nothing to report)."""
    async with open_repository(tcfg) as repo:
        parts, members, now = await read_parts(repo, source, SharedCache())
    shared = scfg.shared if scfg is not None else None
    if shared is None:
        counts = [p.instances for p, _ in parts] + [m.instances for m, _ in members.values()]
        if not counts:
            raise ConfigError(
                f"no parts of source {source!r} in this repository",
                hint="parts exist only for sources with `shared:` (README, Multi-node checkpoints)",
            )
        shared = SharedConfig(instances=max(counts), instance="report-0")
    marker = scfg.completion.marker if scfg is not None else None
    found = assemble(parts, members, shared, marker, now)
    out = PartsReport(tcfg.name, source, shared.instances, found.members, sorted(found.silent))
    for s in found.sets:
        have = sorted(p.instance for p, _ in parts if p.set.name == s.name)
        out.sets.append(SetReport(s.name, "complete", have=have, files=s.files, bytes=s.bytes))
    for w in found.waiting.values():
        out.sets.append(SetReport(w.name, "waiting", w.have, w.missing, w.reasons, w.age(now)))
    out.sets.sort(key=lambda r: r.name)
    return out
