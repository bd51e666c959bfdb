"""The listening socket: aiohttp's TCP site, a deadline on a connection's first headers, and
what is logged about clients that break the protocol.

aiohttp bounds a request's body (server.read_timeout_s) and an idle keep-alive connection,
but not a client that opens a connection and trickles its headers byte by byte (slowloris):
such connections would pile up, each holding a socket, before any handler or limit runs.
Each connection here must deliver the end of its first request's headers (a blank line)
within `server.header_timeout_s`, or it is closed. Later requests on a kept-alive connection
are bounded by the keep-alive timeout while idle and by the read timeout once they start.

A malformed request or a client that hangs up mid-body is the client's fault, not the
daemon's: aiohttp would log each as an ERROR with a traceback (690 KB for 1000 bad request
lines). `ClientFaultLog`, the logger aiohttp's handlers report to, makes each one WARNING line
instead, within the same rate limits as refused tokens (`auth.refusal_events`), and sums up
what the limits held back in one line per `summary_interval_s`. Any other error keeps its
ERROR and its traceback: that one is ours.

Every error the daemon answers is JSON, `{"error": {"code", "message"}}` (the management API's
own shape under /api/v2/), including the answers aiohttp makes by itself: a request it cannot
parse (400 `malformed_request`), a handler that failed (500 `internal_error`, the traceback
in the log only) or timed out (504), an `Expect:` it does not know (417), which its protocol
makes (`JsonErrorHandler`), and the HTTPExceptions its router and body reader raise: no
route (404), a method the route does not take (405, its Allow header kept), a body past
`server.max_body_bytes` (413), made JSON by the `json_answers` middleware. That middleware
also refuses a body framed with a transfer coding other than `chunked` (`Transfer-Encoding:
gzip, chunked`): aiohttp reads such a body as chunked and leaves the gzip on, so compressed
bytes would be taken as the body. The daemon applies no transfer coding: a 400
`unsupported_transfer_encoding` naming the header, before any handler (a body is compressed
with Content-Encoding, where a route takes it).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestHandler

from router.config import RefusalEventsConfig
from router.server.answers import error_body, json_error, too_large_text
from router.server.auth import RateLimit

log = logging.getLogger(__name__)

HEADERS_END = b"\r\n\r\n"
# A client's words quoted in a log line are cut here (the line stays one short line).
MAX_QUOTED_CHARS: Final = 200
# Addresses named in a summary line, the busiest first.
SUMMARY_ADDRESSES: Final = 5
CLIENT_FAULTS: Final = (HttpProcessingError, ConnectionError)
# The error codes of aiohttp's own answers that are not their status's phrase in snake case.
CODES: Final = {400: "malformed_request", 413: "body_too_large", 500: "internal_error"}
# Headers of an HTTPException that describe its plain-text body, not the answer.
BODY_HEADERS: Final = frozenset({"content-type", "content-length", "content-encoding"})


class ClientFaultLog(logging.LoggerAdapter[logging.Logger]):
    """The logger aiohttp's request handlers report to (`AppRunner(logger=...)`): a client
    fault is one rate-limited WARNING line; anything else passes to aiohttp's own logger."""

    def __init__(self, limits: RefusalEventsConfig) -> None:
        super().__init__(logging.getLogger("aiohttp.server"))
        self._limit = RateLimit(limits)
        self._interval_s = limits.summary_interval_s
        self._suppressed: Counter[str] = Counter()
        self._summary: asyncio.TimerHandle | None = None

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        error = kwargs.get("exc_info")
        if not isinstance(error, CLIENT_FAULTS):
            super().exception(msg, *args, **kwargs)
            return
        # aiohttp says "Error handling request from %s" with the peer's address, or nothing.
        address = str(args[0]) if args and args[0] is not None else "an unknown address"
        self.refused(address, describe(error))

    def refused(self, address: str, why: str) -> None:
        """One WARNING line, or a count for the next summary line."""
        if self._limit.allowed(address):
            log.warning("refused a request from %s: %s", address, why)
            return
        self._suppressed[address] += 1
        if self._summary is None:
            loop = asyncio.get_running_loop()
            self._summary = loop.call_later(self._interval_s, self.summarize)

    def summarize(self) -> None:
        """The line for what the rate limit held back since the last one (at stop, too)."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        if not self._suppressed:
            return
        suppressed, self._suppressed = self._suppressed, Counter()
        busiest = ", ".join(
            f"{address} ({count})" for address, count in suppressed.most_common(SUMMARY_ADDRESSES)
        )
        log.warning(
            "%d more refused requests, not logged one by one (rate limit); the most from %s",
            sum(suppressed.values()),
            busiest,
        )


def describe(error: BaseException) -> str:
    """A client fault in one short line: a status and what was wrong, whitespace folded."""
    if isinstance(error, HttpProcessingError):
        text = f"{error.code} {parse_problem(error)}"
    else:
        text = f"the client went away ({type(error).__name__}: {error})"
    return quoted(text)


def parse_problem(error: HttpProcessingError) -> str:
    """What aiohttp's parser found wrong, on one line: its message may end with the offending
    line and a caret under the spot."""
    lines = [line for line in error.message.splitlines() if line.strip() not in ("", "^")]
    return " ".join(" ".join(lines).split())


def quoted(text: str) -> str:
    """`text` cut to a length a log line or an answer may quote."""
    return text if len(text) <= MAX_QUOTED_CHARS else text[: MAX_QUOTED_CHARS - 3] + "..."


def code_for(status: int) -> str:
    """The error code of an answer aiohttp made: `method_not_allowed` for a 405."""
    if status in CODES:
        return CODES[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return f"http_{status}"
    return "_".join(phrase.lower().replace("-", " ").split())


def json_answers(*, max_body_bytes: int, faults: ClientFaultLog) -> Middleware:
    """The first middleware of an app, the journal owner's and each worker's: refuses a
    transfer coding other than chunked, and turns the HTTPExceptions aiohttp raises (404,
    405, 413, ...) into JSON error bodies, with their status and headers (Allow): the
    management API's in its shape (`api_error_json`), the rest in `error_json`."""

    def answer(
        request: web.Request,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        return json_error(status, code, message, headers=headers, body=error_body(request.path))

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        codings = request.headers.getall("Transfer-Encoding", [])
        if codings and [c.strip().lower() for c in ",".join(codings).split(",")] != ["chunked"]:
            sent = quoted(", ".join(codings))
            faults.refused(
                request.remote or "an unknown address", f"400 Transfer-Encoding {sent!r}"
            )
            response = answer(
                request,
                400,
                "unsupported_transfer_encoding",
                f"Transfer-Encoding {sent!r} is not supported: send the body as it is "
                "(Content-Length) or with Transfer-Encoding: chunked alone; compress it with "
                "Content-Encoding: gzip where the route takes that (POST /v1/events)",
            )
            response.force_close()  # the body was never read, nor could it be
            return response
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {k: v for k, v in exc.headers.items() if k.lower() not in BODY_HEADERS}
            response = answer(
                request,
                exc.status,
                code_for(exc.status),
                _exception_message(request, exc, max_body_bytes),
                headers,
            )
            if exc.status == 413:
                response.force_close()  # the rest of the body was never read
            return response

    return middleware


def _exception_message(request: web.Request, exc: web.HTTPException, max_body_bytes: int) -> str:
    path = quoted(request.path)
    if exc.status == 404:
        return f"no route {request.method} {path}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"{request.method} is not allowed on {path}; it takes {allowed or 'no method'}"
    if exc.status == 413:
        return too_large_text(max_body_bytes)
    return exception_text(exc)


def exception_text(exc: web.HTTPException) -> str:
    """What an HTTPException says: its text, unless that is only its status line."""
    default = f"{exc.status}: {exc.reason}"
    return quoted(exc.text) if exc.text and exc.text != default else str(exc.reason)


def _description(status: int) -> str:
    try:
        return HTTPStatus(status).description
    except ValueError:
        return f"HTTP status {status}"


class JsonErrorHandler(RequestHandler):
    """aiohttp's protocol, answering its own errors in the daemon's JSON: a request it cannot
    parse, a handler that raised or timed out, an HTTPException raised outside the middleware
    (the `Expect:` handler's 417). aiohttp makes these answers in its protocol, past every
    middleware, and offers no hook for their body."""

    __slots__ = ()  # the layout of aiohttp's class, so that an instance can take this class

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            headers = {k: v for k, v in resp.headers.items() if k.lower() not in BODY_HEADERS}
            resp = json_error(
                resp.status, code_for(resp.status), exception_text(resp), headers=headers
            )
        return await super().finish_response(request, resp, start_time)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own logs the error (to ClientFaultLog) and refuses once an answer started.
        super().handle_error(request, status, exc, message)
        if isinstance(exc, HttpProcessingError):
            why = quoted(parse_problem(exc))
        elif status == 500:
            why = "the daemon failed to answer this request; the error is in its log"
        else:  # 504: a handler ran out of time
            why = _description(status)
        response = json_error(status, code_for(status), why)
        response.force_close()
        return response


def json_protocol_errors(protocol: RequestHandler) -> RequestHandler:
    """The protocol aiohttp's server made, as a JsonErrorHandler. The server builds each
    connection's protocol from arguments it keeps to itself, so the instance it made takes
    the subclass (same slots, same state) rather than being built again."""
    protocol.__class__ = JsonErrorHandler
    return protocol


# The connections open now, by transport: how a long-lived handler (the tail) learns at once
# that its client has gone, rather than at its next write.
_OPEN: dict[asyncio.BaseTransport, HeaderDeadline] = {}


def on_close(transport: asyncio.BaseTransport | None, callback: Callable[[], None]) -> None:
    """Call `callback` when the connection of `transport` closes (at once if it has)."""
    connection = _OPEN.get(transport) if transport is not None else None
    if connection is None:
        callback()
        return
    connection.closed_callbacks.append(callback)


class HeaderDeadline(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection; passes everything through unchanged."""

    def __init__(self, inner: asyncio.Protocol, timeout_s: float) -> None:
        self._inner = inner
        self._timeout_s = timeout_s
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.BaseTransport | None = None
        self.closed_callbacks: list[Callable[[], None]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        _OPEN[transport] = self
        self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._expire)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            window = self._tail + data
            if HEADERS_END in window:
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = window[-(len(HEADERS_END) - 1) :]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)
        if self._transport is not None:
            _OPEN.pop(self._transport, None)
        callbacks, self.closed_callbacks = self.closed_callbacks, []
        for callback in callbacks:
            callback()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.close()


def deadline_protocol(
    runner: web.BaseRunner, header_timeout_s: float
) -> Callable[[], asyncio.Protocol]:
    """The protocol factory of a site whose connections get a HeaderDeadline."""
    server = runner.server
    assert server is not None

    def protocol() -> asyncio.Protocol:
        return HeaderDeadline(json_protocol_errors(server()), header_timeout_s)

    return protocol


class DeadlineSite(web.TCPSite):
    """A TCPSite whose connections get a HeaderDeadline."""

    def __init__(
        self, runner: web.BaseRunner, *args: object, header_timeout_s: float, **kwargs: object
    ) -> None:
        super().__init__(runner, *args, **kwargs)  # type: ignore[arg-type]
        self._header_timeout_s = header_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)
        self._server = await asyncio.get_running_loop().create_server(
            deadline_protocol(self._runner, self._header_timeout_s),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )


class DeadlineUnixSite(web.UnixSite):
    """A UnixSite whose connections get a HeaderDeadline (and so `on_close`): the journal
    owner's listener when worker processes take the port (router/server/workers.py)."""

    def __init__(self, runner: web.BaseRunner, path: str, *, header_timeout_s: float) -> None:
        super().__init__(runner, path)
        self._header_timeout_s = header_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)
        self._server = await asyncio.get_running_loop().create_unix_server(
            deadline_protocol(self._runner, self._header_timeout_s),
            self._path,
            backlog=self._backlog,
        )
