"""The garbage-collection protocol's objects under ``gc/`` and the writer's side of it
(docs/FORMAT.md section 10).

    gc/lock                     the collector's lock (advisory: it avoids duplicate work)
    gc/plans/<run id>.json      a plan: candidates found unreferenced (phase 1)
    gc/deleting/<run id>        "a collector may be deleting now" (phase 2), heartbeated
    gc/deleted/<run id>.json    the record of what phase 2 deletes, written before it deletes
    gc/writers/<writer id>      "a writer is publishing a manifest now", heartbeated

Safety rests on two handshakes, not on timing:

* Writer and deleter each write their own flag, then list the other's (Dekker): a writer puts
  its intent and then lists ``gc/``; a collector puts its ``deleting`` flag and then lists
  ``gc/writers/``. On a store whose listings show every completed write, at least one sees the
  other, so no deletion runs while a manifest is being written, and a collector that starts
  deleting after a manifest was written has read that manifest.
* A deletion is announced (``gc/deleted/``) before it happens and the record stays for days:
  a writer forgets every object a record names before it trusts its cache of what the
  repository holds, so it never names a chunk it uploaded (or saw) before a deletion.

Freshness is judged by the storage's clock only: an object's age is another object's
modification time minus its own (ObjectInfo.mtime), never the local clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType

from replicator.errors import NotFoundError, RepositoryError, TargetError
from replicator.log import get_logger
from replicator.targets.base import ObjectInfo, Target

log = get_logger(__name__)

LOCK_KEY = "gc/lock"
PLANS = "gc/plans/"
DELETING = "gc/deleting/"
RECORDS = "gc/deleted/"
WRITERS = "gc/writers/"

WRITER_LEASE = 900.0
"""A writer's intent (and a collector's ``deleting`` flag) counts as alive this many seconds
after it was last written; the owner rewrites it every LEASE/3 (HEARTBEAT_SHARE)."""
LOCK_LEASE = 900.0
"""The collector's lock is someone else's for this long after its last heartbeat."""
HEARTBEAT_SHARE = 3.0
RECORD_RETENTION = 7 * 86400.0
"""Deletion records stay this long: a writer that has not looked at ``gc/`` for half of it
re-lists the repository instead of trusting its cache."""
GC_PUTS = 2
"""PUT-class requests the writer's rule adds to each manifest written: the intent and one
LIST of ``gc/`` (its DELETE is free on S3; a new record costs a GET)."""
WAIT_POLL = 0.5
"""How often a writer looks again while a collector is deleting."""

_RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{16}$")
_OBJECT = re.compile(r"^(chunks|packs)/([0-9a-f]{2})/([0-9a-f]{32}|[0-9a-f]{64})$")
_HOST = socket.gethostname()


def new_run_id() -> str:
    """Sortable by time (local clock: only for people; nothing compares it)."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(8)}"


def is_object_key(key: str) -> bool:
    """A chunk or pack key as the format builds them (the only keys GC may delete)."""
    m = _OBJECT.match(key)
    return m is not None and m.group(3).startswith(m.group(2))


def lease_body(role: str) -> bytes:
    """Who holds a lease: same-host peers can tell a dead holder at once (its pid is gone)."""
    doc = {"role": role, "host": _HOST, "pid": os.getpid(), "token": secrets.token_hex(8)}
    return json.dumps(doc).encode()


def holder_dead(body: bytes) -> bool:
    """True only when the holder positively is gone: it ran on this host and its pid does not
    exist. Anything unparsable or remote counts as alive (the lease's age decides)."""
    try:
        doc = json.loads(body)
        host, pid = doc["host"], doc["pid"]
    except (ValueError, TypeError, KeyError):
        return False
    if host != _HOST or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def encode_keys(kind: str, keys: Iterable[str]) -> bytes:
    doc = {"format": f"replicator-gc-{kind}", "version": 1, "keys": sorted(keys)}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_keys(kind: str, raw: bytes, *, where: str) -> list[str]:
    """A plan's or record's object keys; RepositoryError unless every one is a chunk or pack
    key (gc objects are untrusted input like everything else on a target)."""
    try:
        doc = json.loads(raw)
        ours = doc.get("format") == f"replicator-gc-{kind}" and doc.get("version") == 1
        keys = doc["keys"] if ours else None
    except (ValueError, TypeError, KeyError, AttributeError):
        keys = None
    if not isinstance(keys, list) or not all(isinstance(k, str) and is_object_key(k) for k in keys):
        raise RepositoryError(f"malformed garbage-collection {kind}", key=where)
    return keys


