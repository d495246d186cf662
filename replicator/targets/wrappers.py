"""Cross-cutting concerns as Target wrappers, stacked in one place (:func:`replicator.targets.open_target`):

    RetryingTarget -> LimitedTarget -> MeteredTarget -> DeadlineTarget -> backend

Retry is outermost so that a request waiting out its backoff holds no concurrency slot.
Each wrapper is a Target itself, can be tested alone, and is reachable with :func:`unwrap`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from replicator import metrics
from replicator.errors import (
    AlreadyExistsError,
    NotFoundError,
    TargetError,
    TargetUnreachableError,
    TransientTargetError,
)
from replicator.log import get_logger
from replicator.retry import Backoff, RetryPolicy
from replicator.targets.base import ObjectInfo, Target

T = TypeVar("T")
W = TypeVar("W")
log = get_logger(__name__)


class TargetWrapper:
    """Delegates every operation to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Target) -> None:
        self.inner = inner
        self.name = inner.name
        self.url = inner.url

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await self.inner.put(key, data, if_absent=if_absent)

    async def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        return await self.inner.get(key, offset=offset, length=length)

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self.inner.stat(key)

    def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        return self.inner.list(prefix, start_after=start_after)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()


def unwrap(target: Target, kind: type[W]) -> W | None:
    """Return the first layer of type ``kind`` in a wrapper stack, or None."""
    layer: object = target
    while True:
        if isinstance(layer, kind):
            return layer
        if not isinstance(layer, TargetWrapper):
            return None
        layer = layer.inner


class TargetHealth:
    """Whether a target answers, as its requests find out: *failing* from the first failed
    attempt (transient or permanent; "not found" is an answer) to the next success.

    Exported as ``replicator_target_healthy``; listeners (the upload queue) hear each change."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failing_since: float | None = None
        """Monotonic time of the first failure of the current failing period."""
        self.last_error: TargetError | None = None
        """The latest failure; None while healthy."""
        self.listeners: list[Callable[[bool], None]] = []

    @property
    def ok(self) -> bool:
        return self.failing_since is None

    def failed(self, exc: TargetError) -> None:
        self.last_error = exc
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            metrics.TARGET_UP.labels(self.name).set(0)
            for listener in list(self.listeners):
                listener(False)

    def succeeded(self) -> None:
        self.last_error = None
        if self.failing_since is not None:
            self.failing_since = None
            metrics.TARGET_UP.labels(self.name).set(1)
            for listener in list(self.listeners):
                listener(True)


class RetryingTarget(TargetWrapper):
    """Retries transient errors; permanent ones and NotFound pass straight through.

    Every attempt's outcome feeds :attr:`health`, so schedulers can tell a dead target from a
    slow one."""

    def __init__(self, inner: Target, policy: RetryPolicy, health: TargetHealth | None = None) -> None:
        super().__init__(inner)
        self.policy = policy
        self.health = health or TargetHealth(inner.name)

    async def _wait_before_retry(self, exc: TransientTargetError, backoff: Backoff) -> None:
        """Sleep before the next attempt, or re-raise ``exc`` once the budget is spent."""
        self.health.failed(exc)
        delay = backoff.next_delay()
        if backoff.exhausted:
            raise exc
        log.warning(
            "target.retry", target=self.name, error=str(exc), attempt=backoff.failures, delay=round(delay, 2)
        )
        await asyncio.sleep(delay)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        backoff = self.policy.backoff()
        while True:
            try:
                result = await fn()
            except TransientTargetError as exc:
                await self._wait_before_retry(exc, backoff)
                continue
            except (NotFoundError, AlreadyExistsError):
                self.health.succeeded()  # an answer: the target is there
                raise
            except TargetError as exc:
                self.health.failed(exc)
                raise
            self.health.succeeded()
            return result

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await self._call(lambda: self.inner.put(key, data, if_absent=if_absent))

    async def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        return await self._call(lambda: self.inner.get(key, offset=offset, length=length))

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self._call(lambda: self.inner.stat(key))

    async def delete(self, key: str) -> None:
        await self._call(lambda: self.inner.delete(key))

    async def flush(self) -> None:
        await self._call(self.inner.flush)

    async def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        # A failed listing restarts after the last key handed out: never repeats, never skips.
        last, backoff = start_after, self.policy.backoff()
        while True:
            try:
                async for item in self.inner.list(prefix, start_after=last):
                    last = item.key
                    yield item
            except TransientTargetError as exc:
                await self._wait_before_retry(exc, backoff)
                continue
            except TargetError as exc:
                self.health.failed(exc)
                raise
            self.health.succeeded()
            return


class TokenBucket:
    """Bandwidth cap: ``rate`` bytes per second, bursts up to one second's worth. A request
    larger than the bucket is admitted by going into debt, which later requests wait out."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.capacity = float(rate)
        self.tokens = float(rate)
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:  # first come, first served
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            if self.tokens < 0:
                await asyncio.sleep(-self.tokens / self.rate)


