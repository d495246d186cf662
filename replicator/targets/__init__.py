"""Storage targets: the protocol (:mod:`.base`), the backends (:mod:`.posix`, :mod:`.s3`) and the
one place where cross-cutting wrappers are stacked (:func:`open_target`).

A target URL's scheme picks its backend from a small registry: ``s3://`` is :class:`S3Target`,
a plain path or ``file://`` is :class:`PosixTarget`. Tests register more schemes (an in-memory
target with injectable faults, tests/faults.py) with :func:`register_backend`, so that failure
paths run through the real wrapper stack and daemon instead of mocks of our own code."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from replicator.config import TargetConfig
from replicator.errors import ConfigError
from replicator.retry import RetryPolicy
from replicator.s3.settings import parse_s3_url
from replicator.targets.base import ObjectInfo, Target, check_key
from replicator.targets.posix import PosixTarget
from replicator.targets.wrappers import (
    DeadlineTarget,
    LimitedTarget,
    MeteredTarget,
    RequestHook,
    RetryingTarget,
    TargetHealth,
    TargetWrapper,
    unwrap,
)

__all__ = [
    "BackendFactory",
    "DeadlineTarget",
    "LimitedTarget",
    "MeteredTarget",
    "ObjectInfo",
    "PosixTarget",
    "RetryPolicy",
    "RetryingTarget",
    "Target",
    "TargetHealth",
    "TargetWrapper",
    "backend_of",
    "check_key",
    "open_backend",
    "open_target",
    "register_backend",
    "retry_policy",
    "unregister_backend",
    "unwrap",
]

MIN_DEADLINE = 5.0
"""Seconds every request is allowed, whatever the give-up (DeadlineTarget)."""

BackendFactory = Callable[[TargetConfig], Awaitable[Target]]
"""Opens the bare, connected backend for a target config whose url has the registered scheme."""


def backend_of(target: Target) -> Target:
    """The innermost layer of a wrapper stack: the backend itself."""
    while isinstance(target, TargetWrapper):
        target = target.inner
    return target


async def _open_s3(cfg: TargetConfig) -> Target:
    from replicator.targets.s3 import S3Target  # the SDK costs ~0.2 s to import: only when used

    try:
        location = parse_s3_url(cfg.url)
    except ValueError as exc:
        raise ConfigError(f"target {cfg.name}: {exc}") from None
    return await S3Target.open(cfg.name, location, cfg, cfg.concurrency + 4, cfg.checksum)


async def _open_posix(cfg: TargetConfig) -> Target:
    return PosixTarget(cfg.name, Path(cfg.url.removeprefix("file://")), cfg.concurrency)


_BUILTIN = ("s3", "file")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")  # RFC 3986, lower case
_BACKENDS: dict[str, BackendFactory] = {"s3": _open_s3, "file": _open_posix}


def register_backend(scheme: str, factory: BackendFactory) -> None:
    """Make ``scheme://...`` target urls open with ``factory`` (tests: in-memory and
    fault-injecting targets). The built-in schemes cannot be replaced, and a scheme is
    registered once: a second registration is a leak from an earlier test, so it raises."""
    if not _SCHEME.match(scheme) or scheme in _BACKENDS:
        raise ValueError(f"cannot register target url scheme {scheme!r}")
    _BACKENDS[scheme] = factory


def unregister_backend(scheme: str) -> None:
    """Undo :func:`register_backend`; unknown schemes are ignored, built-in ones refused."""
    if scheme in _BUILTIN:
        raise ValueError(f"cannot unregister built-in target url scheme {scheme!r}")
    _BACKENDS.pop(scheme, None)


async def open_backend(cfg: TargetConfig) -> Target:
    """The bare backend for ``cfg.url``, connected (S3: bucket checked)."""
    scheme, sep, _ = cfg.url.partition("://")
    if not sep:
        return await _open_posix(cfg)
    factory = _BACKENDS.get(scheme)
    if factory is None:
        raise ConfigError(
            f"target {cfg.name}: unsupported url {cfg.url!r} (use a directory or s3://bucket/prefix)"
        )
    return await factory(cfg)


def retry_policy(cfg: TargetConfig, *, interactive: bool = True) -> RetryPolicy:
    """Each request stops retrying after ``retry.give_up_after`` (the daemon, which then keeps
    retrying the work itself: replicator.daemon), or ``retry.command_give_up_after`` when
    ``interactive`` (one-shot commands: they never hang on a dead endpoint)."""
    give_up = cfg.retry.give_up_after
    if interactive:
        limit = cfg.retry.command_give_up_after
        give_up = limit if give_up is None else min(give_up, limit)
    return RetryPolicy(initial=cfg.retry.initial, max=cfg.retry.max, give_up_after=give_up)


async def open_target(
    cfg: TargetConfig,
    on_request: RequestHook | None = None,
    *,
    policy: RetryPolicy | None = None,
    health: TargetHealth | None = None,
) -> Target:
    """The full stack for one configured target: retry -> limits -> metrics -> deadline -> backend.

    ``policy``: the retry policy (default :func:`retry_policy`, interactive). ``health``: the
    object that follows whether the target answers, if the caller keeps one across attempts
    to open it. ``on_request`` sees every request made (the spend ledger)."""
    policy = policy or retry_policy(cfg)
    # No single attempt may outlast the whole retry budget (a one-shot command's give-up), but
    # none is cut shorter than MIN_DEADLINE: a request waiting for a pooled connection on a
    # busy machine is slow, not hung.
    deadline = max(MIN_DEADLINE, min(cfg.timeout, policy.give_up_after or cfg.timeout))
    backend = await open_backend(cfg)
    metered = MeteredTarget(DeadlineTarget(backend, deadline), on_request)
    limited = LimitedTarget(metered, cfg.concurrency, cfg.max_bandwidth)
    return RetryingTarget(limited, policy, health)
