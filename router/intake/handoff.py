"""The hand-off between a worker process and the journal owner (`server.workers` > 1).

A worker does the CPU work of an offer (decode, limits, validation, redaction, routing,
serialisation) and hands the owner finished records: each event's id, arrival time, its bytes
as the journal stores them, and the targets its routes chose. The owner journals them (group
commit, with every other worker's records and its own) and answers once they are durable; only
then does the worker answer the producer. `HandoffJournal` is the worker's side of that: the
Journal protocol's `append` over the channel, so the worker's Acceptor is the same Acceptor as
in one process, books, limits, answers and all.

The channel is one unix stream socket per worker (a socketpair the owner made): frames of
`!IBII` (payload length, kind, call id, data blobs) and a pickled payload, then for a call
with `data` the length of each blob (an array of unsigned ints in this machine's order: both
ends are processes of it) and the blobs joined, as one buffer. Either side may call the other
(`Channel.call(op, *args, data=blobs)`: the handler gets the blobs as a last argument) and each
call is answered once (a value, or an error the caller raises again); calls run concurrently,
answers arrive in any order. The events' bytes are such blobs. Joined, they cost one copy
(~0.1 us a 1 KB event) where the transport took 0.7-1.4 us an event to write them as a
thousand buffers; the worker lets the events' own bytes go as it sends them (Event.hand_over),
so a worker whose owner is slow to read still holds them once, and a request waiting for the
owner's durable answer not at all (about 1 MB per waiting 1,000-event request). Pickle is safe
here: the socket joins a parent and the children it started from the same code, and nobody
else can reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import struct
from array import array
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from itertools import accumulate
from typing import Any, ClassVar, Final

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
# A frame larger than this is a broken peer, not a message (an offer is at most
# server.max_inflated_bytes of events, well below it).
MAX_FRAME_BYTES: Final = 1 << 30
# Errors that cross the channel as themselves; anything else arrives as ChannelError.
KNOWN_ERRORS: Final[Mapping[str, type[RouterError]]] = {
    "JournalFullError": JournalFullError,
    "JournalUnavailableError": JournalUnavailableError,
}

Handler = Callable[..., Awaitable[Any]]
# One record handed over: event id, arrival time (epoch s) and target -> route; its event's bytes
# go beside it, as a data blob.
Record = tuple[str, float, Mapping[str, str]]


class ChannelError(RouterError):
    """The other side failed a call, or went away before answering it."""


class Channel:
    """Calls both ways over one stream socket; see the module docstring."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handlers: Mapping[str, Handler],
        *,
        name: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._handlers = handlers
        self.name = name
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._reading: asyncio.Task[None] | None = None
        self._outbox: list[bytes] = []
        self.closed = asyncio.Event()

    @classmethod
    async def over(cls, sock: Any, handlers: Mapping[str, Handler], *, name: str) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME_BYTES)
        return cls(reader, writer, handlers, name=name)

    def start(self) -> None:
        self._reading = asyncio.create_task(self._read(), name=f"channel:{self.name}")

    async def call(self, op: str, *args: Any, data: Sequence[bytes] = ()) -> Any:
        """Run `op` on the other side and return its answer (raising what it raised); `data`,
        when given, is sent as it is and reaches the handler as a last argument (a list of
        bytes)."""
        if self.closed.is_set():
            raise ChannelError(f"{self.name}: the channel is closed")
        self._next_id = call_id = (self._next_id + 1) & 0xFFFFFFFF
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = answer
        try:
            self._send(CALL, call_id, (op, args), data)
            # From here the transport alone holds what was sent, until the other side has it:
            # a caller that let its own copies go waits for the answer without them.
            del args, data
            await self._writer.drain()
            return await answer
        finally:
            self._waiting.pop(call_id, None)

    def _send(self, kind: int, call_id: int, value: Any, data: Sequence[bytes] = ()) -> None:
        """Queue a frame; the frames queued in one turn of the loop go out in one write (a
        group commit answers every call it held at once: one syscall and one wake-up of the
        other side, not one per call). `data` goes as its lengths and one joined buffer."""
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(HEADER.pack(len(payload), kind, call_id, len(data)))
        self._outbox.append(payload)
        if data:
            self._outbox.append(array(BLOB_LENGTH, map(len, data)).tobytes())
            self._outbox.append(b"".join(data))

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if frames and not self._writer.is_closing():
            self._writer.writelines(frames)

    async def _read(self) -> None:
        try:
            while True:
                header = await self._reader.readexactly(HEADER.size)
                size, kind, call_id, blobs = HEADER.unpack(header)
                if size + blobs * BLOB_LENGTH_SIZE > MAX_FRAME_BYTES:
                    raise ChannelError(f"{self.name}: a frame of {size} bytes")
                value = pickle.loads(await self._reader.readexactly(size))
                if kind == CALL:
                    op, args = value
                    if blobs:
                        args = (*args, await self._read_blobs(blobs))
                    task = asyncio.create_task(self._answer(call_id, op, args), name=self.name)
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                    continue
                answer = self._waiting.get(call_id)
                if answer is None or answer.done():
                    continue
                if kind == ANSWER:
                    answer.set_result(value)
                else:
                    error_type, message = value
                    answer.set_exception(KNOWN_ERRORS.get(error_type, ChannelError)(message))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the other side is gone
        except Exception:
            log.exception("%s: the channel failed", self.name)
        finally:
            self._closed()

    async def _read_blobs(self, count: int) -> list[bytes]:
        """A call's data: `count` lengths, then the blobs joined, cut into bytes of their own
        (slices of the block: one copy each)."""
        lengths = array(BLOB_LENGTH)
        lengths.frombytes(await self._reader.readexactly(count * BLOB_LENGTH_SIZE))
        ends = list(accumulate(lengths))
        if ends[-1] > MAX_FRAME_BYTES:
            raise ChannelError(f"{self.name}: {ends[-1]} bytes of data in one frame")
        block = await self._reader.readexactly(ends[-1])
        return [block[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]

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
        with contextlib.suppress(ConnectionError):
            self._send(reply[0], call_id, reply[1])
            await self._writer.drain()

    def _closed(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(ChannelError(f"{self.name}: the other side went away"))
        self._writer.close()

    async def settle(self) -> None:
        """Wait for the calls the other side made to finish here (it may be gone: a worker
        killed while the owner journals its records, which are then durable all the same)."""
        await asyncio.gather(*self._running, return_exceptions=True)

    async def close(self) -> None:
        """Stop reading and answering; calls still waiting fail with ChannelError."""
        self._closed()
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


def records(
    routed: Sequence[tuple[Event, Mapping[str, str]]],
) -> tuple[list[Record], list[bytes]]:
    """What the owner needs of routed events, and their bytes (the journal stores bytes, never
    the body), sent as the call's data. The bytes are taken from the events (Event.hand_over):
    once sent, the owner has them and the worker, waiting for the durable answer, does not."""
    handed = [(event.id, event.received_at, targets) for event, targets in routed]
    return handed, [event.hand_over() for event, _ in routed]


def events(
    handed: Sequence[Record], data: Sequence[bytes]
) -> list[tuple[Event, Mapping[str, str]]]:
    """Records and their bytes back as routed events, as the journal reads them back."""
    return [
        (Event.stored(event_id, encoded, received_at), targets)
        for (event_id, received_at, targets), encoded in zip(handed, data, strict=True)
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
        count = len(handed)
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
