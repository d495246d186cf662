"""Storage targets: the protocol (:mod:`.base`), the backends (:mod:`.posix`, :mod:`.s3`) and the
one place where cross-cutting wrappers are stacked (:func:`open_target`).

A target url's scheme picks its backend (:mod:`replicator.backends`; its settings:
:data:`replicator.config.TARGET_URLS`): ``s3://`` is :class:`S3Target`, a plain path or
``file://`` is :class:`PosixTarget`. Tests register more schemes (an in-memory target with
injectable faults, tests/faults.py) with :func:`register_backend`, so that failure paths run
through the real wrapper stack and daemon instead of mocks of our own code."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from replicator import backends
from replicator.config import TargetConfig
from replicator.retry import RetryPolicy
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


def register_backend(
    scheme: str,
    factory: BackendFactory,
    config: type[TargetConfig] = TargetConfig,
    *,
    what: str | None = None,
) -> None:
    """Make ``scheme://...`` target urls validate with ``config`` (default: the common
    settings only) and open with ``factory`` (:func:`replicator.backends.register_target`).
    The built-in schemes cannot be replaced, and a scheme is registered once: a second
    registration is a leak from an earlier test, so it raises."""
    backends.register_target(scheme, config, factory, what=what)


def unregister_backend(scheme: str) -> None:
    """Undo :func:`register_backend`; unknown schemes are ignored, built-in ones refused."""
    backends.unregister_target(scheme)


async def open_backend(cfg: TargetConfig) -> Target:
    """The bare backend for ``cfg.url``, connected (S3: bucket checked)."""
    return await backends.target_backend(cfg).open(cfg)


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
