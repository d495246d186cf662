"""Sources: where the primary's files come from. See :mod:`.base` for the protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

from replicator.errors import ConfigError
from replicator.globs import PathFilter
from replicator.s3.settings import is_s3_url, parse_s3_url
from replicator.sources.base import Listing, Source, SourceFile
from replicator.sources.posix import PosixSource

if TYPE_CHECKING:
    from replicator.config import SourceConfig

__all__ = ["Listing", "PosixSource", "Source", "SourceFile", "open_source"]


def open_source(cfg: SourceConfig) -> Source:
    path_filter = PathFilter(cfg.include, cfg.exclude)
    if is_s3_url(cfg.url):
        from replicator.sources.s3 import S3Source  # the SDK is imported only when used

        try:
            location = parse_s3_url(cfg.url)
        except ValueError as exc:
            raise ConfigError(f"source {cfg.name}: {exc}") from None
        return S3Source(cfg.name, location, cfg, path_filter)
    if "://" in cfg.url and not cfg.url.startswith("file://"):
        raise ConfigError(
            f"source {cfg.name}: unsupported url {cfg.url!r} (use a directory or s3://bucket/prefix)"
        )
    return PosixSource(cfg.name, cfg.url.removeprefix("file://"), path_filter)
