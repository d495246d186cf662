"""Change detection for the daemon: what may have changed in a source since the last look.

* POSIX sources, ``watch: events`` (default): inotify events via watchfiles, grouped over
  ``step`` (50 ms) of silence. Event paths are reported relative to the source root.
* POSIX sources, ``watch: poll``: for mounts where inotify is blind (NFS, most network
  filesystems): watchfiles' polling observer, every ``poll_interval``.
* S3 sources: a full listing every ``poll_interval``, diffed against the index.

Events are hints, never the truth: the daemon re-stats every reported path, and a full
rescan every ``rescan_interval`` (default 10 min) repairs anything dropped (inotify queue
overflow, events during a restart). A watcher that fails asks for a full rescan and is
restarted after a pause. watchfiles (1.x) cannot report a name that is not valid UTF-8: its
watcher fails on the first such event (issue 17); that is treated the same way, with a
short pause, so such a name costs a rescan, never the daemon.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from replicator.log import get_logger

log = get_logger(__name__)

ChangeCallback = Callable[[set[str] | None], None]
"""Called with relative paths that may have changed, or None for "rescan everything"."""


async def watch_posix(
    root: Path, on_change: ChangeCallback, stop: asyncio.Event, *, poll: bool, poll_interval: float
) -> None:
    """Report changes below ``root`` until ``stop`` is set."""
    from watchfiles import awatch  # imported here: its Rust extension is only needed by the daemon

    prefix = str(root).rstrip(os.sep) + os.sep
    while not stop.is_set():
        pause = 10.0
        try:
            async for changes in awatch(
                root,
                watch_filter=None,
                debounce=500,
                step=50,
                stop_event=stop,
                rust_timeout=1000,
                force_polling=poll,
                poll_delay_ms=int(poll_interval * 1000),
                recursive=True,
                ignore_permission_denied=True,
            ):
                paths = {p[len(prefix) :].replace(os.sep, "/") for _, p in changes if p.startswith(prefix)}
                on_change(paths if paths else None)
        except (OSError, RuntimeError, ExceptionGroup) as exc:
            # The root vanished (unmounted?) or the watcher died: fall back to rescans, retry later.
            # watchfiles runs its watcher in an anyio task group, which wraps its errors.
            error = _watcher_error(exc)
            if "decode path" in str(error):  # a name that is not UTF-8: nothing else is wrong
                pause = 0.5
            log.warning("watch.failed", root=str(root), error=str(error))
            on_change(None)
            try:
                await asyncio.wait_for(stop.wait(), pause)
            except TimeoutError:
                continue


def _watcher_error(exc: BaseException) -> BaseException:
    """The error inside (possibly nested) groups, if they hold only OSError or RuntimeError;
    anything else is re-raised as it came."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    matched, rest = exc.split((OSError, RuntimeError))
    if rest is not None or matched is None:
        raise exc
    inner: BaseException = matched
    while isinstance(inner, BaseExceptionGroup):
        inner = inner.exceptions[0]
    return inner
