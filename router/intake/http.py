"""`POST /v1/events`: read the body within limits, decode it, hand it to the acceptor, answer.

A body is read before the request takes one of `server.max_concurrent_requests` turns for
the work (inflating, decoding, validating, journaling), so a client that sends slowly holds
only its own connection and bytes, never another producer's turn. What slow or many senders
can hold is bounded twice (`InFlight`): every byte of every body being read or waiting counts
against `server.max_body_bytes_in_flight` (past it: 503 server_busy), and one client address
reads at most `server.max_bodies_per_client` bodies at once (its others wait, unread, within
`server.read_timeout_s`), so one address alone cannot use up the bytes.

A body is one JSON object, a JSON array of objects, or NDJSON (one object per line), plain or
gzip-compressed. A request refused as a whole gets a 4xx with `{"error": {"code", "message"}}`;
otherwise the acceptor (router/intake/accept.py) gives each event its own result,
EventBridge-style, and the request answers 202 when at least one event was accepted (400 when
none was). The answer is sent only after the journal has made every accepted event durable; a
full or failing journal answers 503 with Retry-After, and then no event of the request was
accepted. This module is the only part of intake that knows HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson
from aiohttp import web

from router.config import ServerConfig
from router.errors import RequestError
from router.events import encoded_with_new_id
from router.intake.accept import Acceptor, Altered, Decoded, Malformed, Outcome
from router.intake.limits import (
    NumberAltered,
    exact_numbers,
    held_float,
    may_alter_numbers,
    number_problems,
)
from router.observe.metrics import IngestStats
from router.server.answers import too_large_text
from router.server.auth import CALLER

log = logging.getLogger(__name__)

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
READ_CHUNK_BYTES = 64 * 1024
# Told to a producer refused for the bytes in flight: they free up as bodies arrive.
BUSY_RETRY_AFTER_S = 1
# The first decoder of every body (see `decode`): integers exact, every other number literal
# through held_float. What it refuses goes to orjson, which words the answer.
FAITHFUL: msgspec.json.Decoder[Any] = msgspec.json.Decoder(float_hook=held_float)
UNSURE = (msgspec.DecodeError, NumberAltered, RecursionError, orjson.JSONEncodeError)


@dataclass(slots=True)
class _Turns:
    """One client address's bodies: a semaphore of its turns, and who uses or waits for one."""

    semaphore: asyncio.Semaphore
    users: int = 0
    reading: int = 0


@dataclass(slots=True)
class InFlight:
    """The bytes of request bodies held at once, and the bodies each client reads at once."""

    max_bytes: int
    per_client: int
    held_bytes: int = 0
    _clients: dict[str, _Turns] = field(default_factory=dict)

    @asynccontextmanager
    async def turn(self, address: str) -> AsyncIterator[None]:
        """One of the address's `per_client` turns to read a body; waits for one if need be.
        An address is forgotten when it has no body in flight, so the table stays small."""
        turns = self._clients.get(address)
        if turns is None:
            turns = self._clients[address] = _Turns(asyncio.Semaphore(self.per_client))
        turns.users += 1
        try:
            async with turns.semaphore:
                turns.reading += 1
                try:
                    yield
                finally:
                    turns.reading -= 1
        finally:
            turns.users -= 1
            if not turns.users:
                del self._clients[address]

    def reading(self, address: str) -> int:
        turns = self._clients.get(address)
        return turns.reading if turns else 0

    def waiting(self, address: str) -> int:
        turns = self._clients.get(address)
        return turns.users - turns.reading if turns else 0

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[Held]:
        """A request's share of the bytes, all given back when the request ends, however."""
        held = Held(self)
        try:
            yield held
        finally:
            self.held_bytes -= held.size


@dataclass(slots=True)
class Held:
    """The bytes one request holds."""

    budget: InFlight
    size: int = 0

    def take(self, size: int) -> bool:
        """Hold `size` more bytes, if the budget has them (never waits: a body that waited
        for bytes held by stalled bodies would stall too)."""
        if self.budget.held_bytes + size > self.budget.max_bytes:
            return False
        self.budget.held_bytes += size
        self.size += size
        return True


