"""Backends: the code each source and target url scheme names.

The configuration decides which settings a url takes (:data:`replicator.config.SOURCE_URLS`,
:data:`replicator.config.TARGET_URLS`: the scheme's config model); this module keeps, per
scheme, the code that opens it:

* for a target, the factory of the bare backend (the wrappers are stacked by
  :func:`replicator.targets.open_target`);
* for a source, the factory, and how ``replicator run`` sees its changes: a watcher, or none
  (the daemon lists it every ``poll_interval``).

A new backend (GCS, Azure) is one module implementing the protocol
(:mod:`replicator.targets.base`, :mod:`replicator.sources.base`), a config model, and one
:func:`register_target` / :func:`register_source` call, which registers both. Tests add
schemes of their own (``memory://``, ``faulty://``: tests/faults.py). Factories import their
implementation when a url of theirs is opened, so a POSIX-only config never loads the S3 SDK.
(Compare restic's backend location registry and Litestream's replica client types.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

from replicator.config import (
    SOURCE_URLS,
    TARGET_URLS,
    PosixSourceConfig,
    PosixTargetConfig,
    S3SourceConfig,
    S3TargetConfig,
    SourceConfig,
    TargetConfig,
    UrlKind,
    UrlKinds,
    scheme_of,
)

if TYPE_CHECKING:
    from replicator.sources.base import Source
    from replicator.sources.watch import ChangeCallback
    from replicator.targets.base import Target


@dataclass(frozen=True)
class TargetBackend:
    scheme: str
    open: Callable[[TargetConfig], Awaitable[Target]]
    """The bare backend, connected (S3: bucket checked)."""


@dataclass(frozen=True)
class SourceBackend:
    scheme: str
    open: Callable[[SourceConfig], Source]
    watch: Callable[[SourceConfig, ChangeCallback, asyncio.Event], Awaitable[None]] | None = None
    """``replicator run``: report changes as they happen until the event is set. None: the
    source is polled (listed every ``poll_interval``)."""


_TARGETS: dict[str, TargetBackend] = {}
_SOURCES: dict[str, SourceBackend] = {}

T = TypeVar("T", bound=TargetConfig)
S = TypeVar("S", bound=SourceConfig)


def _accept(
    urls: UrlKinds, scheme: str, model: type[T] | type[S], what: str | None, example: str | None
) -> None:
    kind = urls.kind
    urls.add(UrlKind(scheme, model, what or f"a {scheme}:// {kind}", example or f"{scheme}://..."))


def register_target(
    scheme: str,
    config: type[T],
    open: Callable[[T], Awaitable[Target]],
    *,
    what: str | None = None,
    example: str | None = None,
) -> None:
    """Make ``scheme://...`` target urls validate with ``config`` and open with ``open``."""
    _accept(TARGET_URLS, scheme, config, what, example)
    _TARGETS[scheme] = TargetBackend(scheme, cast("Callable[[TargetConfig], Awaitable[Target]]", open))


def register_source(
    scheme: str,
    config: type[S],
    open: Callable[[S], Source],
    *,
    watch: Callable[[S, ChangeCallback, asyncio.Event], Awaitable[None]] | None = None,
    what: str | None = None,
    example: str | None = None,
) -> None:
    """Make ``scheme://...`` source urls validate with ``config`` and open with ``open``;
    ``watch``: see :attr:`SourceBackend.watch`."""
    _accept(SOURCE_URLS, scheme, config, what, example)
    watcher = cast("Callable[[SourceConfig, ChangeCallback, asyncio.Event], Awaitable[None]] | None", watch)
    _SOURCES[scheme] = SourceBackend(scheme, cast("Callable[[SourceConfig], Source]", open), watcher)


def unregister_target(scheme: str) -> None:
    """Undo :func:`register_target`; unknown schemes are ignored, built-in ones refused."""
    TARGET_URLS.remove(scheme)
    _TARGETS.pop(scheme, None)


def target_backend(cfg: TargetConfig) -> TargetBackend:
    """The backend of a validated target config; ConfigError for a scheme not registered (any
    more: a test's), TypeError for a config of another backend's model (a bug)."""
    kind, backend = TARGET_URLS.get(cfg.url), _TARGETS.get(scheme_of(cfg.url))
    if kind is None or backend is None:
        raise TARGET_URLS.unsupported(cfg.name, cfg.url)
    if not isinstance(cfg, kind.model):
        raise TypeError(f"target {cfg.name}: {cfg.url!r} needs a {kind.model.__name__}, not {cfg!r}")
    return backend


def source_backend(cfg: SourceConfig) -> SourceBackend:
    """As :func:`target_backend`, for a source."""
    kind, backend = SOURCE_URLS.get(cfg.url), _SOURCES.get(scheme_of(cfg.url))
    if kind is None or backend is None:
        raise SOURCE_URLS.unsupported(cfg.name, cfg.url)
    if not isinstance(cfg, kind.model):
        raise TypeError(f"source {cfg.name}: {cfg.url!r} needs a {kind.model.__name__}, not {cfg!r}")
    return backend


# --- the built-in backends (their config models are registered in replicator.config) ------


async def _open_posix_target(cfg: PosixTargetConfig) -> Target:
    from replicator.targets.posix import PosixTarget

    return PosixTarget(cfg.name, cfg.path, cfg.concurrency)


async def _open_s3_target(cfg: S3TargetConfig) -> Target:
    from replicator.s3.settings import object_params
    from replicator.targets.s3 import S3Target  # the SDK costs ~0.2 s to import: only when used

    params = object_params(cfg.object_options)
    return await S3Target.open(cfg.name, cfg.s3_location, cfg, cfg.concurrency + 4, cfg.checksum, params)


def _open_posix_source(cfg: PosixSourceConfig) -> Source:
    from replicator.sources.posix import PosixSource

    return PosixSource(cfg.name, cfg.path, cfg.path_filter())


def _open_s3_source(cfg: S3SourceConfig) -> Source:
    from replicator.sources.s3 import S3Source  # the SDK is imported only when used

    return S3Source(cfg.name, cfg.s3_location, cfg, cfg.path_filter())


async def _watch_posix(cfg: PosixSourceConfig, on_change: ChangeCallback, stop: asyncio.Event) -> None:
    from replicator.sources.watch import watch_posix

    await watch_posix(cfg.path, on_change, stop, poll=cfg.watch == "poll", poll_interval=cfg.poll_interval)


_TARGETS["file"] = TargetBackend(
    "file", cast("Callable[[TargetConfig], Awaitable[Target]]", _open_posix_target)
)
_TARGETS["s3"] = TargetBackend("s3", cast("Callable[[TargetConfig], Awaitable[Target]]", _open_s3_target))
_SOURCES["file"] = SourceBackend(
    "file",
    cast("Callable[[SourceConfig], Source]", _open_posix_source),
    cast("Callable[[SourceConfig, ChangeCallback, asyncio.Event], Awaitable[None]]", _watch_posix),
)
_SOURCES["s3"] = SourceBackend("s3", cast("Callable[[SourceConfig], Source]", _open_s3_source))
