"""The fault harness: failures that real servers will not produce on demand (issue 18).

Four pieces, each usable alone:

* :class:`FakeClock` -- time that moves only when a test says so, for backoff and lag tests.
* :class:`MemoryTarget` over a :class:`MemoryStore` -- a complete in-memory Target (the
  conformance suite runs against it) for fast in-process tests of fan-out and daemon logic.
* :class:`FaultyTarget` driven by a :class:`FaultPlan` -- wraps any target (memory, POSIX, S3)
  and injects failures per operation and key prefix: errors, storms, hangs the test releases,
  slow calls, short writes, "200 with an error body", a garbled first read. It records every call.
  :class:`MemoryTargets` (the ``memory_targets`` fixture) plugs both into the real code paths:
  ``memory://NAME`` and ``faulty://NAME`` target urls open through ``open_target`` like any other.
* :class:`FaultProxy` (the ``fault_proxy`` fixture) -- a TCP proxy in its own thread between
  the code under test (in-process or a ``replicator run`` subprocess) and a real S3 server,
  switched at runtime between pass, refuse, reset, blackhole and delay.

Nothing here mocks replicator's own logic: faults sit at the storage boundary (a Target or a
TCP connection), where production failures come from.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import field_validator

from replicator.config import NAME_RE, S3TargetConfig, TargetConfig, target_config
from replicator.errors import (
    AlreadyExistsError,
    NotFoundError,
    PermanentTargetError,
    TargetError,
    TransientTargetError,
)
from replicator.targets import open_backend, register_backend, unregister_backend
from replicator.targets.base import ObjectInfo, Target, check_key
from replicator.targets.wrappers import TargetWrapper

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake_threadsafe(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
    """Resolve ``fut`` from any thread (the test's, or another loop's)."""
    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(_wake, fut)


# --- FakeClock -----------------------------------------------------------------------------


class FakeClock:
    """Time that moves only when the test calls :meth:`advance`.

    Intended use: code that waits or measures time takes a clock (``time``, ``monotonic``,
    ``now`` for ``replicator.budget.Clock``, and an async ``sleep``) instead of calling
    ``time``/``asyncio.sleep`` directly; a test passes a FakeClock and drives it::

        clock = FakeClock()
        task = asyncio.create_task(code_under_test(sleep=clock.sleep, monotonic=clock.monotonic))
        await clock.wait_for_sleepers(1)      # the code is now backing off
        clock.advance(30)                     # ...and its 30 s sleep is over
        await task

    So backoff schedules, RPO lag and budget windows are tested in microseconds, exactly,
    with no dependence on the machine's speed. Wall time (``time``/``now``) and monotonic time
    advance together. A sleep whose deadline is reached by ``advance`` completes on the next
    turn of its event loop; ``advance`` may be called from any thread.
    """

    def __init__(self, start: float = 1_767_225_600.0, monotonic_start: float = 1_000.0) -> None:
        self._wall0 = start  # 2026-01-01T00:00:00Z
        self._mono0 = monotonic_start
        self._elapsed = 0.0
        self._lock = threading.Lock()
        self._order = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._sleeper_watch: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def time(self) -> float:
        """Seconds since the epoch, like ``time.time``."""
        return self._wall0 + self._elapsed

    def monotonic(self) -> float:
        """Like ``time.monotonic``."""
        return self._mono0 + self._elapsed

    def now(self) -> datetime:
        """An aware UTC datetime, like ``replicator.budget.utc_now`` (a ``budget.Clock``)."""
        return datetime.fromtimestamp(self.time(), UTC)

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting for the clock to move."""
        with self._lock:
            return sum(1 for *_, fut in self._sleepers if not fut.done())

    def next_wakeup(self) -> float | None:
        """Seconds until the earliest pending sleep ends, or None if nobody sleeps."""
        with self._lock:
            pending = [d for d, _, _, fut in self._sleepers if not fut.done()]
        return max(0.0, min(pending) - self.monotonic()) if pending else None

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleep whose deadline is now reached."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        with self._lock:
            self._elapsed += seconds
            now = self.monotonic()
            while self._sleepers and self._sleepers[0][0] <= now:
                _, _, loop, fut = heapq.heappop(self._sleepers)
                _wake_threadsafe(loop, fut)

    async def sleep(self, seconds: float) -> None:
        """Like ``asyncio.sleep``, on this clock: returns once ``advance`` has moved time past
        ``seconds`` from now. A zero or negative duration only yields to the event loop."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            heapq.heappush(self._sleepers, (self.monotonic() + seconds, next(self._order), loop, fut))
            count = sum(1 for *_, f in self._sleepers if not f.done())
            ready = [w for w in self._sleeper_watch if w[0] <= count]
            self._sleeper_watch = [w for w in self._sleeper_watch if w[0] > count]
        for _, wloop, wfut in ready:
            _wake_threadsafe(wloop, wfut)
        await fut  # a cancelled sleep leaves a done future in the heap: skipped when counting

    async def wait_for_sleepers(self, n: int = 1) -> None:
        """Return once at least ``n`` sleeps are pending (the code under test is waiting)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if sum(1 for *_, f in self._sleepers if not f.done()) >= n:
                return
            self._sleeper_watch.append((n, loop, fut))
        await fut


