"""What the commands of :mod:`replicator.cli` share at run time: one-line errors and their exit
codes, logging set-up, loading the config, running a coroutine, printing a result.

Imports only typer and light helpers (see :mod:`replicator.cli`); the rest on demand.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

from replicator.cli import render
from replicator.errors import ConfigError, ReplicatorError

if TYPE_CHECKING:
    from replicator.config import Config

T = TypeVar("T")

EXIT_SEVERITY = [0, 4, 3, 1]
"""Exit codes of a pass from least to most severe: the worst outcome wins."""


EXIT_CODES = {
    0: "success",
    1: "the operation failed or found problems",
    2: "usage or configuration error",
    3: "a target (or source) could not be reached",
    4: "sync published, but some files could not be read",
    130: "interrupted (Ctrl-C, SIGINT)",
}
"""Every exit code of every command (documented in README.md; tests/test_failures.py holds
each command to them)."""


def error_line(message: str, code: int, as_json: bool) -> str:
    """An error as the user sees it on stderr: one line of text, or with --json one JSON
    object ``{"error": ..., "exit_code": ...}`` (scripts parse stderr, stdout stays the
    result's)."""
    message = " ".join(message.split())  # one line, whatever the message holds
    if as_json:
        import json

        return json.dumps({"error": message, "exit_code": code})
    return f"replicator: error: {message}"


def json_requested() -> bool:
    """Whether the command being run was given --json."""
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("as_json"))


class OneLineErrors(TyperGroup):
    """The command group: a usage error is one line on stderr (a JSON object with --json),
    exit 2, instead of click's usage banner and boxed message; Ctrl-C while parsing exits 130."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        import sys

        from typer._click import exceptions as click  # typer vendors click: its exceptions

        if not standalone_mode:  # demo's nested invocations: the outer one reports
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in argv
        try:
            code = super().main(argv, prog_name, complete_var, False, windows_expand_args, **extra)
        except click.NoArgsIsHelpError as exc:
            exc.show()  # `replicator` alone, or `replicator config`: the help is the answer
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            message = exc.format_message()
            ctx = getattr(exc, "ctx", None)
            if isinstance(exc, click.UsageError) and ctx is not None:
                message += f" (see '{ctx.command_path} -h')"
            typer.echo(error_line(message, exc.exit_code, as_json), err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo(error_line("interrupted", 130, as_json), err=True)
            sys.exit(130)
        raise SystemExit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # outside run_coroutine (loading the config...): same line
            fail("interrupted", 130)


def from_environment(param: str) -> bool:
    """Whether the running command's option ``param`` took its value from its environment
    variable."""
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(param) is ParameterSource.ENVIRONMENT


def on_command_line(param: str) -> bool:
    """Whether the running command's option ``param`` was given on the command line."""
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(param) is ParameterSource.COMMANDLINE


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(error_line(message, code, json_requested()), err=True)
    raise typer.Exit(code)


def run_coroutine(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, turning library errors into a one-line message and exit code."""
    import asyncio
    import signal
    import threading

    from replicator.log import loop_exception_handler

    async def main() -> T:
        asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
        return await coro_fn()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    if main_thread:
        # While the work runs, Ctrl-C stops it in order (asyncio.run cancels it, then we exit
        # 130); before and after, __main__'s handler exits at once (nothing to stop: a
        # KeyboardInterrupt in interpreter shutdown killed the process without a word).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return asyncio.run(main())
    except ReplicatorError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except OSError as exc:  # what a library call did not convert: still one line, no traceback
        fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


class LogChoice:
    """What -v/--verbose, -q/--quiet and --log-format asked for, recorded by their option
    callbacks while the command line is parsed (see :mod:`replicator.cli.options`) and read by
    :func:`setup_logging`: every command gets them without passing them along."""

    verbose = 0
    quiet = False
    log_format: str | None = None

    @classmethod
    def reset(cls) -> None:
        cls.verbose, cls.quiet, cls.log_format = 0, False, None


def setup_logging(level: str | None, config: Config | None = None, default: str = "warning") -> None:
    """-v (info) / -vv (debug) / -q (errors only), else --log-level (or REPLICATOR_LOG_LEVEL),
    else the config's log_level, else the command's default (one-shot commands stay quiet; the
    daemon logs at info). --log-format (or REPLICATOR_LOG_FORMAT) text|json; by default text
    on a terminal and JSON otherwise."""
    from replicator import log

    if LogChoice.verbose and LogChoice.quiet:
        fail("give either -v/--verbose or -q/--quiet, not both", 2)
    if LogChoice.verbose:
        level = "info" if LogChoice.verbose == 1 else "debug"
    elif LogChoice.quiet:
        level = "error"
    chosen = level or (config.log_level if config else None) or default
    if chosen not in ("debug", "info", "warning", "error"):
        fail(f"--log-level must be debug, info, warning or error (got {chosen!r})", 2)
    fmt = LogChoice.log_format
    log.configure(chosen, json_output=None if fmt is None else fmt == "json")
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
