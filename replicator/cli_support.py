"""What the commands of :mod:`replicator.cli` share at run time: one-line errors and their exit
codes, logging set-up, loading the config, running a coroutine, printing a result.

Imports only typer and light helpers (see :mod:`replicator.cli`); the rest on demand.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

from replicator import render
from replicator.errors import ConfigError, ReplicatorError

if TYPE_CHECKING:
    from replicator.config import Config

T = TypeVar("T")

EXIT_SEVERITY = [0, 4, 3, 1]
"""Exit codes of a pass from least to most severe: the worst outcome wins."""


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"replicator: error: {message}", err=True)
    raise typer.Exit(code)


def run_coroutine(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, turning library errors into a one-line message and exit code."""
    import asyncio

    from replicator.log import loop_exception_handler

    async def main() -> T:
        asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
        return await coro_fn()

    try:
        return asyncio.run(main())
    except ReplicatorError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def setup_logging(level: str | None, config: Config | None = None, default: str = "warning") -> None:
    """--log-level, else the config's log_level, else the command's default (one-shot commands
    stay quiet; the daemon logs at info)."""
    from replicator import log

    chosen = level or (config.log_level if config else None) or default
    if chosen not in ("debug", "info", "warning", "error"):
        fail(f"--log-level must be debug, info, warning or error (got {chosen!r})", 2)
    log.configure(chosen)
    if config is not None:
        log.REDACTOR.add(config.secret_values())


def load(config_path: Path | None, log_level: str | None, default_level: str = "warning") -> Config:
    from replicator.config import load_config

    if config_path is None:
        fail("--config is required (or set REPLICATOR_CONFIG)", 2)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), 2)
    setup_logging(log_level, config, default_level)
    return config


def check_selection(
    config: Config,
    sources: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    *,
    complete: bool = True,
) -> None:
    """A usage error (exit 2) for a config that ``sources`` or ``targets`` (from --source,
    --target) name something it does not hold, or, if ``complete``, that has no source or no
    target (every command that replicates needs both)."""
    if complete and (not config.sources or not config.targets):
        fail("the config needs at least one source and one target", 2)
    try:
        for n in sources or []:
            config.source(n)
        for n in targets or []:
            config.target(n)
    except ConfigError as exc:
        fail(str(exc), 2)


def emit_json(data: Any) -> None:
    typer.echo(render.to_json(data))


def emit(as_json: bool, data: Any, text: Callable[[], Iterable[str]]) -> None:
    """A command's result: ``data`` as JSON with --json, else the lines ``text()`` renders."""
    if as_json:
        emit_json(data)
    else:
        show(text())


def show(lines: Iterable[str], err: bool = False) -> None:
    for line in lines:
        typer.echo(line, err=err)


def read_data_fraction(value: str | None) -> float | None:
    """``--read-data PCT`` as a fraction of 1; None without it."""
    if value is None:
        return None
    try:
        pct = float(value.rstrip("%"))
    except ValueError:
        fail(f"--read-data takes a percentage between 0 and 100 (got {value!r})", 2)
    if not 0 < pct <= 100:
        fail(f"--read-data takes a percentage between 0 and 100 (got {value!r})", 2)
    return pct / 100


def parse_option(option: str | None, value: str, parse: Callable[[str], T]) -> T:
    """``parse(value)``; its ValueError is a usage error (exit 2), prefixed by ``option``."""
    try:
        return parse(value)
    except ValueError as exc:
        fail(f"{option}: {exc}" if option else str(exc), 2)
