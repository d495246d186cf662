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

from replicator.config import S3ObjectOptions, TargetConfig
from replicator.errors import ConfigError
from replicator.format.manifest import wire_name
from replicator.progress import ProgressSink
from replicator.repository import Repository, open_repository
from replicator.restore.core import Destination, Overwrite, RestoreResult, restore_snapshot, snapshot_at
from replicator.s3.location import S3Location, is_s3_url, parse_s3_url


@dataclass
class RestoreOutcome:
    """Which snapshot was restored, and how it went."""

    source: str
    snapshot: str
    result: RestoreResult

    def to_json(self) -> dict[str, Any]:
        res = self.result
        doc = {"snapshot": self.snapshot, **asdict(res), "bytes_per_second": res.bytes_per_second}
        # Names as the manifest carries them: a name that is not UTF-8 has its exact bytes in
        # path_b64 (a lone surrogate in JSON is not text any strict parser takes).
        for name in ("replaced", "kept", "created"):
            doc[name] = [path_json(p) for p in doc[name]]
        return doc


@dataclass(frozen=True)
class DestAccess:
    """How to reach an ``s3://`` destination, where it differs from the repository's target."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    objects: S3ObjectOptions | None = None
    """Encryption, storage class and tags of the restored objects (``--dest-sse``...). Not the
    repository target's: the objects are meant for training jobs, which may not hold its
    SSE-C key, nor need its storage class."""


DEST_CUSTOMER_KEY_ENV = "REPLICATOR_DEST_SSE_CUSTOMER_KEY"
"""Where ``--dest-sse customer`` finds its key: never on the command line, which ``ps`` shows."""


def dest_object_options(
    sse: str | None, kms_key_id: str | None, storage_class: str | None, tags: Sequence[str]
) -> S3ObjectOptions | None:
    """``--dest-sse``, ``--dest-kms-key-id``, ``--dest-storage-class`` and ``--dest-tag KEY=VALUE``
    as the options of an ``s3://`` destination (None when none is given); ConfigError when
    they are invalid, as in a config file."""
    import os

    from replicator.config import object_options

    if sse is None and kms_key_id is None and storage_class is None and not tags:
        return None
    data: dict[str, Any] = {}
    if sse is not None or kms_key_id is not None:
        data["sse"] = {"type": sse or "aes256", **({"kms_key_id": kms_key_id} if kms_key_id else {})}
        if sse == "customer":
            key = os.environ.get(DEST_CUSTOMER_KEY_ENV)
            if not key:
                raise ConfigError(f"--dest-sse customer: set {DEST_CUSTOMER_KEY_ENV} to the base64 key")
            data["sse"]["customer_key"] = key
    if storage_class is not None:
        data["storage_class"] = storage_class
    if tags:
        pairs = {}
        for tag in tags:
            name, sep, value = tag.partition("=")
            if not sep or not name:
                raise ConfigError(f"--dest-tag: use KEY=VALUE (got {tag!r})")
            pairs[name] = value
        data["tags"] = pairs
    return object_options(data, origin="--dest")


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
    source: str | None,
    dest: Path | S3Location,
    snapshot: str | datetime | None = None,
    include: Sequence[str] = (),
    dest_access: DestAccess | None = None,
    *,
    sync: bool = True,
    progress: ProgressSink | None = None,
    overwrite: Overwrite = "if-changed",
    dry_run: bool = False,
) -> RestoreOutcome:
    """Restore a snapshot of ``source`` from ``target``'s repository into ``dest`` (None: the
    repository's only source).
    ``snapshot``: an id (or a unique prefix of one), 'latest' or None for the latest, or a
    time: the newest snapshot taken at or before it. ``include``: only paths matching these
    globs. ``sync``, ``overwrite``, ``dry_run``: see
    :func:`~replicator.restore.core.restore_snapshot`."""
    async with open_repository(target) as repo:
        source = await _pick_source(repo, source)
        if isinstance(snapshot, datetime):
            sid = await snapshot_at(repo, source, snapshot)
        else:
            sid = await repo.resolve(source, snapshot)
        manifest = await repo.load_manifest(source, sid)
        restore = functools.partial(
            restore_snapshot,
            repo,
            manifest,
            include=include,
            progress=progress,
            sync=sync,
            overwrite=overwrite,
            dry_run=dry_run,
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


async def _pick_source(repo: Repository, source: str | None) -> str:
    """``source``, or the repository's only one when None; a ConfigError (exit 2) that lists
    them (and suggests the closest name) when it holds several, or not ``source``."""
    from replicator.errors import did_you_mean

    if source is not None and await repo.latest(source) is not None:
        return source
    known = await repo.list_sources()
    if source is None:
        if len(known) == 1:
            return known[0]
        listed = ", ".join(known) if known else "none"
        raise ConfigError(
            f"--source is required: {repo.target.url} holds snapshots of several sources ({listed})"
            if known
            else f"{repo.target.url} holds no snapshot"
        )
    if source in known:
        return source  # snapshots without a ref: resolve() says what it finds
    raise ConfigError(
        f"no source named {source!r} in {repo.target.url}{did_you_mean(source, known)}"
        f" (known: {', '.join(known) or 'none'})"
    )


def path_json(path: str) -> dict[str, str]:
    """A name for JSON output, the way a manifest writes it (docs/FORMAT.md 5.1): ``path``,
    and for a name that is not valid UTF-8 its display form there and its exact bytes,
    base64, in ``path_b64``."""
    shown, b64 = wire_name(path)
    return {"path": shown} if b64 is None else {"path": shown, "path_b64": b64}


async def _open_bucket(location: S3Location, target: TargetConfig, access: DestAccess) -> Destination:
    from replicator.config import S3Access, S3TargetConfig
    from replicator.restore.s3 import S3Destination
    from replicator.s3.settings import object_params
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
        params=object_params(access.objects),
    )