class LimitedTarget(TargetWrapper):
    """Caps concurrent requests (listing is not counted: it is sequential by nature) and,
    optionally, upload bandwidth."""

    def __init__(self, inner: Target, concurrency: int, max_bandwidth: int | None = None) -> None:
        super().__init__(inner)
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self.bandwidth = TokenBucket(max_bandwidth) if max_bandwidth else None

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if self.bandwidth is not None:
            await self.bandwidth.take(len(data))
        async with self._slots:
            await self.inner.put(key, data, if_absent=if_absent)

    async def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        async with self._slots:
            return await self.inner.get(key, offset=offset, length=length)

    async def stat(self, key: str) -> ObjectInfo | None:
        async with self._slots:
            return await self.inner.stat(key)

    async def delete(self, key: str) -> None:
        async with self._slots:
            await self.inner.delete(key)


MIN_UPLOAD_RATE = 1 << 20
"""Bytes per second a transfer must average (beyond the timeout) before it counts as hung."""


class DeadlineTarget(TargetWrapper):
    """Gives every request a deadline: ``timeout`` plus its body at MIN_UPLOAD_RATE (16 MiB:
    16 s more; a whole-object GET: twice the timeout). A request past it fails as unreachable,
    is retried and marks the target failing, instead of waiting forever. The SDK's own
    timeouts cover connecting and waiting for an answer, not sending: a PUT to a server that
    stopped reading (a dead route, a hung gateway) blocked in the kernel's send buffer for
    good (found by the fault proxy; the publisher hang of issue 18). A hung NFS write is
    bounded the same way (its thread stays blocked in the kernel; the request does not)."""

    def __init__(self, inner: Target, timeout: float) -> None:
        super().__init__(inner)
        self.timeout = timeout

    async def _bounded(self, op: str, key: str, awaitable: Awaitable[T], nbytes: int | None = 0) -> T:
        """``nbytes`` None: a whole-object GET of unknown size, allowed twice the timeout
        (the SDK's read timeout already catches a server that stops sending)."""
        limit = 2 * self.timeout if nbytes is None else self.timeout + nbytes / MIN_UPLOAD_RATE
        try:
            return await asyncio.wait_for(awaitable, limit)
        except TimeoutError:
            raise TargetUnreachableError(
                f"no answer within the {limit:.0f}s timeout", target=self.name, operation=op, key=key
            ) from None

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        await self._bounded("put", key, self.inner.put(key, data, if_absent=if_absent), len(data))

    async def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        return await self._bounded("get", key, self.inner.get(key, offset=offset, length=length), length)

    async def stat(self, key: str) -> ObjectInfo | None:
        return await self._bounded("stat", key, self.inner.stat(key))

    async def delete(self, key: str) -> None:
        await self._bounded("delete", key, self.inner.delete(key))

    async def flush(self) -> None:
        await self._bounded("flush", "", self.inner.flush())

    async def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        items = self.inner.list(prefix, start_after=start_after).__aiter__()
        while True:  # each next item (a listing page on S3) within the timeout
            try:
                item = await self._bounded("list", prefix, anext(items))
            except StopAsyncIteration:
                return
            yield item


def _kind(exc: TargetError) -> str:
    if isinstance(exc, TargetUnreachableError):
        return "unreachable"
    if isinstance(exc, TransientTargetError):
        return "transient"
    if isinstance(exc, NotFoundError):
        return "not_found"
    return "permanent"


RequestHook = Callable[[str, str, int], None]
"""(target, op, bytes uploaded) for every request made: the spend ledger (replicator.budget),
which records; admission happens before a request, where its priority is known."""


class MeteredTarget(TargetWrapper):
    """Counts every request made to the backend (retries included), bytes uploaded, and
    failures by kind (replicator.metrics), and reports each request to ``on_request``.
    Innermost wrapper: it sees each real attempt."""

    def __init__(self, inner: Target, on_request: RequestHook | None = None) -> None:
        super().__init__(inner)
        self.on_request = on_request

    def _count(self, op: str, nbytes: int = 0) -> None:
        metrics.REQUESTS.labels(self.name, op).inc()
        if self.on_request is not None:
            self.on_request(self.name, op, nbytes)

    def _failed(self, exc: TargetError) -> None:
        metrics.TARGET_ERRORS.labels(self.name, _kind(exc)).inc()

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self._count("put", len(data))  # egress is charged for bytes sent, even if the PUT then fails
        try:
            await self.inner.put(key, data, if_absent=if_absent)
        except TargetError as exc:
            self._failed(exc)
            raise
        metrics.SENT_BYTES.labels(self.name).inc(len(data))

    async def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        self._count("get")
        try:
            return await self.inner.get(key, offset=offset, length=length)
        except TargetError as exc:
            if not isinstance(exc, NotFoundError):
                self._failed(exc)
            raise

    async def stat(self, key: str) -> ObjectInfo | None:
        self._count("stat")
        try:
            return await self.inner.stat(key)
        except TargetError as exc:
            self._failed(exc)
            raise

    async def delete(self, key: str) -> None:
        self._count("delete")
        try:
            await self.inner.delete(key)
        except TargetError as exc:
            self._failed(exc)
            raise

    async def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        self._count("list")
        seen = 0
        try:
            async for item in self.inner.list(prefix, start_after=start_after):
                seen += 1
                if seen % 1000 == 0:
                    self._count("list")  # S3 answers 1,000 keys per request
                yield item
        except TargetError as exc:
            self._failed(exc)
            raise
