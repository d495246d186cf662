"""Sources: where the primary's files come from. See :mod:`.base` for the protocol.

A source url's scheme picks its backend from :mod:`replicator.backends`: a plain
path or ``file://`` is :class:`PosixSource` (watched by the daemon), ``s3://`` is
:class:`~replicator.sources.s3.S3Source` (polled)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from replicator.sources.base import Listing, Source, SourceFile
from replicator.sources.posix import PosixSource

if TYPE_CHECKING:
    from replicator.config import SourceConfig

__all__ = ["Listing", "PosixSource", "Source", "SourceFile", "open_source"]


def open_source(cfg: SourceConfig) -> Source:
    """The source ``cfg`` names, with its include/exclude filter."""
    from replicator.backends import source_backend  # imports the config models: only when used

    return source_backend(cfg).open(cfg)
