"""The configuration file: one YAML document validated by pydantic models.

All defaults live in these models. Loading does, in order: parse YAML; reject secrets
written as plain text; expand ``${VAR}`` in every string (``$${`` is a literal ``${``);
resolve relative paths against the config file's directory; validate. Any failure is a
:class:`~replicator.errors.ConfigError` naming the field and the bad value (exit code 2).

Sources and targets are unions discriminated by their url's scheme: each entry is validated
by the model registered for its scheme in :data:`SOURCE_URLS` / :data:`TARGET_URLS`
(:class:`PosixSourceConfig`, :class:`S3TargetConfig`...), which holds the common fields of
:class:`SourceConfig` or :class:`TargetConfig` and its backend's own, so a setting of one
backend given to another is an error that says so ("region: does not apply to a directory").
The code that opens each scheme is registered beside it in :mod:`replicator.backends`.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from replicator.errors import ConfigError, did_you_mean
from replicator.globs import PathFilter, compile_glob
from replicator.retention.policy import RetentionPolicy
from replicator.s3.location import S3Location, parse_s3_url
from replicator.units import parse_duration, parse_fraction, parse_rate, parse_share, parse_size

Size = Annotated[int, BeforeValidator(parse_size)]
"""A byte count written as ``4MiB``, ``1.5GB`` or a plain integer."""
Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds written as ``15m``, ``1h30m``, ``500ms`` or a plain number."""
Share = Annotated[float, BeforeValidator(parse_share)]
"""A fraction written as a percentage, ``50%``."""

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Source and target names: they become object-key components, so they are kept plain."""

SECRET_FIELDS = ("access_key_id", "secret_access_key", "session_token", "customer_key")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Model(BaseModel):
    # defer_build: a model's validator is built when first used, not at import; commands that
    # never load a config file (restore --repo ...) then build only TargetConfig's.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


def _check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError("use letters, digits, '.', '_' or '-' (max 128), starting with a letter or digit")
    return value


def _check_optional_name(value: str | None) -> str | None:
    return None if value is None else _check_name(value)


def _check_globs(patterns: list[str]) -> list[str]:
    for p in patterns:
        compile_glob(p)
    return patterns


class ChunkingConfig(_Model):
    """FastCDC parameters. Recorded in each repository created with them.

    pyfastcdc's mean chunk size is about ``avg_size + min_size`` (its cut-point skipping,
    FastCDC 2020 section 3.4), so the defaults give chunks of ~5 MiB on incompressible data.
    """

    min_size: Size = 1 << 20
    avg_size: Size = 4 << 20
    max_size: Size = 16 << 20

    @model_validator(mode="after")
    def _bounds(self) -> ChunkingConfig:
        if not 64 <= self.min_size <= 1 << 20:
            raise ValueError(f"min_size must be within 64 B..1 MiB (got {self.min_size})")
        if not 256 <= self.avg_size <= 4 << 20:
            raise ValueError(f"avg_size must be within 256 B..4 MiB (got {self.avg_size})")
        if not 1024 <= self.max_size <= 16 << 20:
            raise ValueError(f"max_size must be within 1 KiB..16 MiB (got {self.max_size})")
        if not self.min_size <= self.avg_size <= self.max_size:
            raise ValueError("need min_size <= avg_size <= max_size")
        return self


class CompressionConfig(_Model):
    level: int = Field(3, ge=1, le=19)
    """zstd level for ordinary data."""
    float_grouping: bool = True
    """Try byte-grouped encodings (element width 2 and 4) that suit bf16/fp16/fp32 tensors."""
    verify: bool = True
    """Decompress every zstd frame of an encoded chunk and compare it with the bytes it was
    made from before the chunk is uploaded (restic#4523)."""


class CompleteWhen(_Model):
    """When a checkpoint set (a top-level directory) is complete. Both, if both are given."""

    marker: str | None = None
    """A file name (glob) inside the set whose presence means the writer finished."""
    quiet: Duration | None = None
    """Nothing in the set changed for this long."""

    @model_validator(mode="after")
    def _one(self) -> CompleteWhen:
        if self.marker is None and self.quiet is None:
            raise ValueError("give marker, quiet or both")
        return self


class SharedConfig(_Model):
    """Several replicator instances contribute the files of one checkpoint source (issue 21):
    one per node, each with that node's ranks (node-local disks), or N sharing one big
    directory (``split``). Each writes its *part* of every set to the repository; one instance,
    the *assembler*, publishes a set once every instance's part is in (docs/FORMAT.md §11)."""

    instances: int = Field(ge=1, le=1024)
    """How many instances contribute: a set is published only with a part from each."""
    instance: str
    """This instance's name, unique among them (``${POD_NAME}``, ``${NODE_NAME}``)."""
    assembler: str | None = None
    """The name of the instance that publishes. Default: the one whose name ends in ``-0``
    (a StatefulSet's first pod)."""
    split: bool = False
    """The instances share one directory: each reads only its share of the files (by a hash of
    the path; the instance's number is the trailing number of its name, 0..instances-1)."""
    deadline: Duration = 600.0
    """A set waiting for parts longer than this is reported as overdue (log, metric, alert)."""
    heartbeat: Duration = 30.0
    """How often an instance says it is alive (its member object); the assembler looks for
    new parts this often too. An instance silent for three heartbeats is reported."""

    _names = field_validator("instance", "assembler")(_check_optional_name)

    @property
    def index(self) -> int | None:
        """The trailing number of the instance's name (``replicator-2`` → 2), if it has one."""
        m = re.search(r"(\d+)$", self.instance)
        return int(m.group(1)) if m else None

    @property
    def assembler_name(self) -> str:
        """The instance that publishes (and creates the repository)."""
        return self.assembler if self.assembler is not None else re.sub(r"\d+$", "0", self.instance)

    @property
    def is_assembler(self) -> bool:
        if self.assembler is not None:
            return self.assembler == self.instance
        return self.index == 0

    @model_validator(mode="after")
    def _roles(self) -> SharedConfig:
        index = self.index
        if self.split and (index is None or index >= self.instances):
            raise ValueError(
                f"split: the instance name {self.instance!r} must end in its number, "
                f"0..{self.instances - 1} (a StatefulSet pod name such as replicator-0)"
            )
        if self.assembler is None and index is None:
            raise ValueError(
                f"instance {self.instance!r} has no trailing number: name the instance that "
                "publishes with assembler: NAME"
            )
        return self


Priority = Literal["critical", "high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("critical", "high", "normal", "low")
DEFAULT_PRIORITY: dict[str, Priority] = {"checkpoint": "critical", "embedding": "high", "dataset": "normal"}


class CostConfig(_Model):
    """What a target's provider charges. Spend is computed on what actually crosses the wire
    (after dedup and compression) and on the requests actually made."""

    egress_usd_per_gib: float = Field(0.0, ge=0)
    """Per GiB uploaded to this target (the primary cloud's egress price, e.g. 0.09 for AWS)."""
    put_usd_per_1k: float = Field(0.0, ge=0)
    """Per 1,000 PUT and LIST requests (e.g. 0.005)."""
    get_usd_per_1k: float = Field(0.0, ge=0)
    """Per 1,000 GET and HEAD requests (verify, restore; e.g. 0.0004)."""
    storage_usd_per_gib_month: float | None = Field(None, ge=0)
    """Per GiB stored for a month (e.g. 0.015 for R2). ``replicator stats`` prices what the
    repository stores, ``replicator plan`` what it would retain after a sync. No default:
    without it neither shows a storage cost (they say so)."""


class BudgetConfig(_Model):
    """A spending limit over UTC calendar periods. See docs/BUDGET.md for the pacing policy."""

    usd_per_day: float | None = Field(None, gt=0)
    usd_per_month: float | None = Field(None, gt=0)
    mode: Literal["soft", "hard"] = "soft"
    """soft: critical work keeps flowing past the budget (and alerts); hard: all sending stops."""

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetConfig:
        if self.usd_per_day is None and self.usd_per_month is None:
            raise ValueError("give usd_per_day, usd_per_month or both")
        return self


Location = tuple[str, str | None, str]
"""Where a source or target is, for the self-overlap check: (scheme, endpoint, path with a
trailing ``/``), e.g. ``("s3", endpoint, "bucket/prefix/")`` or ``("file", None, "/abs/dir/")``."""


class _Endpoint(_Model):
    """What every source and target has: a name and a url whose scheme picks the backend."""

    name: Annotated[str, BeforeValidator(_check_name)]
    url: str
    """A directory (or ``file://``) or ``s3://bucket/prefix``; the scheme picks the backend
    (:mod:`replicator.backends`) and with it the settings that apply."""

    def location(self) -> Location:
        """Symbolic links resolved for a directory; other schemes as written."""
        scheme, sep, rest = self.url.partition("://")
        if not sep or scheme == "file":
            return "file", None, str(posix_path(self.url).expanduser().resolve()).rstrip("/") + "/"
        return scheme, None, rest.rstrip("/") + "/"


def posix_path(url: str) -> Path:
    """The directory a ``file://`` url or a plain path names."""
    return Path(url.removeprefix("file://"))


class S3Access(_Model):
    """How to reach an S3 endpoint: the settings of every ``s3://`` source and target (and of
    an ``s3://`` restore destination)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    sdk_checksums: Literal["when_required", "when_supported"] = "when_required"
    """botocore's own request/response checksum behaviour; some S3-compatible servers reject
    the CRC headers boto3 >= 1.36 sends by default (boto3#4392)."""
    timeout: Duration = 60.0
    """Per-request connect/read timeout, and the base of every request's deadline (plus 1 s
    per MiB transferred): a request to a target that stopped answering fails, is retried,
    and marks the target unhealthy, instead of hanging."""


class _S3Endpoint(S3Access):
    """An ``s3://bucket/prefix`` source or target: the url must name a valid bucket."""

    url: str

    @field_validator("url")
    @classmethod
    def _bucket(cls, url: str) -> str:
        parse_s3_url(url)
        return url

    @property
    def s3_location(self) -> S3Location:
        return parse_s3_url(self.url)

    def location(self) -> Location:
        return "s3", self.endpoint_url, self.url.removeprefix("s3://").rstrip("/") + "/"


class SourceConfig(_Endpoint):
    """The settings every source has, whatever its backend: the base of each source backend's
    model (the config's ``sources`` hold instances of those)."""

    kind: Literal["checkpoint", "dataset", "embedding"] = "dataset"
    priority: Priority | None = None
    """Under a budget, lower priorities are deferred first. Default: checkpoint critical,
    embedding high, dataset normal."""
    include: list[str] = Field(default_factory=lambda: ["**"])
    exclude: list[str] = Field(default_factory=list)
    complete_when: CompleteWhen | None = None
    """Checkpoint sources only. Default: quiet for 30 s."""
    max_delete: Share = 0.5
    """Hold a publish that would drop more than this share of the files or bytes of the
    target's latest snapshot, until an operator releases it (``replicator release``, or
    ``sync --allow-deletes``): a wiped primary must not wipe the replica. ``100%`` disables
    the guard (for a trainer that keeps a single checkpoint and rotates it)."""
    watch: Literal["events", "poll"] = "events"
    """Sources watched for changes under ``replicator run`` (directories): inotify events, or
    polling for network mounts. Sources that are listed instead (S3) ignore it."""
    poll_interval: Duration = 30.0
    """How often ``watch: poll`` sources and listed sources (S3) are checked for changes."""
    rescan_interval: Duration = 600.0
    """Full rescan as the safety net for dropped events."""
    rpo: Duration | None = None
    """Recovery point objective: alert when a target's copy lags more than this. None: lag is
    measured and exported but never alerted."""
    rpo_overrides: dict[str, Duration] = Field(default_factory=dict)
    """Per-target objectives that replace ``rpo``, e.g. ``{cold-archive: 24h}``."""
    debounce: Duration | None = None
    """Wait for this much quiet after a change before snapshotting. Default: 2 s for datasets
    and embeddings, 0.2 s for checkpoints (whose sets have their own completion rule)."""
    max_delay: Duration = 30.0
    """A source that never falls quiet is still snapshotted at least this often (counted from
    the first change not yet snapshotted), so its lag stays bounded."""

    shared: SharedConfig | None = None
    """Checkpoint sources only: this instance is one of several contributing to the source
    (multi-node checkpoints, scale-out of one directory). See :class:`SharedConfig`."""

    # -- retention (replicator.retention.policy; README "Retention") --------------------------
    retention: RetentionPolicy | None = None
    """What each target keeps of this source (default: everything). Datasets and embeddings:
    the policy counts snapshots. Checkpoint sources: it counts checkpoint *sets*, each kept
    in the newest snapshot that holds it. Only manifests are deleted, never chunks."""
    retention_overrides: dict[str, RetentionPolicy] = Field(default_factory=dict)
    """Per-target policies that replace ``retention``, e.g. ``{cold-archive: {keep_monthly: 24}}``
    (``{}``: that target keeps everything)."""
    keep_last: int | None = Field(None, ge=1)
    """Shorthand for ``retention: {keep_last: N}``, as written before policies existed."""

    def retention_for(self, target: str) -> RetentionPolicy:
        """The policy ``target`` applies to this source (empty: keep everything)."""
        if target in self.retention_overrides:
            return self.retention_overrides[target]
        if self.retention is not None:
            return self.retention
        return RetentionPolicy(keep_last=self.keep_last)

    @model_validator(mode="after")
    def _retention_rules(self) -> SourceConfig:
        if self.keep_last is not None and self.retention is not None:
            raise ValueError("give keep_last inside retention, not beside it")
        policies = [self.retention, *self.retention_overrides.values()]
        if self.kind != "checkpoint" and any(p is not None and p.keep_sets for p in policies):
            raise ValueError("retention keep_sets applies to kind: checkpoint only")
        return self

    # -------------------------------------------------------------------------------------------

    _globs = field_validator("include", "exclude")(_check_globs)

    @model_validator(mode="after")
    def _kind_rules(self) -> SourceConfig:
        if self.complete_when is not None and self.kind != "checkpoint":
            raise ValueError("complete_when applies to kind: checkpoint only")
        if self.shared is not None and self.kind != "checkpoint":
            raise ValueError("shared applies to kind: checkpoint only")
        if self.max_delay < self.quiet_before_snapshot:
            raise ValueError(f"max_delay ({self.max_delay:g}s) must not be shorter than debounce")
        return self

    @property
    def completion(self) -> CompleteWhen:
        return self.complete_when or CompleteWhen(quiet=30.0)

    @property
    def effective_priority(self) -> Priority:
        return self.priority or DEFAULT_PRIORITY[self.kind]

    def rpo_for(self, target: str) -> float | None:
        return self.rpo_overrides.get(target, self.rpo)

    @property
    def quiet_before_snapshot(self) -> float:
        if self.debounce is not None:
            return self.debounce
        return 0.2 if self.kind == "checkpoint" else 2.0

    def path_filter(self) -> PathFilter:
        return PathFilter(self.include, self.exclude)


class PosixSourceConfig(SourceConfig):
    """A source directory (a plain path or ``file://``)."""

    @property
    def path(self) -> Path:
        return posix_path(self.url)


class S3SourceConfig(_S3Endpoint, SourceConfig):
    """A source bucket, ``s3://bucket/prefix`` (the primary's object store)."""


class RetryConfig(_Model):
    """Capped exponential backoff with full jitter, on transient errors only."""

    initial: Duration = 0.5
    max: Duration = 30.0
    give_up_after: Duration | None = 300.0
    """``replicator run``: a request stops retrying after this; the daemon has marked the target
    unhealthy long before (after 5 s of failures) and keeps probing it, indefinitely."""
    command_give_up_after: Duration = 30.0
    """One-shot commands (sync, snapshots, verify, restore, plan, status) stop retrying a
    request after this, and report the target as failed (exit code 3 when it could not be
    reached at all): an interactive command never hangs on a dead endpoint."""


# --- scheduled garbage collection (issue 19; replicator.daemon, docs/DEPLOY.md) ----------------


class PruneSchedule(_Model):
    """``prune: {every: 24h, grace: 1h}`` on a target: ``replicator run`` runs ``replicator
    prune`` on it this often, beside replication. Without it the daemon never prunes."""

    every: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
    """Between the end of one run and the start of the next (the first: this long after start)."""
    grace: Duration = 3600.0
    """``replicator prune --grace``: a candidate is deleted only by a run at least this long
    after the run that planned it."""
    repack_below: Annotated[float, BeforeValidator(parse_fraction)] = 0.5
    """``replicator prune --repack-below``: packs whose referenced bytes are below this share
    of their size have their live chunks copied out, so that they can be deleted (0: never)."""


class TargetConfig(_Endpoint):
    """The settings every target has, whatever its backend: the base of each target backend's
    model (the config's ``targets`` hold instances of those)."""

    concurrency: int = Field(8, ge=1, le=256)
    timeout: Duration = 60.0
    """The base of every request's deadline (plus 1 s per MiB transferred): a request to a
    target that stopped answering (a dead endpoint, a hung NFS mount) fails, is retried, and
    marks the target unhealthy, instead of hanging. S3: also the connect/read timeout."""
    hash: Literal["xxh3-128", "blake3"] = "xxh3-128"
    """Chunk id algorithm for a repository created here; blake3 for untrusted sources."""
    retry: RetryConfig = Field(default_factory=RetryConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    budget: BudgetConfig | None = None
    max_bandwidth: Annotated[int, BeforeValidator(parse_rate)] | None = None
    """Upload cap in bytes per second (``200MiB/s``), a token bucket independent of money."""
    confirm_window: Duration = 0.0
    """The local state's claims that a chunk is stored are trusted by a new process (a
    ``sync``) when confirmed (by an upload or a listing) within this long; older ones are
    checked against the target before a snapshot names them (a HEAD each, or a listing).
    0: every process checks what it relies on. A repository of millions of chunks synced
    every few minutes may want e.g. ``1h``: a chunk deleted behind replicator's back is then
    noticed within that long (docs/RELIABILITY.md)."""
    relist_interval: Duration = 86400.0
    """``replicator run`` lists the repository's chunks again this often, so that a chunk
    removed behind its back (lifecycle rules, a person) is noticed and sent again even when no
    publish needs it (publishes confirm what they use anyway: docs/RELIABILITY.md)."""
    prune: PruneSchedule | None = None
    """Scheduled garbage collection by the daemon (None: never; ``replicator prune`` or a CronJob)."""


class PosixTargetConfig(TargetConfig):
    """A target directory (a plain path or ``file://``): local disk, NFS."""

    @property
    def path(self) -> Path:
        return posix_path(self.url)


# --- S3 object options: encryption, storage class, tags (issue 22) -------------------------

S3_STORAGE_CLASSES = (
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "EXPRESS_ONEZONE",
    "OUTPOSTS",
    "SNOW",
)
"""S3's storage classes whose objects can be read at once (GetObject answers)."""
S3_ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
"""Refused: their objects need a restore request before a GET, so the repository's manifests
and chunks could not be read (a lifecycle rule can still move old objects there)."""
_TAG_CHARS = re.compile(r"^[\w .:/=+\-@]*$", re.UNICODE)


class SseConfig(_Model):
    """Server-side encryption of every object written: ``aes256`` (SSE-S3), ``kms`` (SSE-KMS,
    with ``kms_key_id`` or the account's default key) or ``customer`` (SSE-C: a 256-bit key
    given base64-encoded through ``${ENV}``, sent with every PUT, GET and HEAD)."""

    type: Literal["aes256", "kms", "customer"]
    kms_key_id: str | None = None
    """kms only: a key id, ARN or alias (default: the aws/s3 managed key)."""
    customer_key: SecretStr | None = None
    """customer only: ``${ENV}`` holding the key, base64 (``openssl rand -base64 32``)."""

    @model_validator(mode="after")
    def _consistent(self) -> SseConfig:
        if self.kms_key_id is not None and self.type != "kms":
            raise ValueError("kms_key_id applies to type: kms only")
        if self.type != "customer":
            if self.customer_key is not None:
                raise ValueError("customer_key applies to type: customer only")
            return self
        if self.customer_key is None:
            raise ValueError("type: customer needs customer_key: ${SOME_ENV_VAR} (a base64 256-bit key)")
        self.customer_key_bytes()  # raises ValueError for a malformed key
        return self

    def customer_key_bytes(self) -> bytes:
        """The SSE-C key (32 bytes), decoded."""
        import binascii

        assert self.customer_key is not None
        try:
            key = base64.b64decode(self.customer_key.get_secret_value(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("customer_key must be base64 (e.g. openssl rand -base64 32)") from None
        if len(key) != 32:
            raise ValueError(f"customer_key must decode to 32 bytes (a 256-bit key), not {len(key)}")
        return key


def _check_storage_class(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.upper()  # S3 spells them in capitals; standard_ia is meant the same
    if value in S3_ARCHIVE_CLASSES:
        raise ValueError(
            f"{value} objects cannot be read without a restore request, so the repository could "
            "not be read; use GLACIER_IR, or a lifecycle rule on the bucket"
        )
    if value not in S3_STORAGE_CLASSES:
        raise ValueError(f"unknown S3 storage class (use one of {', '.join(S3_STORAGE_CLASSES)})")
    return value


def _check_tags(tags: dict[str, str]) -> dict[str, str]:
    # S3's object tag limits: at most 10 tags, keys up to 128 and values up to 256 characters.
    if len(tags) > 10:
        raise ValueError(f"S3 allows at most 10 tags per object (got {len(tags)})")
    for key, value in tags.items():
        if not 1 <= len(key) <= 128 or len(value) > 256:
            raise ValueError(f"tag {key!r}: keys are 1-128 characters, values at most 256")
        if key.lower().startswith("aws:"):
            raise ValueError(f"tag {key!r}: the aws: prefix is reserved")
        if not _TAG_CHARS.match(key) or not _TAG_CHARS.match(value):
            raise ValueError(f"tag {key!r}: use letters, digits, spaces and _ . : / = + - @")
    return tags


class S3ObjectOptions(_Model):
    """How every object replicator writes to a bucket is stored: encryption, storage class and
    tags. Set on an ``s3://`` target; a restore into a bucket takes its own (``--dest-*``)."""

    sse: SseConfig | None = None
    storage_class: Annotated[str | None, AfterValidator(_check_storage_class)] = None
    """Default: the bucket's (STANDARD)."""
    tags: Annotated[dict[str, str], AfterValidator(_check_tags)] = Field(default_factory=dict)
    """Object tags (``{team: ml, retention: dr}``): for lifecycle rules, cost allocation and
    IAM conditions."""

    @property
    def object_options(self) -> S3ObjectOptions:
        """These options alone (of a target that holds them with its other settings)."""
        return S3ObjectOptions(sse=self.sse, storage_class=self.storage_class, tags=self.tags)


class S3TargetConfig(_S3Endpoint, S3ObjectOptions, TargetConfig):
    """A target bucket, ``s3://bucket/prefix``, on AWS or any S3-compatible server."""

    checksum: Literal["auto", "md5", "crc32", "crc32c", "sha256", "sha1"] = "auto"
    """Integrity checksum sent with every PUT: Content-MD5 or an x-amz-checksum-* header.
    ``auto`` probes the server once (at the first PUT) and uses CRC32 where it verifies it (a
    fifth of MD5's CPU), else Content-MD5 (docs/PERFORMANCE.md, "Checksums on S3 PUTs").
    ``crc32c`` needs the awscrt package."""


# --- sources and targets: one model per url scheme --------------------------------------


def _fail(field: str, message: str, value: Any) -> ValidationError:
    """A validation error located at ``field`` of the entry being validated."""
    detail: InitErrorDetails = {
        "type": PydanticCustomError("backend", message),
        "loc": (field,),
        "input": value,
    }
    return ValidationError.from_exception_data("entry", [detail])


SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
"""RFC 3986, lower case."""


def scheme_of(url: str) -> str:
    """``s3`` for ``s3://...``; ``file`` for a plain path (what precedes ``://`` otherwise,
    valid scheme or not: it then names no backend)."""
    scheme, sep, _ = url.partition("://")
    return scheme if sep else "file"


@dataclass(frozen=True)
class UrlKind:
    """What one url scheme means to the configuration."""

    scheme: str
    model: type[_Endpoint]
    """Validates an entry with such a url: the common fields and the backend's own."""
    what: str
    """How messages name one: "a directory", "an s3:// bucket"."""
    example: str
    """How hints show its url: "a directory", "s3://bucket/prefix"."""


class UrlKinds:
    """The url schemes that ``sources`` (or ``targets``) entries accept."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._kinds: dict[str, UrlKind] = {}
        self._builtin: set[str] = set()

    def add(self, kind: UrlKind, *, builtin: bool = False) -> None:
        """Accept ``kind.scheme``. Built-in schemes cannot be replaced, and a scheme is added
        once: a second registration (a leak from an earlier test) raises."""
        if not SCHEME.match(kind.scheme) or kind.scheme in self._kinds:
            raise ValueError(f"cannot register {self.kind} url scheme {kind.scheme!r}")
        self._kinds[kind.scheme] = kind
        if builtin:
            self._builtin.add(kind.scheme)

    def remove(self, scheme: str) -> None:
        """Undo :meth:`add`; unknown schemes are ignored, built-in ones refused."""
        if scheme in self._builtin:
            raise ValueError(f"cannot unregister built-in {self.kind} url scheme {scheme!r}")
        self._kinds.pop(scheme, None)

    def get(self, url: str) -> UrlKind | None:
        return self._kinds.get(scheme_of(url))

    def __iter__(self) -> Iterator[UrlKind]:
        return iter(list(self._kinds.values()))

    def examples(self) -> str:
        """The accepted kinds of url, for hints: "a directory or s3://bucket/prefix"."""
        shown = [k.example for k in self._kinds.values()]
        return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"

    def unsupported(self, name: str, url: str) -> ConfigError:
        return ConfigError(f"{self.kind} {name}: unsupported url {url!r} (use {self.examples()})")


SOURCE_URLS = UrlKinds("source")
TARGET_URLS = UrlKinds("target")
for _urls, _posix, _s3 in (
    (SOURCE_URLS, PosixSourceConfig, S3SourceConfig),
    (TARGET_URLS, PosixTargetConfig, S3TargetConfig),
):
    _urls.add(UrlKind("file", _posix, "a directory", "a directory"), builtin=True)
    _urls.add(UrlKind("s3", _s3, "an s3:// bucket", "s3://bucket/prefix"), builtin=True)


def _by_scheme(urls: UrlKinds, base: type[_Endpoint], value: Any) -> Any:
    """Validate one ``sources``/``targets`` entry with the model registered for its url's scheme."""
    if isinstance(value, base):
        return value  # built in code (or a model_copy), already validated
    if not isinstance(value, Mapping) or not isinstance(value.get("url"), str):
        return base.model_validate(value)  # reports what is missing or wrong
    kind = urls.get(value["url"])
    if kind is None:
        raise _fail("url", f"unsupported url (use {urls.examples()})", value["url"])
    fields = kind.model.model_fields
    for key in value:
        if key in fields:
            continue
        owners = [k.scheme for k in urls if key in k.model.model_fields]
        if owners:
            where = " or ".join(f"{scheme}://" for scheme in owners)
            raise _fail(key, f"does not apply to {kind.what} (only to {where} {urls.kind}s)", value[key])
    return kind.model.model_validate(value)


def _source_entry(value: Any) -> Any:
    return _by_scheme(SOURCE_URLS, SourceConfig, value)


def _target_entry(value: Any) -> Any:
    return _by_scheme(TARGET_URLS, TargetConfig, value)


SourceEntry = Annotated[SerializeAsAny[SourceConfig], PlainValidator(_source_entry)]
"""A source of any registered backend (serialized with all of its backend's fields)."""
TargetEntry = Annotated[SerializeAsAny[TargetConfig], PlainValidator(_target_entry)]
"""A target of any registered backend (serialized with all of its backend's fields)."""


def _validated(validate: Callable[[Any], Any], data: Mapping[str, Any], origin: str) -> Any:
    """``validate(data)``, its ValidationError turned into one ConfigError line."""
    try:
        return validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {_describe(exc)}") from None


def source_config(data: Mapping[str, Any], origin: str = "source") -> SourceConfig:
    """One source entry, validated as ``sources[i]`` of a config file is."""
    entry: SourceConfig = _validated(_source_entry, data, origin)
    return entry


def target_config(data: Mapping[str, Any], origin: str = "target") -> TargetConfig:
    """One target entry, validated as ``targets[i]`` of a config file is (``--repo URL``)."""
    entry: TargetConfig = _validated(_target_entry, data, origin)
    return entry


def object_options(data: Mapping[str, Any], origin: str = "options") -> S3ObjectOptions:
    """S3 object options validated as a target's are (a restore's ``--dest-*``)."""
    options: S3ObjectOptions = _validated(S3ObjectOptions.model_validate, data, origin)
    return options


class AlertsConfig(_Model):
    webhooks: list[SecretStr] = Field(default_factory=list)
    """URLs that receive a JSON POST on every breach and recovery (Slack-compatible ``text``).
    Treated as secrets: tokens in webhook URLs never reach the logs."""
    repeat: Duration = 1800.0
    """Re-send a breach at most this often while it lasts."""
    timeout: Duration = 10.0


def _listen(value: str | None) -> str | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("use host:port, e.g. 127.0.0.1:9464")
    return value


class Config(_Model):
    state_dir: Path = Field(default_factory=lambda: default_state_dir())
    sources: list[SourceEntry] = Field(default_factory=list)
    targets: list[TargetEntry] = Field(default_factory=list)
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    log_level: Literal["debug", "info", "warning", "error"] | None = None
    """Default: info for ``replicator run``, warning for one-shot commands."""
    memory_budget: Size = 256 << 20
    """Upper bound on chunk bytes held in memory between reading and the last upload."""
    catch_up_bandwidth: Annotated[int, BeforeValidator(parse_rate)] | None = 256 << 20
    """``replicator run``: how fast a target returning from an outage may re-read what it
    missed from the sources (bytes per second, e.g. ``256MiB/s``; null: unpaced). Catch-up also
    waits whenever a new candidate is being read, so current targets never wait for it."""
    shutdown_grace: Duration = 30.0
    """``replicator run``: on SIGTERM/SIGINT, let in-flight work finish for this long."""
    listen: Annotated[str | None, BeforeValidator(_listen)] = "127.0.0.1:9464"
    """``replicator run`` serves /metrics, /healthz, /readyz and /status here (None: off).
    Localhost by default: expose it deliberately (e.g. 0.0.0.0:9464 in a pod)."""
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    budget: BudgetConfig | None = None
    """A global budget over all targets' spend, in addition to per-target ones."""

    @model_validator(mode="after")
    def _unique(self) -> Config:
        for what, items in (("sources", self.sources), ("targets", self.targets)):
            names = [i.name for i in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {what} name {dupes[0]!r}")
        targets = {t.name for t in self.targets}
        for s in self.sources:
            unknown = sorted(set(s.rpo_overrides) - targets)
            if unknown:
                raise ValueError(f"source {s.name}: rpo_overrides names unknown target {unknown[0]!r}")
            unknown = sorted(set(s.retention_overrides) - targets)
            if unknown:
                raise ValueError(f"source {s.name}: retention_overrides names unknown target {unknown[0]!r}")
        self._no_overlap()
        return self

    def _no_overlap(self) -> None:
        """A replica must never lie inside what it replicates, nor the reverse: the daemon would
        copy its own repository (or its state) forever, a new snapshot every few seconds."""
        for s in self.sources:
            where = s.location()
            for t in self.targets:
                there = t.location()
                if _within(there, where):
                    raise ValueError(
                        f"target {t.name} ({_show(there)}) is inside source {s.name} ({_show(where)}): "
                        "it would replicate its own repository"
                    )
                if _within(where, there):
                    raise ValueError(
                        f"source {s.name} ({_show(where)}) is inside target {t.name} ({_show(there)}): "
                        "it would replicate the repository"
                    )
            state = ("file", None, str(self.state_dir.expanduser().resolve()))
            if _within(state, where):
                raise ValueError(
                    f"state_dir ({self.state_dir}) is inside source {s.name} ({_show(where)}): "
                    "it would replicate its own state"
                )

    def secret_values(self) -> list[str]:
        """Every credential in the config, for the log redactor."""
        items: list[_Endpoint] = [*self.sources, *self.targets]
        keys = [
            value.get_secret_value()
            for item in items
            for name in type(item).model_fields
            if isinstance(value := getattr(item, name), SecretStr)
        ]
        for t in self.targets:
            if isinstance(t, S3TargetConfig) and t.sse is not None and t.sse.customer_key is not None:
                # as written, and as botocore sends it (its own base64 of the key: the header a
                # --log-level debug request log would show)
                keys.append(t.sse.customer_key.get_secret_value())
                keys.append(base64.b64encode(t.sse.customer_key_bytes()).decode())
        return keys + [w.get_secret_value() for w in self.alerts.webhooks]

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        known = [s.name for s in self.sources]
        raise ConfigError(f"no source named {name!r}{did_you_mean(name, known)} (known: {', '.join(known)})")

    def target(self, name: str) -> TargetConfig:
        for t in self.targets:
            if t.name == name:
                return t
        known = [t.name for t in self.targets]
        raise ConfigError(f"no target named {name!r}{did_you_mean(name, known)} (known: {', '.join(known)})")


def _within(inner: Location, outer: Location) -> bool:
    inner_path = inner[2] if inner[2].endswith("/") else inner[2] + "/"
    return inner[:2] == outer[:2] and inner_path.startswith(outer[2])


def _show(location: Location) -> str:
    path = location[2].rstrip("/")
    return path if location[0] == "file" else f"{location[0]}://{path}"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "replicator"


# --- loading -----------------------------------------------------------------------------


def _loc(path: tuple[str | int, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _expand(node: Any, path: tuple[str | int, ...]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            literal = not (isinstance(v, str) and _ENV_REF.fullmatch(v.strip()))
            if isinstance(k, str) and k in SECRET_FIELDS and v is not None and literal:
                raise ConfigError(
                    f"{_loc((*path, k))}: secrets must not be written in the file",
                    hint="write ${SOME_ENV_VAR} or rely on the standard AWS credential chain",
                )
            out[k] = _expand(v, (*path, k))
        return out
    if isinstance(node, list):
        return [_expand(v, (*path, i)) for i, v in enumerate(node)]
    if isinstance(node, str):
        return expand_env(node, _loc(path))
    return node


def expand_env(text: str, where: str = "value") -> str:
    """Replace ``${VAR}`` with the environment's value; ``$${`` stays a literal ``${``."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return os.environ[name]

    pieces = text.split("$${")
    return "${".join(_ENV_REF.sub(sub, piece) for piece in pieces)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and "://" not in value:
            p = Path(value).expanduser()
            return str(p if p.is_absolute() else (base / p).resolve())
        return value

    if "state_dir" in data:
        data["state_dir"] = fix(data["state_dir"])
    for section in ("sources", "targets"):
        for item in data.get(section) or []:
            if isinstance(item, dict) and "url" in item:
                item["url"] = fix(item["url"])


def _describe(err: ValidationError, data: Any = None, root: type[BaseModel] | None = None) -> str:
    """The first problem as one line, and how many more there are. ``data`` (what was
    validated) and ``root`` (its model) let a misspelt field name suggest the right one."""
    problems = err.errors()
    text = _describe_one(problems[0], data, root)
    more = len(problems) - 1
    if more:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return text


def _describe_one(error: Any, data: Any, root: type[BaseModel] | None) -> str:
    loc = tuple(error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden" and loc:
        model = _model_at(loc[:-1], data, root) if root is not None else None
        msg = "unknown setting"
        if model is not None:
            msg += did_you_mean(str(loc[-1]), model.model_fields)
    text = f"{_loc(loc)}: {msg}" if loc else msg
    shows_input = error["type"] not in ("missing", "extra_forbidden") and "input" in error
    if shows_input and not isinstance(error["input"], dict | list):
        field = loc[-1] if loc else None
        shown = "***" if field in SECRET_FIELDS else repr(error["input"])
        text += f" (got {shown})"
    return text


def _model_at(loc: tuple[str | int, ...], data: Any, model: type[BaseModel]) -> type[BaseModel] | None:
    """The model that validates the mapping at ``loc`` of ``data`` (validated by ``model``):
    the backend's for a ``sources``/``targets`` entry, by its url. None when unknown."""
    node = data
    for i, part in enumerate(loc):
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if part not in model.model_fields:
            return None
        node = node.get(part) if isinstance(node, Mapping) else None
        if model is Config and part in ("sources", "targets"):
            index = loc[i + 1] if i + 1 < len(loc) else None
            in_list = isinstance(node, list) and isinstance(index, int) and index < len(node)
            entry = node[index] if in_list else None  # type: ignore[index]
            url = entry.get("url") if isinstance(entry, Mapping) and index is not None else None
            urls = SOURCE_URLS if part == "sources" else TARGET_URLS
            kind = urls.get(url) if isinstance(url, str) else None
            if kind is None:
                return None
            model = kind.model
            continue
        sub = _submodel(model.model_fields[part].annotation)
        if sub is None:
            return None
        model = sub
    return model


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (``X``, ``X | None``), or None."""
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def describe_all(err: ValidationError, data: Any = None, root: type[BaseModel] | None = None) -> list[str]:
    """Every problem, one line each (``replicator config check``)."""
    return [_describe_one(e, data, root) for e in err.errors()]


def parse_config(data: Any, base_dir: Path, origin: str = "config") -> Config:
    """Validate already-parsed YAML data; ``base_dir`` anchors relative paths."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    expanded = _expand(data, ())
    _resolve_paths(expanded, base_dir)
    try:
        return Config.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {_describe(exc, expanded, Config)}") from None


def load_config(path: str | Path) -> Config:
    """Read, expand and validate a configuration file."""
    p = Path(path)
    return parse_config(_read_yaml(p), p.resolve().parent, str(p))


def check_config_file(path: str | Path) -> tuple[Config | None, list[str]]:
    """As :func:`load_config`, but every validation problem is reported, one line each
    (``replicator config check``): the config, or None and its problems. Problems found before
    validation (YAML syntax, an unset ``${VAR}``, a secret in the file) stop at the first."""
    p = Path(path)
    try:
        data = _read_yaml(p)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}")
        expanded = _expand(data, ())
        _resolve_paths(expanded, p.resolve().parent)
    except ConfigError as exc:
        return None, [str(exc)]
    try:
        return Config.model_validate(expanded), []
    except ValidationError as exc:
        return None, describe_all(exc, expanded, Config)


def _read_yaml(p: Path) -> Any:
    import yaml  # ~15 ms to import (it compiles its resolver regexes): only for a config file

    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: {problem}{where}") from None
