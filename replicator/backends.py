"""Backends: which settings and which code a source or target url names.

A url's scheme picks its backend (a plain path is ``file``). Each scheme is registered once,
for sources and for targets separately, with:

* the config model that validates an entry with such a url: the common fields of
  :class:`~replicator.config.SourceConfig` / :class:`~replicator.config.TargetConfig` plus
  its own, so a setting of one backend given to another is refused by name
  (:func:`replicator.config._by_scheme`);
* the factory that opens it (:func:`replicator.targets.open_backend`,
  :func:`replicator.sources.open_source`);
* for a source, how ``replicator run`` sees its changes: a watcher, or none (the daemon
  lists it every ``poll_interval``).

The built-in backends are registered at the bottom of this module; a new one (GCS, Azure)
is one module implementing the protocol (:mod:`replicator.targets.base`,
:mod:`replicator.sources.base`) and one registration here. Tests add schemes of their own
(``memory://``, ``faulty://``: tests/faults.py). Factories import their implementation
when a url of theirs is opened, so a POSIX-only config never loads the S3 SDK; this module
imports only the config models, so that validating a config loads no backend at all.
(Compare restic's backend location registry and Litestream's replica client types.)
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, cast

from replicator.config import (
    PosixSourceConfig,
    PosixTargetConfig,
    S3SourceConfig,
    S3TargetConfig,
    SourceConfig,
    TargetConfig,
)
from replicator.errors import ConfigError

if TYPE_CHECKING:
    from replicator.sources.base import Source
    from replicator.sources.watch import ChangeCallback
    from replicator.targets.base import Target

SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
"""RFC 3986, lower case."""


def scheme_of(url: str) -> str:
    """``s3`` for ``s3://...``; ``file`` for a plain path (what precedes ``://`` otherwise,
    valid scheme or not: it then names no backend)."""
    scheme, sep, _ = url.partition("://")
    return scheme if sep else "file"


@dataclass(frozen=True)
class TargetBackend:
    scheme: str
    config: type[TargetConfig]
    open: Callable[[TargetConfig], Awaitable[Target]]
    """The bare backend, connected (S3: bucket checked); the wrappers are stacked by
    :func:`replicator.targets.open_target`."""
    what: str
    """How messages name one: "a directory", "an s3:// bucket"."""
    example: str
    """How hints show its url: "a directory", "s3://bucket/prefix"."""


@dataclass(frozen=True)
class SourceBackend:
    scheme: str
    config: type[SourceConfig]
    open: Callable[[SourceConfig], Source]
    what: str
    example: str
    watch: Callable[[SourceConfig, ChangeCallback, asyncio.Event], Awaitable[None]] | None = None
    """``replicator run``: report changes as they happen until the event is set. None: the
    source is polled (listed every ``poll_interval``)."""


class _Backend(Protocol):
    @property
    def scheme(self) -> str: ...
    @property
    def example(self) -> str: ...


B = TypeVar("B", bound=_Backend)


class Registry(Generic[B]):
    """The backends of one kind (``source`` or ``target``) by url scheme."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._backends: dict[str, B] = {}
        self._builtin: set[str] = set()

    def add(self, backend: B, *, builtin: bool = False) -> None:
        """Register ``backend`` for its scheme. Built-in schemes cannot be replaced, and a
        scheme is registered once: a second registration (a leak from an earlier test) raises."""
        if not SCHEME.match(backend.scheme) or backend.scheme in self._backends:
            raise ValueError(f"cannot register {self.kind} url scheme {backend.scheme!r}")
        self._backends[backend.scheme] = backend
        if builtin:
            self._builtin.add(backend.scheme)

    def remove(self, scheme: str) -> None:
        """Undo :meth:`add`; unknown schemes are ignored, built-in ones refused."""
        if scheme in self._builtin:
            raise ValueError(f"cannot unregister built-in {self.kind} url scheme {scheme!r}")
        self._backends.pop(scheme, None)

    def get(self, url: str) -> B | None:
        """The backend ``url`` names, or None."""
        return self._backends.get(scheme_of(url))

    def __iter__(self) -> Iterator[B]:
        return iter(list(self._backends.values()))

    def examples(self) -> str:
        """The registered kinds of url, for hints: "a directory or s3://bucket/prefix"."""
        shown = [b.example for b in self._backends.values()]
        return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"

    def unsupported(self, name: str, url: str) -> ConfigError:
        return ConfigError(f"{self.kind} {name}: unsupported url {url!r} (use {self.examples()})")


