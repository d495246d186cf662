"""Logging: structlog events, readable on a terminal and JSON otherwise, always on stderr.

Event names are stable (``snapshot.published``, ``target.retry``...) so that alerting and log
queries can rely on them. An event is one line whatever names it carries (issue 17): a
``path`` is shown as :func:`~replicator.paths.display_path` shows it, and on a terminal any
other value holding a newline or another unprintable character is quoted the same way;
bytes of names that are not UTF-8 never reach the stream as lone surrogates.

Secrets never reach the output: every event and every stdlib record
(botocore's DEBUG logging included) passes through :class:`Redactor`, which masks the
configured secret values, AWS credentials in the environment, Authorization headers,
presigned-URL signatures and credentials embedded in URLs.

structlog itself is imported on the first event that passes the configured level: importing
it costs ~60 ms of CPU (it imports rich's traceback and pretty-printer modules whenever rich
is installed), and a one-shot command at its default level usually logs nothing.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from types import ModuleType
from typing import Any

from replicator.paths import display_path

_PATTERNS = [
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)[^'\",}\n]+"), r"\1***"),
    (
        re.compile(r"(?i)(x-amz-(?:security-token|signature|credential)['\"]?\s*[:=]\s*['\"]?)[^&'\",}\s]+"),
        r"\1***",
    ),
    (
        re.compile(r"(?i)((?:signature|credential|security-token|token|key|secret|password)=)[^&\s'\"]+"),
        r"\1***",
    ),
    (re.compile(r"(://[^/\s:@]+:)[^@/\s]+@"), r"\1***@"),
]
_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECURITY_TOKEN")


class Redactor:
    """Masks secrets in strings; holds the literal values to mask (at least 4 characters)."""

    def __init__(self) -> None:
        self.values: set[str] = set()
        self.add(os.environ.get(name) for name in _ENV_SECRETS)

    def add(self, values: Iterable[str | None]) -> None:
        for v in values:
            if v and len(v) >= 4:
                self.values.add(v)

    def scrub(self, text: str) -> str:
        for v in sorted(self.values, key=len, reverse=True):
            if v in text:
                text = text.replace(v, "***")
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for k, v in list(event.items()):
            event[k] = self.scrub_value(v)
        return event

    def scrub_value(self, value: Any, depth: int = 0) -> Any:
        """``value`` with its secrets masked, keeping its JSON shape (issue 22): a list, tuple,
        set or mapping stays one, so a JSON log line carries ``"sources": ["ckpt"]``, not the
        string ``"['ckpt']"``; numbers, booleans and None stay as they are; anything else
        becomes its (scrubbed) str. A mapping entry named like a credential (Authorization,
        ``*secret*``, ``*password*``, ``*token``) is masked whole."""
        if isinstance(value, str):
            return self.scrub(value)
        if value is None or isinstance(value, int | float | bool):
            return value
        if depth < 8 and isinstance(value, Mapping):
            return {
                self.scrub(str(k)): "***" if _SECRET_KEY.search(str(k)) else self.scrub_value(v, depth + 1)
                for k, v in value.items()
            }
        if depth < 8 and isinstance(value, list | tuple | set | frozenset):
            items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
            return [self.scrub_value(v, depth + 1) for v in items]
        return self.scrub(str(value))


_SECRET_KEY = re.compile(r"(?i)^(authorization|.*secret.*|.*password.*|.*token|x-amz-.*-key(-md5)?)$")


REDACTOR = Redactor()


class LineSafe:
    """Processor: every event stays one line and encodable (see the module docstring).

    JSON escapes control characters itself, so there only ``path`` values and strs holding
    lone surrogates (which no UTF-8 encoder or strict JSON parser takes) are rewritten.
    Tracebacks (``exception``, ``stack``) keep their lines."""

    def __init__(self, json_output: bool) -> None:
        self.json_output = json_output

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for k, v in event.items():
            if isinstance(v, list | dict):
                event[k] = self._nested(v)
                continue
            if not isinstance(v, str) or v.isprintable():
                if k == "path" and isinstance(v, str):
                    event[k] = display_path(v)
                continue
            if k in ("exception", "stack"):
                event[k] = v.encode("utf-8", "backslashreplace").decode("utf-8")
            elif k == "path" or not self.json_output or _SURROGATE.search(v):
                event[k] = display_path(v)
        return event

    def _nested(self, value: Any) -> Any:
        """A list's or mapping's strings made safe as a top-level one (JSON escapes control
        characters; a text line quotes them)."""
        if isinstance(value, list):
            return [self._nested(v) for v in value]
        if isinstance(value, dict):
            return {self._nested(k): self._nested(v) for k, v in value.items()}
        unsafe = isinstance(value, str) and not value.isprintable()
        if unsafe and (not self.json_output or _SURROGATE.search(value)):
            return display_path(value)
        return value


_SURROGATE = re.compile("[\ud800-\udfff]")


_threshold = logging.NOTSET
"""Events below this level are dropped before they reach structlog; set by :func:`configure`."""
_unapplied_level: int | None = None
"""The level :func:`configure` chose, until structlog has been configured with it."""
_generation = 0
"""Counts :func:`configure` calls: a logger made under an earlier configuration (structlog's
default one, in library use) is made again, or it would keep printing to stdout."""


def _structlog() -> ModuleType:
    """structlog, imported on first use and set up as :func:`configure` asked."""
    global _unapplied_level
    import structlog

    if _unapplied_level is not None:
        structlog.configure(
            processors=[
                *_shared_processors(structlog),
                structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.make_filtering_bound_logger(_unapplied_level),
            cache_logger_on_first_use=False,
        )
        _unapplied_level = None
    return structlog


def _shared_processors(structlog: ModuleType) -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        REDACTOR,
    ]


class Logger:
    """What :func:`get_logger` returns: structlog's call style (``log.info("event", key=value)``).

    Events below the level given to :func:`configure` are dropped here, and the first one that
    passes imports structlog (see the module docstring). Without :func:`configure` (library
    use, tests) every event goes to structlog with its default configuration."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: Any = None
        self._generation = -1

    def _log(self, level: int, method: str, event: str, kw: dict[str, Any]) -> None:
        if level < _threshold:
            return
        if self._generation != _generation:
            self._logger = _structlog().get_logger(self.name)
            self._generation = _generation
        getattr(self._logger, method)(event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._log(logging.DEBUG, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log(logging.INFO, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log(logging.WARNING, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log(logging.ERROR, "error", event, kw)


def get_logger(name: str) -> Logger:
    return Logger(name)


class _Formatter(logging.Formatter):
    """The root handler's formatter: structlog's ProcessorFormatter, built on the first record."""

    def __init__(self, json_output: bool, colors: bool) -> None:
        super().__init__()
        self.json_output = json_output
        self.colors = colors
        self._formatter: logging.Formatter | None = None

    def format(self, record: logging.LogRecord) -> str:
        if self._formatter is None:
            structlog = _structlog()
            renderer: Any = (
                structlog.processors.JSONRenderer()
                if self.json_output
                else structlog.dev.ConsoleRenderer(colors=self.colors)
            )
            self._formatter = structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    REDACTOR,
                    LineSafe(self.json_output),
                    renderer,
                ],
                foreign_pre_chain=[
                    structlog.stdlib.add_log_level,
                    structlog.stdlib.ExtraAdder(),
                    *_shared_processors(structlog)[2:],
                ],
            )
        return self._formatter.format(record)


def configure(level: str = "info", *, json_output: bool | None = None, stream: Any = None) -> None:
    """Set up structlog and the stdlib root logger (idempotent)."""
    global _threshold, _unapplied_level, _generation
    stream = stream or sys.stderr
    if json_output is None:
        json_output = not stream.isatty()
    numeric = getattr(logging, level.upper())
    _threshold = _unapplied_level = numeric
    _generation += 1
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Formatter(json_output, colors=stream.isatty()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # botocore/aiobotocore/urllib3 are chatty; at DEBUG they still pass through the redactor.
    for noisy in ("botocore", "aiobotocore", "boto3", "urllib3", "s3transfer", "asyncio", "watchfiles"):
        logging.getLogger(noisy).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)


def loop_exception_handler(loop: Any, context: dict[str, Any]) -> None:
    """The event loop's handler for exceptions nobody awaited. The HTTP client's own background
    writes fail with a reset or closed connection when a target drops it; the request that
    owned them fails too and is retried and reported (``target.retry``), so those are logged at
    debug, not as a traceback an operator would read as a crash. Anything else: as asyncio
    would."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and "never retrieved" in str(context.get("message", "")):
        get_logger("asyncio").debug("asyncio.connection_error_unretrieved", error=repr(exc))
        return
    loop.default_exception_handler(context)
