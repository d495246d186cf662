"""Alert delivery: a JSON POST to each configured webhook, off the replication path.

The body is generic JSON that also carries a Slack-compatible ``text`` field, so a Slack
incoming webhook (or anything that reads ``text``) works unchanged. Delivery is retried with
backoff in a background task; a webhook that keeps failing is logged (its URL redacted) and
given up on for that event. It never blocks or crashes replication.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from replicator.config import AlertsConfig
from replicator.log import get_logger
from replicator.retry import RetryPolicy

log = get_logger(__name__)

ATTEMPTS = 5


class WebhookNotifier:
    def __init__(self, config: AlertsConfig) -> None:
        self.reconfigure(config)
        self.policy = RetryPolicy(initial=1.0, max=30.0, give_up_after=None)
        self.host = socket.gethostname()
        self._tasks: set[asyncio.Task[None]] = set()

    def reconfigure(self, config: AlertsConfig) -> None:
        self.urls = [u.get_secret_value() for u in config.webhooks]
        self.timeout = config.timeout

    def send(self, event: dict[str, Any]) -> None:
        """Queue ``event`` for every webhook; returns at once."""
        body = json.dumps({**event, "host": self.host}).encode()
        for index, url in enumerate(self.urls):
            task = asyncio.create_task(self._deliver(index, url, body), name=f"webhook-{index}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, index: int, url: str, body: bytes) -> None:
        import aiohttp  # ~140 ms to import: only once an alert is actually sent

        backoff = self.policy.backoff()
        for attempt in range(1, ATTEMPTS + 1):
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session,
                    session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp,
                ):
                    if resp.status < 300:
                        return
                    error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = f"{type(exc).__name__}"
            # Only the webhook's index is logged: its URL may embed a token.
            log.warning("alert.webhook_failed", webhook=index, error=error, attempt=attempt)
            if attempt < ATTEMPTS:
                await backoff.wait()
        log.error("alert.webhook_gave_up", webhook=index, attempts=ATTEMPTS)

    async def close(self, grace: float = 5.0) -> None:
        """Give pending deliveries a moment (a resolved alert at shutdown), then cancel them."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
