"""One worker process of `server.workers` > 1: POST /v1/events on the shared port, the rest
passed to the journal owner.

The owner (router/server/workers.py) starts `event-router _worker --fd N` with one end of a
socketpair and sends it its setup: the running config, the port and the path of the owner's
own unix socket. The worker then builds what ingest needs in one process (validator, redactor,
route table, guard, acceptor, Ingest) over a HandoffJournal (router/intake/handoff.py), and
listens on the port with SO_REUSEPORT beside the other workers; the kernel spreads connections
among them. A POST /v1/events is read, inflated, decoded, limited, validated, redacted, routed
and serialised here, its records handed to the owner, and answered once the owner has them
durable: the same answer as one process gives. Every other request (status, metrics, tail,
management API, console, receipts, search, dead letters) is passed to the owner's unix socket
as it came, with the caller's address and scheme in two headers the owner trusts on that
socket only, and its answer streamed back: one daemon, however many workers.

Refused attempts are recorded by the owner (one set of rate limits and counters); a reload
reaches each worker (`configure`) before the owner finishes applying it; the owner asks for
the ingest counters when it shows them (`stats`). SIGTERM or SIGINT: stop listening, finish
the requests in flight (their records still reach the owner), report the last counters, exit.
When the owner goes away the worker stops at once: it cannot make anything durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from router.config import Config, RefusalEventsConfig, ServerConfig
from router.deadletter import DeadLetters
from router.evidence.keys import load_private
from router.evidence.receipt import Receipts
from router.intake.accept import Acceptor
from router.intake.handoff import (
    MAX_FRAME_BYTES,
    Channel,
    ChannelError,
    HandoffJournal,
    max_handoff_bytes,
)
from router.intake.http import Ingest, json_response
from router.intake.redaction import take_run_hash_key
from router.observe.metrics import IngestStats
from router.reload import checkers_for, redactor_for, validator_for
from router.routing import RouteTable
from router.server.auth import Caller, Guard, Refusals
from router.server.collector import settle
from router.server.listener import ClientFaultLog, DeadlineSite, json_answers, on_close
from router.server.servertls import server_context

log = logging.getLogger(__name__)

# The caller's address and scheme, for the owner's guard and handlers (router/server/workers.py
# trusts them on its unix socket, which only this daemon's processes can reach).
PEER_HEADER: Final = "X-Event-Router-Peer"
SCHEME_HEADER: Final = "X-Event-Router-Scheme"
# The caller sent no Host (HTTP/1.0): the client library always sends one, so this says so.
NO_HOST_HEADER: Final = "X-Event-Router-No-Host"
# Hop-by-hop headers (RFC 9110 7.6.1) and the length, which the proxy sets itself.
HOP_HEADERS: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        PEER_HEADER.lower(),
        SCHEME_HEADER.lower(),
        NO_HOST_HEADER.lower(),
    }
)
INGEST_PATH: Final = "/v1/events"
# The owner's answer must start within this (a tail stream then runs as long as it runs).
OWNER_CONNECT_TIMEOUT_S: Final = 10.0
# After the owner went away: what a request in flight still gets to finish.
ORPHANED_STOP_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """What the owner tells a worker it starts: everything else comes from the config."""

    config: Config
    port: int
    owner_socket: str
    index: int
    count: int
    run_hash_key: bytes  # redaction's key without redaction.hash_key: the owner's, for all


def share(server: ServerConfig, count: int) -> ServerConfig:
    """One worker's part of the limits that bound what all requests hold at once, so that the
    workers together hold no more than one process would: the requests worked on, the bytes
    of bodies in flight (never below one body's worth) and one client's bodies (never below
    one: with fewer per-client turns than workers, a client may hold one body per worker)."""
    return replace(
        server,
        max_concurrent_requests=max(1, server.max_concurrent_requests // count),
        max_body_bytes_in_flight=max(
            server.max_body_bytes, server.max_body_bytes_in_flight // count
        ),
        max_bodies_per_client=max(1, server.max_bodies_per_client // count),
    )


class OwnerRefusals(Refusals):
    """Refused attempts recorded by the owner: one set of rate limits, counters and events
    for the daemon, whichever process turned the caller away."""

    __slots__ = ("channel",)

    def __init__(self, config: Config, channel: Channel) -> None:
        super().__init__(
            config.auth.refusal_events if config.auth else RefusalEventsConfig(), _never
        )
        self.channel = channel

    async def record(self, caller: Caller, status: int, why: str) -> None:
        try:
            await self.channel.call("refused", caller, status, why)
        except ChannelError:
            # An audit event that cannot be written must not turn a 401 into a 500.
            log.exception("could not hand a refused attempt to the journal owner")


async def _never(body: dict[str, Any]) -> None:
    raise AssertionError("a worker's refusals are recorded by the journal owner")


class OwnerProxy:
    """Passes a request to the owner's unix socket as it came and streams the answer back."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.path),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=OWNER_CONNECT_TIMEOUT_S),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The body goes on as it arrives (chunked): the owner reads it within its own limits,
        and what it refuses (an API change past server.max_body_bytes) it also audits."""
        assert self._session is not None
        headers = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in HOP_HEADERS
        )
        headers[PEER_HEADER] = request.remote or ""
        headers[SCHEME_HEADER] = request.scheme
        if "Host" not in request.headers:
            headers[NO_HOST_HEADER] = "1"
        url = URL(f"http://owner{request.raw_path}", encoded=True)
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False,
            ) as upstream:
                return await self._relay(request, upstream)
        except aiohttp.ClientConnectionError as exc:
            log.error("cannot reach the journal owner at %s: %s", self.path, exc)
            return json_response(
                {
                    "error": {
                        "code": "owner_unavailable",
                        "message": "the daemon's journal owner does not answer; retry later",
                    }
                },
                status=503,
                headers={"Retry-After": "1"},
            )

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP_HEADERS:
                response.headers.add(name, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        else:
            # A stream (the tail): stop relaying the moment the client hangs up, so the owner
            # sees its subscriber go at once, not at its next write.
            task = asyncio.current_task()
            if task is not None:
                on_close(request.transport, lambda: _cancel(task))
        if upstream.headers.get("Connection", "").lower() == "close":
            response.force_close()
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        await response.write_eof()
        return response


def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()


class Worker:
    """The worker's parts, built from the owner's setup; see the module docstring."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self.stats = IngestStats()
        self.journal: HandoffJournal | None = None
        self.config: Config | None = None
        self.acceptor: Acceptor | None = None
        self._runner: web.AppRunner | None = None
        self._proxy: OwnerProxy | None = None
        self._lock = asyncio.Lock()  # setup, then each configure, in the order they came
        self._drained: asyncio.Task[None] | None = None

    async def setup(self, setup: WorkerSetup) -> int:
        """Build ingest from the owner's config and listen; returns this process's id."""
        async with self._lock:
            assert self.channel is not None
            config = self.config = setup.config
            # The owner takes no larger frame: an offer that would be larger is refused here.
            self.channel.max_send_bytes = max_handoff_bytes(config.server)
            take_run_hash_key(setup.run_hash_key)
            validator, redactor = validator_for(config), redactor_for(config)
            guard = Guard.build(config.auth, _never, config.server)
            guard.refusals = refusals = OwnerRefusals(config, self.channel)
            self.journal = journal = HandoffJournal(self.channel)
            self.acceptor = acceptor = Acceptor(
                server=config.server,
                validator=validator,
                routes=RouteTable(config.routes, config.settings.default_targets),
                journal=journal,
                stats=self.stats,
                storage=config.storage,
                dead_letters=DeadLetters(config.storage.dead_letter_dir()),
                refusals=refusals,
                redactor=redactor,
                receipts=_receipts(config),
            )
            ingest = Ingest(
                server=share(config.server, setup.count), stats=self.stats, acceptor=acceptor
            )
            self._proxy = proxy = OwnerProxy(setup.owner_socket)
            await proxy.start()
            faults = ClientFaultLog(
                config.auth.refusal_events if config.auth else RefusalEventsConfig()
            )
            # Errors in JSON and transfer codings refused here too: what the proxy passes on
            # arrives at the owner plain, with its framing gone.
            answers = json_answers(max_body_bytes=config.server.max_body_bytes, faults=faults)
            app = web.Application(
                client_max_size=config.server.max_body_bytes,
                middlewares=[answers, _ingest_only(guard)],
            )
            app.router.add_post(INGEST_PATH, ingest.handle)
            # Every other path, a line break in it too (`.` alone stops at one: such a path got
            # this process's own 404, and the owner never audited the refused attempt).
            app.router.add_route("*", "/{path:(?s:.*)}", proxy.handle)
            server = config.server
            self._runner = web.AppRunner(
                app,
                auto_decompress=False,
                handle_signals=False,
                access_log=None,
                shutdown_timeout=config.shutdown.drain_timeout_s,
                max_line_size=server.max_header_bytes,
                max_field_size=server.max_header_bytes,
                keepalive_timeout=server.keepalive_timeout_s,
                logger=faults,
            )
            await self._runner.setup()
            site = DeadlineSite(
                self._runner,
                server.host,
                setup.port,
                ssl_context=server_context(server.tls) if server.tls is not None else None,
                header_timeout_s=server.header_timeout_s,
                reuse_port=True,
            )
            await site.start()
            settle()  # the collector, as serve's own (router/server/collector.py)
            log.info(
                "worker %d of %d (pid %d) takes POST %s on port %d",
                setup.index + 1,
                setup.count,
                os.getpid(),
                INGEST_PATH,
                setup.port,
            )
            return os.getpid()

    async def configure(self, config: Config) -> None:
        """A reload: validate, redact and route with the new config's from the next offer on
        (offers being routed and handed over finish first, as in one process)."""
        async with self._lock:
            assert self.acceptor is not None and self.config is not None
            assert self.acceptor.redactor is not None  # setup gave it one
            old, self.config = self.config, config
            validator, redactor = checkers_for(
                old, config, self.acceptor.validator, self.acceptor.redactor
            )
            await self.acceptor.swap(
                validator=validator,
                routes=RouteTable(config.routes, config.settings.default_targets),
                redactor=redactor,
            )

    async def report(self) -> tuple[IngestStats, int]:
        """The ingest counters of this process (the owner sums every process's), and how many
        of its events the owner has answered durable so far (HandoffJournal.handed)."""
        return self.stats, self.journal.handed if self.journal is not None else 0

    async def modules(self) -> list[str]:
        """What this process has imported: a worker imports what ingest needs and no target's
        client (router/targets/cos.py, event_streams.py), no signing library, no management
        API; the owner asks, for a test or for an operator weighing a worker's memory."""
        return sorted(sys.modules)

    async def frozen(self) -> int:
        """How many objects setup froze out of the garbage collector's sight (gc.freeze): the
        owner asks, for a test."""
        return gc.get_freeze_count()

    async def collector(self) -> tuple[int, ...]:
        """The collector's thresholds (gc.get_threshold), for a test."""
        return gc.get_threshold()

    async def drain(self) -> None:
        """Stop listening and finish the requests in flight; once, however often asked."""
        if self._drained is None:
            self._drained = asyncio.create_task(self._drain(), name="worker-drain")
        await self._drained

    async def _drain(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # stops listening, then waits for in-flight requests
        if self._proxy is not None:
            await self._proxy.close()


def _ingest_only(guard: Guard) -> Callable[..., Any]:
    """The guard on POST /v1/events only: what the worker passes on, the owner guards."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical == INGEST_PATH:
            return await guard.middleware(request, handler)
        return await handler(request)  # type: ignore[no-any-return]

    return middleware


def _receipts(config: Config) -> Receipts | None:
    """The owner's receipt key (it made the file before starting any worker), and its signing
    key: a worker issues the same receipts the owner would."""
    if not (config.evidence.enabled and config.evidence.receipts):
        return None
    key_file = config.evidence.signing_key_file
    signing = load_private(Path(key_file)) if key_file else None
    return Receipts.load_or_create(Path(config.storage.path), signing)


async def run_worker(fd: int) -> int:
    """The worker process: serve until told to stop (0) or until the owner goes away (1)."""
    sock = socket.socket(fileno=fd)
    worker = Worker()
    channel = await Channel.over(
        sock,
        {
            "setup": worker.setup,
            "configure": worker.configure,
            "stats": worker.report,
            "modules": worker.modules,
            "frozen": worker.frozen,
            "collector": worker.collector,
        },
        name="journal-owner",
        max_frame_bytes=MAX_FRAME_BYTES,  # the owner's frames: its config, its reloads
    )
    worker.channel = channel
    channel.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the owner reloads, then tells us
    stopping = asyncio.create_task(stop.wait(), name="worker-stop")
    orphaned = asyncio.create_task(channel.closed.wait(), name="worker-orphaned")
    await asyncio.wait([stopping, orphaned], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    orphaned.cancel()
    if channel.closed.is_set():
        log.error("the journal owner went away; worker %d stops", os.getpid())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ORPHANED_STOP_S):
                await worker.drain()
        return 1
    await worker.drain()
    with contextlib.suppress(ChannelError):  # if the owner went away, it has what it last asked
        await channel.call("drained", *await worker.report())
    await channel.close()
    return 0