@dataclass(slots=True)
class Ingest:
    """The POST /v1/events handler, built once by the daemon over its acceptor."""

    server: ServerConfig
    stats: IngestStats
    acceptor: Acceptor
    _slots: asyncio.Semaphore = field(init=False)
    bodies: InFlight = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.server.max_concurrent_requests)
        self.bodies = InFlight(
            self.server.max_body_bytes_in_flight, self.server.max_bodies_per_client
        )

    async def handle(self, request: web.Request) -> web.Response:
        """Read the body (no turn held), then take one of `server.max_concurrent_requests`
        turns for the work: a slow sender never keeps another producer waiting."""
        self.stats.requests += 1
        async with self.bodies.hold() as held:
            try:
                body = await self.read_body(request, held)
            except ConnectionError:
                # aiohttp's handler logs it (listener.ClientFaultLog: a warning, not a trace).
                self.stats.refuse("client_disconnected")
                raise
            except RequestError as exc:
                self.stats.refuse(exc.code)
                response = error_response(exc)
                if exc.status == 503:
                    response.headers["Retry-After"] = str(BUSY_RETRY_AFTER_S)
                return response
            async with self._slots:
                taken = [body]
                del body  # `_handle` lets it go once it is decoded
                return await self._handle(request, taken)

    async def _handle(self, request: web.Request, taken: list[bytes]) -> web.Response:
        """Decode the body `taken` holds (taking it out), then accept the events: a request
        waiting for its durable answer holds its events' bytes, not also the body they came
        in (up to server.max_body_bytes)."""
        try:
            items = self._decode(request, taken.pop())
        except RequestError as exc:
            self.stats.refuse(exc.code)
            return error_response(exc)
        return outcome_response(await self.acceptor.accept(items, request.get(CALLER)))

    def _decode(self, request: web.Request, body: bytes) -> list[Any]:
        if content_encoding(request) == "gzip":
            body = inflate(body, self.server.max_inflated_bytes)
        items = decode(body, request.content_type)
        if not items:
            raise RequestError(400, "no_events", "the body holds no event")
        if len(items) > self.server.max_events_per_request:
            raise RequestError(
                413,
                "too_many_events",
                f"{len(items)} events in one request; the limit is "
                f"{self.server.max_events_per_request}",
            )
        return items

    async def read_body(self, request: web.Request, held: Held) -> bytes:
        """The body as sent, refused past server.max_body_bytes, past the bytes in flight, or
        when it does not arrive within server.read_timeout_s (waiting for the client's turn
        included)."""
        limit = self.server.max_body_bytes
        if request.content_type not in JSON_TYPES | NDJSON_TYPES:
            raise RequestError(
                415,
                "unsupported_media_type",
                f"Content-Type {request.content_type!r} is not supported; send "
                "application/json or application/x-ndjson",
            )
        content_encoding(request)  # refused before the body is read
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with (
                asyncio.timeout(self.server.read_timeout_s),
                self.bodies.turn(request.remote or ""),
            ):
                while chunk := await request.content.read(READ_CHUNK_BYTES):
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    if not held.take(len(chunk)):
                        raise self._busy()
                    chunks.append(chunk)
        except TimeoutError as exc:
            raise RequestError(
                408,
                "request_timeout",
                f"the body did not arrive within server.read_timeout_s "
                f"({self.server.read_timeout_s} s)",
            ) from exc
        return b"".join(chunks)

    def _busy(self) -> RequestError:
        return RequestError(
            503,
            "server_busy",
            f"request bodies in flight have reached server.max_body_bytes_in_flight "
            f"({self.server.max_body_bytes_in_flight} bytes); retry later",
        )


