"""S3 plumbing shared by S3 targets and S3 sources: URLs, clients and error conversion.

Credentials always come from botocore's standard chain (environment, shared profile, web
identity, instance metadata) unless the config gives ``${ENV}``-expanded keys. botocore's own
retries are reduced to a single attempt: retrying is the job of
:class:`replicator.targets.wrappers.RetryingTarget`, whose budget does not run dry in a long
outage (Litestream learned this with the AWS SDK's retryer).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import botocore.exceptions
from pydantic import SecretStr

from replicator.errors import (
    NotFoundError,
    PermanentTargetError,
    TargetError,
    TargetUnreachableError,
    TransientTargetError,
)

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "BadDigest",
    "OperationAborted",
    "XAmzContentSHA256Mismatch",
    "ExpiredToken",
    "TokenRefreshRequired",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    """Empty, or ends with ``/``."""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def parse_s3_url(url: str) -> S3Location:
    if not is_s3_url(url):
        raise ValueError(f"not an s3:// url: {url!r}")
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"invalid bucket name {bucket!r} in {url!r}")
    prefix = prefix.strip("/")
    return S3Location(bucket, f"{prefix}/" if prefix else "")


@dataclass(frozen=True)
class S3Settings:
    """Connection settings common to targets and sources (a subset of their config)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    sdk_checksums: Literal["when_required", "when_supported"] = "when_required"
    timeout: float = 60.0
    max_connections: int = 10

    @classmethod
    def from_config(cls, cfg: Any, max_connections: int = 10) -> S3Settings:
        fields = (
            "endpoint_url",
            "region",
            "profile",
            "access_key_id",
            "secret_access_key",
            "session_token",
            "addressing_style",
            "sdk_checksums",
            "timeout",
        )
        return cls(
            **{f: getattr(cfg, f) for f in fields if getattr(cfg, f, None) is not None},
            max_connections=max_connections,
        )

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``session.create_client('s3', **kwargs)`` minus ``config``."""
        kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        # S3-compatible servers rarely care about the region, but SigV4 needs one.
        region = self.region or ("us-east-1" if self.endpoint_url else None)
        if region:
            kwargs["region_name"] = region
        if self.access_key_id and self.secret_access_key:
            kwargs["aws_access_key_id"] = self.access_key_id.get_secret_value()
            kwargs["aws_secret_access_key"] = self.secret_access_key.get_secret_value()
            if self.session_token:
                kwargs["aws_session_token"] = self.session_token.get_secret_value()
        return kwargs

    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for botocore's ``Config`` / aiobotocore's ``AioConfig``."""
        style = self.addressing_style
        if style == "auto" and self.endpoint_url:
            style = "path"  # virtual-host addressing needs DNS the S3-compatible server rarely has
        return {
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": self.timeout,
            "read_timeout": self.timeout,
            "max_pool_connections": self.max_connections,
            "request_checksum_calculation": self.sdk_checksums,
            "response_checksum_validation": self.sdk_checksums,
            "s3": {"addressing_style": style},
        }


def convert_error(exc: BaseException, *, target: str, operation: str, key: str) -> TargetError:
    """Map one of :data:`SDK_ERRORS` to our error vocabulary (never NotFound by accident)."""
    bex = botocore.exceptions
    ctx: dict[str, Any] = {"target": target, "operation": operation, "key": key}
    if isinstance(exc, TargetError):
        return exc
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = f"{code or status}: {err.get('Message') or 'no message'}"
        if code == "NoSuchBucket":
            return PermanentTargetError(message, hint="create the bucket or fix the url", **ctx)
        if code in _NOT_FOUND_CODES or (status == 404 and not code):
            return NotFoundError("no such object", **ctx)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientTargetError(message, **ctx)
        hint = None
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            hint = "check the credentials and the bucket policy"
        return PermanentTargetError(message, hint=hint, **ctx)
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError | bex.ProfileNotFound):
        return PermanentTargetError(
            str(exc), hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or web identity", **ctx
        )
    if isinstance(exc, bex.EndpointConnectionError | bex.ConnectTimeoutError | aiohttp.ClientConnectorError):
        return TargetUnreachableError(f"cannot connect: {exc}", **ctx)
    return TransientTargetError(f"{type(exc).__name__}: {exc}", **ctx)


SDK_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ClientError,
    botocore.exceptions.BotoCoreError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    OSError,
)
"""What S3 calls may raise besides bugs; everything else propagates unconverted."""
