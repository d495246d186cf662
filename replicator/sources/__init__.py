"""Sources: where the primary's files come from. See :mod:`.base` for the protocol."""

from __future__ import annotations

from replicator.config import SourceConfig
from replicator.errors import ConfigError
from replicator.globs import PathFilter
from replicator.s3 import is_s3_url
from replicator.sources.base import Source, SourceFile
from replicator.sources.posix import PosixSource

__all__ = ["PosixSource", "Source", "SourceFile", "open_source"]


def open_source(cfg: SourceConfig) -> Source:
    path_filter = PathFilter(cfg.include, cfg.exclude)
    if is_s3_url(cfg.url):
        raise ConfigError(f"source {cfg.name}: S3 sources are not supported yet")
    if "://" in cfg.url and not cfg.url.startswith("file://"):
        raise ConfigError(
            f"source {cfg.name}: unsupported url {cfg.url!r} (use a directory or s3://bucket/prefix)"
        )
    return PosixSource(cfg.name, cfg.url.removeprefix("file://"), path_filter)
