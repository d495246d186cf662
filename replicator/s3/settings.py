"""S3 client settings shared by S3 targets and S3 sources (URLs: :mod:`replicator.s3.location`).

Kept free of SDK imports so that commands on POSIX-only configs start fast; the SDK-facing
half (error conversion) is :mod:`replicator.s3.errors`.

Credentials always come from botocore's standard chain (environment, shared profile, web
identity, instance metadata) unless the config gives ``${ENV}``-expanded keys. botocore's own
retries are reduced to a single attempt: retrying is the job of
:class:`replicator.targets.wrappers.RetryingTarget`, whose budget does not run dry in a long
outage (Litestream learned this with the AWS SDK's retryer).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

if TYPE_CHECKING:
    from replicator.config import Config, S3Access, S3ObjectOptions
    from replicator.errors import ConfigError


def client_kwargs(access: S3Access) -> dict[str, Any]:
    """Keyword arguments for ``session.create_client('s3', **kwargs)`` minus ``config``."""
    kwargs: dict[str, Any] = {}
    if access.endpoint_url:
        kwargs["endpoint_url"] = access.endpoint_url
    # S3-compatible servers rarely care about the region, but SigV4 needs one.
    region = access.region or ("us-east-1" if access.endpoint_url else None)
    if region:
        kwargs["region_name"] = region
    if access.access_key_id and access.secret_access_key:
        kwargs["aws_access_key_id"] = access.access_key_id.get_secret_value()
        kwargs["aws_secret_access_key"] = access.secret_access_key.get_secret_value()
        if access.session_token:
            kwargs["aws_session_token"] = access.session_token.get_secret_value()
    return kwargs


def is_loopback(url: str) -> bool:
    """Whether ``url`` names this machine (localhost, 127.0.0.0/8, ::1)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_kwargs(access: S3Access, max_connections: int = 10) -> dict[str, Any]:
    """Keyword arguments for botocore's ``Config`` / aiobotocore's ``AioConfig``."""
    style = access.addressing_style
    if style == "auto" and access.endpoint_url:
        style = "path"  # virtual-host addressing needs DNS the S3-compatible server rarely has
    s3: dict[str, Any] = {"addressing_style": style}
    url = access.endpoint_url
    if url is None or url.lower().startswith("https://") or is_loopback(url):
        # Over plain HTTP botocore signs a SHA-256 of every body so that nothing on the network
        # can alter it; a loopback endpoint (a local gateway such as `rclone serve s3` or MinIO)
        # has no network in between, and over HTTPS TLS guards the body. Every PUT's checksum
        # header still lets the server reject a damaged body. botocore itself skips the
        # SHA-256 over HTTPS only when it sees Content-MD5 or a checksum it computed: the
        # x-amz-checksum-crc32 we compute (replicator.s3.checksums) would be hashed twice.
        s3["payload_signing_enabled"] = False
    return {
        # total_max_attempts, not max_attempts: botocore counts the latter as retries, so 1
        # made every request twice (a blackholed request took two timeouts).
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        "connect_timeout": access.timeout,
        "read_timeout": access.timeout,
        "max_pool_connections": max_connections,
        "request_checksum_calculation": access.sdk_checksums,
        "response_checksum_validation": access.sdk_checksums,
        "s3": s3,
    }


@dataclass(frozen=True)
class ObjectParams:
    """Request parameters that :class:`~replicator.config.S3ObjectOptions` add to the requests
    on the objects replicator writes. Holds an SSE-C key: never log it."""

    write: dict[str, Any] = field(default_factory=dict)
    """PutObject and CreateMultipartUpload: encryption, storage class, tags."""
    read: dict[str, Any] = field(default_factory=dict)
    """GetObject, HeadObject, UploadPart and CompleteMultipartUpload: the SSE-C key, without
    which S3 refuses to serve (or extend) an object encrypted with it."""

    def __repr__(self) -> str:
        return f"ObjectParams(write={sorted(self.write)}, read={sorted(self.read)})"


def object_params(options: S3ObjectOptions | None) -> ObjectParams:
    """The request parameters for ``options`` (none for None: the bucket's defaults)."""
    if options is None:
        return ObjectParams()
    write: dict[str, Any] = {}
    read: dict[str, Any] = {}
    sse = options.sse
    if sse is not None and sse.type == "aes256":
        write["ServerSideEncryption"] = "AES256"
    elif sse is not None and sse.type == "kms":
        write["ServerSideEncryption"] = "aws:kms"
        if sse.kms_key_id:
            write["SSEKMSKeyId"] = sse.kms_key_id
    elif sse is not None:
        # botocore adds the key's base64 and its MD5 (SSECustomerKeyMD5) to each request.
        read = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": sse.customer_key_bytes()}
        write.update(read)
    if options.storage_class:
        write["StorageClass"] = options.storage_class
    if options.tags:
        write["Tagging"] = urlencode(options.tags)  # the x-amz-tagging header: a URL query string
    return ObjectParams(write, read)


def check_profiles(config: Config) -> None:
    """A ConfigError for the first S3 source or target whose ``profile:`` the AWS config files
    do not define: ``replicator run`` checks before it starts (its loops would retry it
    forever). One-shot commands meet it where the client is made
    (:func:`replicator.s3.errors.profile_error`)."""
    missing = missing_profiles(config)
    if missing:
        raise missing[0]


def missing_profiles(config: Config) -> list[ConfigError]:
    """A ConfigError for each S3 source or target whose ``profile:`` the AWS config files do
    not define (``replicator config check`` lists them all)."""
    from replicator.config import S3SourceConfig, S3TargetConfig

    named = [
        (kind, item.name, item.profile)
        for kind, items in (("source", config.sources), ("target", config.targets))
        for item in items
        if isinstance(item, S3SourceConfig | S3TargetConfig) and item.profile
    ]
    if not named:
        return []  # no SDK import for configs without profiles
    import botocore.session

    from replicator.s3.errors import profile_error

    available = set(botocore.session.Session().available_profiles)
    return [profile_error(kind, name, profile) for kind, name, profile in named if profile not in available]