# --- MemoryTarget --------------------------------------------------------------------------


class MemoryStore:
    """The bucket behind :class:`MemoryTarget`: objects outlive any one connection, so a target
    closed and opened again (the daemon re-attaching a failed target) sees what it wrote.

    ``conditional_writes=False`` behaves like ``rclone serve s3``, which ignores If-None-Match:
    ``put(if_absent=True)`` is last-writer-wins. :meth:`crash` models a power cut: every put and
    delete since the last ``flush`` is undone (the Target contract makes only flushed writes
    durable), so write-order bugs show up without pulling a plug.
    """

    def __init__(self, *, conditional_writes: bool = True) -> None:
        self.objects: dict[str, bytes] = {}
        self.mtimes: dict[str, float] = {}
        """When each key was last written (the storage's clock, for ObjectInfo.mtime)."""
        self.clock: Callable[[], float] = time.time
        self.conditional_writes = conditional_writes
        self._unflushed: dict[str, bytes | None] = {}  # key -> value at the last flush
        self._lock = threading.Lock()  # tests may read the store from another thread

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Store; False if ``if_absent`` and the key exists (and the write was refused)."""
        with self._lock:
            if if_absent and self.conditional_writes and key in self.objects:
                return False
            self._unflushed.setdefault(key, self.objects.get(key))
            self.objects[key] = data
            self.mtimes[key] = self.clock()
            return True

    def delete(self, key: str) -> None:
        with self._lock:
            if key in self.objects:
                self._unflushed.setdefault(key, self.objects[key])
                del self.objects[key]

    def flush(self) -> None:
        with self._lock:
            self._unflushed.clear()

    def crash(self) -> None:
        """Lose every write and delete that no flush made durable."""
        with self._lock:
            for key, before in self._unflushed.items():
                if before is None:
                    self.objects.pop(key, None)
                else:
                    self.objects[key] = before
            self._unflushed.clear()

    def keys(self, prefix: str = "") -> list[str]:
        """Stored keys under ``prefix``, in the order ``list`` yields them."""
        with self._lock:
            return sorted((k for k in self.objects if k.startswith(prefix)), key=str.encode)


class MemoryTarget:
    """A complete Target over a :class:`MemoryStore`, honouring the error contract of
    replicator.targets.base: NotFoundError only for a missing object, ValueError for a
    malformed key, and a RuntimeError (a bug, loudly) when used after ``close``.

    Every operation yields to the event loop once, as a real backend would, so interleavings
    that only happen when storage calls suspend still happen here.
    """

    def __init__(self, name: str, store: MemoryStore | None = None, url: str | None = None) -> None:
        self.name = name
        self.store = store if store is not None else MemoryStore()
        self.url = url or f"memory://{name}"
        self.closed = False

    async def _enter(self, key: str | None) -> None:
        if self.closed:
            raise RuntimeError(f"target {self.name} used after close")
        if key is not None:
            check_key(key)
        await asyncio.sleep(0)

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await self._enter(key)
        if not self.store.put(key, bytes(data), if_absent=if_absent):
            raise AlreadyExistsError("object exists", target=self.name, operation="put", key=key)

    async def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        await self._enter(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid range offset={offset} length={length}")
        data = self.store.objects.get(key)
        if data is None:
            raise NotFoundError("no such object", target=self.name, operation="get", key=key)
        return data[offset:] if length is None else data[offset : offset + length]

    async def stat(self, key: str) -> ObjectInfo | None:
        await self._enter(key)
        data = self.store.objects.get(key)
        return None if data is None else ObjectInfo(key, len(data), self.store.mtimes.get(key))

    async def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        await self._enter(None)
        after = None if start_after is None else start_after.encode()
        for key in self.store.keys(prefix):
            if after is not None and key.encode() <= after:
                continue
            data = self.store.objects.get(key)
            if data is not None:  # deleted while listing
                yield ObjectInfo(key, len(data), self.store.mtimes.get(key))

    async def delete(self, key: str) -> None:
        await self._enter(key)
        self.store.delete(key)

    async def flush(self) -> None:
        await self._enter(None)
        self.store.flush()

    async def close(self) -> None:
        self.closed = True


# --- FaultyTarget --------------------------------------------------------------------------

Op = Literal["put", "get", "stat", "list", "delete", "flush"]
OPS: tuple[Op, ...] = ("put", "get", "stat", "list", "delete", "flush")
FaultKind = Literal["fail", "hang", "slow", "short_write", "error_body", "garble"]

S3_ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>%s</Code><Message>%s</Message>"
    b"<RequestId>4442587FB7D0A2F9</RequestId></Error>"
)


class Gate:
    """Where a hung call waits until the test calls :meth:`release`.

    Never time-based: a hung call stays hung however slow the machine is. ``release`` may be
    called from any thread and opens the gate for good (later calls pass through at once).
    A hung call that is cancelled (the daemon stopping) ends with ``CancelledError``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._entered_watch: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.entered = 0
        """How many calls have reached the gate so far."""

    @property
    def released(self) -> bool:
        return self._open

    @property
    def waiting(self) -> int:
        """Calls blocked here right now."""
        with self._lock:
            return sum(1 for _, fut in self._waiters if not fut.done())

    def release(self) -> None:
        with self._lock:
            self._open = True
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            _wake_threadsafe(loop, fut)

    async def wait(self) -> None:
        """Block the calling operation until released."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self.entered += 1
            ready = [w for w in self._entered_watch if w[0] <= self.entered]
            self._entered_watch = [w for w in self._entered_watch if w[0] > self.entered]
            if not self._open:
                self._waiters.append((loop, fut))
        for _, wloop, wfut in ready:
            _wake_threadsafe(wloop, wfut)
        if self._open:
            return
        await fut

    async def wait_entered(self, n: int = 1) -> None:
        """Return once ``n`` calls in total have reached the gate (from a test coroutine;
        a synchronous test polls :attr:`entered` instead)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self.entered >= n:
                return
            self._entered_watch.append((n, loop, fut))
        await fut


