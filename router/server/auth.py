"""Who may call what: bearer tokens checked in constant time, and every refusal written down
as an Activity Tracker event of the router itself.

    route                                   needs
    GET /healthz, /readyz, /openapi.json    nothing (probes and the API description)
    GET /console, /console/{name}           nothing (the console's static files: no data)
    POST /v1/events                         an ingest token
    anything else (status, tail, redrive)   an admin token

Routes not in OPEN_ROUTES or INGEST_ROUTES need an admin token, so an endpoint added later is
closed until someone decides otherwise. A missing or unknown token, or more than one
Authorization header, is a 401 with `WWW-Authenticate: Bearer realm="event-router"`; a known
token on a route its kind does not open is a 403. Tokens are kept as SHA-256 digests and the
digest of what a caller presents is compared with every one of them by `hmac.compare_digest`,
so neither the answer nor its timing tells how close a guess came.

Browsers are callers too, on behalf of whatever page they show. A request that changes
something (any method but GET, HEAD and OPTIONS) and carries an `Origin` other than the
daemon's own is refused (403 `cross_origin`): no page elsewhere may post to the daemon, with
or without tokens. Without an `auth` section there is no token to ask for, so two more doors
close: management API changes (`/api/v2/...`, anything but a read) are refused with a 403 that
says to configure `auth.admin_tokens` (reads stay open, as the daemon listens on loopback by
default), and a request whose `Host` is not one of the daemon's own names (403
`unknown_host`) is refused before any handler: a page on `evil.example` whose DNS name is
rebound to 127.0.0.1 sends `Host: evil.example`. The daemon's names are `server.host`,
`localhost`, this host's name, any IP address (a rebinding attack needs a DNS name it
controls), and `server.allowed_hosts`. Probes answer any name.

Each refusal becomes an `event-router.instance.login` event (outcome failure, 401
Unauthorized or 403 Forbidden, severity critical, the caller's address, never the token),
routed and journaled like any producer's event, so `reason.reasonType:Unauthorized` finds
attacks on the router too. Token buckets (one per client address, one for all) keep an
attacker from filling the journal with them: what the buckets refuse is counted, and one
summary event per `refusal_events.summary_interval_s` says how many and from where.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from router.config import AuthConfig, RefusalEventsConfig, ServerConfig, TokenConfig
from router.events import crn_service
from router.intake.validation import Problem
from router.selfevent import refusal_event, summary_event
from router.server.answers import API_PREFIX, error_body, json_error

log = logging.getLogger(__name__)

INGEST: Final = "ingest"
ADMIN: Final = "admin"
REALM: Final = 'Bearer realm="event-router"'
OPEN_ROUTES: Final = frozenset(
    {"/healthz", "/readyz", "/openapi.json", "/console", "/console/{name}"}
)
INGEST_ROUTES: Final = frozenset({"/v1/events"})
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# Per-client buckets kept at most; beyond, the least recently refused client is forgotten.
MAX_TRACKED_CLIENTS: Final = 10_000
MAX_AGENT_CHARS: Final = 256

EmitEvent = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Principal:
    """A caller whose token matched: the token's name, its kind, and the services it may
    speak for (empty: any)."""

    name: str
    kind: str
    services: frozenset[str] = frozenset()

    def problems(self, event: dict[str, Any]) -> list[Problem]:
        """A valid event this principal may not send: another service's audit trail."""
        if not self.services:
            return []
        service = crn_service(event["logSourceCRN"])
        if service in self.services:
            return []
        allowed = ", ".join(sorted(self.services))
        return [
            Problem(
                "/logSourceCRN",
                f"token {self.name!r} may send events of {allowed} only, not of {service!r}",
            )
        ]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request, as far as the router can tell; never holds the token."""

    address: str
    agent: str
    endpoint: str
    principal: Principal | None = None


CALLER: Final = web.RequestKey("caller", Caller)


def caller_of(request: web.Request, principal: Principal | None = None) -> Caller:
    route = request.match_info.route
    resource = route.resource.canonical if route.resource is not None else "?"
    return Caller(
        address=request.remote or "",
        agent=request.headers.get("User-Agent", "")[:MAX_AGENT_CHARS],
        endpoint=f"{request.method} {resource}",
        principal=principal,
    )


class TokenTable:
    """The configured tokens; finds the one a caller presents."""

    def __init__(self, auth: AuthConfig) -> None:
        self._entries: list[tuple[bytes, Principal]] = [
            *_principals(auth.ingest_tokens, INGEST),
            *_principals(auth.admin_tokens, ADMIN),
        ]

    def lookup(self, presented: str) -> Principal | None:
        """The principal of `presented`. Every digest is compared, found or not, in constant
        time each, so timing reveals neither which token nor how much of it matched."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, principal in self._entries:
            if hmac.compare_digest(digest, known) and found is None:
                found = principal
        return found