def content_encoding(request: web.Request) -> str:
    """`gzip` or `identity`, checked before the body is read."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("gzip", "identity"):
        raise RequestError(
            415,
            "unsupported_encoding",
            f"Content-Encoding {encoding!r} is not supported; send gzip or identity",
        )
    return encoding


def decode(body: bytes, content_type: str) -> list[Any]:
    """The events in a body: a list for a JSON array or NDJSON, a one-item list for an object.
    An empty (or all-whitespace) body holds no event: the caller answers `no_events`.

    msgspec decodes first: it keeps every integer exact and shows every other number literal
    to held_float, so a body whose numbers a 64-bit value holds needs no scan of its bytes;
    each object is encoded at once (the acceptor needs its bytes anyway), which is where an
    integer outside the 64-bit range shows. Whatever it refuses or cannot vouch for (malformed
    JSON, a number decoding would change, nesting past its depth) takes the exact path:
    orjson, which words the errors, and the number scan (`decode_exact`)."""
    if content_type in NDJSON_TYPES:
        items: list[Any] = []
        made: list[bytes | None] = []
        ids: list[str | None] = []
        for number, start, line in _lines(body):
            try:
                item = FAITHFUL.decode(line)
                _encode_into(item, made, ids)
            except UNSURE:
                item = _decode_line(number, start, line, True)
                made.append(None)
                ids.append(None)
            items.append(item)
        return Decoded(items, made, ids)
    try:
        value = FAITHFUL.decode(body)
        items = value if isinstance(value, list) else [value]
        return Decoded(items, *_encoded(items))
    except UNSURE:
        return decode_exact(body, content_type)


def _encoded(items: list[Any]) -> tuple[list[bytes | None], list[str | None]]:
    """`_encode_into` for every item of a body, in one loop with what it calls bound once:
    a batch's 100 calls of `_encode_into` cost more than their work (0.3 us an event)."""
    made: list[bytes | None] = []
    ids: list[str | None] = []
    keep, fresh_id, dumps = made.append, ids.append, orjson.dumps
    for item in items:
        if not isinstance(item, dict):
            dumps(item)  # see _encode_into
            keep(None)
            fresh_id(None)
        elif "id" in item or not item:
            keep(memoryview(dumps(item)).tobytes())
            fresh_id(None)
        else:
            fresh, encoded = encoded_with_new_id(item)
            keep(encoded)
            fresh_id(fresh)
    return made, ids


def _encode_into(item: Any, made: list[bytes | None], ids: list[str | None]) -> None:
    """Append an item's compact JSON to `made`, for the acceptor (None for what is not an
    object, which the acceptor does not encode either), copied out of orjson's buffer to its
    size (`Decoded`); orjson.JSONEncodeError for an item holding an integer outside the 64-bit
    range (or nested past orjson's depth), whatever the item. An object without an `id` gets
    one in that copy, appended as orjson writes a key added last (Event.from_body adds it to
    the body if the event is accepted), and the id goes to `ids` (else None): the copy is made
    once, where appending the id later copied the bytes again."""
    if not isinstance(item, dict):
        orjson.dumps(item)  # not an event (a list, a number), yet its numbers decide its answer
        made.append(None)
        ids.append(None)
        return
    if "id" in item or not item:  # an id of its own, or {} (never an event)
        made.append(memoryview(orjson.dumps(item)).tobytes())
        ids.append(None)
        return
    fresh, encoded = encoded_with_new_id(item)
    made.append(encoded)
    ids.append(fresh)


def decode_exact(body: bytes, content_type: str) -> list[Any]:
    """`decode` by orjson alone, each number checked against its literal when the bytes
    suggest one may not survive: the path of a body msgspec refused or could not vouch for
    (and the reference the tests hold `decode` to)."""
    if content_type in NDJSON_TYPES:
        suspect = may_alter_numbers(body)
        return [_decode_line(number, start, line, suspect) for number, start, line in _lines(body)]
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if not body.strip():
            return []
        if utf8 := _utf8_error(body):
            offset, reason = utf8
            line = body.count(b"\n", 0, offset) + 1
            column = offset - (body.rfind(b"\n", 0, offset) + 1) + 1
            message = f"invalid UTF-8 at line {line} column {column} (byte {offset}): {reason}"
        else:
            message = (
                f"invalid JSON at line {exc.lineno} column {exc.colno} (byte {exc.pos}): {exc.msg}"
            )
        raise RequestError(400, "malformed_json", message) from exc
    exact = exact_numbers(body) if may_alter_numbers(body) else None
    if isinstance(value, list):
        if isinstance(exact, list) and len(exact) == len(value):
            return [
                _faithful(item, exact_item) for item, exact_item in zip(value, exact, strict=True)
            ]
        return value
    return [_faithful(value, exact)]


