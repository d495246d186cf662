"""A target in an S3-compatible bucket (AWS S3, GCS's XML API, R2, MinIO, Ceph, rclone...).

Every PUT carries an integrity checksum the server verifies before it stores anything: with
``checksum: auto`` (the default) CRC32 where the server verifies flexible checksums, else
Content-MD5, detected once per target at its first PUT (:mod:`replicator.s3.checksums`). A
PUT is atomic on S3, so partial objects are never visible. Bodies are also
SHA-256-signed over plain HTTP, except to a loopback endpoint (see ``replicator.s3.settings``).

HEAD answers carry no error code, so to ``stat`` a missing bucket looks like a missing key;
the repository therefore always starts with a GET of its config object, which does tell
(NoSuchBucket is a permanent error).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import secrets
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import botocore.compat
import botocore.exceptions
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

from replicator.config import S3Access
from replicator.errors import (
    AlreadyExistsError,
    ConfigError,
    NotFoundError,
    PermanentTargetError,
    TransientTargetError,
)
from replicator.format.chunks import Buffer
from replicator.log import get_logger
from replicator.s3.checksums import HASH_IN_THREAD, PROBE_BODY, PROBE_PREFIX, Detected, checksum_args, detect
from replicator.s3.errors import SDK_ERRORS, convert_error, http_status, profile_error
from replicator.s3.location import S3Location
from replicator.s3.settings import ObjectParams, client_kwargs, config_kwargs
from replicator.targets.base import ObjectInfo, check_key

log = get_logger(__name__)


async def content_md5(data: Buffer) -> str:
    """The Content-MD5 header for ``data``. MD5 runs at ~600 MiB/s here: hashing a whole chunk
    on the event loop would stall every other request, so a big body is hashed in a thread
    (hashlib releases the GIL)."""
    if len(data) >= HASH_IN_THREAD:
        return await asyncio.to_thread(_content_md5, data)
    return _content_md5(data)


def _content_md5(data: Buffer) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


async def connect(
    stack: contextlib.AsyncExitStack,
    access: S3Access,
    max_connections: int,
    *,
    name: str,
    url: str,
    kind: str = "target",
) -> Any:
    """An aiobotocore S3 client entered into ``stack`` (closed with it); errors name ``kind
    name``. A profile the AWS config does not define is a ConfigError (exit code 2)."""
    session = AioSession(profile=access.profile) if access.profile else AioSession()
    try:
        return await stack.enter_async_context(
            session.create_client(
                "s3", config=AioConfig(**config_kwargs(access, max_connections)), **client_kwargs(access)
            )
        )
    except botocore.exceptions.ProfileNotFound:
        raise profile_error(kind, name, access.profile or "") from None
    except SDK_ERRORS as exc:
        raise convert_error(exc, target=name, operation="connect", key=url) from exc


class S3Target:
    def __init__(
        self, name: str, location: S3Location, checksum: str = "auto", params: ObjectParams | None = None
    ) -> None:
        self.name = name
        self.location = location
        self.url = location.url
        self.checksum = checksum
        """As configured: ``auto`` or the checksum every PUT carries."""
        self.detected: Detected | None = None
        """What ``auto`` chose, once the first PUT has probed the server."""
        self._detecting = asyncio.Lock()
        self.params = params or ObjectParams()
        """Encryption, storage class and tags of every PUT; the SSE-C key of every GET/HEAD."""
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    @classmethod
    async def open(
        cls,
        name: str,
        location: S3Location,
        access: S3Access,
        max_connections: int,
        checksum: str = "auto",
        params: ObjectParams | None = None,
    ) -> S3Target:
        if checksum == "crc32c" and not botocore.compat.HAS_CRT:
            raise ConfigError(
                f"target {name}: checksum crc32c needs the awscrt package",
                hint="pip install awscrt, or use checksum: auto (CRC32 where the server verifies it)",
            )
        self = cls(name, location, checksum, params)
        self._client = await connect(self._stack, access, max_connections, name=name, url=location.url)
        return self

    def _key(self, key: str) -> str:
        return self.location.prefix + check_key(key)

    def _fail(self, exc: BaseException, operation: str, key: str) -> Exception:
        return convert_error(exc, target=self.name, operation=operation, key=key)

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        args: dict[str, Any] = {
            "Bucket": self.location.bucket,
            "Key": self._key(key),
            "Body": data,
            **self.params.write,
        }
        args.update(await checksum_args(await self.checksum_mode(key), data))
        if if_absent:
            args["IfNoneMatch"] = "*"
        try:
            await self._client.put_object(**args)
        except SDK_ERRORS as exc:
            err = self._fail(exc, "put", key)
            status = http_status(exc)
            if if_absent and status == 412:
                raise AlreadyExistsError("object exists", target=self.name, operation="put", key=key) from exc
            if if_absent and status == 501:
                # The server does not implement conditional writes: degrade as documented.
                if await self.stat(key) is not None:
                    raise AlreadyExistsError(
                        "object exists", target=self.name, operation="put", key=key
                    ) from exc
                return await self.put(key, data)
            raise err from exc
        return None

    async def checksum_mode(self, key: str = "") -> str:
        """The checksum PUTs carry: the configured one, or with ``auto`` the one the server
        verifies, probed once (concurrent first PUTs wait for one probe). A probe that fails
        fails the PUT of ``key`` (the next PUT probes again)."""
        if self.checksum != "auto":
            return self.checksum
        if self.detected is None:
            async with self._detecting:
                if self.detected is None:
                    self.detected = await self._detect(key)
        return self.detected.mode

    async def _detect(self, for_key: str) -> Detected:
        key = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
        base = {"Bucket": self.location.bucket, "Key": self._key(key), **self.params.write}

        async def put(checksum: dict[str, str], must_store: bool) -> bool:
            try:
                await self._client.put_object(**base, Body=PROBE_BODY, **checksum)
            except SDK_ERRORS as exc:
                if http_status(exc) == 400 and not must_store:  # BadDigest, InvalidDigest...
                    return False
                raise self._fail(exc, "put", for_key or key) from exc
            return True

        # A failed probe may leave its object: readers ignore tmp/, and deleting it from a
        # server that does not answer would only double the wait.
        found = await detect(put)
        try:
            await self._client.delete_object(Bucket=self.location.bucket, Key=self._key(key))
        except SDK_ERRORS as exc:
            log.warning("s3.checksum_probe_left", target=self.name, key=key, error=str(exc))
        if found.verified:
            log.info("s3.checksum", target=self.name, checksum=found.mode, verified=True)
        else:
            log.warning("s3.checksum_unverified", target=self.name, detail=found.describe())
        return found

    async def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        args: dict[str, Any] = {"Bucket": self.location.bucket, "Key": self._key(key), **self.params.read}
        if length == 0:
            return b""
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"
        try:
            resp = await self._client.get_object(**args)
            async with resp["Body"] as body:
                data: bytes = await body.read()
        except SDK_ERRORS as exc:
            raise self._fail(exc, "get", key) from exc
        expected = resp.get("ContentLength")
        if expected is not None and len(data) != expected:
            raise TransientTargetError(
                f"short read: {len(data)} of {expected} bytes", target=self.name, operation="get", key=key
            )
        return data

    async def stat(self, key: str) -> ObjectInfo | None:
        try:
            resp = await self._client.head_object(
                Bucket=self.location.bucket, Key=self._key(key), **self.params.read
            )
        except SDK_ERRORS as exc:
            status = http_status(exc)
            if status == 404:
                return None
            raise self._fail(exc, "stat", key) from exc
        return ObjectInfo(key, int(resp["ContentLength"]), _timestamp(resp.get("LastModified")))

    async def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        strip = len(self.location.prefix)
        args: dict[str, Any] = {"Bucket": self.location.bucket, "Prefix": self.location.prefix + prefix}
        if start_after is not None:
            args["StartAfter"] = self.location.prefix + start_after
        while True:
            try:
                page = await self._client.list_objects_v2(**args)
            except SDK_ERRORS as exc:
                raise self._fail(exc, "list", prefix) from exc
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][strip:], int(obj["Size"]), _timestamp(obj.get("LastModified")))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                raise PermanentTargetError(
                    "truncated listing without a continuation token",
                    target=self.name,
                    operation="list",
                    key=prefix,
                )
            args["ContinuationToken"] = token

    async def delete(self, key: str) -> None:
        try:
            await self._client.delete_object(Bucket=self.location.bucket, Key=self._key(key))
        except SDK_ERRORS as exc:
            err = self._fail(exc, "delete", key)
            if not isinstance(err, NotFoundError):
                raise err from exc

    async def flush(self) -> None:
        return None  # a PUT is durable when S3 acknowledges it

    async def close(self) -> None:
        await self._stack.aclose()


def _timestamp(value: object) -> float | None:
    """``LastModified`` (botocore parses it into an aware datetime) as Unix seconds."""
    return value.timestamp() if isinstance(value, datetime) else None