def _principals(tokens: Iterable[TokenConfig], kind: str) -> list[tuple[bytes, Principal]]:
    return [(t.digest, Principal(t.name, kind, frozenset(t.services))) for t in tokens]


def bearer_token(request: web.Request) -> str | None:
    """The token of `Authorization: Bearer <token>` (the scheme in any case), or None."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def repeated_authorization(request: web.Request) -> bool:
    """Whether the request carries more than one Authorization header. The field holds one
    credential (RFC 9110): which of several counts is a guess that a proxy in front may
    make otherwise (the last), so none counts, whichever comes first."""
    return len(request.headers.getall("Authorization", ())) > 1


@dataclass(slots=True)
class TokenBucket:
    """`burst` at once, refilled at `per_s`."""

    burst: float
    per_s: float
    tokens: float = -1.0
    at: float = 0.0

    def take(self, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass(slots=True)
class RateLimit:
    """A token bucket per client address and one for all, sized by `refusal_events`: how
    many refusals are written down one by one (as events, or as log lines)."""

    config: RefusalEventsConfig
    clock: Callable[[], float] = time.monotonic
    _global: TokenBucket = field(init=False)
    _clients: OrderedDict[str, TokenBucket] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self._global = TokenBucket(self.config.global_burst, self.config.global_per_s)

    def allowed(self, address: str) -> bool:
        now = self.clock()
        bucket = self._clients.pop(address, None) or TokenBucket(
            self.config.per_client_burst, self.config.per_client_per_s
        )
        self._clients[address] = bucket  # most recent last
        while len(self._clients) > MAX_TRACKED_CLIENTS:
            self._clients.popitem(last=False)
        return bucket.take(now) and self._global.take(now)


@dataclass(slots=True)
class Refusals:
    """Turns refused attempts into self-events, within the rate limits."""

    config: RefusalEventsConfig
    emit: EmitEvent
    clock: Callable[[], float] = time.monotonic
    refused: Counter[str] = field(default_factory=Counter)  # by reasonType
    recorded: int = 0
    suppressed_total: int = 0
    _limit: RateLimit = field(init=False)
    _suppressed: Counter[str] = field(default_factory=Counter)
    _pending: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._limit = RateLimit(self.config, self.clock)

    def _allowed(self, address: str) -> bool:
        return self._limit.allowed(address)

    async def record(self, caller: Caller, status: int, why: str) -> None:
        """One refused attempt: an event now, or a count for the next summary."""
        reason_type = "Unauthorized" if status == 401 else "Forbidden"
        self.refused[reason_type] += 1
        if not self._allowed(caller.address):
            self._suppressed[caller.address] += 1
            self.suppressed_total += 1
            self._pending.set()
            return
        await self._emit(caller_refused(caller, status, reason_type, why))

    async def _emit(self, body: dict[str, Any]) -> None:
        try:
            await self.emit(body)
            self.recorded += 1
        except Exception:
            # An audit event that cannot be written must not turn a 401 into a 500.
            log.exception("could not record a refused attempt")

    async def summarize(self) -> None:
        """One event for the attempts the buckets kept out of the journal since the last."""
        self._pending.clear()
        if not self._suppressed:
            return
        suppressed, self._suppressed = self._suppressed, Counter()
        total = sum(suppressed.values())
        await self._emit(summary_event(total, suppressed))

    async def run(self) -> None:
        """Sum up suppressed refusals once per interval while there are any."""
        while True:
            await self._pending.wait()
            await asyncio.sleep(self.config.summary_interval_s)
            await self.summarize()


def caller_refused(caller: Caller, status: int, reason_type: str, why: str) -> dict[str, Any]:
    """The refusal event (router/selfevent.py) for this caller."""
    principal = caller.principal
    return refusal_event(
        endpoint=caller.endpoint,
        address=caller.address,
        agent=caller.agent,
        principal=principal.name if principal else None,
        status=status,
        reason_type=reason_type,
        why=why,
    )


@dataclass(slots=True)
class Guard:
    """The middleware that applies the route table, and the refusal recorder behind it."""

    auth: AuthConfig | None
    refusals: Refusals
    _tokens: TokenTable | None = None
    _task: asyncio.Task[None] | None = None

    own_hosts: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls, auth: AuthConfig | None, emit: EmitEvent, server: ServerConfig | None = None
    ) -> Guard:
        refusals = Refusals(auth.refusal_events if auth else RefusalEventsConfig(), emit)
        hosts = own_host_names(server or ServerConfig())
        return cls(auth, refusals, TokenTable(auth) if auth else None, own_hosts=hosts)

    async def start(self) -> None:
        if self.auth is None:
            log.warning(
                "no auth section in the config: ingest and reads are open to anyone who can "
                "reach the listener, and the management API refuses changes; configure "
                "auth.ingest_tokens and auth.admin_tokens"
            )
            return
        self._task = asyncio.create_task(self.refusals.run(), name="auth:refusal-summary")

    async def stop(self) -> None:
        """Write the last summary while the journal is still open."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.refusals.summarize()

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.auth is not None,
            "refused": dict(self.refusals.refused),
            "refusal_events": self.refusals.recorded,
            "refusal_events_suppressed": self.refusals.suppressed_total,
        }

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        if route is None or route.canonical in OPEN_ROUTES:
            return await handler(request)
        changes = request.method not in SAFE_METHODS
        if changes and not same_origin(request):
            why = f"Origin {request.headers['Origin']!r} is not this daemon's"
            await self.refusals.record(caller_of(request), 403, why)
            return _refusal(
                request, 403, "cross_origin", f"{why}; changes come from its own origin only"
            )
        if self._tokens is None:
            return await self._open(request, handler, changes)
        need = INGEST if route.canonical in INGEST_ROUTES else ADMIN
        if need == ADMIN and self.auth is not None and not self.auth.admin_tokens:
            why = "no admin token is configured"
            await self.refusals.record(caller_of(request), 403, why)
            return _refusal(request, 403, "forbidden", f"{why}; configure auth.admin_tokens")
        presented = bearer_token(request)
        repeated = repeated_authorization(request)
        principal = None
        if presented is not None and not repeated:
            principal = self._tokens.lookup(presented)
        if principal is None:
            why = (
                "more than one Authorization header"
                if repeated
                else "no bearer token"
                if presented is None
                else "unknown token"
            )
            await self.refusals.record(caller_of(request), 401, why)
            return _refusal(
                request, 401, "unauthorized", f"{why}; send Authorization: Bearer <token>"
            )
        if principal.kind != need:
            why = f"token {principal.name!r} is an {principal.kind} token, not an {need} token"
            await self.refusals.record(caller_of(request, principal), 403, why)
            return _refusal(request, 403, "forbidden", why)
        request[CALLER] = caller_of(request, principal)
        return await handler(request)

    async def _open(
        self, request: web.Request, handler: Handler, changes: bool
    ) -> web.StreamResponse:
        """No auth section: answer only to the daemon's own names, and change no config."""
        # The header itself: aiohttp's request.host falls back to a name lookup without one.
        # Browsers always send Host; a client without it is no rebinding page.
        host = request.headers.get("Host")
        if host is not None and not self.is_own_host(host):
            why = f"Host {host[:MAX_AGENT_CHARS]!r} is not one of this daemon's names"
            await self.refusals.record(caller_of(request), 403, why)
            return _refusal(
                request,
                403,
                "unknown_host",
                f"{why}; without auth tokens it answers only to server.host, localhost, its "
                "host name, IP addresses and server.allowed_hosts (DNS rebinding defence)",
            )
        if changes and request.path.startswith(API_PREFIX):
            why = "no admin token is configured, so the management API only reads"
            await self.refusals.record(caller_of(request), 403, why)
            return _refusal(
                request,
                403,
                "forbidden",
                f"{why}; configure auth.admin_tokens (and auth.ingest_tokens) to change "
                "targets, routes and settings through it",
            )
        return await handler(request)

    def is_own_host(self, host: str) -> bool:
        """Whether `Host: host` names this daemon (see the module docstring)."""
        name = host_name(host)
        if name in self.own_hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def host_name(host: str) -> str:
    """The name of a `Host` header or an origin's netloc, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


def own_host_names(server: ServerConfig) -> frozenset[str]:
    return frozenset(
        name.lower()
        for name in (server.host, "localhost", socket.gethostname(), *server.allowed_hosts)
    )


def same_origin(request: web.Request) -> bool:
    """No `Origin` (not a browser, or a same-origin GET) or one naming the host and port
    the request was sent to, with the scheme it came in on."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = origin.strip().lower().split("://", 1)
    if len(parts) != 2:
        return False  # `null`: a sandboxed page, a file, a redirect across origins
    scheme, netloc = parts
    host = request.headers.get("Host", "").strip().lower()
    return scheme == request.scheme and netloc.rstrip("/") == host


def _refusal(request: web.Request, status: int, code: str, message: str) -> web.Response:
    """A refusal before the handler, in the shape of the path's answers (atracker's under
    the management API)."""
    headers = {"WWW-Authenticate": REALM} if status == 401 else {}
    response = json_error(status, code, message, headers=headers, body=error_body(request.path))
    # The body was never read; do not keep the connection waiting for it.
    response.force_close()
    return response
