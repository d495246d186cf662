"""A source in an S3 bucket: the primary cloud's object store.

Objects under the prefix are the files; their signature is ETag, size and LastModified, so a
listing diff finds every change (the daemon polls the listing). Reads stream the object
(boto3, in a worker thread) with ``If-Match: <ETag>``: if the object is overwritten while we
read, S3 answers 412 and the read is retried later, never recorded torn. S3 itself serves a
GET from one version, so a read that completes is consistent.

Keys are UTF-8 and may hold newlines, tabs and backslashes, which are kept as they are. Keys
that cannot be safe relative paths (``..`` or ``.`` segments, ``//``, a segment over 255
bytes) are skipped with a warning and named in the listing's ``unreadable`` (sync's
``skipped``: a name is never left out in silence); "directory marker" objects (keys ending
in ``/``) are ignored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config as BotoConfig

from replicator.config import S3Access
from replicator.errors import FileChangedError, SourceError
from replicator.globs import PathFilter
from replicator.log import get_logger
from replicator.paths import check_relative_path
from replicator.s3.errors import SDK_ERRORS, convert_error, http_status, profile_error
from replicator.s3.location import S3Location
from replicator.s3.settings import client_kwargs, config_kwargs
from replicator.sources.base import Listing, Readable, SourceFile

log = get_logger(__name__)


class _ObjectStream:
    """readinto() over a botocore StreamingBody, counting the bytes delivered."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.read_bytes = 0

    def readinto(self, buffer: memoryview, /) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        self.read_bytes += len(data)
        return len(data)

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0, /) -> int:
        raise OSError("S3 object streams are not seekable")

    def close(self) -> None:
        self.body.close()


class S3Source:
    read_concurrency = 4
    """Each small object is a GET round trip: overlap a few."""
    read_in_helper = False  # holds an SDK client; reads wait on the network, not the GIL

    def __init__(self, name: str, location: S3Location, access: S3Access, path_filter: PathFilter) -> None:
        self.name = name
        self.location = location
        self.url = location.url
        self.filter = path_filter
        try:
            session = (
                boto3.session.Session(profile_name=access.profile)
                if access.profile
                else boto3.session.Session()
            )
            self.client = session.client(
                "s3", config=BotoConfig(**config_kwargs(access)), **client_kwargs(access)
            )
        except botocore.exceptions.ProfileNotFound:
            raise profile_error("source", name, access.profile or "") from None

    def _error(self, exc: BaseException, op: str, key: str) -> SourceError:
        err = convert_error(exc, target=self.name, operation=op, key=key)
        return SourceError(err.message, operation=op, key=key, hint=err.hint, retryable=err.retryable)

    def _describe(self, obj: dict[str, Any], listing: Listing | None = None) -> SourceFile | None:
        rel = obj["Key"][len(self.location.prefix) :]
        if not rel or rel.endswith("/") or not self.filter(rel):
            return None
        try:
            check_relative_path(rel)
        except ValueError as exc:
            log.warning("source.skipped", source=self.name, path=rel, reason=str(exc))
            if listing is not None:
                listing.unreadable[rel] = str(exc)  # in sync's skipped: never left out in silence
            return None
        etag = str(obj["ETag"]).strip('"')
        mtime_ns = int(obj["LastModified"].timestamp() * 1_000_000_000)
        size = int(obj.get("Size", obj.get("ContentLength", 0)))
        return SourceFile(rel, size, mtime_ns, 0o644, f"{etag}:{size}:{mtime_ns}")

    async def scan(self, found: Callable[[SourceFile], None] | None = None) -> Listing:
        return await self._list("", found)

    async def scan_below(self, path: str) -> Listing:
        return await self._list(path)

    async def _list(self, path: str, found: Callable[[SourceFile], None] | None = None) -> Listing:
        def scan() -> Listing:
            listing = Listing()
            out = listing.files
            paginator = self.client.get_paginator("list_objects_v2")
            try:
                for page in paginator.paginate(
                    Bucket=self.location.bucket, Prefix=self.location.prefix + path
                ):
                    for obj in page.get("Contents", []):
                        file = self._describe(obj, listing)
                        if file is not None:
                            out.append(file)
                            if found is not None:
                                found(file)
            except SDK_ERRORS as exc:
                raise self._error(exc, "scan", self.url) from exc
            out.sort(key=lambda f: f.path)
            return listing

        return await asyncio.to_thread(scan)

    async def stat(self, path: str) -> SourceFile | None:
        def head() -> SourceFile | None:
            try:
                resp = self.client.head_object(Bucket=self.location.bucket, Key=self.location.prefix + path)
            except SDK_ERRORS as exc:
                if http_status(exc) == 404:
                    return None
                raise self._error(exc, "stat", path) from exc
            return self._describe({**resp, "Key": self.location.prefix + path})

        return await asyncio.to_thread(head)

    def open(self, file: SourceFile) -> Readable:
        etag = file.signature.split(":", 1)[0]
        try:
            resp = self.client.get_object(
                Bucket=self.location.bucket, Key=self.location.prefix + file.path, IfMatch=f'"{etag}"'
            )
        except SDK_ERRORS as exc:
            status = http_status(exc)
            if status in (404, 412):
                raise FileChangedError(
                    "object changed or vanished before it was read", key=file.path
                ) from exc
            raise self._error(exc, "read", file.path) from exc
        return _ObjectStream(resp["Body"])

    def confirm(self, file: SourceFile, handle: Readable) -> None:
        assert isinstance(handle, _ObjectStream)
        if handle.read_bytes != file.size:
            raise FileChangedError(
                f"read {handle.read_bytes} of {file.size} bytes", operation="read", key=file.path
            )

    async def close(self) -> None:
        self.client.close()
