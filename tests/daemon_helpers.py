"""Running ``replicator run`` as a subprocess in tests, and reading what it published."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from replicator.config import target_config
from replicator.errors import NotFoundError
from replicator.format.manifest import Manifest
from replicator.repository import Repository
from replicator.targets import open_target

T = TypeVar("T")


class DaemonProcess:
    """``python -m replicator run -c CONFIG`` with its log in a file."""

    def __init__(
        self, config: Path, log: Path, env: dict[str, str] | None = None, *, as_unprivileged: bool = False
    ) -> None:
        """``as_unprivileged``: see :func:`tests.conftest.cli`."""
        self.config, self.log = config, log
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in stop()
        prefix = (
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
            if as_unprivileged and os.geteuid() == 0
            else []
        )
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "replicator", "run", "-c", str(config)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log_file.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log_file.close()
        return code

    def ready(self) -> bool:
        return "daemon.ready" in self.log_text()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def crashes(self) -> list[str]:
        """The log lines of tasks that crashed (``daemon.task_failed``, tracebacks): each names
        the task and carries its traceback, so a failing assertion shows why."""
        return [line for line in self.log_text().splitlines() if "task_failed" in line or "Traceback" in line]


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def latest_manifest(target: dict[str, Any], source: str) -> Manifest | None:
    """The manifest the source's ref points at on a target, or None (no repository or ref yet)."""

    async def go() -> Manifest | None:
        t = await open_target(target_config({**target, "retry": {"give_up_after": 1}}))
        try:
            try:
                repo = await Repository.open(t)
            except Exception:
                return None
            sid = await repo.latest(source)
            return None if sid is None else await repo.load_manifest(source, sid)
        finally:
            await t.close()

    return asyncio.run(go())


def all_manifests(target: dict[str, Any], source: str) -> list[Manifest]:
    """The source's manifests, oldest first; one a running daemon's retention deletes between
    the listing and its read is left out (a CI run read one that was just forgotten)."""

    async def go() -> list[Manifest]:
        t = await open_target(target_config(target))
        try:
            repo = await Repository.open(t)
            out = []
            for sid in await repo.list_snapshots(source):
                with contextlib.suppress(NotFoundError):
                    out.append(await repo.load_manifest(source, sid))
            return out
        finally:
            await t.close()

    return asyncio.run(go())


def file_count(target: dict[str, Any], source: str) -> int:
    m = latest_manifest(target, source)
    return len(m.files) if m is not None else 0


def set_names(m: Manifest | None) -> list[str]:
    return [s.name for s in m.sets] if m is not None else []
