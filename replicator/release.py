"""Releasing a publish held by the mass-deletion guard (replicator.reconcile): an operator's
word that the deletions on the primary are intended.

``replicator release -c FILE -s SOURCE`` leaves a note in the state directory and sends SIGHUP
to the daemon that holds that directory; the daemon takes the note on SIGHUP
(:meth:`replicator.daemon.Daemon.take_releases`) and every target then publishes the held
snapshot once, deletions included. With no daemon running, ``replicator sync --allow-deletes``
does the same in one pass. A note is a plain file, so a release needs no network endpoint:
whoever may run commands beside the daemon (and signal it) may release it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from replicator.errors import ReplicatorError
from replicator.state import holder_pid


def _note(state_dir: Path, source: str) -> Path:
    return state_dir / f"release-{source}"


def request(state_dir: Path, source: str) -> int:
    """Leave the note and signal the running daemon; return its pid. Raises ReplicatorError
    (and leaves no note) when no daemon is running on ``state_dir``."""
    pid = holder_pid(state_dir)
    if pid is None:
        raise ReplicatorError(
            f"no replicator daemon is running on state_dir {state_dir}",
            hint=f"run `replicator sync -s {source} --allow-deletes` to publish the deletions once",
        )
    _note(state_dir, source).write_text(f"{time.time()}\n")
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        _note(state_dir, source).unlink(missing_ok=True)
        raise ReplicatorError(f"cannot signal the daemon (pid {pid}): {exc.strerror}") from None
    return pid


def take(state_dir: Path, sources: Iterable[str]) -> list[str]:
    """The sources released since the last call (their notes are consumed)."""
    released = []
    for source in sources:
        note = _note(state_dir, source)
        with contextlib.suppress(FileNotFoundError):
            note.unlink()
            released.append(source)
    return released