@dataclass(eq=False)
class Fault:
    """One rule of a :class:`FaultPlan`; the handle a plan method returns."""

    kind: FaultKind
    ops: frozenset[str]
    prefix: str
    remaining: int | None
    """Calls (for ``garble``: keys) still to affect; None: every matching call until cancelled."""
    plan: FaultPlan
    error: type[Exception] | None = None
    message: str = "injected fault"
    gate: Gate | None = None
    seconds: float = 0.0
    keep: int | None = None
    after: int = 0
    code: str = "SlowDown"
    hits: int = 0
    """Calls this rule has affected so far."""
    garbled: set[str] = field(default_factory=set)

    def cancel(self) -> None:
        """Remove the rule; a hang's gate is released so that nothing stays stuck."""
        self.plan.remove(self)

    @property
    def active(self) -> bool:
        return self in self.plan.faults and self.remaining != 0

    def _matches(self, op: str, key: str) -> bool:
        if op not in self.ops or not key.startswith(self.prefix) or self.remaining == 0:
            return False
        if self.kind == "hang" and self.gate is not None and self.gate.released:
            return False  # a released hang no longer affects (nor is recorded against) calls
        return not (self.kind == "garble" and key in self.garbled)

    def _raise(self, target: str, op: str, key: str) -> None:
        assert self.error is not None
        if issubclass(self.error, TargetError):
            raise self.error(self.message, target=target, operation=op, key=key)
        raise self.error(self.message)  # a bug in a backend: not one of our errors


@dataclass
class Call:
    """One operation that reached a FaultyTarget."""

    op: str
    key: str
    """The object key; for ``list`` the listing prefix; ``""`` for ``flush``."""
    fault: FaultKind | None = None
    """The fault injected into this call, if any."""
    outcome: str = "pending"
    """``pending`` while running, then ``ok``, ``cancelled`` or the exception's class name."""


def _ops(op: Op | Iterable[Op] | None) -> frozenset[str]:
    if op is None:
        return frozenset(OPS)
    chosen = frozenset([op] if isinstance(op, str) else op)
    unknown = chosen - set(OPS)
    if unknown:
        raise ValueError(f"unknown operations {sorted(unknown)}")
    return chosen