TARGETS: Registry[TargetBackend] = Registry("target")
SOURCES: Registry[SourceBackend] = Registry("source")

T = TypeVar("T", bound=TargetConfig)
S = TypeVar("S", bound=SourceConfig)


def register_target(
    scheme: str,
    config: type[T],
    open: Callable[[T], Awaitable[Target]],
    *,
    what: str | None = None,
    example: str | None = None,
    builtin: bool = False,
) -> None:
    """Make ``scheme://...`` target urls validate with ``config`` and open with ``open``."""
    factory = cast("Callable[[TargetConfig], Awaitable[Target]]", open)  # checked by target_backend
    what = what or f"a {scheme}:// target"
    TARGETS.add(TargetBackend(scheme, config, factory, what, example or f"{scheme}://..."), builtin=builtin)


def register_source(
    scheme: str,
    config: type[S],
    open: Callable[[S], Source],
    *,
    watch: Callable[[S, ChangeCallback, asyncio.Event], Awaitable[None]] | None = None,
    what: str | None = None,
    example: str | None = None,
    builtin: bool = False,
) -> None:
    """Make ``scheme://...`` source urls validate with ``config`` and open with ``open``;
    ``watch``: see :attr:`SourceBackend.watch`."""
    factory = cast("Callable[[SourceConfig], Source]", open)  # checked by source_backend
    watcher = cast("Callable[[SourceConfig, ChangeCallback, asyncio.Event], Awaitable[None]] | None", watch)
    what = what or f"a {scheme}:// source"
    backend = SourceBackend(scheme, config, factory, what, example or f"{scheme}://...", watcher)
    SOURCES.add(backend, builtin=builtin)


def target_backend(cfg: TargetConfig) -> TargetBackend:
    """The backend of a validated target config; ConfigError for a scheme not registered (any
    more: a test's), TypeError for a config of another backend's model (a bug)."""
    backend = TARGETS.get(cfg.url)
    if backend is None:
        raise TARGETS.unsupported(cfg.name, cfg.url)
    if not isinstance(cfg, backend.config):
        raise TypeError(f"target {cfg.name}: {cfg.url!r} needs a {backend.config.__name__}, not {cfg!r}")
    return backend


def source_backend(cfg: SourceConfig) -> SourceBackend:
    """As :func:`target_backend`, for a source."""
    backend = SOURCES.get(cfg.url)
    if backend is None:
        raise SOURCES.unsupported(cfg.name, cfg.url)
    if not isinstance(cfg, backend.config):
        raise TypeError(f"source {cfg.name}: {cfg.url!r} needs a {backend.config.__name__}, not {cfg!r}")
    return backend


# --- the built-in backends -----------------------------------------------------------------


async def _open_posix_target(cfg: PosixTargetConfig) -> Target:
    from replicator.targets.posix import PosixTarget

    return PosixTarget(cfg.name, cfg.path, cfg.concurrency)


async def _open_s3_target(cfg: S3TargetConfig) -> Target:
    from replicator.targets.s3 import S3Target  # the SDK costs ~0.2 s to import: only when used

    return await S3Target.open(cfg.name, cfg.s3_location, cfg, cfg.concurrency + 4, cfg.checksum)


def _open_posix_source(cfg: PosixSourceConfig) -> Source:
    from replicator.sources.posix import PosixSource

    return PosixSource(cfg.name, cfg.path, cfg.path_filter())


def _open_s3_source(cfg: S3SourceConfig) -> Source:
    from replicator.sources.s3 import S3Source  # the SDK is imported only when used

    return S3Source(cfg.name, cfg.s3_location, cfg, cfg.path_filter())


async def _watch_posix(cfg: PosixSourceConfig, on_change: ChangeCallback, stop: asyncio.Event) -> None:
    from replicator.sources.watch import watch_posix

    await watch_posix(cfg.path, on_change, stop, poll=cfg.watch == "poll", poll_interval=cfg.poll_interval)


register_target(
    "file", PosixTargetConfig, _open_posix_target, what="a directory", example="a directory", builtin=True
)
register_target(
    "s3", S3TargetConfig, _open_s3_target, what="an s3:// bucket", example="s3://bucket/prefix", builtin=True
)
register_source(
    "file",
    PosixSourceConfig,
    _open_posix_source,
    watch=_watch_posix,
    what="a directory",
    example="a directory",
    builtin=True,
)
register_source(
    "s3", S3SourceConfig, _open_s3_source, what="an s3:// bucket", example="s3://bucket/prefix", builtin=True
)
