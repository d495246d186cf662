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
    "TargetWrapper",
    "backend_of",
    "check_key",
    "open_backend",
    "open_target",
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


async def open_target(cfg: TargetConfig, on_request: RequestHook | None = None) -> Target:
    """The full stack for one configured target: retry -> limits -> metrics -> backend.

    Each request stops retrying after ``retry.give_up_after``; the daemon keeps retrying the
    work itself (replicator.daemon). ``on_request`` sees every request made (the spend ledger)."""
    backend = await open_backend(cfg)
    policy = RetryPolicy(initial=cfg.retry.initial, max=cfg.retry.max, give_up_after=cfg.retry.give_up_after)
    metered = MeteredTarget(backend, on_request)
    return RetryingTarget(LimitedTarget(metered, cfg.concurrency, cfg.max_bandwidth), policy)
