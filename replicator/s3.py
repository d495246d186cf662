"""S3 settings shared by S3 targets and S3 sources: URLs and client configuration.

Kept free of SDK imports so that commands on POSIX-only configs start fast; the SDK-facing
half (error conversion) is :mod:`replicator.s3_errors`.

Credentials always come from botocore's standard chain (environment, shared profile, web
identity, instance metadata) unless the config gives ``${ENV}``-expanded keys. botocore's own
retries are reduced to a single attempt: retrying is the job of
:class:`replicator.targets.wrappers.RetryingTarget`, whose budget does not run dry in a long
outage (Litestream learned this with the AWS SDK's retryer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import SecretStr

from replicator.config import S3Access

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


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
    def from_config(cls, cfg: S3Access, max_connections: int = 10) -> S3Settings:
        return cls(
            endpoint_url=cfg.endpoint_url,
            region=cfg.region,
            profile=cfg.profile,
            access_key_id=cfg.access_key_id,
            secret_access_key=cfg.secret_access_key,
            session_token=cfg.session_token,
            addressing_style=cfg.addressing_style,
            sdk_checksums=cfg.sdk_checksums,
            timeout=cfg.timeout,
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
