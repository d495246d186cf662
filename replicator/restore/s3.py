"""Restore into a bucket: each file becomes one plain object a training job can read directly.

``s3://bucket/prefix`` + the file's path is the key (the manifest path is already proven safe:
relative, no ``.`` or ``..`` segment, no empty segment, so no key escapes the prefix on
servers that map keys to POSIX files; a backslash is an ordinary character there, as in S3).
A key is UTF-8 text of at most 1024 bytes: a file whose name is not valid UTF-8, or whose key
would be longer, cannot be restored into a bucket and fails alone, by name
(:meth:`S3Destination.cannot_hold`). An object appears atomically: a small file is one PUT;
a larger one is a multipart upload whose parts are streamed as chunks arrive (memory per
file is one part), and it becomes visible only when the upload is completed, after the
whole file's digest was checked. A failed file's upload is aborted.

Each object carries the manifest digest in ``x-amz-meta-replicator-digest`` (and the file's
mtime in ``x-amz-meta-replicator-mtime-ns``): a restore run again skips objects whose size
and digest metadata already match. Any other writer replaces the metadata with its object,
so a stale match is not possible through ordinary PUTs.

Every request carries Content-MD5, and transient errors are retried with the target's
backoff policy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from replicator.config import S3Access
from replicator.errors import NotFoundError, PermanentTargetError, TargetError, TransientTargetError
from replicator.format.chunks import Buffer
from replicator.format.manifest import FileEntry
from replicator.paths import encode_path
from replicator.restore.core import FileWriter
from replicator.restore.local import Found
from replicator.retry import RetryPolicy
from replicator.s3.errors import SDK_ERRORS, convert_error, http_status
from replicator.s3.location import S3Location
from replicator.s3.settings import ObjectParams
from replicator.targets.s3 import connect, content_md5

T = TypeVar("T")

PART_SIZE = 16 << 20
"""Multipart part size (and the largest file sent as one PUT); grown for huge files so that
no file needs more than MAX_PARTS parts (S3 allows 10,000)."""
MAX_PARTS = 9_000
DIGEST_META = "replicator-digest"
MTIME_META = "replicator-mtime-ns"
NAME = "destination"
"""How the destination is named in errors and logs."""
MAX_KEY_BYTES = 1024
"""S3's limit on the UTF-8 length of a key."""


