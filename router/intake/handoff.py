"""The hand-off between a worker process and the journal owner (`server.workers` > 1).

A worker does the CPU work of an offer (decode, limits, validation, redaction, routing,
serialisation) and hands the owner finished records: each event's id, arrival time, its bytes
as the journal stores them, and the targets its routes chose. The owner journals them (group
commit, with every other worker's records and its own) and answers once they are durable; only
then does the worker answer the producer. `HandoffJournal` is the worker's side of that: the
Journal protocol's `append` over the channel, so the worker's Acceptor is the same Acceptor as
in one process, books, limits, answers and all.

The channel is one unix stream socket per worker (a socketpair the owner made): frames of
`!IBII` (payload length, kind, call id, data blobs) and a pickled payload, then for a call with
`data` the length of each blob (an array of unsigned ints in this machine's order: both ends are
processes of it) and the blobs joined, as one buffer (the owner takes no frame from a worker
longer than `max_handoff_bytes`: a larger claim is the worker's protocol fault, never
allocated). Either side may call the other (`Channel.call(op, *args, data=blobs)`: the handler
gets the blobs as a last argument) and each call is answered once (a value, or an error the
caller raises again); calls run concurrently, answers arrive in any order. The events' bytes are
such blobs. Joined, they cost one copy (~0.1 us a 1 KB event) where the transport took 0.7-1.4
us an event to write them as a thousand buffers; the worker lets the events' own bytes go as it
sends them (Event.hand_over), so a worker whose owner is slow to read still holds them once, and
a request waiting for the owner's durable answer not at all (about 1 MB per waiting 1,000-event
request). Pickle is safe here: the socket joins a parent and the children it started from the
same code, and nobody else can reach it.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import struct
from array import array
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Final, cast

from router.config import ServerConfig
from router.errors import RouterError
from router.events import Event
from router.journal import Books, Entry, JournalFullError, JournalUnavailableError

log = logging.getLogger(__name__)

HEADER: Final = struct.Struct("!IBII")
BLOB_LENGTH: Final = "I"  # array type of a blob's length
BLOB_LENGTH_SIZE: Final = array(BLOB_LENGTH).itemsize
CALL: Final = 1
ANSWER: Final = 2
FAILED: Final = 3
# The read buffer: what one read may fill (a frame larger than it grows it for its time), and
# the least room left at its end before what is not taken yet moves to its start.
READ_BYTES: Final = 256 * 1024
MIN_READ_BYTES: Final = 64 * 1024
# The most a worker takes in one frame from its owner, whom it trusts (the config it is set up
# with, reloads, answers): a larger one is a broken owner, not a message.
MAX_FRAME_BYTES: Final = 1 << 30
# Per event of an offer, beside its bytes: its id (256 characters at most, 1 KiB in UTF-8), its
# arrival time, its blob's length and its routes (target -> route: the same mappings and
# strings for every event routed alike, which pickle writes once), generously.
HANDOFF_RECORD_BYTES: Final = 2048
# Besides offers, what a worker sends fits in this: its counters, a refusal, its answers.
HANDOFF_OTHER_BYTES: Final = 1 << 20


def max_handoff_bytes(server: ServerConfig) -> int:
    """The largest frame a worker sends its owner: one request's events as journaled (at most
    server.max_event_bytes()) and their records (server.max_events_per_request of them), or
    anything else it sends. The owner takes no larger frame from a worker: a header claiming
    more is the worker's protocol fault (`ProtocolFault`), and a worker refuses an offer that
    would come to more rather than send it (`Channel.max_send_bytes`)."""
    return (
        server.max_event_bytes()
        + server.max_events_per_request * HANDOFF_RECORD_BYTES
        + HANDOFF_OTHER_BYTES
    )


# What a Channel takes from the other side unless told: what a worker with the default server
# limits sends (the owner's side; the owner passes its own config's).
DEFAULT_MAX_FRAME_BYTES: Final = max_handoff_bytes(ServerConfig())
# Errors that cross the channel as themselves; anything else arrives as ChannelError.
KNOWN_ERRORS: Final[Mapping[str, type[RouterError]]] = {
    "JournalFullError": JournalFullError,
    "JournalUnavailableError": JournalUnavailableError,
}

Handler = Callable[..., Awaitable[Any]]
# An offer's records handed over, as three lists in the events' order: their ids, arrival
# times (epoch s) and target -> route; their bytes go beside them, as data blobs. Three lists,
# not a tuple per event: pickle memoizes every tuple it writes (0.43 against 0.08 us an event
# to pickle, 0.09 against 0.07 to unpickle, 100 tuples fewer to allocate on each side).
Records = tuple[list[str], list[float], list[Mapping[str, str]]]


def frame(kind: int, call_id: int, value: Any, data: Sequence[bytes] = ()) -> list[bytes]:
    """One frame as the buffers that go out in a row: the header, the pickled `value`, and
    with `data` its blobs' lengths and the blobs joined."""
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    parts = [HEADER.pack(len(payload), kind, call_id, len(data)), payload]
    if data:
        parts.append(array(BLOB_LENGTH, map(len, data)).tobytes())
        parts.append(b"".join(data))
    return parts


