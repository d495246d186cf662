"""``replicator verify`` over the chosen targets: for each, open its repository, check it
(:mod:`.check`), then, as asked, send again what the check found damaged (:mod:`.repair`) and
drill a restore (:mod:`.drill`). Targets are verified one after another.

With a config, the local state store is opened so that a check that finds chunks lost tells
its presence cache (the next sync sends them again); a daemon holding the store does not stop
a verify, which then only cannot update the cache. The repair and drill modules are imported
only when asked for: the drill's format checks load NumPy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from replicator.config import Config, TargetConfig
from replicator.progress import NoProgress, ProgressSink
from replicator.repository import open_repository
from replicator.state import StateLockedError, StateStore
from replicator.verify.check import VerifyReport, verify_repository

if TYPE_CHECKING:
    from replicator.verify.drill import DrillReport
    from replicator.verify.repair import RepairReport


@dataclass(frozen=True)
class VerifyOptions:
    """What to verify on each target, and what to do besides."""

    sources: Sequence[str] | None = None
    """Only these sources (default: every source in the repository)."""
    snapshot: str | None = None
    """Only this snapshot id or 'latest' (default: every snapshot; the drill takes the latest)."""
    read_data: float | None = None
    """Also re-hash chunks: all (1.0) or a random fraction."""
    repair: bool = False
    """Send again the damaged chunks the sources still hold (needs the config)."""
    restore_drill: bool = False
    scratch: Path | None = None
    """Where the drill restores to, kept afterwards (default: a temporary directory)."""
    load: bool = False
    """The drill also loads every checkpoint with PyTorch (:mod:`.load`)."""


@dataclass
class TargetVerification:
    """What ``verify`` found on one target, and what it did about it."""

    verify: VerifyReport
    repair: RepairReport | None = None
    drill: DrillReport | None = None

    @property
    def verified(self) -> bool:
        """The check passed, or every problem it found was a chunk that was then repaired."""
        if self.verify.ok:
            return True
        fixed = self.repair
        return bool(fixed and fixed.ok and all(p.chunk for p in self.verify.problems))

    @property
    def ok(self) -> bool:
        return self.verified and (self.drill is None or self.drill.ok)

    def to_json(self) -> dict[str, Any]:
        """The verify report, plus "drill" and "repair" when they ran."""
        return {
            **asdict(self.verify),
            **({"drill": self.drill.to_json()} if self.drill is not None else {}),
            **({"repair": asdict(self.repair)} if self.repair is not None else {}),
        }


async def run_verify(
    targets: Sequence[TargetConfig],
    config: Config | None,
    options: VerifyOptions,
    progress: ProgressSink | None = None,
) -> list[TargetVerification]:
    """Verify each of ``targets`` (see module docstring). ``config`` is None for a repository
    opened by URL alone; a repair needs it (it reads the sources)."""
    if options.repair and config is None:
        raise ValueError("a repair reads the sources: it needs the config")
    progress = progress or NoProgress()
    state = None
    if config is not None:
        with contextlib.suppress(StateLockedError):
            state = StateStore.open(config.state_dir)
    try:
        return [await _verify_target(t, config, state, options, progress) for t in targets]
    finally:
        if state is not None:
            state.close()


async def _verify_target(
    target: TargetConfig,
    config: Config | None,
    state: StateStore | None,
    options: VerifyOptions,
    progress: ProgressSink,
) -> TargetVerification:
    async with open_repository(target) as repo:
        found = TargetVerification(
            await verify_repository(
                repo,
                sources=options.sources,
                snapshot=options.snapshot,
                read_data=options.read_data,
                progress=progress,
                state=state,
            )
        )
        if options.repair and found.verify.damaged:
            from replicator.verify.repair import repair_chunks

            assert config is not None
            found.repair = await repair_chunks(repo, config, found.verify.damaged, state)
        if options.restore_drill:
            from replicator.verify.drill import run_drill

            found.drill = await run_drill(
                repo,
                sources=options.sources,
                snapshot=options.snapshot,
                scratch=options.scratch,
                load=options.load,
                progress=progress,
            )
        return found