@dataclass
class GcListing:
    """One listing of ``gc/``, sorted into its kinds (unknown keys are ignored)."""

    lock: ObjectInfo | None = None
    plans: dict[str, ObjectInfo] = field(default_factory=dict)
    deleting: dict[str, ObjectInfo] = field(default_factory=dict)
    records: dict[str, ObjectInfo] = field(default_factory=dict)
    writers: dict[str, ObjectInfo] = field(default_factory=dict)
    infos: dict[str, ObjectInfo] = field(default_factory=dict)


async def list_gc(target: Target) -> GcListing:
    out = GcListing()
    async for info in target.list("gc/"):
        out.infos[info.key] = info
        if info.key == LOCK_KEY:
            out.lock = info
            continue
        for prefix, into, suffix in (
            (PLANS, out.plans, ".json"),
            (RECORDS, out.records, ".json"),
            (DELETING, out.deleting, ""),
            (WRITERS, out.writers, ""),
        ):
            name = info.key[len(prefix) :]
            if info.key.startswith(prefix) and name.endswith(suffix) and "/" not in name:
                run_id = name[: len(name) - len(suffix)] if suffix else name
                if _RUN_ID.match(run_id):
                    into[run_id] = info
    return out


def age(info: ObjectInfo, now: float) -> float:
    """Seconds between ``info``'s last write and ``now`` (both the storage's clock); an
    object without a time is treated as just written (kept alive, never judged old)."""
    return 0.0 if info.mtime is None else now - info.mtime


async def alive(target: Target, info: ObjectInfo, now: float, lease: float) -> bool:
    """Whether a lease object (intent, flag, lock) still holds: written within ``lease`` of
    ``now`` and its holder not known dead."""
    if age(info, now) > lease:
        return False
    try:
        body = await target.get(info.key)
    except NotFoundError:
        return False  # released meanwhile
    return not holder_dead(body)


LISTING_RETRIES = (0.2, 0.5, 1.0)
"""Seconds before looking again for an object a listing did not show just after its PUT."""


async def server_now(target: Target, key: str) -> float:
    """The storage's clock: the modification time of ``key``, just written by the caller.
    Read from a listing, like every time it is compared with (an S3 HEAD's Last-Modified has
    whole seconds where a listing has milliseconds)."""
    info = None
    for delay in (0.0, *LISTING_RETRIES):
        await asyncio.sleep(delay)
        async for found in target.list(key):
            if found.key == key:
                info = found
        if info is not None:
            break
    if info is None:
        # Seen once under load with `rclone serve s3` (bench_gc_torture): the listing right
        # after the PUT missed the object. A few looks later, it is a store whose listings
        # lag its writes, which the protocol cannot work with (FORMAT.md 10.4).
        raise RepositoryError(
            "a listing does not show the object just written; garbage collection needs "
            "listings that show completed writes",
            key=key,
            hint="nothing was deleted; try again, and if it persists the store's listings lag its writes",
        )
    if info.mtime is None:
        raise RepositoryError(
            "the target reports no modification times; garbage collection needs them",
            key=key,
            hint="use a POSIX or S3 target that returns LastModified",
        )
    return info.mtime