def part_size_for(size: int) -> int:
    """Parts of at least PART_SIZE, whole MiB, few enough for S3's part limit."""
    need = -(-size // MAX_PARTS)
    return max(PART_SIZE, -(-need // (1 << 20)) << 20)


class S3Destination:
    """A :class:`~replicator.restore.core.Destination` in an S3-compatible bucket."""

    def __init__(
        self, location: S3Location, access: S3Access, retry: RetryPolicy, params: ObjectParams | None = None
    ) -> None:
        self.location = location
        self.url = location.url
        self.access = access
        self.retry = retry
        self.params = params or ObjectParams()
        """Encryption, storage class and tags of every object written (``--dest-*``)."""
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None

    @classmethod
    async def open(
        cls,
        location: S3Location,
        access: S3Access,
        retry: RetryPolicy,
        max_connections: int,
        params: ObjectParams | None = None,
    ) -> S3Destination:
        """Connect and check that the bucket exists and is reachable."""
        self = cls(location, access, retry, params)
        self.client = await connect(
            self._stack, access, max_connections, name=NAME, url=location.url, kind="restore"
        )
        try:
            await self.client.head_bucket(Bucket=location.bucket)
        except SDK_ERRORS as exc:
            if http_status(exc) == 404:  # HEAD answers carry no error code
                raise PermanentTargetError(
                    "bucket does not exist", target=NAME, operation="connect", key=location.url
                ) from exc
            raise convert_error(exc, target=NAME, operation="connect", key=location.url) from exc
        return self

    def key(self, path: str) -> str:
        return self.location.prefix + path

    def cannot_hold(self, path: str) -> str | None:
        raw = encode_path(path)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "not valid UTF-8: an S3 key cannot hold this name (restore it to a directory)"
        size = len(encode_path(self.location.prefix)) + len(raw)
        if size > MAX_KEY_BYTES:
            return f"a key of {size} bytes: S3 keys are at most {MAX_KEY_BYTES} bytes"
        return None

    async def call(self, operation: str, key: str, request: Callable[[], Awaitable[T]]) -> T:
        """One S3 request, its errors converted and transient ones retried within the policy."""
        backoff = self.retry.backoff()
        while True:
            try:
                return await request()
            except SDK_ERRORS as exc:
                err = convert_error(exc, target=NAME, operation=operation, key=key)
                if not isinstance(err, TransientTargetError) or not await backoff.wait():
                    raise err from exc

    async def examine(self, entry: FileEntry, content: bool = True) -> Found:
        key = self.key(entry.path)
        try:
            head = await self.call(
                "stat",
                key,
                lambda: self.client.head_object(Bucket=self.location.bucket, Key=key, **self.params.read),
            )
        except NotFoundError:
            return "absent"
        # Metadata names are case-insensitive HTTP headers; some servers (rclone) capitalize them.
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        same = int(head.get("ContentLength", -1)) == entry.size and meta.get(DIGEST_META) == entry.digest
        return "same" if content and same else "different"

    async def create(self, entry: FileEntry, replace: bool = True) -> FileWriter:
        # ``replace=False`` relies on the check made just before (examine): not every
        # S3-compatible server honours a conditional PUT (If-None-Match), so none is sent.
        return _S3Object(self, entry)

    async def examine_many(self, entries: Sequence[FileEntry], content: bool = True) -> list[Found]:
        return list(await asyncio.gather(*(self.examine(e, content) for e in entries)))

    async def write_whole(
        self, files: Sequence[tuple[FileEntry, Buffer]], replace: bool = True
    ) -> list[Exception | None]:
        # Every failure is returned: restore_snapshot decides which of them stop the restore.
        async def one(entry: FileEntry, data: Buffer) -> Exception | None:
            writer = _S3Object(self, entry)
            try:
                await writer.write(data)
                await writer.commit()
            except TargetError as exc:
                await writer.discard()
                return exc
            return None

        return list(await asyncio.gather(*(one(entry, data) for entry, data in files)))

    async def flush(self) -> None:
        """Nothing to do: S3 acknowledges a PUT or a completed multipart upload only once the
        object is stored durably, so every committed object already is."""

    async def close(self) -> None:
        await self._stack.aclose()


class _S3Object:
    """One object being uploaded: buffered up to a part, multipart beyond one part."""

    def __init__(self, dest: S3Destination, entry: FileEntry) -> None:
        self.dest, self.entry = dest, entry
        self.key = dest.key(entry.path)
        self.part_size = part_size_for(entry.size)
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []

    def _args(self) -> dict[str, Any]:
        return {"Bucket": self.dest.location.bucket, "Key": self.key}

    def _metadata(self) -> dict[str, str]:
        return {DIGEST_META: self.entry.digest, MTIME_META: str(self.entry.mtime_ns)}

    async def write(self, data: Buffer) -> None:
        self.buffer += data
        while len(self.buffer) >= self.part_size and self.entry.size > self.part_size:
            with memoryview(self.buffer) as view:
                part = bytes(view[: self.part_size])
            del self.buffer[: self.part_size]
            await self._send_part(part)

    async def _send_part(self, body: bytes) -> None:
        client = self.dest.client
        if self.upload_id is None:
            started = await self.dest.call(
                "create multipart upload",
                self.key,
                lambda: client.create_multipart_upload(
                    **self._args(), **self.dest.params.write, Metadata=self._metadata()
                ),
            )
            self.upload_id = str(started["UploadId"])
        number = len(self.parts) + 1
        md5 = await content_md5(body)  # once, not again for every retry
        answer = await self.dest.call(
            "upload part",
            self.key,
            lambda: client.upload_part(
                **self._args(),
                **self.dest.params.read,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=body,
                ContentMD5=md5,
            ),
        )
        self.parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    async def commit(self) -> None:
        client = self.dest.client
        if self.upload_id is None:
            body = bytes(self.buffer)
            md5 = await content_md5(body)
            await self.dest.call(
                "put",
                self.key,
                lambda: client.put_object(
                    **self._args(),
                    **self.dest.params.write,
                    Body=body,
                    ContentMD5=md5,
                    Metadata=self._metadata(),
                ),
            )
        else:
            if self.buffer:
                await self._send_part(bytes(self.buffer))
            upload_id, parts = self.upload_id, {"Parts": self.parts}
            await self.dest.call(
                "complete multipart upload",
                self.key,
                lambda: client.complete_multipart_upload(
                    **self._args(), **self.dest.params.read, UploadId=upload_id, MultipartUpload=parts
                ),
            )
            self.upload_id = None
        self.buffer = bytearray()

    async def discard(self) -> None:
        self.buffer = bytearray()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            with contextlib.suppress(*SDK_ERRORS):  # an orphaned upload is invisible; lifecycle rules reap it
                await self.dest.client.abort_multipart_upload(**self._args(), UploadId=upload_id)
