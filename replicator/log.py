"""Logging: structlog events, readable on a terminal and JSON otherwise, always on stderr.

Event names are stable (``snapshot.published``, ``target.retry``...) so that alerting and log
queries can rely on them. Secrets never reach the output: every event and every stdlib record
(botocore's DEBUG logging included) passes through :class:`Redactor`, which masks the
configured secret values, AWS credentials in the environment, Authorization headers,
presigned-URL signatures and credentials embedded in URLs.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

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
            if isinstance(v, str):
                event[k] = self.scrub(v)
            elif v is not None and not isinstance(v, int | float | bool):
                event[k] = self.scrub(str(v))
        return event


REDACTOR = Redactor()


def configure(level: str = "info", *, json_output: bool | None = None, stream: Any = None) -> None:
    """Set up structlog and the stdlib root logger (idempotent)."""
    stream = stream or sys.stderr
    if json_output is None:
        json_output = not stream.isatty()
    numeric = getattr(logging, level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        REDACTOR,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, REDACTOR, renderer],
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.ExtraAdder(), *shared[2:]],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # botocore/aiobotocore/urllib3 are chatty; at DEBUG they still pass through the redactor.
    for noisy in ("botocore", "aiobotocore", "boto3", "urllib3", "s3transfer", "asyncio", "watchfiles"):
        logging.getLogger(noisy).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