class Heartbeat:
    """Rewrite a lease object every ``lease / HEARTBEAT_SHARE`` seconds until stopped;
    :attr:`written_at` is the local monotonic time the last successful write began."""

    def __init__(self, target: Target, key: str, role: str, lease: float) -> None:
        self.target, self.key, self.lease = target, key, lease
        self.body = lease_body(role)
        self.written_at = 0.0
        self._task: asyncio.Task[None] | None = None

    async def write(self) -> None:
        started = time.monotonic()
        await self.target.put(self.key, self.body)
        self.written_at = started

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat(), name=f"heartbeat-{self.key}")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.lease / HEARTBEAT_SHARE)
            try:
                await self.write()
            except TargetError as exc:
                log.warning("gc.heartbeat_failed", key=self.key, error=str(exc))

    def fresh(self, share: float = 0.5) -> bool:
        """Whether the lease was written within ``share`` of its length (local clock: a
        duration, so no clock comparison with the storage)."""
        return time.monotonic() - self.written_at < self.lease * share

    async def stop(self, *, delete: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if delete:
            with contextlib.suppress(TargetError):
                await self.target.delete(self.key)


@dataclass
class WriterGcState:
    """What one writer process knows about the collector on one repository."""

    seen_records: set[str] = field(default_factory=set)
    checked_at: float | None = None
    """Local monotonic time of the last look at ``gc/``."""


class PublishWindow:
    """The writer's rule around writing a manifest (docs/FORMAT.md 10.3), as an async context:

    1. put the intent ``gc/writers/<id>``, then list ``gc/``;
    2. while a live ``deleting`` flag is listed, wait (keeping the intent fresh) and look again;
    3. forget every object named by a deletion record not seen before (``forget``), and
       remember them in :attr:`forgotten`: a manifest that names one must not be written now;
    4. the caller writes the manifest (and ref) while the intent is heartbeated, after
       :meth:`check` says the intent is still fresh; on exit the intent is deleted.

    ``relist`` is called instead of trusting the cache when ``gc/`` was last looked at more
    than half of RECORD_RETENTION ago (records older than that may be gone)."""

    def __init__(
        self,
        target: Target,
        state: WriterGcState,
        forget: Callable[[list[str]], None],
        relist: Callable[[], object] | None = None,
        *,
        lease: float = WRITER_LEASE,
        max_wait: float = 2 * LOCK_LEASE,
    ) -> None:
        self.target = target
        self.state = state
        self.forget = forget
        self.relist = relist
        self.lease = lease
        self.max_wait = max_wait
        self.key = f"{WRITERS}{new_run_id()}"
        self.heartbeat = Heartbeat(target, self.key, "writer", lease)
        self.forgotten: set[str] = set()
        self.relisted = False
        """The cache was replaced by a listing: whatever the caller computed from it is void."""
        self.waited = 0.0

    async def __aenter__(self) -> PublishWindow:
        try:
            await self._enter()
        except BaseException:
            await self.heartbeat.stop()
            raise
        return self

    async def _enter(self) -> None:
        last = self.state.checked_at
        stale = last is not None and time.monotonic() - last > RECORD_RETENTION / 2
        started = time.monotonic()
        while True:
            await self.heartbeat.write()
            listing = await list_gc(self.target)
            me = listing.infos.get(self.key)
            if me is None:
                raise TargetError(
                    "the writer's intent is missing from the listing that follows it",
                    target=self.target.name,
                    key=self.key,
                    hint="the store's listings are not consistent; garbage collection is unsafe on it",
                )
            # A store that reports no times makes every flag look fresh: wait, never guess.
            now = me.mtime if me.mtime is not None else float("inf")
            busy = [
                i
                for i in listing.deleting.values()
                if me.mtime is None or await alive(self.target, i, now, WRITER_LEASE)
            ]
            if not busy:
                break
            if time.monotonic() - started > self.max_wait:
                raise TargetError(
                    f"a garbage collection has been deleting for over {self.max_wait:.0f}s",
                    target=self.target.name,
                    key=busy[0].key,
                    hint="the manifest is published once it finishes",
                    retryable=True,
                )
            await asyncio.sleep(WAIT_POLL)
        self.waited = time.monotonic() - started
        self.heartbeat.start()
        if stale and self.relist is not None:
            await self._relist()
        for run_id in sorted(set(listing.records) - self.state.seen_records):
            key = listing.records[run_id].key
            try:
                keys = decode_keys("record", await self.target.get(key), where=key)
            except NotFoundError:
                keys = []  # expired between the listing and now: older than any claim we rely on
            except RepositoryError as exc:
                if self.relist is None:
                    raise
                log.warning("gc.record_unreadable", key=key, error=str(exc), hint="re-listing the repository")
                await self._relist()
                keys = []
            if keys:
                self.forget(keys)
                self.forgotten.update(keys)
            self.state.seen_records.add(run_id)
        self.state.checked_at = time.monotonic()

    async def _relist(self) -> None:
        assert self.relist is not None
        result = self.relist()
        if asyncio.iscoroutine(result):
            await result
        self.relisted = True

    def lost(self, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` the cache may have been wrong about: named by a deletion record,
        or all of them after a relisting (the caller must check and upload them again)."""
        return list(keys) if self.relisted else [k for k in keys if k in self.forgotten]

    def check(self) -> None:
        """Raise unless the intent is fresh enough to start writing the manifest now."""
        if not self.heartbeat.fresh():
            raise TargetError(
                "the publish window outlived half its lease; starting it again",
                target=self.target.name,
                key=self.key,
                retryable=True,
            )

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.heartbeat.stop()
