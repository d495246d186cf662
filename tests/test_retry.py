"""The one backoff helper (replicator.retry): delays, the give-up budget, stopping, resets."""

from __future__ import annotations

import asyncio
import time

from replicator.retry import Backoff, RetryPolicy, pause


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_delays_grow_capped_with_full_jitter() -> None:
    policy = RetryPolicy(initial=0.5, max=4.0)
    for attempt, ceiling in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # jittered over the whole range, not a constant
    assert policy.delay(10_000) <= 4.0  # no overflow on a daemon that retried for weeks


def failure(backoff: Backoff) -> tuple[float, bool]:
    """(the pause, whether the policy gives up) for one more failure."""
    return backoff.next_delay(), backoff.exhausted


def test_backoff_gives_up_when_the_next_attempt_would_start_past_the_budget() -> None:
    clock = Clock()
    backoff = RetryPolicy(initial=1.0, max=1.0, give_up_after=10.0).backoff(clock)
    delay, exhausted = failure(backoff)
    assert delay <= 1.0 and not exhausted and backoff.failures == 1
    clock.now += 9.5
    for _ in range(20):
        delay, exhausted = failure(backoff)
        assert exhausted == (delay > 0.5)  # 9.5 s spent: would the attempt start past 10 s?
    assert backoff.failures == 21
    clock.now += 1.0
    assert failure(backoff)[1]  # past the budget: every attempt would
    backoff.reset()
    assert backoff.failures == 0
    delay, exhausted = failure(backoff)
    assert delay <= 1.0 and not exhausted  # a full budget again


def test_a_policy_without_give_up_retries_forever() -> None:
    clock = Clock()
    backoff = RetryPolicy(initial=0.01, max=0.01, give_up_after=None).backoff(clock)
    clock.now += 1e9
    assert not failure(backoff)[1]

    async def go() -> None:
        assert await backoff.wait()  # the pause happens, and the caller tries again

    asyncio.run(go())


def test_wait_returns_false_at_once_when_spent_or_stopped() -> None:
    async def go() -> None:
        spent = RetryPolicy(initial=60.0, max=60.0, give_up_after=0.0).backoff()
        started = time.monotonic()
        assert not await spent.wait()
        stop = asyncio.Event()
        slow = RetryPolicy(initial=3600.0, max=3600.0, give_up_after=None).backoff()
        asyncio.get_running_loop().call_later(0.05, stop.set)
        assert not await slow.wait(stop)  # cut short by the stop event
        assert not await slow.wait(stop)  # already set: no pause at all
        assert time.monotonic() - started < 30

    asyncio.run(go())


def test_pause_reports_whether_the_event_was_set() -> None:
    async def go() -> None:
        event = asyncio.Event()
        assert not await pause(0.01, event)
        assert not await pause(-1.0, event)  # a deadline already past: no wait
        event.set()
        assert await pause(3600.0, event)
        assert not await pause(0.0)

    asyncio.run(go())
