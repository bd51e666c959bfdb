"""The live tail: `GET /v1/tail?query=...` streams accepted events that match a query as
Server-Sent Events, and `event-router tail 'QUERY'` follows that stream in a terminal.

Ingest hands every accepted event (after the journal has it) to `TailHub.publish`, which is
synchronous and never waits: each subscriber has a bounded queue, and an event that finds the
queue full is dropped for that subscriber and counted. The subscriber is told, with a
`dropped` event carrying the running count, before its next event. A slow client therefore
costs ingest nothing and loses only its own view.

The stream: `event: ready` once subscribed (data: the canonical query), then `event: event`
with the event's JSON as data and its id as the SSE id, `event: dropped` as above, and a
comment line every KEEPALIVE_S so proxies keep the connection. A client that went away is
noticed at the next write (an event or the keep-alive), when its subscription ends; until then
its queue can only fill up, never grow. Unauthenticated for now, like every endpoint: it is as
private as the listener it is bound to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import urlencode

import aiohttp
import orjson
from aiohttp import web

from router.errors import QueryError
from router.events import Event
from router.logformat import counted
from router.query import Query, parse

log = logging.getLogger(__name__)

QUEUE_EVENTS = 1000
KEEPALIVE_S = 15.0
_CLOSED = b""  # the sentinel a closing hub puts in every queue


@dataclass(eq=False, slots=True)
class Subscriber:
    """One client of the tail: its query, its bounded queue and what it missed."""

    query: Query | None
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(QUEUE_EVENTS))
    dropped: int = 0
    closed: bool = False


@dataclass(slots=True)
class TailHub:
    """Fans accepted events out to the subscribers whose query they match."""

    subscribers: set[Subscriber] = field(default_factory=set)
    queue_events: int = QUEUE_EVENTS

    def subscribe(self, query: Query | None) -> Subscriber:
        subscriber = Subscriber(query, asyncio.Queue(self.queue_events))
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def publish(self, events: Iterable[Event]) -> None:
        """Offer accepted events to every subscriber; never blocks (drops and counts)."""
        if not self.subscribers:
            return
        for event in events:
            for subscriber in self.subscribers:
                if subscriber.query is not None and not subscriber.query.matches(event.body):
                    continue
                try:
                    subscriber.queue.put_nowait(event.encoded())
                except asyncio.QueueFull:
                    subscriber.dropped += 1

    def close(self) -> None:
        """Ends every stream (at shutdown), so that no request keeps the daemon waiting."""
        for subscriber in self.subscribers:
            subscriber.closed = True
            with contextlib.suppress(asyncio.QueueEmpty):
                subscriber.queue.get_nowait()  # make room for the sentinel
            subscriber.queue.put_nowait(_CLOSED)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/tail?query=...`: 400 `bad_query` (with the column) or an SSE stream."""
        text = request.query.get("query", "")
        query: Query | None = None
        if text.strip():
            try:
                query = parse(text)
            except QueryError as exc:
                body = {
                    "error": {"code": "bad_query", "message": exc.message, "column": exc.column}
                }
                return web.json_response(body, status=400, dumps=_dumps)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        subscriber = self.subscribe(query)
        try:
            ready = orjson.dumps({"query": str(query) if query else ""})
            await response.write(b"event: ready\ndata: " + ready + b"\n\n")
            await self._stream(subscriber, response)
        except ConnectionResetError:
            pass  # the client went away; nothing to tell anyone
        finally:
            self.unsubscribe(subscriber)
        return response

    async def _stream(self, subscriber: Subscriber, response: web.StreamResponse) -> None:
        told = 0
        while not subscriber.closed:
            try:
                encoded = await asyncio.wait_for(subscriber.queue.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if encoded == _CLOSED or subscriber.closed:
                break
            if subscriber.dropped != told:
                told = subscriber.dropped
                await response.write(
                    b"event: dropped\ndata: " + orjson.dumps({"dropped": told}) + b"\n\n"
                )
            event_id = orjson.loads(encoded).get("id", "")
            await response.write(
                b"event: event\nid: " + str(event_id).encode() + b"\ndata: " + encoded + b"\n\n"
            )


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class SseMessage:
    """One Server-Sent Event: its type and its (joined) data."""

    event: str
    data: str


async def sse_messages(content: aiohttp.StreamReader) -> AsyncIterator[SseMessage]:
    """Parse an SSE stream (the subset the tail sends: event, id, data, comments)."""
    kind, data = "message", list[str]()
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield SseMessage(kind, "\n".join(data))
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)


async def follow(
    base_url: str,
    query: str,
    *,
    limit: int | None = None,
    token: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`event-router tail`: print matching events as NDJSON until interrupted (or `limit`
    events). The exit code: 0, 1 when the daemon cannot be reached, 2 for a bad query."""
    out = out or sys.stdout
    err = err or sys.stderr
    url = f"{base_url.rstrip('/')}/v1/tail?{urlencode({'query': query})}"
    shown = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(
                url,
                headers={
                    "Accept": "text/event-stream",
                    **({"Authorization": f"Bearer {token}"} if token else {}),
                },
            ) as resp,
        ):
            if resp.status != 200:
                body = await resp.json(content_type=None)
                error = body.get("error", {})
                if error.get("code") == "bad_query":
                    column = int(error["column"])
                    print(f"bad query: {error['message']}\n  {query}", file=err)
                    print(f"  {' ' * (column - 1)}^", file=err)
                    return 2
                print(f"tail refused: {resp.status} {error.get('message', '')}", file=err)
                return 1
            async for message in sse_messages(resp.content):
                if message.event == "ready":
                    print(f"tailing {base_url} for {query or 'every event'}", file=err)
                elif message.event == "dropped":
                    dropped = orjson.loads(message.data)["dropped"]
                    print(f"(too slow: {counted(dropped, 'event')} dropped so far)", file=err)
                elif message.event == "event":
                    print(message.data, file=out, flush=True)
                    shown += 1
                    if limit is not None and shown >= limit:
                        return 0
    except aiohttp.ClientError as exc:
        print(f"cannot reach the daemon at {base_url}: {exc}", file=err)
        return 1
    print("the daemon ended the stream", file=err)
    return 0
