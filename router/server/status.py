"""GET /healthz, /readyz, /v1/status, /metrics and /openapi.json: what a running daemon shows
of itself. They read it through `Health`, never the daemon module, so the server layer does not
import the layer that composes it.

/healthz answers while the process serves; /readyz turns 200 last on start-up (and 503 while
the journal cannot take writes, or while a delivery worker keeps failing with a backlog).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from router.intake.http import json_response
from router.observe.prometheus import CONTENT_TYPE
from router.resources import schemas_dir


class Health(Protocol):
    """What the status endpoints read of the running daemon."""

    @property
    def ready(self) -> bool:
        """Started, and not stopping."""

    @property
    def journal_healthy(self) -> bool:
        """The journal takes writes."""

    def failing_workers(self) -> list[str]:
        """Targets whose worker keeps failing while events wait for it."""

    def status(self) -> dict[str, Any]:
        """The books: ingest counters and per-target received, delivered, dead, pending."""


@dataclass(slots=True)
class StatusEndpoints:
    """The handlers, over the daemon's Health and its Prometheus rendering."""

    health: Health
    render_metrics: Callable[[], bytes]
    _openapi_doc: bytes | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/metrics", self.metrics)

    async def status(self, request: web.Request) -> web.Response:
        return json_response(self.health.status())

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "alive"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.render_metrics(), headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        """The API described (schemas/openapi.json, kept by hand; the fuzz test holds it true)."""
        if self._openapi_doc is None:
            path = schemas_dir() / "openapi.json"  # the daemon's API, not the event model
            self._openapi_doc = await asyncio.to_thread(path.read_bytes)
        return web.Response(body=self._openapi_doc, content_type="application/json")

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.health.ready:
            return json_response({"status": "not ready"}, status=503)
        if not self.health.journal_healthy:
            return json_response({"status": "journal unhealthy"}, status=503)
        if failing := self.health.failing_workers():
            return json_response({"status": "delivery failing", "targets": failing}, status=503)
        return json_response({"status": "ready"})
