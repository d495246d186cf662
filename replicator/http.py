"""The daemon's HTTP endpoint (aiohttp, already a dependency of aiobotocore), on ``listen``
(default 127.0.0.1:9464: localhost unless exposed deliberately).

* ``/metrics``: Prometheus text format (replicator.metrics);
* ``/healthz``: 200 while the event loop is alive and not stuck — it is served *by* the loop,
  and a heartbeat task must have run in the last 10 s;
* ``/readyz``: 200 once the config is loaded and every target has been reached at least once;
* ``/status``: the JSON of ``replicator status --json``;
* ``/``: the same as a page for people, with lag charts (replicator.page).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from replicator.metrics import REGISTRY

STUCK_AFTER = 10.0


class HttpEndpoint:
    def __init__(
        self,
        listen: str,
        *,
        status: Callable[[], dict[str, Any]],
        unready: Callable[[], list[str]],
        page: Callable[[], str] | None = None,
    ) -> None:
        self.host, _, port = listen.rpartition(":")
        self.port = int(port)
        self.status = status
        self.unready = unready
        self.page = page
        self.heartbeat = time.monotonic()
        self._runner: web.AppRunner | None = None

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        if self.page is not None:
            app.router.add_get("/", self._page)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host.strip("[]"), self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        age = time.monotonic() - self.heartbeat
        if age > STUCK_AFTER:
            return web.json_response({"status": "stuck", "heartbeat_age_seconds": round(age, 1)}, status=503)
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        waiting = self.unready()
        if waiting:
            return web.json_response({"status": "not ready", "waiting_for": waiting}, status=503)
        return web.json_response({"status": "ready"})

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _page(self, _: web.Request) -> web.Response:
        assert self.page is not None
        return web.Response(text=self.page(), content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)


# The page is self-contained: the browser may load nothing else (air-gapped sites, and no
# way for an untrusted name that escaped escaping to pull anything in).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
