"""The journal on NATS JetStream: several routers share one replicated backlog per target.

Each target's backlog is a work-queue stream, `<stream>_<target>` (subject `<stream>.q.<target>`),
with `storage.jetstream.replicas` replicas and `max_bytes`, refusing new messages when full.
`append` publishes every event to the stream of each of its targets, with Nats-Msg-Id = the
event id (a producer's retry after a lost answer is stored once) and returns only once JetStream
acknowledged every publish, that is once a quorum of the stream's replicas stored it; only then
does the producer get its 2xx. A full stream is JournalFullError (503 + Retry-After); no answer
is JournalUnavailableError (503).

Each target has one durable pull consumer, `delivery`, which every router bound to the stream
shares: JetStream hands each message to one of them (work-queue semantics), so each event goes
to the target once, whichever router sends it. A batch is acked (and leaves the stream) once
the target took it or it was dead-lettered. Everything a router holds (fetched and not yet
acked: the batch being sent or retried, what it lingers for, what did not fit the last batch)
is kept with in-progress acks once it is held a quarter of ack_wait_s; a router that dies
holding a batch leaves it to be redelivered to another after ack_wait_s. A stopping router
hands back (naks) what it holds, including what its last fetch brings: a stop does not cut a
fetch short (nats-py's fetch, cancelled, leaves its pull request on the server, which goes on
handing it messages), it leaves it to end (FETCH_WAIT_S at most), and what it brought is
handed back with the rest (_hand_back). Left unacked, those went to no router until
ack_wait_s passed, at every stop of a rolling restart.

The books are the streams' state, the same on every router: received is the target stream's
last sequence (every event ever stored; a dedup'd retry takes none), pending the messages it
still holds (in flight included), dead_lettered the dead-letter stream's last sequence, and
delivered the rest. A stream per target (not one stream with a subject per target) is what
makes `received` exact: JetStream keeps a sequence per stream, not per subject.

Every batch a router accepts is also published, once, on the core NATS subject
`<stream>.tail` (no stream: nothing is kept), and every router hands what the others accepted
to its live tail (`tail_sink`), so /v1/tail on any router sees every router's events.

The journal's dead letters (letters.py), its evidence chains' records (chains.py) and the
shared config (sharedconfig.py) are parts of it of their own; `storage.path` keeps what is
local to one router: its lock (one daemon per directory) and its chain id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import nats
import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.client import DEFAULT_JS_SUB_PENDING_BYTES_LIMIT, DEFAULT_JS_SUB_PENDING_MSGS_LIMIT
from nats.js.errors import APIError

from router.config import StorageConfig
from router.errors import StorageUnavailableError
from router.events import Event
from router.journal import Books, ChainFencedError, Entry, JournalFullError, JournalUnavailableError
from router.journal.jetstream.chains import ChainRecords, read_chain_id
from router.journal.jetstream.letters import REDRIVE_SEP, StreamDeadLetters
from router.journal.jetstream.sharedconfig import SharedConfig
from router.journal.jetstream.streams import (
    CONSUMER,
    PUBLISH_RETRY_S,
    PUBLISH_TRY_S,
    READ_TRY_S,
    STREAM_ERRORS,
    STREAM_FULL,
    confirm_ack,
    connect,
    ensure_consumer,
    ensure_target_streams,
    letters_stream,
    publish_until_acked,
    queue_stream,
    queue_subject,
    tail_subject,
    transient,
)
from router.journal.lock import lock_storage

log = logging.getLogger(__name__)

# Headers of a journaled message beside Nats-Msg-Id.
ROUTE = "Router-Route"
RECEIVED_AT = "Router-Received-At"
ORIGIN = "Router-Instance"
# How often the books are read back from the streams.
BOOKS_EVERY_S = 0.5
# The longest one fetch waits (a batch gathered for longer fetches again): a stopping router
# waits this long at most for its last fetch to end.
FETCH_WAIT_S = 1.0
# A pull request expires on the server this long after it arrived there, a little after its
# fetch timed out: the margin for its way there, before a stopping router takes what it brought.
PULL_ARRIVAL_S = 0.1
# What a router holds gets an in-progress ack once it is held this share of ack_wait_s (and
# again each time as long): at most half of ack_wait_s passes between two, which leaves the
# other half for an event loop held up or a connection moving to another server.
IN_PROGRESS_SHARE = 4


# The latest arrival time a date can hold (9999-12-31T23:59:59Z): past it, or not finite, a
# Router-Received-At header is damage or a foreign message's, not a time.
LATEST_ARRIVAL = 253_402_300_799.0


def arrival(headers: Mapping[str, str]) -> float | None:
    """A stored message's arrival time, from its Router-Received-At header; None when it is
    missing or not a time (the message is then quarantined, journal_corrupt): "nan" or 1e300
    passed float() and stood as the event's arrival, and formatting it raised later, in a
    dead letter's timestamp or the books' oldest arrival."""
    try:
        at = float(headers[RECEIVED_AT])
    except (KeyError, ValueError):
        return None
    return at if math.isfinite(at) and 0 <= at <= LATEST_ARRIVAL else None


def _failure(future: asyncio.Future[Any] | None) -> BaseException | None:
    """Why a publish_async did not end in an ack (None: it did)."""
    if future is None:
        return nats.errors.ConnectionReconnectingError()
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()


@dataclass(slots=True)
class _Target:
    books: Books = field(default_factory=Books)
    sub: JetStreamContext.PullSubscription | None = None
    # The subscription on `sub`'s inbox: what the pull requests brought and no fetch took yet
    # waits there (a fetch takes it first; a stopping router hands it back).
    inbox: Subscription | None = None
    # A fetch its worker stopped waiting for (a stop, a cancelled worker): the next fetch
    # takes it over, or the hand-back waits for it. Never cancelled (see _fetch).
    fetching: asyncio.Future[list[Msg]] | None = None
    # Messages this router holds (fetched, not yet acked), by stream sequence: the batch
    # out, the messages being gathered for the next one and `carry`.
    held: dict[int, Msg] = field(default_factory=dict)
    # When each held message was fetched or last told in progress (time.monotonic()).
    touched: dict[int, float] = field(default_factory=dict)
    # Fetched messages that did not fit the last batch's max_bytes: the next batch's head.
    carry: list[Msg] = field(default_factory=list)
    # The batch handed out last: what of it is still held (not acked) when the next batch is
    # asked for was left unsettled by its worker. Settled, none of it is held, or only what
    # is `unconfirmed`; unsettled, all of it.
    out: Sequence[Entry] = ()
    # Held messages whose ack got no confirmation: settled (the daemon acks nothing else),
    # so a hand-back acks them again rather than nak them.
    unconfirmed: set[int] = field(default_factory=set)
    # The consumer's ack_wait as the server has it (the config's, unless another router
    # with another storage section set it since): the in-progress acks keep to the shorter.
    ack_wait_s: float = 0.0
    # The stream sequence of the oldest message pending when the books were last read.
    oldest_seq: int = 0

    def hold(self, msgs: Sequence[Msg]) -> None:
        """Fetched messages: this router holds them (and keeps them) until they are acked."""
        now = time.monotonic()
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            self.held[seq] = msg
            self.touched[seq] = now

    def release(self, seq: int) -> None:
        self.held.pop(seq, None)
        self.touched.pop(seq, None)

    async def buffered(self) -> list[Msg]:
        """What the pull requests brought that no fetch took, out of the inbox (a message the
        server sent as the request expired, after its fetch timed out). Status messages (a
        request's end) are no messages."""
        found: list[Msg] = []
        while self.inbox is not None and self.inbox.pending_msgs:
            msg = await self.inbox.next_msg(timeout=None)  # there: it does not wait
            if not JetStreamContext.is_status_msg(msg):
                found.append(msg)
        return found

    def due(self, now: float, every_s: float) -> list[Msg]:
        """The held messages not fetched or told in progress for `every_s`, marked as told."""
        due = [seq for seq, at in self.touched.items() if now - at >= every_s]
        for seq in due:
            self.touched[seq] = now
        return [self.held[seq] for seq in due]


class JetStreamJournal:
    """The journal over JetStream. `open()` connects and sets up the streams and consumers;
    `close()` hands back what this router holds and disconnects."""

    MAKES_ROOM_ITSELF: ClassVar[bool] = False  # the Acceptor sheds when this one is full

    def __init__(self, storage: StorageConfig, target_ids: Sequence[str]) -> None:
        self.config = storage
        self.js_config = storage.jetstream
        self.directory = Path(storage.path)
        self.path = f"jetstream:{self.js_config.stream}"
        self.max_bytes = self.js_config.max_bytes
        self._targets = {target_id: _Target() for target_id in target_ids}
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._reads: JetStreamContext | None = None
        self._lock_fd: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._settling: set[asyncio.Task[None]] = set()
        self.used_bytes = 0
        self.quarantined = 0
        self.lost_records = 0
        self.checkpoint_errors = 0
        self.healthy = True
        # What the SQLite journal finds at start-up or while running; a shared stream has no
        # orphans of its own (another router may still deliver a target this one dropped).
        self.orphans: set[str] = set()
        self.orphaned: asyncio.Queue[str] = asyncio.Queue()
        # Event id -> the message id its redrive publishes under (StreamDeadLetters.take): the
        # stream would drop a second message under the id it remembers.
        self.redriving: dict[str, str] = {}
        # Who this router is on the tail subject, and where the other routers' events go (the
        # daemon sets it to its TailHub.publish).
        self.instance = uuid.uuid4().hex
        self.tail_sink: Callable[[Iterable[Event]], None] | None = None
        self.dead_letters = StreamDeadLetters(self, storage.dead_letter_dir())
        self.shared_config = SharedConfig(self)
        # router/evidence: this router's chain id (read at open) and its chains' records; a
        # target's chain head (seq, hash) to keep after each ack (Evidence.head_of: a file
        # target's), as the SQLite journal keeps it with the ack.
        self.chain_id = ""
        self.chains = ChainRecords(self)
        self.chain_head: Callable[[str], tuple[int, bytes] | None] | None = None

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "the journal is not open"
        return self._js

    @property
    def reads(self) -> JetStreamContext:
        """The JetStream API for reads, each waiting READ_TRY_S for its answer."""
        assert self._reads is not None, "the journal is not open"
        return self._reads

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        await asyncio.to_thread(self._lock)
        self.chain_id = await asyncio.to_thread(read_chain_id, self.directory)
        self._nc = await connect(self.js_config)
        self._js = self._nc.jetstream(timeout=self.js_config.publish_timeout_s)
        self._reads = self._nc.jetstream(timeout=min(READ_TRY_S, self.js_config.publish_timeout_s))
        try:
            for target_id in self._targets:
                await self._set_up(target_id)
            await self._read_books()
        except (nats.errors.Error, TimeoutError, StorageUnavailableError) as exc:
            await self._nc.close()
            self._unlock()
            if isinstance(exc, StorageUnavailableError):
                raise
            raise StorageUnavailableError(f"storage.jetstream: no streams: {exc}") from exc
        await self._nc.subscribe(tail_subject(self.js_config), cb=self._on_tail)
        self._tasks = [
            asyncio.create_task(self._keep_books(), name="journal-books"),
            asyncio.create_task(self._keep_in_progress(), name="journal-in-progress"),
        ]

    async def _set_up(self, target_id: str) -> None:
        """The target's stream, its dead-letter stream and its shared durable consumer."""
        c = self.js_config
        await ensure_target_streams(self.js, c, target_id)
        stream = queue_stream(c, target_id)
        target = self._targets[target_id]
        target.ack_wait_s = await ensure_consumer(self.js, c, stream)
        # What js.pull_subscribe_bind does, keeping the inbox's subscription: its buffer is
        # where a stopping router finds what its last pull requests brought (hand_back).
        assert self._nc is not None
        inbox = await self._nc.subscribe(
            self._nc.new_inbox(),
            pending_msgs_limit=DEFAULT_JS_SUB_PENDING_MSGS_LIMIT,
            pending_bytes_limit=DEFAULT_JS_SUB_PENDING_BYTES_LIMIT,
        )
        target.inbox = inbox
        target.sub = JetStreamContext.PullSubscription(
            js=self.js,
            sub=inbox,
            stream=stream,
            consumer=CONSUMER,
            deliver=inbox.subject.encode(),
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._settling, return_exceptions=True)
        await self._hand_back(list(self._targets.values()))
        if self._nc is not None:
            with contextlib.suppress(*STREAM_ERRORS):
                await self._nc.close()
        self._unlock()

    async def _hand_back(self, targets: Sequence[_Target]) -> None:
        """What this router holds of `targets` goes to the other routers now, not after
        ack_wait: a nak for each message it holds, for each one a fetch left running brings
        (it is awaited: FETCH_WAIT_S at most), and for each one the pull requests brought
        that no fetch took (a round trip first brings every one the server sent; a margin
        before it, PULL_ARRIVAL_S, lets a request that just timed out end on the server too).

        A message handed back was never sent by this router, or its batch was not settled
        (the drain timeout cut it short): sent again by another router, it is at least once,
        as after a crash. A settled one is not handed back: an acked one was released, and
        one whose ack got no confirmation (`unconfirmed`) is acked again instead, since a nak
        that landed where its ack did not (a connection lost on the way) would have another
        router send it again at once, and the target has it."""
        nc = self._nc
        connected = nc is not None and nc.is_connected
        running = [t for t in targets if t.fetching is not None]
        for target in running:
            fetch, target.fetching = target.fetching, None
            assert fetch is not None
            if connected:  # it ends by its own timeout; one that does not (a bug) is cut off
                await asyncio.wait([fetch], timeout=2 * FETCH_WAIT_S)
            fetch.cancel()
            if fetch.done() and not fetch.cancelled() and fetch.exception() is None:
                target.hold(fetch.result())
        if nc is None or not connected:
            return  # JetStream hands them out again after ack_wait
        if running:
            await asyncio.sleep(PULL_ARRIVAL_S)
        with contextlib.suppress(*STREAM_ERRORS):
            await nc.flush(timeout=2)
            settled = [m for t in targets for seq, m in t.held.items() if seq in t.unconfirmed]
            naks = [
                m
                for t in targets
                for m in (
                    *(m for seq, m in t.held.items() if seq not in t.unconfirmed),
                    *await t.buffered(),
                )
            ]
            # The ack itself, not Msg.ack() (see _settle).
            await asyncio.gather(*(nc.publish(m.reply) for m in settled), *(m.nak() for m in naks))
            await nc.flush(timeout=2)

    def _lock(self) -> None:
        self._lock_fd = lock_storage(self.directory)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- append --------------------------------------------------------------------------------

    async def append(self, routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
        """Publish each event to each of its targets' streams and wait for every ack.

        All publishes go out at once (publish_async: one reply subscription, twice the rate
        of a request per message); those that failed transiently or got no ack within
        PUBLISH_TRY_S are published again one by one, with the same message id, until
        publish_timeout_s."""
        sends = [
            (target_id, event, route)
            for event, targets in routed
            for target_id, route in targets.items()
            # A target retired by a reload since the event was routed: nobody delivers it.
            if target_id in self._targets
        ]
        if not sends:
            await self._share_with_tails(routed)
            return
        started = time.monotonic()
        futures: list[asyncio.Future[Any] | None] = []
        for target_id, event, route in sends:
            subject, payload, headers = self._message(target_id, event, route)
            try:
                futures.append(await self.js.publish_async(subject, payload, headers=headers))
            except STREAM_ERRORS:
                futures.append(None)  # the connection is away: the slow path tries again
        waiting = [f for f in futures if f is not None]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=PUBLISH_TRY_S)
            for unanswered in late:
                unanswered.cancel()  # frees its place among publish_async's pending ones
        again = []
        for send, outcome in zip(sends, futures, strict=True):
            failure = _failure(outcome)
            if failure is None:
                continue
            self._raise_if_final(send[0], failure)
            again.append(send)
        if again:
            left = self.js_config.publish_timeout_s - (time.monotonic() - started)
            await self._publish_each(again, max(left, PUBLISH_RETRY_S))
        self.healthy = True
        await self._share_with_tails(routed)

    async def _share_with_tails(self, routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
        """The accepted batch, once, for the other routers' live tails: best effort, as the
        tail is (a tail that falls behind drops events too)."""
        assert self._nc is not None
        lines = b"\n".join(event.encoded() for event, _ in routed)
        with contextlib.suppress(*STREAM_ERRORS):
            await self._nc.publish(
                tail_subject(self.js_config), lines, headers={ORIGIN: self.instance}
            )

    async def _on_tail(self, msg: Msg) -> None:
        """Another router's accepted batch, into this router's tail (parsed only if someone
        tails here: TailHub.publish looks at its subscribers before it takes an event)."""
        if self.tail_sink is None or (msg.headers or {}).get(ORIGIN) == self.instance:
            return
        now = time.time()
        self.tail_sink(
            Event.from_body(orjson.loads(line), received_at=now, encoded=line)
            for line in msg.data.split(b"\n")
            if line
        )

    async def _publish_each(
        self, sends: Sequence[tuple[str, Event, str]], timeout_s: float
    ) -> None:
        results = await asyncio.gather(
            *(
                publish_until_acked(self.js, *self._message(*send), timeout_s=timeout_s)
                for send in sends
            ),
            return_exceptions=True,
        )
        failures = [(s[0], r) for s, r in zip(sends, results, strict=True) if r is not None]
        for target_id, failure in failures:
            assert isinstance(failure, BaseException)
            self._raise_if_final(target_id, failure)
        if failures:
            self.healthy = False
            raise JournalUnavailableError(f"JetStream did not acknowledge: {failures[0][1]!r}")

    def _raise_if_final(self, target_id: str, failure: BaseException) -> None:
        """A full stream is the producer's 503 at once; an error that is no stream's answer
        (a bug) is raised as it is; anything else may be tried again."""
        if isinstance(failure, APIError) and failure.err_code == STREAM_FULL:
            raise JournalFullError(
                f"target {target_id}'s stream {queue_stream(self.js_config, target_id)} "
                f"holds storage.jetstream.max_bytes ({self.js_config.max_bytes})"
            )
        if not isinstance(failure, (*STREAM_ERRORS, asyncio.CancelledError)):
            raise failure

    def _message(
        self, target_id: str, event: Event, route: str
    ) -> tuple[str, bytes, dict[str, str]]:
        """A journaled event: its subject, its bytes, and its headers (the message id, by
        which the stream de-duplicates, the route, and when it was received)."""
        return (
            queue_subject(self.js_config, target_id),
            event.encoded(),
            {
                "Nats-Msg-Id": self.redriving.get(event.id, event.id),
                ROUTE: route,
                RECEIVED_AT: repr(event.received_at),
            },
        )

    # -- read and settle -----------------------------------------------------------------------

    async def next_batch(
        self,
        target_id: str,
        *,
        max_events: int,
        max_bytes: int,
        max_wait_s: float,
        stopping: asyncio.Event,
    ) -> list[Entry]:
        """The next batch JetStream hands this router; empty once `stopping` is set: what is
        left stays in the stream for the other routers (and this one's next start).

        The last batch, if it is not acked, comes first again, as the SQLite journal's cursor
        gives it: its worker stopped without settling it (a reload changing the target stops
        it at once, an error restarts it), and the target's next worker sends it (the daemon's
        Unrecorded knows what of it was settled). Held with in-progress acks and handed out
        no more, it went to no endpoint until the router stopped."""
        target = self._targets[target_id]
        msgs = target.carry
        out, held = target.out, target.held
        if out and (out[0].seq in held or out[-1].seq in held or target.unconfirmed):
            msgs = [held[e.seq] for e in out if e.seq in held] + msgs
        target.out = ()
        target.carry = []
        while not msgs:
            if stopping.is_set():
                return []
            msgs = await self._fetch(target, max_events, FETCH_WAIT_S, stopping)
        # Linger for more, up to max_wait_s after the first, unless stopping.
        deadline = time.monotonic() + max_wait_s
        while len(msgs) < max_events and not stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0.01:
                break
            more = await self._fetch(
                target, max_events - len(msgs), min(remaining, FETCH_WAIT_S), stopping
            )
            msgs.extend(more)
        batch: list[Entry] = []
        size = 0
        for i, msg in enumerate(msgs):
            entry = self._entry(msg)
            entry_bytes = len(msg.data) + 1
            if batch and size + entry_bytes > max_bytes:
                target.carry = msgs[i:]
                break
            batch.append(entry)
            size += entry_bytes
        target.out = batch
        return batch

    async def _fetch(
        self, target: _Target, count: int, wait_s: float, stopping: asyncio.Event
    ) -> list[Msg]:
        """Up to `count` messages, waiting at most `wait_s` for the first; none if the servers
        are away (the worker comes back), or once `stopping` is set.

        A stop does not cancel the fetch: nats-py's fetch, cancelled, leaves its pull request on
        the server until it expires (and drops what it took from its inbox and had not
        returned yet), and JetStream counts every message it hands that request delivered:
        they reached the inbox after the fetch was gone, and went to no router until ack_wait.
        The fetch is left to end (`fetching`): the next fetch of the target takes it over (a
        worker started again by a reload), or the hand-back of a stopping router or a retired
        target waits for it and hands back what it brought."""
        assert target.sub is not None
        fetch = target.fetching
        if fetch is None:
            fetch = asyncio.ensure_future(target.sub.fetch(count, timeout=max(wait_s, 0.05)))
        target.fetching = fetch
        stop = asyncio.ensure_future(stopping.wait())
        waits: list[asyncio.Future[Any]] = [fetch, stop]
        try:  # a cancelled worker leaves the fetch running too: asyncio.wait cancels neither
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not fetch.done():
            return []
        target.fetching = None
        try:
            msgs = list(fetch.result())
        except TimeoutError:
            return []
        except (nats.errors.Error, OSError) as exc:
            log.warning("journal: fetching from JetStream failed: %s", exc)
            await asyncio.sleep(FETCH_WAIT_S)
            return []
        target.hold(msgs)  # from now on kept with in-progress acks, until acked or handed back
        return msgs

    def _entry(self, msg: Msg) -> Entry:
        """A stored message as an Entry; one whose body is not a JSON object (or whose headers
        are gone) is dead-lettered as journal_corrupt, as a record failing its checksum is."""
        seq = msg.metadata.sequence.stream
        headers = msg.headers or {}
        event_id = headers.get("Nats-Msg-Id")
        received_at = arrival(headers)
        if event_id is None or received_at is None or not msg.data.startswith(b"{"):
            self.quarantined += 1
            log.error("journal: message %d is not an event; quarantined", seq)
            return Entry(
                seq,
                Event.corrupt_record(seq, msg.data, event_id=event_id, received_at=received_at),
                headers.get(ROUTE, ""),
            )
        # A redriven event's message id carries a suffix (below); the event's id does not.
        return Entry(
            seq,
            Event.stored(event_id.split(REDRIVE_SEP, 1)[0], msg.data, received_at),
            headers.get(ROUTE, ""),
        )

    async def ack(self, target_id: str, batch: Sequence[Entry], *, dead_lettered: int) -> None:
        """Ack the batch: it leaves the stream. Shielded from a cancelled worker, as in the
        SQLite journal; safe to call again after it raised (acked messages are not acked
        twice). `dead_lettered` needs no counting here: the letters are in their stream."""
        if not batch:
            return
        settling = asyncio.create_task(self._settle(target_id, batch), name=f"ack:{target_id}")
        self._settling.add(settling)
        settling.add_done_callback(self._settling.discard)
        await asyncio.shield(settling)

    async def _settle(self, target_id: str, batch: Sequence[Entry]) -> None:
        """Ack every message and have the consumer confirm them. A fire-and-forget ack sent
        while the consumer's leader dies is lost without a word, and JetStream hands the
        message out again after ack_wait_s: a node kill under load delivered 266 of 2,140
        events twice that way. Confirming each ack cost about 35 us of CPU per event, so the
        batch's acks go out as before and only the last is a request: acks from one
        connection reach the consumer's leader in order and its confirmation comes once the
        ack has a quorum, so it vouches for the ones before it. Without it (a leader died or
        changed on the way) every ack of the batch is confirmed on its own, each tried again
        until publish_timeout_s; one still unconfirmed raises: its message may then come back
        (at least once, as after a crash), never be lost."""
        target = self._targets.get(target_id, _Target())  # retired meanwhile: nothing held
        msgs = [(e.seq, target.held[e.seq]) for e in batch if e.seq in target.held]
        # Read on the loop, after the write: the head only covers lines already written.
        head = self.chain_head(target_id) if self.chain_head is not None else None
        if not msgs:
            if head is not None:  # an ack tried again after it went through
                await self._keep_head(target_id, *head)
            return
        nc = self._nc
        assert nc is not None
        timeout_s = self.js_config.publish_timeout_s
        try:
            for _, msg in msgs[:-1]:
                # The ack itself, not Msg.ack(): that refuses a message it acked before, and
                # an ack tried again after one that raised has sent these already.
                await nc.publish(msg.reply)
            await nc.request(msgs[-1][1].reply, b"", timeout=min(timeout_s, PUBLISH_TRY_S))
        except STREAM_ERRORS as exc:
            target.unconfirmed.update(seq for seq, _ in msgs)
            if not transient(exc):
                raise JournalUnavailableError(f"JetStream did not take the acks: {exc!r}") from exc
            results = await asyncio.gather(
                *(confirm_ack(nc, msg, timeout_s=timeout_s) for _, msg in msgs),
                return_exceptions=True,
            )
            confirmed = {seq for (seq, _), r in zip(msgs, results, strict=True) if r is None}
            target.unconfirmed -= confirmed
            if len(confirmed) < len(msgs):
                for seq in confirmed:
                    target.release(seq)
                failure = next(r for r in results if r is not None)
                raise JournalUnavailableError(
                    f"JetStream did not confirm the acks of {len(msgs) - len(confirmed)} of "
                    f"{len(msgs)} messages: {failure!r}"
                ) from exc
        for seq, _ in msgs:
            target.release(seq)
        if target.unconfirmed:  # confirmed now, by an ack tried again
            target.unconfirmed.difference_update(seq for seq, _ in msgs)
        if head is not None:
            await self._keep_head(target_id, *head)

    async def _keep_head(self, target_id: str, seq: int, head_hash: bytes) -> None:
        """The chain head after an ack, in the chain's record. Not the ack's business if it
        fails: the batch is settled, the lines are in the file (which gives the head back at
        start), and the next ack keeps a newer head."""
        try:
            await self.chains.keep_head(target_id, seq, head_hash)
        except ChainFencedError as exc:
            if self.chains.announce_fenced(target_id):
                log.error("target %s: %s", target_id, exc)
        except JournalUnavailableError as exc:
            log.warning("target %s: cannot keep the chain head: %s", target_id, exc)

    async def _keep_in_progress(self) -> None:
        """While a router holds messages (a long send, retries of a target that is down, a
        batch being gathered, the carry), tell JetStream they are still being worked on, so
        they are not given to another router: each once it is held a quarter of ack_wait_s
        and then every quarter (IN_PROGRESS_SHARE). A batch settled sooner (a target keeping
        up) costs nothing here."""
        while True:
            every = (
                min(
                    (t.ack_wait_s or self.js_config.ack_wait_s for t in self._targets.values()),
                    default=self.js_config.ack_wait_s,
                )
                / IN_PROGRESS_SHARE
            )
            await asyncio.sleep(every)
            now = time.monotonic()
            due = [m for t in list(self._targets.values()) for m in t.due(now, every)]
            if due:
                with contextlib.suppress(*STREAM_ERRORS):
                    await asyncio.gather(*(m.in_progress() for m in due))

    # -- books -------------------------------------------------------------------------------

    async def _keep_books(self) -> None:
        while True:
            await asyncio.sleep(BOOKS_EVERY_S)
            try:
                await self._read_books()
            except STREAM_ERRORS as exc:
                log.debug("journal: cannot read the books from JetStream: %s", exc)

    async def _read_books(self) -> None:
        """Every target's books from its two streams: the same on every router."""
        used = 0
        for target_id, target in list(self._targets.items()):
            queue = (await self.reads.stream_info(queue_stream(self.js_config, target_id))).state
            letters = (
                await self.reads.stream_info(letters_stream(self.js_config, target_id))
            ).state
            books = target.books
            books.received = queue.last_seq
            books.pending = queue.messages
            books.dead_lettered = letters.last_seq
            books.delivered = queue.last_seq - queue.messages - letters.last_seq
            if not queue.messages:
                books.oldest_received_at = None
            elif queue.first_seq != target.oldest_seq:  # the oldest pending one changed
                books.oldest_received_at = await self._received_at(target_id, queue.first_seq)
            target.oldest_seq = queue.first_seq if queue.messages else 0
            used += queue.bytes
        self.used_bytes = used
        if self._nc is not None:
            self.healthy = self._nc.is_connected

    async def _received_at(self, target_id: str, seq: int) -> float | None:
        with contextlib.suppress(*STREAM_ERRORS):
            msg = await self.reads.get_msg(queue_stream(self.js_config, target_id), seq)
            return arrival(msg.headers or {})
        return None

    def books(self, target_id: str) -> Books:
        """The target's books as last read from its streams (a target this router just
        retired, still shown while a reload finishes: empty)."""
        target = self._targets.get(target_id)
        return target.books if target is not None else Books()

    # -- what the SQLite journal also does -------------------------------------------------------

    def shed_order(self) -> list[str]:
        """Never shed: storage.when_full drop_oldest_per_target needs the SQLite journal."""
        return []

    @asynccontextmanager
    async def shed(self, target_id: str, count: int) -> AsyncIterator[list[Entry]]:
        yield []

    async def add_target(self, target_id: str) -> None:
        """A target joins at run time (a config reload): its streams and consumer."""
        if target_id in self._targets:
            return
        self._targets[target_id] = _Target()
        await self._set_up(target_id)

    async def retire(
        self,
        target_id: str,
        dead_letter: Callable[[list[Entry]], Awaitable[int]],
        *,
        orphan: bool = False,
    ) -> int:
        """A target removed by a reload stops being delivered by this router; its stream
        stays, with its backlog, for the routers that still have it (or this one again). A
        shared stream has no orphans (`orphan` is the SQLite journal's)."""
        if orphan:
            return 0
        target = self._targets.pop(target_id, None)
        if target is not None:
            await self._hand_back([target])
            if target.inbox is not None:
                with contextlib.suppress(*STREAM_ERRORS):
                    await target.inbox.unsubscribe()
        return 0

    async def pending_for(self, event_id: str) -> list[str]:
        """Receipts' lookup: not answered from a shared stream (no index by event id)."""
        return []

    # -- evidence (router/evidence): this router's chains, in the KV bucket ---------------------

    async def chain_heads(self) -> dict[str, tuple[int, bytes, bytes | None, float | None]]:
        """Per target: this router's chain head, its last checkpoint (b"" before the first)
        and when; each record is taken for this process (ChainRecords: fencing)."""
        return await self.chains.heads(list(self._targets))

    async def save_chain(
        self, target_id: str, seq: int, head_hash: bytes, checkpoint: bytes, at: float
    ) -> None:
        """Keep a target's chain head and the checkpoint just written for it."""
        await self.chains.save(target_id, seq, head_hash, checkpoint, at)

    async def planned_objects(
        self,
    ) -> dict[str, tuple[str, str, int, bytes, int, bytes, bytes, bytes, str]]:
        """Per target: the object planned before its last PUT (router/evidence)."""
        return await self.chains.plans(list(self._targets))

    async def save_planned(
        self, target_id: str, plan: tuple[str, str, int, bytes, int, bytes, bytes, bytes, str]
    ) -> None:
        """Keep the object a bucket target is about to PUT (one per target), before the PUT."""
        await self.chains.save_plan(target_id, plan)

    async def drop_planned(self, target_id: str) -> None:
        """Forget a target's planned object: its PUT failed and its places went back."""
        await self.chains.save_plan(target_id, None)