class FaultPlan:
    """What a :class:`FaultyTarget` does wrong, programmed (and re-programmed) by the test.

    Each method adds a rule and returns it (:class:`Fault`; ``.cancel()`` removes it). ``op``
    is one operation, several, or None for all; ``prefix`` limits a rule to keys that start
    with it (a listing's key is its prefix; flush's is ``""``). A call takes the first rule in
    the order added that matches it; calls no rule matches go straight to the wrapped target.
    Every call is recorded in :attr:`calls`. Thread-safe: a test thread may reprogram a plan
    while another thread's event loop uses it.

    ``sleep`` is what :meth:`slow` awaits: ``asyncio.sleep`` or :meth:`FakeClock.sleep`.
    """

    def __init__(self, sleep: Sleep = asyncio.sleep) -> None:
        self.sleep = sleep
        self.faults: list[Fault] = []
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            if fault in self.faults:
                self.faults.remove(fault)
        if fault.gate is not None:
            fault.gate.release()

    def clear(self) -> None:
        """Remove every rule (ends a storm) and release every hang; calls stay recorded."""
        with self._lock:
            faults, self.faults = self.faults, []
        for f in faults:
            if f.gate is not None:
                f.gate.release()

    # -- the faults -----------------------------------------------------------------------

    def fail(
        self,
        op: Op | Iterable[Op] | None = None,
        *,
        times: int | None = 1,
        error: type[Exception] = TransientTargetError,
        prefix: str = "",
        message: str = "injected fault",
        after: int = 0,
    ) -> Fault:
        """The next ``times`` matching calls raise ``error`` (TransientTargetError,
        TargetUnreachableError, PermanentTargetError, NotFoundError..., or any other exception
        class, for a bug in a backend) without reaching the wrapped target; ``times=None``:
        every matching call until cancelled. For ``list``, ``after`` items are yielded first: a
        listing that breaks part-way."""
        return self._add(
            Fault("fail", _ops(op), prefix, times, self, error=error, message=message, after=after)
        )

    def storm(self, op: Op | Iterable[Op] | None = None, *, prefix: str = "") -> Fault:
        """A "503 storm": every matching call raises TransientTargetError (503 SlowDown) until
        the rule is cancelled or the plan cleared."""
        return self.fail(op, times=None, prefix=prefix, message="503 SlowDown: injected storm")

    def hang(
        self,
        op: Op | Iterable[Op] | None = None,
        *,
        times: int | None = None,
        prefix: str = "",
        then: type[TargetError] | None = None,
    ) -> Gate:
        """Matching calls block on a :class:`Gate` until the test releases it (``gate.release()``,
        ``fault.cancel()`` or ``plan.clear()``); then they proceed to the wrapped target, or
        raise ``then`` (a request that finally times out). Returns the gate."""
        gate = Gate()
        self._add(
            Fault("hang", _ops(op), prefix, times, self, error=then, gate=gate, message="injected hang")
        )
        return gate

    def slow(
        self,
        op: Op | Iterable[Op] | None = None,
        *,
        seconds: float,
        times: int | None = None,
        prefix: str = "",
    ) -> Fault:
        """Matching calls first await ``plan.sleep(seconds)`` (a FakeClock's sleep for tests
        that must not wait), then proceed."""
        return self._add(Fault("slow", _ops(op), prefix, times, self, seconds=seconds))

    def short_write(self, *, keep: int | None = None, times: int | None = 1, prefix: str = "") -> Fault:
        """Matching puts store only the first ``keep`` bytes (default: half) and return success
        (the failure restic#3023 and rclone's FsPutShortEOF guard against). Only a read-back
        can tell."""
        return self._add(Fault("short_write", frozenset({"put"}), prefix, times, self, keep=keep))

    def error_body(
        self,
        *,
        code: str = "SlowDown",
        message: str = "Please reduce your request rate.",
        times: int | None = 1,
        prefix: str = "",
    ) -> Fault:
        """Matching gets return an S3 XML error document as if it were the object's bytes (a
        "200 OK" whose body is an error, as some gateways and caches answer), without reaching
        the wrapped target."""
        return self._add(
            Fault("error_body", frozenset({"get"}), prefix, times, self, code=code, message=message)
        )

    def garble_first_read(self, *, prefix: str = "", keys: int | None = None) -> Fault:
        """The first get of each matching key (after the rule is added) returns the object with
        one bit flipped (in its middle byte); later gets of that key are correct. ``keys``
        limits how many different keys are garbled (None: all)."""
        return self._add(Fault("garble", frozenset({"get"}), prefix, keys, self))

    # -- used by FaultyTarget -------------------------------------------------------------

    def _begin(self, op: str, key: str) -> tuple[Call, Fault | None]:
        with self._lock:
            fault = next((f for f in self.faults if f._matches(op, key)), None)
            if fault is not None:
                fault.hits += 1
                if fault.remaining is not None:
                    fault.remaining -= 1
                if fault.kind == "garble":
                    fault.garbled.add(key)
            call = Call(op, key, fault.kind if fault is not None else None)
            self.calls.append(call)
        return call, fault

    # -- for assertions -------------------------------------------------------------------

    def calls_to(self, op: Op | None = None, prefix: str = "") -> list[Call]:
        """Recorded calls, optionally of one operation and under a key prefix."""
        with self._lock:
            return [c for c in self.calls if (op is None or c.op == op) and c.key.startswith(prefix)]

    def outcomes(self, op: Op | None = None, prefix: str = "") -> list[str]:
        return [c.outcome for c in self.calls_to(op, prefix)]


