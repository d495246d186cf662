"""The memory budget: chunk bytes held between reading and the last upload (or, in restore and
verify, between download and use), counted so that memory stays bounded however large the
files. Not a money budget: that is :mod:`replicator.budget`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class ByteBudget:
    """An async counting semaphore over bytes. A request larger than the whole budget is
    admitted alone, so a single huge chunk can never deadlock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = asyncio.Condition()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def try_acquire(self, n: int) -> bool:
        if self._fits(n):
            self.used += n
            return True
        return False

    async def acquire(self, n: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self._fits(n))
            self.used += n

    async def acquire_or_free(self, n: int, free_one: Callable[[], Awaitable[bool]]) -> None:
        """Acquire ``n`` for a caller that may already hold some of this budget (chunks in
        flight it has yet to hand on): while ``n`` does not fit, the caller frees what it holds,
        one piece per ``free_one()`` call (which returns False once it holds nothing), and waits
        only when it holds nothing. Callers waiting for each other's memory while holding their
        own would wait forever."""
        while not self.try_acquire(n):
            if not await free_one():
                await self.acquire(n)
                return

    def release(self, n: int) -> None:
        self.used -= n

        async def wake() -> None:
            async with self._cond:
                self._cond.notify_all()

        asyncio.get_running_loop().create_task(wake())


class Lease:
    """Reference count on a chunk's reservation in a :class:`ByteBudget`."""

    __slots__ = ("_budget", "_refs", "_size")

    def __init__(self, budget: ByteBudget, size: int) -> None:
        self._budget, self._size, self._refs = budget, size, 1

    def retain(self) -> None:
        self._refs += 1

    def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            self._budget.release(self._size)
        assert self._refs >= 0, "lease released too often"
