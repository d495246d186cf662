"""Storage targets: the protocol (:mod:`.base`), the backends (:mod:`.posix`, :mod:`.s3`) and the
one place where cross-cutting wrappers are stacked (:func:`open_target`)."""

from __future__ import annotations

from pathlib import Path

from replicator.config import TargetConfig
from replicator.errors import ConfigError
from replicator.s3 import is_s3_url, parse_s3_url
from replicator.targets.base import ObjectInfo, Target, check_key
from replicator.targets.posix import PosixTarget
from replicator.targets.wrappers import (
    LimitedTarget,
    MeteredTarget,
    RequestHook,
    RetryingTarget,
    RetryPolicy,
    TargetHealth,
    TargetWrapper,
    unwrap,
)

__all__ = [
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
    "retry_policy",
    "unwrap",
]


def backend_of(target: Target) -> Target:
    """The innermost layer of a wrapper stack: the backend itself."""
    while isinstance(target, TargetWrapper):
        target = target.inner
    return target


async def open_backend(cfg: TargetConfig) -> Target:
    """The bare backend for ``cfg.url``, connected (S3: bucket checked)."""
    if is_s3_url(cfg.url):
        from replicator.targets.s3 import S3Target  # the SDK costs ~0.2 s to import: only when used

        try:
            location = parse_s3_url(cfg.url)
        except ValueError as exc:
            raise ConfigError(f"target {cfg.name}: {exc}") from None
        return await S3Target.open(cfg.name, location, cfg, cfg.concurrency + 4, cfg.checksum)
    if "://" in cfg.url and not cfg.url.startswith("file://"):
        raise ConfigError(
            f"target {cfg.name}: unsupported url {cfg.url!r} (use a directory or s3://bucket/prefix)"
        )
    return PosixTarget(cfg.name, Path(cfg.url.removeprefix("file://")), cfg.concurrency)


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
    """The full stack for one configured target: retry -> limits -> metrics -> backend.

    ``policy``: the retry policy (default :func:`retry_policy`, interactive). ``health``: the
    object that follows whether the target answers, if the caller keeps one across attempts
    to open it. ``on_request`` sees every request made (the spend ledger)."""
    backend = await open_backend(cfg)
    metered = MeteredTarget(backend, on_request)
    limited = LimitedTarget(metered, cfg.concurrency, cfg.max_bandwidth)
    return RetryingTarget(limited, policy or retry_policy(cfg), health)
