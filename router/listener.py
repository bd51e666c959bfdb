"""The listening socket: aiohttp's TCP site, plus a deadline on a connection's first headers.

aiohttp bounds a request's body (server.read_timeout_s) and an idle keep-alive connection,
but not a client that opens a connection and trickles its headers byte by byte (slowloris):
such connections would pile up, each holding a socket, before any handler or limit runs.
Each connection here must deliver the end of its first request's headers (a blank line)
within `server.header_timeout_s`, or it is closed. Later requests on a kept-alive connection
are bounded by the keep-alive timeout while idle and by the read timeout once they start.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

HEADERS_END = b"\r\n\r\n"


class HeaderDeadline(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection; passes everything through unchanged."""

    def __init__(self, inner: asyncio.Protocol, timeout_s: float) -> None:
        self._inner = inner
        self._timeout_s = timeout_s
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
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

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.close()


class DeadlineSite(web.TCPSite):
    """A TCPSite whose connections get a HeaderDeadline."""

    def __init__(
        self, runner: web.BaseRunner, *args: object, header_timeout_s: float, **kwargs: object
    ) -> None:
        super().__init__(runner, *args, **kwargs)  # type: ignore[arg-type]
        self._header_timeout_s = header_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            return HeaderDeadline(server(), self._header_timeout_s)

        self._server = await asyncio.get_running_loop().create_server(
            protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
