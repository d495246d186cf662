"""Retrying: capped exponential backoff with full jitter, written once.

A :class:`RetryPolicy` says how long to wait (AWS Architecture Blog, "Exponential Backoff And
Jitter", 2015) and when to give up; a :class:`Backoff` is one run of retries under it — one
request retried by :class:`~replicator.targets.RetryingTarget`, one webhook delivery, or a
daemon loop that retries forever and starts over after each success::

    backoff = policy.backoff()
    while True:
        try:
            return await attempt()
        except TransientError:
            if not await backoff.wait(stopping):
                raise

:func:`pause` is the wait itself: a sleep that an event cuts short (the daemon's stop and
wake-up events). SDK retryers run dry in long outages (Litestream replaced the AWS SDK's);
a policy with ``give_up_after=None`` never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter. ``give_up_after=None`` retries forever:
    the daemon outlives outages."""

    initial: float = 0.5
    max: float = 30.0
    give_up_after: float | None = 300.0

    def delay(self, attempt: int) -> float:
        """The pause after failure number ``attempt`` (0 for the first): uniform in
        ``[0, min(max, initial * 2**attempt)]``."""
        return random.uniform(0, min(self.max, self.initial * 2 ** min(attempt, 30)))

    def backoff(self, clock: Callable[[], float] = time.monotonic) -> Backoff:
        """A fresh run of retries; its give-up budget counts from now."""
        return Backoff(self, clock)


class Backoff:
    """The retries of one operation under a policy: counts failures, and knows when the next
    attempt would start past ``give_up_after`` (counted from its creation or last :meth:`reset`)."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.failures = 0
        """Failures since the start (or the last success)."""
        self.exhausted = False
        """The pause :meth:`next_delay` returned last would end past ``give_up_after``: give up."""
        self.started = clock()

    def next_delay(self) -> float:
        """Count a failure; return the pause before the next attempt (then see :attr:`exhausted`)."""
        delay = self.policy.delay(self.failures)
        self.failures += 1
        limit = self.policy.give_up_after
        self.exhausted = limit is not None and self.clock() - self.started + delay > limit
        return delay

    async def wait(self, stop: asyncio.Event | None = None) -> bool:
        """Count a failure and pause before the next attempt. False (at once) when the policy
        gives up, or when ``stop`` is set before the pause ends; True: try again."""
        delay = self.next_delay()
        if self.exhausted:
            return False
        return not await pause(delay, stop)

    def reset(self) -> None:
        """A success: the next failure starts over from ``initial``, with a full budget."""
        self.failures = 0
        self.exhausted = False
        self.started = self.clock()


async def pause(seconds: float, until: asyncio.Event | None = None) -> bool:
    """Sleep ``seconds``, or less if ``until`` is set; return whether it is set."""
    seconds = max(0.0, seconds)
    if until is None:
        await asyncio.sleep(seconds)
        return False
    if not until.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), seconds)
    return until.is_set()
