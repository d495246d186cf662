"""Progress reporting for long work: a tiny protocol the library calls, and a rich bar for TTYs."""

from __future__ import annotations

import sys
from typing import Any, Protocol


class ProgressSink(Protocol):
    def begin(self, label: str, total: int | None) -> None:
        """Start a stage of ``total`` units (bytes); None: not known in advance (a listing)."""

    def advance(self, n: int) -> None: ...
    def end(self) -> None: ...


class NoProgress:
    def begin(self, label: str, total: int | None) -> None:
        return None

    def advance(self, n: int) -> None:
        return None

    def end(self) -> None:
        return None


def speed_text(bytes_per_second: float | None) -> str:
    """A progress bar's rate in IEC units, as every other rate replicator prints (rich's
    TransferSpeedColumn says MB/s)."""
    from replicator.units import format_size

    return "?" if bytes_per_second is None else f"{format_size(bytes_per_second)}/s"


def _speed_column() -> Any:
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(speed_text(task.finished_speed or task.speed), style="progress.data.speed")

    return SpeedColumn()


class BarProgress:
    """A byte-count progress bar on stderr."""

    def __init__(self) -> None:
        from rich.console import Console  # imported on demand: only terminals get bars
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            _speed_column(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task: Any = None

    def begin(self, label: str, total: int | None) -> None:
        self.end()
        self._bar.start()
        self._task = self._bar.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, n)

    def end(self) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
            self._bar.stop()
            self._task = None


def make_progress(quiet: bool) -> ProgressSink:
    """A bar when stderr is a terminal and not ``--quiet``; silence otherwise."""
    return BarProgress() if not quiet and sys.stderr.isatty() else NoProgress()
