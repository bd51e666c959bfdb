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
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from router.config import RefusalEventsConfig
from router.server.auth import RateLimit

log = logging.getLogger(__name__)

HEADERS_END = b"\r\n\r\n"
# A client's words quoted in a log line are cut here (the line stays one short line).
MAX_QUOTED_CHARS: Final = 200
# Addresses named in a summary line, the busiest first.
SUMMARY_ADDRESSES: Final = 5
CLIENT_FAULTS: Final = (HttpProcessingError, ConnectionError)


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
        # aiohttp's message may end with the offending line and a caret under the spot.
        lines = [line for line in error.message.splitlines() if line.strip() not in ("", "^")]
        text = f"{error.code} {' '.join(lines)}"
    else:
        text = f"the client went away ({type(error).__name__}: {error})"
    text = " ".join(text.split())
    return text if len(text) <= MAX_QUOTED_CHARS else text[: MAX_QUOTED_CHARS - 3] + "..."


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
        return HeaderDeadline(server(), header_timeout_s)

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