class ChannelError(RouterError):
    """The other side failed a call, or went away before answering it."""


class ProtocolFault(ChannelError):
    """The other side sent what it never would if sound: a frame longer than it may send."""


class Channel(asyncio.BufferedProtocol):
    """Calls both ways over one stream socket; see the module docstring.

    The channel is the socket's protocol: the transport reads into the channel's own buffer
    (asyncio.BufferedProtocol), and a frame is taken apart where it lies there: the payload
    unpickled from a view of it, each blob copied once into bytes of its own. Read through a
    StreamReader each event's bytes were copied four times on their way in (the transport's
    bytes, the reader's buffer, readexactly's bytes, the blob's slice)."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        name: str,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        on_fault: Callable[[str], object] | None = None,
    ) -> None:
        self._handlers = handlers
        self.name = name
        # The longest frame taken from the other side: a header claiming more is its protocol
        # fault, and the channel is dropped before anything is allocated for it (`on_fault`
        # is told why: the owner stops that worker, to be started again as after a crash).
        self.max_frame_bytes = max_frame_bytes
        self._on_fault = on_fault
        # The longest frame the other side takes: a call that would come to more fails here,
        # unsent (a worker's offer whose events grew past what the owner takes).
        self.max_send_bytes = MAX_FRAME_BYTES
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._outbox: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._paused = False  # the transport holds more than its high-water mark
        self._drained: list[asyncio.Future[None]] = []
        # What has arrived and is not taken yet: self._buffer[self._start:self._end].
        self._buffer = bytearray(READ_BYTES)
        self._start = self._end = 0
        # Bytes from self._start the next step of reading needs: a header, then the header,
        # payload and blob lengths, then the whole frame.
        self._need = HEADER.size
        # The frame being read, once its header and blob lengths are in: its size, its header
        # fields and its blobs' lengths.
        self._frame: tuple[int, int, int, int, int, list[int]] | None = None
        self._started = False
        self.closed = asyncio.Event()

    @classmethod
    async def over(
        cls,
        sock: Any,
        handlers: Mapping[str, Handler],
        *,
        name: str,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        on_fault: Callable[[str], object] | None = None,
    ) -> Channel:
        channel = cls(handlers, name=name, max_frame_bytes=max_frame_bytes, on_fault=on_fault)
        await asyncio.get_running_loop().create_unix_connection(lambda: channel, sock=sock)
        return channel

    def start(self) -> None:
        """Read and answer from here on (what arrived before waits: the handlers may need
        their owner to hold this channel first)."""
        self._started = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self.buffer_updated(0)

    # -- the protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.pause_reading()  # until start()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()
        for waiter in self._drained:
            if not waiter.done():
                waiter.set_result(None)
        if not self._gone.done():
            self._gone.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drained:
            if not waiter.done():
                waiter.set_result(None)
        self._drained.clear()

    def eof_received(self) -> bool:
        return False  # the other side is gone: close (a frame it left unfinished is dropped)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Room at the end of the buffer, at least MIN_READ_BYTES: what is not taken yet moves
        to its start first, and the buffer grows to hold a frame larger than itself (and
        shrinks back after one)."""
        buffer, start, end = self._buffer, self._start, self._end
        kept = end - start
        need = max(self._need, kept)
        size = max(READ_BYTES, need + MIN_READ_BYTES)
        if len(buffer) - end < MIN_READ_BYTES or start + need > len(buffer) or size < len(buffer):
            if size != len(buffer):
                self._buffer = bytearray(size)
                self._buffer[:kept] = memoryview(buffer)[start:end]
            elif start:
                with memoryview(buffer) as view:
                    view[:kept] = view[start:end]
            self._start, self._end = 0, kept
        return memoryview(self._buffer)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if not self._started or self.closed.is_set():
            return
        try:
            while self._take():
                pass
        except ProtocolFault as exc:
            log.error("%s; the channel is dropped", exc)
            if self._on_fault is not None:
                self._on_fault(str(exc))
            self._closed()
        except Exception:
            log.exception("%s: the channel failed", self.name)
            self._closed()

    def _take(self) -> bool:
        """Take one whole frame from the buffer if it holds one (True); else note what the
        next step needs (self._need)."""
        buffer, start, end = self._buffer, self._start, self._end
        if self._frame is None:
            if end - start < HEADER.size:
                self._need = HEADER.size
                return False
            size, kind, call_id, blobs = HEADER.unpack_from(buffer, start)
            head = HEADER.size + size + blobs * BLOB_LENGTH_SIZE
            # Checked before self._need asks get_buffer for room: a claim is never allocated.
            if head > self.max_frame_bytes:
                raise self._fault(head)
            if end - start < head:
                self._need = head
                return False
            lengths = array(BLOB_LENGTH)
            lengths.frombytes(buffer[start + head - blobs * BLOB_LENGTH_SIZE : start + head])
            total = head + sum(lengths)
            if total > self.max_frame_bytes:
                raise self._fault(total)
            self._frame = (total, size, kind, call_id, blobs, lengths.tolist())
        total, size, kind, call_id, blobs, sizes = self._frame
        if end - start < total:
            self._need = total
            return False
        self._frame = None
        self._need = HEADER.size
        self._start = start + total
        at = start + HEADER.size
        with memoryview(buffer) as view:
            value = pickle.loads(view[at : at + size])
            at += size + blobs * BLOB_LENGTH_SIZE
            data = []
            for length in sizes:
                data.append(view[at : at + length].tobytes())
                at += length
        if self._start == self._end:
            self._start = self._end = 0
            if len(buffer) > READ_BYTES:
                self._buffer = bytearray(READ_BYTES)
        self._arrived(kind, call_id, value, data)
        return True

    def _fault(self, claimed: int) -> ProtocolFault:
        return ProtocolFault(
            f"{self.name}: a frame of {claimed} bytes, more than the {self.max_frame_bytes} "
            "it may send"
        )

    def _arrived(self, kind: int, call_id: int, value: Any, data: list[bytes]) -> None:
        if kind == CALL:
            op, args = value
            if data:
                args = (*args, data)
            task = asyncio.create_task(self._answer(call_id, op, args), name=self.name)
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            return
        answer = self._waiting.get(call_id)
        if answer is None or answer.done():
            return
        if kind == ANSWER:
            answer.set_result(value)
        else:
            error_type, message = value
            answer.set_exception(KNOWN_ERRORS.get(error_type, ChannelError)(message))

    # -- calls

    async def call(self, op: str, *args: Any, data: Sequence[bytes] = ()) -> Any:
        """Run `op` on the other side and return its answer (raising what it raised); `data`,
        when given, is sent as it is and reaches the handler as a last argument (a list of
        bytes)."""
        if self.closed.is_set():
            raise ChannelError(f"{self.name}: the channel is closed")
        self._next_id = call_id = (self._next_id + 1) & 0xFFFFFFFF
        parts = frame(CALL, call_id, (op, args), data)
        # Only a call with data (an offer) can come near what the other side takes: its other
        # calls and its answers are a few KB (HANDOFF_OTHER_BYTES leaves room for them).
        if data and (size := sum(map(len, parts))) > self.max_send_bytes:
            raise ChannelError(
                f"{self.name}: a {op} of {size} bytes is more than the other side takes "
                f"({self.max_send_bytes})"
            )
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = answer
        try:
            self._send(parts)
            del parts
            # From here the transport alone holds what was sent, until the other side has it:
            # a caller that let its own copies go waits for the answer without them.
            del args, data
            await self._drain()
            return await answer
        finally:
            self._waiting.pop(call_id, None)

    async def _drain(self) -> None:
        """Until the transport holds less than its high-water mark (or the channel closed)."""
        if self._paused and not self.closed.is_set():
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drained.append(waiter)
            await waiter

    def _send(self, parts: list[bytes]) -> None:
        """Queue a frame (`frame`'s parts); the frames queued in one turn of the loop go out in
        one write (a group commit answers every call it held at once: one syscall and one
        wake-up of the other side, not one per call)."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.extend(parts)

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if frames and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(frames)

    async def _answer(self, call_id: int, op: str, args: Sequence[Any]) -> None:
        try:
            result = await self._handlers[op](*args)
        except Exception as exc:
            if not isinstance(exc, tuple(KNOWN_ERRORS.values())):
                log.exception("%s: %s failed", self.name, op)
            reply = (FAILED, (type(exc).__name__, str(exc)))
        else:
            reply = (ANSWER, result)
        if self.closed.is_set():
            return
        self._send(frame(reply[0], call_id, reply[1]))
        await self._drain()

    def _closed(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(ChannelError(f"{self.name}: the other side went away"))
        if self._transport is not None:
            self._transport.close()

    async def settle(self) -> None:
        """Wait for the calls the other side made to finish here (it may be gone: a worker
        killed while the owner journals its records, which are then durable all the same)."""
        await asyncio.gather(*self._running, return_exceptions=True)

    async def close(self) -> None:
        """Stop reading and answering; calls still waiting fail with ChannelError."""
        self._closed()
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        if self._transport is not None:
            await self._gone


def records(
    routed: Sequence[tuple[Event, Mapping[str, str]]],
) -> tuple[Records, list[bytes]]:
    """What the owner needs of routed events, and their bytes (the journal stores bytes, never
    the body), sent as the call's data. The bytes are taken from the events (Event.hand_over):
    once sent, the owner has them and the worker, waiting for the durable answer, does not."""
    ids = [event.id for event, _ in routed]
    arrived = [event.received_at for event, _ in routed]
    chosen = [targets for _, targets in routed]
    return (ids, arrived, chosen), [event.hand_over() for event, _ in routed]


def events(handed: Records, data: Sequence[bytes]) -> list[tuple[Event, Mapping[str, str]]]:
    """Records and their bytes back as routed events, as the journal reads them back."""
    ids, arrived, chosen = handed
    stored = Event.stored
    return [
        (stored(event_id, encoded, received_at), targets)
        for event_id, encoded, received_at, targets in zip(ids, data, arrived, chosen, strict=True)
    ]


class HandoffJournal:
    """The Journal protocol as a worker sees it: `append` hands the records to the owner and
    returns once they are durable there (JournalFullError and JournalUnavailableError come
    back as themselves); delivery never runs in a worker, so the rest is empty."""

    # The owner answers journal_full only once it has shed (storage.when_full) and tried again:
    # the Acceptor asks this journal once (Acceptor._append).
    MAKES_ROOM_ITSELF: ClassVar[bool] = True

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        # Events the owner answered durable: the owner counts what it journaled for this
        # worker too, and the difference at the worker's death is what it accepted unreported.
        self.handed = 0

    async def append(self, routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
        """Hand the routed events' records to the owner and wait for its durable answer. The
        events' bytes go with the call (records): the events keep only their ids, so a refused
        offer cannot be offered again from them; the owner has shed and tried again before it
        answers journal_full (MAKES_ROOM_ITSELF)."""
        handed, data = records([(event, targets) for event, targets in routed if targets])
        count = len(data)
        if not count:
            return
        call = self.channel.call("append", handed, data=data)
        del handed, data  # the call holds them until they are sent, and no longer
        try:
            await call
        except ChannelError as exc:
            raise JournalUnavailableError(f"the journal owner did not answer: {exc}") from exc
        self.handed += count

    async def next_batch(
        self,
        target_id: str,
        *,
        max_events: int,
        max_bytes: int,
        max_wait_s: float,
        stopping: asyncio.Event,
    ) -> list[Entry]:
        raise NotImplementedError("delivery runs in the journal owner")

    async def ack(self, target_id: str, batch: Sequence[Entry], *, dead_lettered: int) -> None:
        raise NotImplementedError("delivery runs in the journal owner")

    def books(self, target_id: str) -> Books:
        return Books()

    def shed_order(self) -> list[str]:
        """Nothing to shed here: the owner sheds (drop_oldest_per_target) before it answers
        journal_full."""
        return []

    def shed(self, target_id: str, count: int) -> AbstractAsyncContextManager[list[Entry]]:
        raise NotImplementedError("the journal owner sheds")
