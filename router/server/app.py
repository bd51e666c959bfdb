"""The HTTP surface assembled: every route of a running daemon on one aiohttp Application.

The daemon composes the parts and hands them here; the server layer never imports the daemon.
What changes on reload (the targets, the validator, the running config's file archives) is
passed as callables, asked at each request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from router.config import ServerConfig
from router.deadletter import DeadLetters
from router.intake.http import Ingest
from router.journal import Journal
from router.server.auth import Guard
from router.server.console import ConsolePage
from router.server.letters import LetterEndpoints
from router.server.listener import ClientFaultLog, json_answers
from router.server.receipts import ReceiptEndpoint
from router.server.redrive import Redrive
from router.server.search import SearchEndpoint
from router.server.status import Health, StatusEndpoints
from router.server.tail import TailHub


class Routes(Protocol):
    """A set of handlers that adds its own routes (the management API)."""

    def routes(self, app: web.Application) -> None:
        """Add the handlers to `app`."""


def build_app(
    *,
    server: ServerConfig,
    guard: Guard,
    ingest: Ingest,
    tail: TailHub,
    dead_letters: DeadLetters,
    journal: Journal,
    pending_for: Callable[[str], Awaitable[list[str]]],
    health: Health,
    render_metrics: Callable[[], bytes],
    is_target: Callable[[str], bool],
    is_invalid: Callable[[dict[str, Any]], bool],
    file_archives: Callable[[], Mapping[str, Path]],
    letters_dir: Path,
    api: Routes,
    client_faults: ClientFaultLog,
    middlewares: Sequence[Middleware] = (),
) -> web.Application:
    """The application: ingest, tail, dead letters and redrive, archive search, status and
    metrics, receipts, management API, all behind the guard (authentication and refusals),
    and the console page that calls them. Every error is JSON, aiohttp's own answers too
    (router/server/listener.py); `middlewares` run after that and before the guard (the
    journal owner's, when worker processes pass it the requests: router/server/workers.py)."""
    answers = json_answers(max_body_bytes=server.max_body_bytes, faults=client_faults)
    app = web.Application(
        client_max_size=server.max_body_bytes,
        middlewares=[answers, *middlewares, guard.middleware],
    )
    app.router.add_post("/v1/events", ingest.handle)
    app.router.add_get("/v1/tail", tail.handle)
    redrive = Redrive(dead_letters, journal, is_target=is_target, is_invalid=is_invalid)
    app.router.add_post("/v1/deadletters/{target}/redrive", redrive.handle)
    LetterEndpoints(letters_dir, dead_letters).routes(app)
    SearchEndpoint(file_archives).routes(app)
    StatusEndpoints(health, render_metrics).routes(app)
    ReceiptEndpoint(pending_for, file_archives, letters_dir, dead_letters).routes(app)
    api.routes(app)
    ConsolePage().routes(app)
    return app
