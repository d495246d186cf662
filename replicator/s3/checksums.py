"""The integrity checksum every PUT to an S3 target carries, and which one a server verifies.

A PUT's checksum header lets the server reject a body damaged in transit before it stores it
(a rejected PUT is retried: BadDigest is a transient error). ``checksum: auto``, the default,
finds out once per target which header the server actually checks, with a probe object under
``tmp/`` (docs/FORMAT.md: scratch, not part of the repository):

1. a PUT with a deliberately wrong ``x-amz-checksum-crc32``: a server that verifies flexible
   checksums (AWS S3 documents that it does) rejects it with HTTP 400; then the right one must be
   accepted, and CRC32 is used: ~5x cheaper than MD5 on this project's machines (zlib, no
   extra dependency; docs/PERFORMANCE.md "Checksums on S3 PUTs");
2. otherwise (the wrong CRC was stored, or every CRC header is refused) a PUT with a wrong
   Content-MD5: rejected, and the right one accepted, means MD5 is verified, and MD5 is used
   (a server that refuses even the right one refuses the probe for another reason, say SSE-C
   over plain HTTP: that error is the PUT's);
3. a server that stores both wrong values verifies nothing in transit: MD5 is still sent (it
   costs the server nothing to ignore) and a warning says so.

The checksum is computed once, by us, over the exact bytes sent, and handed to botocore as the
header's value, so botocore computes nothing again and never sends it as an aws-chunked trailer
(which several S3-compatible servers reject). Big bodies are hashed in a thread: hashlib and
zlib release the GIL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from replicator.format.chunks import Buffer

HASH_IN_THREAD = 256 << 10
"""Bodies from this size on are hashed in a thread, not on the event loop."""

PROBE_PREFIX = "tmp/checksum-probe-"
"""Where ``checksum: auto`` writes its probe object (deleted at once)."""
PROBE_BODY = b"replicator checksum probe\n"

_HEADER_ARGS = {
    "md5": "ContentMD5",
    "crc32": "ChecksumCRC32",
    "sha1": "ChecksumSHA1",
    "sha256": "ChecksumSHA256",
}


def _digest(mode: str, data: Buffer) -> bytes:
    if mode == "md5":
        return hashlib.md5(data).digest()
    if mode == "crc32":
        return zlib.crc32(data).to_bytes(4, "big")
    return hashlib.new(mode, data).digest()


def _args(mode: str, data: Buffer) -> dict[str, str]:
    return {_HEADER_ARGS[mode]: base64.b64encode(_digest(mode, data)).decode()}


async def checksum_args(mode: str, data: Buffer) -> dict[str, str]:
    """PutObject arguments carrying ``data``'s checksum under ``mode`` (md5, crc32, sha1,
    sha256; crc32c is left to botocore, which needs awscrt for it)."""
    if mode == "crc32c":
        return {"ChecksumAlgorithm": "CRC32C"}
    if len(data) >= HASH_IN_THREAD:
        return await asyncio.to_thread(_args, mode, data)
    return _args(mode, data)


def wrong_args(mode: str, data: Buffer) -> dict[str, str]:
    """As :func:`checksum_args` but with a value that cannot match ``data`` (one bit flipped)."""
    ((name, value),) = _args(mode, data).items()
    raw = bytearray(base64.b64decode(value))
    raw[0] ^= 0x01
    return {name: base64.b64encode(raw).decode()}


@dataclass(frozen=True)
class Detected:
    """What ``checksum: auto`` chose for a target."""

    mode: str
    """The checksum sent with every PUT: ``crc32`` or ``md5``."""
    verified: bool
    """Whether the server was seen to reject a wrong value of it."""

    def describe(self) -> str:
        if self.verified:
            return f"{self.mode}, verified by the server"
        return f"{self.mode}, not verified: the server stored a wrong CRC32 and a wrong MD5"


ProbePut = Callable[[dict[str, str], bool], Awaitable[bool]]
"""``put(checksum_args, must_store)`` writes :data:`PROBE_BODY` with these checksum arguments:
True if stored, False if the server refused it as a client error (HTTP 400), unless
``must_store``: then that refusal raises, as every other failure does."""


async def detect(put: ProbePut) -> Detected:
    """Which checksum the server behind ``put`` verifies (the steps in the module doc)."""
    if not await put(wrong_args("crc32", PROBE_BODY), False) and await put(_args("crc32", PROBE_BODY), False):
        return Detected("crc32", True)
    if await put(wrong_args("md5", PROBE_BODY), False):
        return Detected("md5", False)
    await put(_args("md5", PROBE_BODY), True)
    return Detected("md5", True)
