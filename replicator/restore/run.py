"""``replicator restore``: open the repository, pick the snapshot (an id or a unique prefix of
one, 'latest', or the newest taken at or before a time), open the destination (a directory,
or a bucket whose files become plain objects) and restore into it (:mod:`.core`).

A destination bucket may live elsewhere than the repository: its endpoint, region and profile
can be given apart; everything else (timeouts, checksums, retries) follows the repository's
target. The S3 destination is imported only for an ``s3://`` DEST: a restore to a directory
never loads the S3 SDK.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from replicator.config import TargetConfig
from replicator.progress import ProgressSink
from replicator.repository import open_repository
from replicator.restore.core import Destination, RestoreResult, restore_snapshot, snapshot_at
from replicator.s3.settings import S3Location, is_s3_url, parse_s3_url


@dataclass
class RestoreOutcome:
    """Which snapshot was restored, and how it went."""

    source: str
    snapshot: str
    result: RestoreResult

    def to_json(self) -> dict[str, Any]:
        res = self.result
        return {"snapshot": self.snapshot, **asdict(res), "bytes_per_second": res.bytes_per_second}


@dataclass(frozen=True)
class DestAccess:
    """How to reach an ``s3://`` destination, where it differs from the repository's target."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None


def parse_destination(dest: str) -> Path | S3Location:
    """DEST as written: a directory, or ``s3://bucket/prefix``; ValueError for anything else."""
    if "://" in dest and not is_s3_url(dest):
        raise ValueError(f"DEST must be a directory or s3://bucket/prefix (got {dest!r})")
    if not is_s3_url(dest):
        return Path(dest)
    try:
        return parse_s3_url(dest)
    except ValueError as exc:
        raise ValueError(f"DEST: {exc}") from None


async def run_restore(
    target: TargetConfig,
    source: str,
    dest: Path | S3Location,
    snapshot: str | datetime | None = None,
    include: Sequence[str] = (),
    dest_access: DestAccess | None = None,
    *,
    sync: bool = True,
    progress: ProgressSink | None = None,
) -> RestoreOutcome:
    """Restore a snapshot of ``source`` from ``target``'s repository into ``dest``.
    ``snapshot``: an id (or a unique prefix of one), 'latest' or None for the latest, or a
    time: the newest snapshot taken at or before it. ``include``: only paths matching these
    globs. ``sync``: see :func:`~replicator.restore.core.restore_snapshot`."""
    async with open_repository(target) as repo:
        if isinstance(snapshot, datetime):
            sid = await snapshot_at(repo, source, snapshot)
        else:
            sid = await repo.resolve(source, snapshot)
        manifest = await repo.load_manifest(source, sid)
        restore = functools.partial(
            restore_snapshot, repo, manifest, include=include, progress=progress, sync=sync
        )
        if isinstance(dest, Path):
            result = await restore(dest)
        else:
            bucket = await _open_bucket(dest, target, dest_access or DestAccess())
            try:
                result = await restore(bucket)
            finally:
                await bucket.close()
    return RestoreOutcome(source, sid, result)


async def _open_bucket(location: S3Location, target: TargetConfig, access: DestAccess) -> Destination:
    from replicator.config import S3Access, S3TargetConfig
    from replicator.restore.s3 import S3Destination
    from replicator.targets import RetryPolicy

    # The bucket may live elsewhere than the repository: the endpoint, region and profile are
    # overridable; the rest (timeouts) follows the target, or S3's defaults for a directory.
    base: S3Access = target if isinstance(target, S3TargetConfig) else S3Access(timeout=target.timeout)
    settings = base.model_copy(
        update={
            "endpoint_url": access.endpoint_url or base.endpoint_url,
            "region": access.region or base.region,
            "profile": access.profile or base.profile,
        }
    )
    retry = target.retry
    return await S3Destination.open(
        location,
        settings,
        RetryPolicy(retry.initial, retry.max, retry.give_up_after),
        max_connections=target.concurrency + 4,
    )