def _faithful(item: Any, exact: Any) -> Any:
    """The decoded item, or Altered when decoding changed one of its numbers."""
    if exact is None or not (problems := number_problems(exact)):
        return item
    item_id = item.get("id") if isinstance(item, dict) else None
    return Altered(problems, item_id if isinstance(item_id, str) else None)


def _lines(body: bytes) -> list[tuple[int, int, bytes]]:
    """(line number, offset of its first byte in the body, line) for each non-blank line."""
    lines = []
    start = 0
    for number, line in enumerate(body.split(b"\n"), start=1):
        if line.strip():
            lines.append((number, start, line))
        start += len(line) + 1
    return lines


def _decode_line(number: int, start: int, line: bytes, suspect: bool) -> Any:
    """One NDJSON line, which starts at byte `start` of the body; `suspect`: the body may hold
    a number decoding would change."""
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        if utf8 := _utf8_error(line):
            offset, reason = utf8
            return Malformed(
                f"line {number}: invalid UTF-8 at column {offset + 1} "
                f"(byte {start + offset}): {reason}"
            )
        return Malformed(f"line {number}: invalid JSON at column {exc.colno}: {exc.msg}")
    return _faithful(item, exact_numbers(line) if suspect and may_alter_numbers(line) else None)


def _utf8_error(data: bytes) -> tuple[int, str] | None:
    """Where `data` stops being UTF-8, and why; None when it is UTF-8. orjson refuses such
    input as a whole, at "byte 0" with a message about surrogates, so a producer would never
    find the byte; Python's decoder names it. Only called once orjson has refused the data."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start, str(exc.reason)
    return None


def inflate(body: bytes, max_bytes: int) -> bytes:
    """Gunzip `body`, every member of it (`cat a.gz b.gz` is valid gzip, and some shippers send
    it), refusing to produce more than `max_bytes` in all (a gzip bomb stops there). Bytes after
    the last member that are not another member make the body malformed, never ignored."""
    out: list[bytes] = []
    size = 0
    rest = body
    try:
        while True:
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            chunk = inflater.decompress(rest, max_bytes - size + 1)
            size += len(chunk)
            if size > max_bytes or inflater.unconsumed_tail:
                raise RequestError(
                    413,
                    "inflated_body_too_large",
                    f"the gzip body inflates past server.max_inflated_bytes ({max_bytes} bytes)",
                )
            out.append(chunk)
            if not inflater.eof:
                raise RequestError(400, "malformed_gzip", "the gzip body is truncated")
            rest = inflater.unused_data
            if not rest:
                return b"".join(out)
    except zlib.error as exc:
        where = "bytes after a gzip member are not gzip" if out else "the body is not valid gzip"
        raise RequestError(400, "malformed_gzip", f"{where}: {exc}") from exc


def _too_large(limit: int) -> RequestError:
    return RequestError(413, "body_too_large", too_large_text(limit))


def outcome_response(outcome: Outcome) -> web.Response:
    """202 when an event was accepted, 400 when none was, 503 with Retry-After when the
    journal refused the request as a whole."""
    if outcome.refusal is not None:
        return json_response(
            outcome.as_dict(),
            status=503,
            headers={"Retry-After": str(outcome.refusal.retry_after_s)},
        )
    return json_response(outcome.as_dict(), status=202 if outcome.accepted else 400)


def json_response(body: Any, *, status: int = 200, **kwargs: Any) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", **kwargs
    )


def error_response(error: RequestError) -> web.Response:
    response = json_response(
        {"error": {"code": error.code, "message": error.message}}, status=error.status
    )
    if error.status in (408, 413, 503):
        # The rest of the body was never read: close the connection rather than keep it (and
        # a shutdown) waiting for bytes nobody will read.
        response.force_close()
    return response
