"""Converting S3 SDK exceptions (botocore, aiohttp) into replicator's error vocabulary."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import botocore.exceptions

from replicator.errors import (
    ConfigError,
    NotFoundError,
    PermanentTargetError,
    TargetError,
    TargetUnreachableError,
    TransientTargetError,
)

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


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an SDK error, when the server answered at all."""
    # Transport errors (a read timeout) carry ``response = None``, not a missing attribute.
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status else None


def convert_error(exc: BaseException, *, target: str, operation: str, key: str) -> TargetError:
    """Map one of :data:`SDK_ERRORS` to our error vocabulary (never NotFound by accident)."""
    bex = botocore.exceptions
    ctx: dict[str, Any] = {"target": target, "operation": operation, "key": key}
    if isinstance(exc, TargetError):
        return exc
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = http_status(exc) or 0
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
    if isinstance(exc, bex.ReadTimeoutError | aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        # Connected, then no answer: a hung server or a route that drops packets. For the
        # user it is a target that cannot be reached (exit code 3), like a refused one.
        return TargetUnreachableError(f"no answer within the timeout: {exc or type(exc).__name__}", **ctx)
    return TransientTargetError(f"{type(exc).__name__}: {exc}", **ctx)


SDK_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ClientError,
    botocore.exceptions.BotoCoreError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    OSError,
)
"""What S3 calls may raise besides bugs; everything else propagates unconverted."""


def profile_error(kind: str, name: str, profile: str) -> ConfigError:
    """A config error for an S3 source or target (``kind`` ``name``) whose ``profile:`` the AWS
    config files do not define (botocore's ProfileNotFound): a setting to fix, not a target
    failure to retry."""
    return ConfigError(
        f"{kind} {name}: AWS profile {profile!r} does not exist",
        hint=f"add [profile {profile}] to the AWS config file of the user running replicator "
        "(AWS_CONFIG_FILE, default ~/.aws/config), or remove profile: to use the default chain",
    )
