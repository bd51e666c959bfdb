"""The live tail: `GET /v1/tail?query=...` (or `?view=NAME`, a saved view's query, which a
`query` given too narrows) streams accepted events that match a query as
Server-Sent Events (`event-router tail 'QUERY'`, router/clients/tail.py, follows that stream
in a terminal).

Ingest hands each batch of accepted events (after the journal has it) to `TailHub.publish`,
which queues the batch once and returns: what it costs ingest does not depend on how many
clients tail. A background task (`tail:fan-out`) takes what arrived within FLUSH_S, encodes
each event's SSE message once, matches it once per distinct query, and hands every subscriber
its share in one call (so a client costs the fan-out once per interval, not once per event
or request); each subscriber holds at most `QUEUE_EVENTS` of them and at most
`server.tail_queue_bytes` (queued and taken for a write the client has not read yet, so a
slow reader of large events holds megabytes, not a thousand events' worth), and an event
that finds no room is dropped for that subscriber and counted (it is told, with a `dropped`
event carrying the running count, before its next events). `/v1/status` shows what the
tail holds (`tail.held_bytes`). When the fan-out falls behind, whole batches are dropped for
everyone, and counted the same way, so ingest never waits for it: past INBOX_BATCHES batches
or `server.tail_queue_bytes` of events waiting (one batch always fits; `tail.backlog_bytes`).

A client's stream writes everything waiting for it at once; a write that does not complete
within `server.tail_write_timeout_s` (a client that stopped reading) drops the client: its
connection is closed, its queue freed. A client that hangs up is noticed at once (the
listener tells), not at the next write. At most `server.max_tail_clients` clients tail at once;
the next one gets 503 `too_many_tail_clients`.

The stream: `event: ready` once subscribed (data: the canonical query), then `event: event`
with the event's JSON as data and its id as the SSE id, `event: dropped` as above, and a
comment line every KEEPALIVE_S so proxies keep the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import orjson
from aiohttp import web

from router.config import ServerConfig
from router.errors import QueryError
from router.events import Event
from router.query import And, Query, parse
from router.server.listener import on_close

log = logging.getLogger(__name__)

QUEUE_EVENTS = 1000
QUEUE_BYTES: Final = ServerConfig().tail_queue_bytes  # its default lives in the config
# Batches waiting for the fan-out task; past it a batch is dropped for every subscriber.
INBOX_BATCHES: Final = 1000
KEEPALIVE_S = 15.0
# The kernel's send buffer of a tail connection: ~200 events in flight to a client, enough to
# stream thousands a second over a LAN.
SEND_BUFFER_BYTES: Final = 256 * 1024
# Events accepted within this interval reach the clients together (one wake and one write
# each): what a client costs depends on the interval, not on the rate of requests.
FLUSH_S: Final = 0.1
# The longest the fan-out holds the loop at a time while it encodes and matches a round.
SLICE_S: Final = 0.005
# Told to a client refused past the cap: tails are long-lived, a slot frees up slowly.
FULL_RETRY_AFTER_S: Final = 30
# An SSE id must not hold a line break (it would end the field and start another).
_ID_UNSAFE: Final = str.maketrans({"\r": None, "\n": None, "\0": None})


@dataclass(eq=False, slots=True)
class Subscriber:
    """One client of the tail: its query, the messages waiting for it, and what it missed."""

    query: Query | None
    limit: int = QUEUE_EVENTS
    limit_bytes: int = QUEUE_BYTES
    since: int = 0  # the last batch published before it subscribed: it gets only later ones
    pending: list[bytes] = field(default_factory=list)  # SSE messages, oldest first
    pending_bytes: int = 0
    writing_bytes: int = 0  # taken for the write under way, not yet taken by the client
    dropped: int = 0
    closed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def held_bytes(self) -> int:
        return self.pending_bytes + self.writing_bytes

    def offer(self, messages: list[bytes]) -> None:
        """Keep what fits in the queue, in events and in bytes (the oldest first; one message
        always fits a client that holds nothing, however large); count the rest as dropped."""
        room = max(self.limit - len(self.pending), 0)
        kept = 0
        held = self.held_bytes
        for message in messages[:room]:
            if held and held + len(message) > self.limit_bytes:
                break
            held += len(message)
            kept += 1
        self.dropped += len(messages) - kept
        if kept:
            self.pending.extend(messages[:kept])
            self.pending_bytes = held - self.writing_bytes
            self.wake.set()

    def take(self) -> list[bytes]:
        """Everything waiting, to be written at once (held until `written`)."""
        taken, self.pending = self.pending, []
        self.writing_bytes += self.pending_bytes
        self.pending_bytes = 0
        self.wake.clear()
        return taken

    def written(self) -> None:
        """The client took what `take` gave: it is no longer held."""
        self.writing_bytes = 0

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class SlowClientError(Exception):
    """A tail client did not take a write within server.tail_write_timeout_s."""


class TailHub:
    """Fans accepted events out to the subscribers whose query they match, from a task of
    its own (`start`, `stop`), so that ingest only queues each batch once."""

    def __init__(
        self,
        *,
        max_clients: int = 32,
        write_timeout_s: float = 10.0,
        queue_events: int = QUEUE_EVENTS,
        queue_bytes: int = QUEUE_BYTES,
        view: Callable[[str], str | None] = lambda name: None,
    ) -> None:
        self.subscribers: set[Subscriber] = set()
        self.view = view  # a saved view's query by name (`?view=`), from the running config
        self.max_clients = max_clients
        self.write_timeout_s = write_timeout_s
        self.queue_events = queue_events
        self.queue_bytes = queue_bytes
        self.dropped_clients = 0
        self.refused_clients = 0
        self._inbox: asyncio.Queue[tuple[int, list[Event], int]] = asyncio.Queue(INBOX_BATCHES)
        self._inbox_bytes = 0  # of the events waiting in the inbox
        self._published = 0  # batches published so far: each batch's number
        self._lost = 0  # events of batches the inbox had no room for, not yet told
        self._task: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        """Batches published and not yet fanned out."""
        return self._inbox.qsize()

    def status(self) -> dict[str, int]:
        """What the tail holds and has refused, for /v1/status."""
        return {
            "clients": len(self.subscribers),
            "held_bytes": sum(s.held_bytes for s in self.subscribers),
            "dropped_events": sum(s.dropped for s in self.subscribers),
            "dropped_clients": self.dropped_clients,
            "refused_clients": self.refused_clients,
            "backlog_batches": self.backlog,
            "backlog_bytes": self._inbox_bytes,
        }

    def start(self) -> None:
        self._task = asyncio.create_task(self._fan_out(), name="tail:fan-out")

    async def stop(self) -> None:
        """End every stream (so that no request keeps the daemon waiting), then the task."""
        self.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def subscribe(self, query: Query | None) -> Subscriber:
        subscriber = Subscriber(query, self.queue_events, self.queue_bytes, since=self._published)
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def publish(self, events: Iterable[Event]) -> None:
        """Queue a batch of accepted events for the fan-out, once, whoever tails; never
        blocks (a batch that finds the queue full is dropped for everyone, and counted)."""
        if not self.subscribers:
            return
        batch = list(events)
        self._published += 1
        size = sum(len(event.encoded()) for event in batch)
        if self._inbox_bytes and self._inbox_bytes + size > self.queue_bytes:
            self._lost += len(batch)
            return
        try:
            self._inbox.put_nowait((self._published, batch, size))
        except asyncio.QueueFull:
            self._lost += len(batch)
            return
        self._inbox_bytes += size

    def close(self) -> None:
        for subscriber in self.subscribers:
            subscriber.close()

    async def _fan_out(self) -> None:
        while True:
            taken = [await self._inbox.get()]
            # What arrives within FLUSH_S goes out together: a client wakes and is written to
            # once per interval, however many requests brought the events.
            await asyncio.sleep(FLUSH_S)
            while not self._inbox.empty():
                taken.append(self._inbox.get_nowait())
            self._inbox_bytes -= sum(size for _, _, size in taken)
            batches = [(number, batch) for number, batch, _ in taken]
            try:
                await self._offer(batches)
            except Exception:
                # A task boundary: one bad batch must not end the tail for everyone.
                log.exception("the tail could not fan out %d batches", len(batches))

    async def _offer(self, batches: list[tuple[int, list[Event]]]) -> None:
        """Encode each event once and match it once per distinct query, then give every
        subscriber its share in one call (only of batches published after it subscribed).
        Matching runs on the loop, so it hands the loop back every SLICE_S: many clients
        with large queries make the tail fall behind (and drop, counted), never the daemon
        stop answering."""
        lost, self._lost = self._lost, 0
        turn = _Turn()
        messages = []
        for number, batch in batches:
            for event in batch:
                messages.append((number, event, sse_event(event)))
                if turn.due():
                    await asyncio.sleep(0)
        shares: dict[tuple[Query | None, int], list[bytes]] = {}
        first = batches[0][0]
        for subscriber in list(self.subscribers):
            subscriber.dropped += lost
            query, since = subscriber.query, max(subscriber.since, first - 1)
            share = shares.get((query, since))
            if share is None:
                share = []
                for number, event, message in messages:
                    if number > since and (query is None or query.matches(event.body)):
                        share.append(message)
                    if turn.due():
                        await asyncio.sleep(0)
                shares[(query, since)] = share
            subscriber.offer(share)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/tail?query=...`: 503 past the cap, 400 `bad_query` (with the column), or
        an SSE stream."""
        if len(self.subscribers) >= self.max_clients:
            self.refused_clients += 1
            body = {
                "error": {
                    "code": "too_many_tail_clients",
                    "message": f"server.max_tail_clients ({self.max_clients}) clients tail "
                    "already; try again when one has left",
                }
            }
            return web.json_response(
                body,
                status=503,
                dumps=_dumps,
                headers={"Retry-After": str(FULL_RETRY_AFTER_S)},
            )
        text = request.query.get("query", "")
        saved: str | None = None
        if "view" in request.query:
            name = request.query["view"]
            saved = self.view(name)
            if saved is None:
                unknown = {"code": "unknown_view", "message": f"no view named {name!r}"}
                return web.json_response({"error": unknown}, status=404, dumps=_dumps)
        query: Query | None = None
        try:
            # Each parsed on its own (a column is the caller's, a query must stand alone);
            # a query given too narrows the view.
            parts = [parse(part) for part in (saved, text) if part is not None and part.strip()]
        except QueryError as exc:
            error = {"code": "bad_query", "message": exc.message, "column": exc.column}
            return web.json_response({"error": error}, status=400, dumps=_dumps)
        if parts:
            query = parts[0] if len(parts) == 1 else Query(And(tuple(p.root for p in parts)))
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        _bound_send_buffer(request)
        await response.prepare(request)
        subscriber = self.subscribe(query)
        on_close(request.transport, subscriber.close)  # a client that leaves frees its place
        try:
            ready = orjson.dumps({"query": str(query) if query else ""})
            await self._write(response, b"event: ready\ndata: " + ready + b"\n\n")
            await self._stream(subscriber, response)
        except ConnectionResetError:
            pass  # the client went away; nothing to tell anyone
        except SlowClientError:
            self.dropped_clients += 1
            log.info(
                "tail client %s dropped: it took nothing for %s s (server.tail_write_timeout_s)",
                request.remote,
                self.write_timeout_s,
            )
            if request.transport is not None:
                request.transport.abort()  # what it has not read is thrown away
        finally:
            self.unsubscribe(subscriber)
        return response

    async def _stream(self, subscriber: Subscriber, response: web.StreamResponse) -> None:
        told = 0
        while not subscriber.closed:
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    await subscriber.wake.wait()
            except TimeoutError:
                await self._write(response, b": keep-alive\n\n")
                continue
            if subscriber.closed:
                break
            messages = subscriber.take()
            if subscriber.dropped != told:
                told = subscriber.dropped
                notice = b"event: dropped\ndata: " + orjson.dumps({"dropped": told}) + b"\n\n"
                messages.insert(0, notice)
            await self._write(response, b"".join(messages))
            subscriber.written()

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await response.write(data)
        except TimeoutError as exc:
            raise SlowClientError from exc


class _Turn:
    """Hands the loop back once SLICE_S of work has gone by (the clock read every CHECK_EVERY
    steps, so a cheap step costs a counter)."""

    CHECK_EVERY: Final = 64

    def __init__(self) -> None:
        self.steps = 0
        self.since = time.monotonic()

    def due(self) -> bool:
        """Whether to hand the loop back now (then the next slice starts)."""
        self.steps += 1
        if self.steps % self.CHECK_EVERY or time.monotonic() - self.since < SLICE_S:
            return False
        self.since = time.monotonic()
        return True


def _bound_send_buffer(request: web.Request) -> None:
    """A fixed, small kernel send buffer for a tail connection: a client that stops reading
    holds that much of the kernel's memory, not the megabytes autotuning would grow to, and
    its writes block (and it is dropped) sooner."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


def sse_event(event: Event) -> bytes:
    """An accepted event as one SSE message (built once, shared by every subscriber)."""
    event_id = event.id.translate(_ID_UNSAFE).encode()
    return b"event: event\nid: " + event_id + b"\ndata: " + event.encoded() + b"\n\n"


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()
