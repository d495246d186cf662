"""The error vocabulary. Every failure that reaches a user is one of these.

Errors are converted where they cross a boundary (SDK, filesystem, JSON parser) with
``raise ... from exc`` and carry the operation, the key and a hint, plus whether retrying
can help. ``str(err)`` is a single line fit for a CLI error message. A bug must never look
like "not found": only a backend that positively answered "no such object" raises
:class:`NotFoundError`.
"""

from __future__ import annotations

from collections.abc import Iterable

from replicator.paths import one_line


class ReplicatorError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with when this error ends a command."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        operation: str | None = None,
        key: str | None = None,
        hint: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.operation = operation
        self.key = key
        self.hint = hint
        self.retryable = retryable

    def __str__(self) -> str:
        parts = []
        if self.operation:
            parts.append(self.operation)
        if self.key:
            parts.append(one_line(self.key))  # a file's name may hold a newline or raw bytes
        head = " ".join(parts)
        text = f"{head}: {self.message}" if head else self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return text.replace("\n", " ")


class ConfigError(ReplicatorError):
    """The configuration file or command-line options are invalid."""

    exit_code = 2


class TargetError(ReplicatorError):
    """A storage target failed an operation. ``target`` names it when known."""

    def __init__(self, message: str, *, target: str | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.target = target

    def __str__(self) -> str:
        text = super().__str__()
        return f"target {self.target}: {text}" if self.target else text


class TransientTargetError(TargetError):
    """May succeed if retried: timeouts, throttling, 5xx, connection resets."""

    def __init__(self, message: str, **kwargs: object) -> None:
        kwargs.setdefault("retryable", True)
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class TargetUnreachableError(TransientTargetError):
    """The target could not be contacted at all (connection refused, DNS, no route)."""

    exit_code = 3


class PermanentTargetError(TargetError):
    """Retrying cannot help without a human: access denied, missing bucket, bad request."""


class NotFoundError(TargetError):
    """The backend positively answered that the object does not exist."""


class AlreadyExistsError(TargetError):
    """A create-if-absent write found the object already present."""


class RepositoryError(ReplicatorError):
    """A repository object is missing, malformed or of an unsupported format."""


class UnsupportedFormatError(RepositoryError):
    """The repository (or one of its objects) declares a format version this code does not know."""

    exit_code = 2


class GcRefusedError(RepositoryError):
    """Garbage collection refused to delete anything: what it read (a listing, a manifest, a
    ref) is not trustworthy evidence that an object is unused (replicator.gc)."""


class GcBusyError(RepositoryError):
    """Another ``replicator prune`` holds the repository's lock."""


class IntegrityError(RepositoryError):
    """Stored bytes do not match their content address or recorded digest."""


class SourceError(ReplicatorError):
    """A source file or object could not be read consistently."""


class FileChangedError(SourceError):
    """A file changed while it was being read; its bytes must not be recorded."""

    def __init__(self, message: str, **kwargs: object) -> None:
        kwargs.setdefault("retryable", True)
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'keep_last'?"`` when one of ``known`` is close to ``name``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