def _flip(data: bytes) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    out[len(out) // 2] ^= 0x01
    return bytes(out)


class FaultyTarget(TargetWrapper):
    """Wraps any Target and does what its :class:`FaultPlan` says (see there for each fault).

    Put it directly around the backend, under the production wrappers (``open_target`` does
    that for ``memory://`` and ``faulty://`` urls): retry, limits and metrics then see injected
    failures exactly as they see real ones."""

    def __init__(self, inner: Target, plan: FaultPlan | None = None) -> None:
        super().__init__(inner)
        self.plan = plan if plan is not None else FaultPlan()

    async def _run(self, op: Op, key: str, fn: Callable[[Fault | None], Awaitable[T]]) -> T:
        call, fault = self.plan._begin(op, key)
        try:
            if fault is not None:
                await self._before(fault, op, key)
            result = await fn(fault)
        except asyncio.CancelledError:
            call.outcome = "cancelled"
            raise
        except BaseException as exc:
            call.outcome = type(exc).__name__
            raise
        call.outcome = "ok"
        return result

    async def _before(self, fault: Fault, op: str, key: str) -> None:
        """The part of a fault that happens before the wrapped target is reached."""
        if fault.kind == "hang":
            assert fault.gate is not None
            await fault.gate.wait()
            if fault.error is not None:
                fault._raise(self.name, op, key)
        elif fault.kind == "slow":
            await self.plan.sleep(fault.seconds)
        elif fault.kind == "fail" and not (op == "list" and fault.after):
            fault._raise(self.name, op, key)

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        async def go(fault: Fault | None) -> None:
            if fault is not None and fault.kind == "short_write":
                keep = len(data) // 2 if fault.keep is None else fault.keep
                await self.inner.put(key, data[:keep], if_absent=if_absent)
            else:
                await self.inner.put(key, data, if_absent=if_absent)

        await self._run("put", key, go)

    async def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        async def go(fault: Fault | None) -> bytes:
            if fault is not None and fault.kind == "error_body":
                return S3_ERROR_BODY % (fault.code.encode(), fault.message.encode())
            data = await self.inner.get(key, offset=offset, length=length)
            return _flip(data) if fault is not None and fault.kind == "garble" else data

        return await self._run("get", key, go)

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self._run("stat", key, lambda _: self.inner.stat(key))

    async def delete(self, key: str) -> None:
        await self._run("delete", key, lambda _: self.inner.delete(key))

    async def flush(self) -> None:
        await self._run("flush", "", lambda _: self.inner.flush())

    async def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        call, fault = self.plan._begin("list", prefix)
        try:
            if fault is not None:
                await self._before(fault, "list", prefix)
            n = 0
            async for item in self.inner.list(prefix, start_after=start_after):
                if fault is not None and fault.kind == "fail" and n == fault.after:
                    fault._raise(self.name, "list", prefix)
                yield item
                n += 1
            if fault is not None and fault.kind == "fail":  # fewer items than `after`: fail at the end
                fault._raise(self.name, "list", prefix)
        except GeneratorExit:
            call.outcome = "ok"  # the consumer stopped early
            raise
        except asyncio.CancelledError:
            call.outcome = "cancelled"
            raise
        except BaseException as exc:
            call.outcome = type(exc).__name__
            raise
        call.outcome = "ok"


# --- memory:// and faulty:// urls ----------------------------------------------------------


@dataclass
class FakeTarget:
    """One ``memory://NAME`` or ``faulty://NAME`` target a test registered."""

    name: str
    url: str
    """What to write as the target's ``url`` in a config."""
    plan: FaultPlan
    store: MemoryStore | None
    """The objects (``memory://`` only): read or damage them behind the target's back."""
    real_url: str | None = None
    """``faulty://`` only: the backend under the FaultyTarget."""
    opened: list[FaultyTarget] = field(default_factory=list)
    """Every connection opened to it, in order (the daemon may reopen a failed target)."""

    def config(self, **fields: Any) -> dict[str, Any]:
        """A target config entry: ``{"name": ..., "url": ..., **fields}``."""
        return {"name": self.name, "url": self.url, **fields}


class FaultyTargetConfig(S3TargetConfig):
    """A ``faulty://NAME`` entry: the settings of the backend it wraps (a directory or an
    ``s3://`` bucket), which that backend's own model checks when the target is opened."""

    @field_validator("url")
    @classmethod
    def _bucket(cls, url: str) -> str:  # replaces S3TargetConfig's: not a bucket url
        return url


class MemoryTargets:
    """Registers the ``memory`` and ``faulty`` url schemes for one test (the ``memory_targets``
    fixture), so configs that name them open through the real ``open_target`` stack:

    * ``memory://NAME`` -- a :class:`FaultyTarget` over a :class:`MemoryTarget` on the store
      :meth:`add` made for NAME (the store outlives each connection);
    * ``faulty://NAME`` -- a :class:`FaultyTarget` over the real backend of the url given to
      :meth:`wrap` (a directory or ``s3://``; the target config's other fields, such as
      ``endpoint_url`` and ``timeout``, apply to it: its entries take S3 settings, which the
      real backend's model checks when it is opened).

    Opening an unknown NAME raises PermanentTargetError, like a missing bucket. The schemes
    exist in this process only: a ``replicator run`` subprocess cannot open them (use
    :class:`FaultProxy` there).
    """

    def __init__(self, sleep: Sleep = asyncio.sleep) -> None:
        self.sleep = sleep
        self.targets: dict[str, FakeTarget] = {}
        self._registered = False

    def __enter__(self) -> MemoryTargets:
        register_backend("memory", self._open_memory, what="a memory:// target")
        try:
            register_backend("faulty", self._open_faulty, FaultyTargetConfig, what="a faulty:// target")
        except BaseException:
            unregister_backend("memory")
            raise
        self._registered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._registered:
            unregister_backend("memory")
            unregister_backend("faulty")
            self._registered = False

    def add(
        self, name: str, *, conditional_writes: bool = True, store: MemoryStore | None = None
    ) -> FakeTarget:
        """A new in-memory target ``memory://NAME`` (or one more url onto an existing ``store``)."""
        fake = FakeTarget(
            name,
            f"memory://{name}",
            FaultPlan(self.sleep),
            store if store is not None else MemoryStore(conditional_writes=conditional_writes),
        )
        return self._put(fake)

    def wrap(self, name: str, url: str) -> FakeTarget:
        """``faulty://NAME``: the real target at ``url`` behind a FaultPlan."""
        return self._put(FakeTarget(name, f"faulty://{name}", FaultPlan(self.sleep), None, real_url=url))

    def _put(self, fake: FakeTarget) -> FakeTarget:
        if not NAME_RE.match(fake.name):
            raise ValueError(f"invalid fake target name {fake.name!r}")
        if fake.name in self.targets:
            raise ValueError(f"fake target {fake.name!r} already exists")
        self.targets[fake.name] = fake
        return fake

    def __getitem__(self, name: str) -> FakeTarget:
        return self.targets[name]

    def _find(self, cfg: TargetConfig, scheme: str) -> FakeTarget:
        name = cfg.url.removeprefix(f"{scheme}://")
        fake = self.targets.get(name)
        if fake is None or not fake.url.startswith(f"{scheme}://"):
            raise PermanentTargetError(
                f"no {scheme} target named {name!r}",
                target=cfg.name,
                operation="open",
                hint=f"register it first: memory_targets.{'add' if scheme == 'memory' else 'wrap'}(...)",
            )
        return fake

    async def _open_memory(self, cfg: TargetConfig) -> Target:
        fake = self._find(cfg, "memory")
        target = FaultyTarget(MemoryTarget(cfg.name, fake.store, fake.url), fake.plan)
        fake.opened.append(target)
        return target

    async def _open_faulty(self, cfg: TargetConfig) -> Target:
        fake = self._find(cfg, "faulty")
        assert fake.real_url is not None
        settings = cfg.model_dump(exclude_unset=True)  # as written: checked by the real model
        inner = await open_backend(target_config({**settings, "url": fake.real_url}, origin=cfg.name))
        target = FaultyTarget(inner, fake.plan)
        fake.opened.append(target)
        return target


# --- FaultProxy ----------------------------------------------------------------------------

ProxyMode = Literal["pass", "refuse", "reset", "blackhole", "delay"]
ProxyFactory = Callable[[Any], "FaultProxy"]
"""The ``fault_proxy`` fixture: ``fault_proxy(server)`` puts a proxy in front of an S3 server."""
_CHUNK = 64 << 10
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


@dataclass(frozen=True)
class ProxyStats:
    connections: int
    """Connections accepted since the proxy started."""
    active: int
    """Connections open now."""
    bytes_up: int
    """Client -> server bytes forwarded."""
    bytes_down: int
    """Server -> client bytes forwarded."""
    dropped: int
    """Bytes swallowed in blackhole mode."""
    resets: int
    """Connections closed with RST (reset and refuse modes, ``cut``, an unreachable upstream)."""
    corrupted: int
    """PUT bodies forwarded with a byte flipped (:meth:`FaultProxy.corrupt_puts`)."""


class _RequestBodies:
    """Follows the HTTP/1.1 requests on one client connection (headers, then Content-Length
    bytes of body) so that one byte of a chosen PUT's body can be flipped on its way up."""

    def __init__(self) -> None:
        self.head = b""
        self.body_left = 0
        self.flip = False

    def feed(self, data: bytes, choose: Callable[[bytes, int], bool]) -> bytes:
        """``data`` as forwarded; ``choose(request_line, content_length)`` says whether to
        damage the body of the request whose headers just ended."""
        out = bytearray(data)
        i = 0
        while i < len(out):
            if self.body_left:
                if self.flip:
                    out[i] ^= 0xFF
                    self.flip = False
                n = min(self.body_left, len(out) - i)
                i, self.body_left = i + n, self.body_left - n
                continue
            before = len(self.head)
            self.head += bytes(out[i:])
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return bytes(out)
            i += end + 4 - before
            lines = self.head[:end].split(b"\r\n")
            self.head = b""
            length = next(
                (
                    int(v)
                    for k, _, v in (ln.partition(b":") for ln in lines[1:])
                    if k.strip().lower() == b"content-length"
                ),
                0,
            )
            self.body_left = length
            self.flip = length > 0 and choose(lines[0], length)
        return bytes(out)


class _Conn:
    def __init__(self, client_sock: socket.socket) -> None:
        self.client_sock = client_sock
        self.client: asyncio.StreamWriter | None = None
        self.upstream: asyncio.StreamWriter | None = None
        self.reset = False

    def sockets(self) -> list[Any]:
        out: list[Any] = [self.client_sock]
        if self.upstream is not None:
            out.append(self.upstream.get_extra_info("socket"))
        return out

    def is_reset(self) -> bool:
        return self.reset

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of a server, with faults switched at runtime.

    It runs its own event loop in a daemon thread, so synchronous tests that drive a
    ``replicator run`` subprocess use it as easily as async ones. Modes (:meth:`set_mode`):

    * ``pass`` -- forward both ways.
    * ``refuse`` -- a dead server: the listening socket is closed, so new connections get
      ECONNREFUSED, and existing ones are reset (a dead process's sockets do not linger).
    * ``reset`` -- accept, then close with RST (SO_LINGER 0); existing connections are reset
      at their next chunk of data.
    * ``blackhole`` -- accept and read, never answer nor forward: a hung server or a dropped
      route. Existing connections go silent too. Only the client's own timeout ends a request.
    * ``delay`` -- forward, each chunk (up to 64 KiB) after ``delay`` seconds.

    :meth:`corrupt_puts` (in any forwarding mode) flips one byte of the next PUT bodies, as a
    bad NIC or middlebox would: the server must reject them by their checksum.

    :meth:`cut` resets every open connection now, without changing the mode. The upstream may
    be stopped and started behind the proxy (``RcloneServer.stop()/start()`` keeps its port);
    while it is down, new connections are accepted and reset. ``upstream`` (host, port) may be
    reassigned: new connections go there. :attr:`stats` counts traffic.
    """

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", kind: str = "proxy") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.kind = kind
        self.host = "127.0.0.1"
        self.port = 0
        self._mode: ProxyMode = "pass"
        self._delay = 0.0
        self._listener: socket.socket | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._counts = {
            "connections": 0,
            "bytes_up": 0,
            "bytes_down": 0,
            "dropped": 0,
            "resets": 0,
            "corrupted": 0,
        }
        self._corrupt: tuple[bytes, int] = (b"", 0)
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen())
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def for_server(cls, server: Any) -> FaultProxy:
        """A proxy in front of an ``S3Server`` (tests.servers) or anything with ``endpoint``."""
        endpoint = urlsplit(server.endpoint)
        assert endpoint.port is not None
        return cls(endpoint.port, upstream_host=endpoint.hostname or "127.0.0.1", kind=server.kind)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: use as ``endpoint_url`` in a target config."""
        return f"http://{self.host}:{self.port}"

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    def set_mode(self, mode: ProxyMode, *, delay: float | None = None) -> None:
        """Switch modes; when this returns the new mode is in force (for ``refuse``: nothing
        listens any more). ``delay`` (seconds per chunk) is required for ``delay`` mode."""
        if mode not in ("pass", "refuse", "reset", "blackhole", "delay"):
            raise ValueError(f"unknown proxy mode {mode!r}")
        if mode == "delay" and delay is None:
            raise ValueError("delay mode needs delay=SECONDS")
        self._call(self._set_mode(mode, delay or 0.0))

    def cut(self) -> None:
        """Reset every open connection (RST) now; the mode stays as it is."""
        self._call(self._cut())

    def corrupt_puts(self, *, path_contains: str = "", times: int = 1) -> None:
        """Flip one byte in the body of each of the next ``times`` PUT requests whose path
        contains ``path_contains``; :attr:`stats` ``corrupted`` counts them."""

        async def arm() -> None:
            self._corrupt = (path_contains.encode(), times)

        self._call(arm())

    def _choose_corrupt(self, request_line: bytes, _length: int) -> bool:
        needle, left = self._corrupt
        method, _, rest = request_line.partition(b" ")
        if left <= 0 or method != b"PUT" or needle not in rest.partition(b" ")[0]:
            return False
        self._corrupt = (needle, left - 1)
        self._counts["corrupted"] += 1
        return True

    @property
    def stats(self) -> ProxyStats:
        return self._call(self._stats())

    def close(self) -> None:
        """Stop listening, reset every connection and stop the proxy's thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=60)
        finally:
            self._stop_loop()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- loop-thread side -----------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("fault proxy is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()

    # Accepting is a synchronous reader callback on a socket of our own, not asyncio.Server:
    # a connection accepted by asyncio.Server just before it is closed is orphaned (open,
    # never served nor closed: CPython 3.11's Server._attach asserts and the socket leaks),
    # and closing the proxy must reset every connection it ever accepted.

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind while TIME_WAITs last
            sock.bind((self.host, self.port))
            sock.listen(256)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._listener = sock
        self._loop.add_reader(sock.fileno(), self._on_accept)

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._on_accept()  # take what the kernel already queued: it is reset like the rest
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    def _on_accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:  # BlockingIOError: queue empty; EMFILE & co: the client will see it
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            self._conns.add(conn)
            self._counts["connections"] += 1
            if self._closed or self._mode in ("reset", "refuse"):
                self._reset(conn)
            task = self._loop.create_task(self._handle(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _set_mode(self, mode: ProxyMode, delay: float) -> None:
        if mode == "refuse":
            self._mode = mode
            self._stop_listening()
            await self._cut()
            return
        if self._listener is None:
            await self._listen()
        self._mode, self._delay = mode, delay

    async def _cut(self) -> None:
        for conn in list(self._conns):
            self._reset(conn)

    async def _stats(self) -> ProxyStats:
        return ProxyStats(active=len(self._conns), **self._counts)

    async def _shutdown(self) -> None:
        self._stop_listening()
        await self._cut()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=10)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _reset(self, conn: _Conn) -> None:
        """RST both sides. A socket not yet wrapped in a stream is closed by its handler
        (closing it here could pull it from under a transport being built)."""
        if conn.reset:
            return
        conn.reset = True
        self._counts["resets"] += 1
        for sock in conn.sockets():
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        for w in conn.writers():
            w.transport.abort()

    async def _handle(self, conn: _Conn) -> None:
        try:
            if not conn.reset:
                reader, writer = await asyncio.open_connection(sock=conn.client_sock, limit=_CHUNK)
                conn.client = writer
                if not conn.is_reset():
                    await self._serve(conn, reader, writer)
        except OSError:
            self._reset(conn)
        finally:
            self._conns.discard(conn)
            if conn.reset:
                for w in conn.writers():
                    w.transport.abort()
            else:
                for w in conn.writers():
                    w.close()
            if conn.client is None:
                conn.client_sock.close()

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self._mode
        if mode in ("reset", "refuse"):  # switched while the connection was being set up
            self._reset(conn)
            return
        if mode == "blackhole":
            while not conn.reset:
                data = await reader.read(_CHUNK)
                if not data:
                    return
                self._counts["dropped"] += len(data)
            return
        try:
            up_reader, conn.upstream = await asyncio.open_connection(*self.upstream, limit=_CHUNK)
        except OSError:
            self._reset(conn)  # upstream stopped: the client sees its connection reset
            return
        if conn.is_reset():  # cut while connecting upstream: _handle aborts both
            return
        await asyncio.gather(
            self._pump(conn, reader, conn.upstream, "bytes_up", _RequestBodies()),
            self._pump(conn, up_reader, writer, "bytes_down"),
        )

    async def _pump(
        self,
        conn: _Conn,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        counter: str,
        requests: _RequestBodies | None = None,
    ) -> None:
        try:
            while not conn.reset:
                data = await src.read(_CHUNK)
                if not data:
                    if dst.can_write_eof() and not dst.is_closing():
                        dst.write_eof()  # half-close: HTTP clients may still be reading
                    return
                mode = self._mode
                if mode in ("reset", "refuse"):
                    self._reset(conn)
                    return
                if mode == "blackhole":
                    self._counts["dropped"] += len(data)
                    continue
                if mode == "delay":
                    await asyncio.sleep(self._delay)
                    if conn.is_reset():  # cut while this chunk was held back
                        return
                if requests is not None:
                    data = requests.feed(data, self._choose_corrupt)
                dst.write(data)
                self._counts[counter] += len(data)
                await dst.drain()
        except OSError:
            self._reset(conn)  # one side went away mid-stream: end the other side too
