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

Dead letters go to a stream per target, `<stream>_DLQ_<target>` (StreamDeadLetters), with
Nats-Msg-Id = the event's sequence in the target's stream, so a batch dead-lettered by a router
that died before its ack, and dead-lettered again by the next, is one letter.

The books are the streams' state, the same on every router: received is the target stream's
last sequence (every event ever stored; a dedup'd retry takes none), pending the messages it
still holds (in flight included), dead_lettered the dead-letter stream's last sequence, and
delivered the rest. A stream per target (not one stream with a subject per target) is what
makes `received` exact: JetStream keeps a sequence per stream, not per subject.

Every batch a router accepts is also published, once, on the core NATS subject
`<stream>.tail` (no stream: nothing is kept), and every router hands what the others accepted
to its live tail (`tail_sink`), so /v1/tail on any router sees every router's events.

The config is shared too (SharedConfig): the management API on any router puts the config
into the KV bucket `<stream>_CONFIG`, and every router watches it and applies what another
one put; the YAML file is the bootstrap (what a router runs until the bucket has a config).

Evidence (router/evidence) keeps its chains' records in the KV bucket `<stream>_CHAIN`
(ChainRecords): per chain and target, `<chain id>.<target>` holds the head, the last checkpoint
and the planned object. A file target's archive is local to one router, so each router's file
is a chain of its own, named by the router's chain id (`<storage.path>/chain-id`, made at its
first start). Every write is a compare-and-set on the key's revision by the process that holds
it (it took the key at start): a process whose key another one took since (the same chain id
started elsewhere) is refused from then on (ChainFencedError), so two writers never fork one
record. A chain written by several routers at once (one bucket, one topic) needs a lease on
top of this: not supported yet (router/config/crosscheck.py refuses it).

`storage.path` keeps what is local to one router: its lock (one daemon per directory) and its
chain id.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import ssl
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import nats
import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamState,
)
from nats.js.client import DEFAULT_JS_SUB_PENDING_BYTES_LIMIT, DEFAULT_JS_SUB_PENDING_MSGS_LIMIT
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from router.config import JetStreamConfig, StorageConfig
from router.deadletter import (
    DeadLetters,
    Failure,
    Letter,
    LetterFilter,
    LetterPage,
    LetterTally,
    Taken,
    letter_bytes,
    page_answer,
    unredrivable,
)
from router.errors import StorageUnavailableError
from router.events import Event
from router.journal import (
    Books,
    ChainFencedError,
    Entry,
    JournalFullError,
    JournalUnavailableError,
)
from router.journal.lock import lock_storage

log = logging.getLogger(__name__)
_T = TypeVar("_T")

CONSUMER = "delivery"
# JetStream's error code for a stream at its max_bytes / max_msgs (discard: new).
STREAM_FULL = 10077
STREAM_NAME_IN_USE = 10058
# JetStream's answers to a create the cluster cannot place yet: too few peers online for the
# replicas (a node restarting: "no suitable peers for placement, peer offline"), or the meta
# group without a leader for a moment. A starting router tries again (PLACE_RETRY_S apart)
# until start_timeout_s, as it does for the first connection.
NOT_PLACEABLE_YET = frozenset({10005, 10008})
PLACE_RETRY_S = 0.5
# Headers of a journaled message beside Nats-Msg-Id.
ROUTE = "Router-Route"
RECEIVED_AT = "Router-Received-At"
ORIGIN = "Router-Instance"
# One publish try waits this long for its ack; tries go on until publish_timeout_s, after a
# pause that starts here and doubles.
PUBLISH_TRY_S = 2.0
PUBLISH_RETRY_S = 0.05
# How often the books are read back from the streams.
BOOKS_EVERY_S = 0.5
# How long a read (the books, the dead letters) waits for its answer. Not publish_timeout_s:
# a request whose answer was lost (its server died on the way) waited all of that, and the
# books of a router connected to a killed node stood still for 24 of publish_timeout_s's 30 s.
READ_TRY_S = 2.0
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
# Letters a dead-letter read takes per fetch, and how long its consumer outlives a reader that
# died before deleting it (the server removes it then).
LETTERS_PER_FETCH = 256
LETTER_READER_IDLE_S = 30.0
STREAM_ERRORS = (nats.errors.Error, TimeoutError, OSError)


def stream_token(target_id: str) -> str:
    """A target id as one token of a stream name and a subject: target ids may hold `.` and
    `:`, which neither allows; every character but letters, digits and `-` becomes `_XX`."""
    return re.sub(r"[^A-Za-z0-9-]", lambda m: f"_{ord(m.group()):02X}", target_id)


def queue_stream(config: JetStreamConfig, target_id: str) -> str:
    return f"{config.stream}_{stream_token(target_id)}"


def queue_subject(config: JetStreamConfig, target_id: str) -> str:
    return f"{config.stream}.q.{stream_token(target_id)}"


def letters_stream(config: JetStreamConfig, target_id: str) -> str:
    return f"{config.stream}_DLQ_{stream_token(target_id)}"


def letters_subject(config: JetStreamConfig, target_id: str) -> str:
    return f"{config.stream}.dlq.{stream_token(target_id)}"


def tail_subject(config: JetStreamConfig) -> str:
    return f"{config.stream}.tail"


async def connect(config: JetStreamConfig, *, name: str = "event-router") -> Client:
    """A NATS connection as storage.jetstream says: its servers, credentials and TLS; it
    reconnects for ever (the journal answers 503 while it is away). The first connection is
    tried for `start_timeout_s`: nats-py, told to reconnect for ever, also tries a first
    connection for ever, and a router started with no server to reach hung at start-up with
    a warning every half second instead of saying why it cannot start."""
    options: dict[str, Any] = {
        "servers": list(config.servers),
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        "allow_reconnect": True,
    }
    if config.credentials_file is not None:
        options["user_credentials"] = config.credentials_file
    if config.user is not None:
        options["user"], options["password"] = config.user, config.password
    if config.token is not None:
        options["token"] = config.token
    if config.tls is not None:
        context = ssl.create_default_context(cafile=config.tls.ca_file)
        if config.tls.cert_file is not None:
            context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
        options["tls"] = context

    async def quiet(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    options["error_cb"] = quiet
    servers = ", ".join(config.servers)
    try:
        return await asyncio.wait_for(nats.connect(**options), config.start_timeout_s)
    except TimeoutError as exc:
        raise StorageUnavailableError(
            f"storage.jetstream.servers: none of {servers} answered in "
            f"storage.jetstream.start_timeout_s ({config.start_timeout_s:g} s)"
        ) from exc
    except (nats.errors.Error, OSError) as exc:
        raise StorageUnavailableError(
            f"storage.jetstream.servers: cannot connect to {servers}: {exc}"
        ) from exc


async def placed(create: Callable[[], Awaitable[_T]], what: str, timeout_s: float) -> _T:
    """`create()`, tried again while the cluster cannot place it yet (NOT_PLACEABLE_YET, or no
    answer in time), for up to `timeout_s`: a router started beside NATS, or while a node
    restarts, waits for the cluster (with one warning saying so) instead of exiting; past
    `timeout_s` the last refusal is raised."""
    until = time.monotonic() + timeout_s
    warned = False
    while True:
        try:
            return await create()
        except (APIError, nats.errors.TimeoutError) as exc:
            # A create that timed out (an election under way) may have landed: trying it
            # again with the same config is answered as a create.
            if isinstance(exc, APIError) and exc.err_code not in NOT_PLACEABLE_YET:
                raise
            if time.monotonic() >= until:
                raise
            if not warned:
                log.warning(
                    "storage.jetstream: cannot place %s yet (%s); trying again for up to "
                    "storage.jetstream.start_timeout_s (%g s)",
                    what,
                    exc.description if isinstance(exc, APIError) else "no answer",
                    timeout_s,
                )
                warned = True
        await asyncio.sleep(PLACE_RETRY_S)


async def ensure_stream(js: JetStreamContext, wanted: StreamConfig, timeout_s: float) -> None:
    """Create the stream if missing (waiting up to `timeout_s` for the cluster to be able to
    place it: see `placed`); if present, check what the journal relies on (retention,
    subjects) and bring the limits (replicas, max_bytes, dedup window) to the config's."""
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        try:
            await placed(lambda: js.add_stream(wanted), f"stream {wanted.name}", timeout_s)
            return
        except APIError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:  # not: another router created it meanwhile
                raise StorageUnavailableError(
                    f"storage.jetstream: cannot create stream {wanted.name}: {exc.description}"
                ) from exc
        info = await js.stream_info(wanted.name)
    have = info.config
    if have.retention != wanted.retention or list(have.subjects or []) != wanted.subjects:
        raise StorageUnavailableError(
            f"storage.jetstream.stream: stream {wanted.name} exists with retention "
            f"{have.retention} and subjects {have.subjects}; the journal needs "
            f"{wanted.retention} and {wanted.subjects} (another application's stream?)"
        )
    if (have.num_replicas, have.max_bytes, have.duplicate_window, have.discard) != (
        wanted.num_replicas,
        wanted.max_bytes,
        wanted.duplicate_window,
        wanted.discard,
    ):
        await js.update_stream(wanted)


def _transient(exc: BaseException) -> bool:
    """A publish that may be acknowledged if tried again: the stream has no leader for a
    moment (a node died, an election runs), the answer timed out, or the connection is
    moving to another server. A full stream is not transient: it is the producer's 503."""
    if isinstance(exc, APIError):
        return exc.code == 503 and exc.err_code != STREAM_FULL
    return isinstance(
        exc,
        (
            NoStreamResponseError,
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            nats.errors.ConnectionReconnectingError,
            TimeoutError,
        ),
    )


def _failure(future: asyncio.Future[Any] | None) -> BaseException | None:
    """Why a publish_async did not end in an ack (None: it did)."""
    if future is None:
        return nats.errors.ConnectionReconnectingError()
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()


async def publish_until_acked(
    js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str], *, timeout_s: float
) -> None:
    """Publish and wait for the stream's ack, trying again while the failure is transient,
    until `timeout_s` has passed. Every try carries the same Nats-Msg-Id, so a try whose ack
    was lost is stored once."""

    async def publish(try_s: float) -> object:
        return await js.publish(subject, payload, headers=headers, timeout=try_s)

    await until_answered(publish, timeout_s)


async def confirm_ack(nc: Client, msg: Msg, *, timeout_s: float) -> None:
    """Ack `msg` as a request and wait for the consumer's confirmation, trying again while
    the failure is transient (no consumer leader for a moment, the connection moving to
    another server) until `timeout_s` has passed. The message may have been acked already
    (by a plain ack that did arrive): the server answers that too, and nothing changes."""

    async def ack(try_s: float) -> object:
        return await nc.request(msg.reply, b"", timeout=try_s)

    await until_answered(ack, timeout_s)


async def until_answered(attempt: Callable[[float], Awaitable[object]], timeout_s: float) -> None:
    """Await `attempt(seconds this try may wait)` until it is answered, trying again while its
    failure is transient (_transient), after a pause that starts at PUBLISH_RETRY_S and
    doubles up to a second, until `timeout_s` has passed; then its failure is raised."""
    deadline = time.monotonic() + timeout_s
    pause = PUBLISH_RETRY_S
    while True:
        left = deadline - time.monotonic()
        try:
            await attempt(max(min(left, PUBLISH_TRY_S), 0.05))
            return
        except (nats.errors.Error, TimeoutError) as exc:
            if not _transient(exc) or deadline - time.monotonic() < pause:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)


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
        common: dict[str, Any] = {
            "storage": StorageType.FILE,
            "num_replicas": c.replicas,
            "duplicate_window": c.duplicate_window_s,
        }
        await ensure_stream(
            self.js,
            StreamConfig(
                name=queue_stream(c, target_id),
                subjects=[queue_subject(c, target_id)],
                retention=RetentionPolicy.WORK_QUEUE,
                max_bytes=c.max_bytes,
                discard=DiscardPolicy.NEW,
                **common,
            ),
            c.start_timeout_s,
        )
        await ensure_stream(
            self.js,
            StreamConfig(
                name=letters_stream(c, target_id),
                subjects=[letters_subject(c, target_id)],
                retention=RetentionPolicy.LIMITS,
                max_bytes=-1,
                discard=DiscardPolicy.NEW,
                **common,
            ),
            c.start_timeout_s,
        )
        stream = queue_stream(c, target_id)
        target = self._targets[target_id]
        target.ack_wait_s = await self._ensure_consumer(stream)
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

    async def _ensure_consumer(self, stream: str) -> float:
        """Create the stream's shared consumer if missing, or bring its ack_wait to the
        config's (otherwise a consumer kept the ack_wait it was made with, whatever
        ack_wait_s said since); the ack_wait the consumer has."""
        c = self.js_config
        consumer = ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=c.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=-1,
            num_replicas=c.replicas,
        )
        try:
            info = await self.js.consumer_info(stream, CONSUMER)
        except NotFoundError:
            with contextlib.suppress(APIError):  # another router created it meanwhile
                await placed(
                    lambda: self.js.add_consumer(stream, consumer),
                    f"consumer {stream}/{CONSUMER}",
                    c.start_timeout_s,
                )
            info = await self.js.consumer_info(stream, CONSUMER)
        else:
            if info.config.ack_wait != c.ack_wait_s:
                try:
                    info = await self.js.add_consumer(stream, consumer)  # an update
                except APIError as exc:
                    log.warning(
                        "stream %s: consumer %s keeps ack_wait %ss: %s",
                        stream,
                        CONSUMER,
                        info.config.ack_wait,
                        exc.description,
                    )
        return float(info.config.ack_wait or c.ack_wait_s)

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
        try:
            received_at = float(headers[RECEIVED_AT])
        except (KeyError, ValueError):
            received_at = None
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
            if not _transient(exc):
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
        with contextlib.suppress(*STREAM_ERRORS, KeyError, ValueError):
            msg = await self.reads.get_msg(queue_stream(self.js_config, target_id), seq)
            return float((msg.headers or {})[RECEIVED_AT])
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


CHAIN_ID_FILE = "chain-id"
# The receipt key's name in the chain bucket (no `.`: never a chain's key).
RECEIPT_KEY = "receipt-key"


def read_chain_id(directory: Path) -> str:
    """This router's chain id: made at its first start (random), kept in storage.path, which
    one daemon holds at a time (its lock), so a router started again goes on with its chains."""
    path = directory / CHAIN_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        found = path.read_text().strip()
        if found and stream_token(found) == found:
            return found
        log.warning("%s holds no chain id (%r): a new one is made", path, found[:40])
    made = uuid.uuid4().hex[:16]
    partial = path.with_name(CHAIN_ID_FILE + ".new")
    with open(partial, "w") as f:
        f.write(made + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return made


def chain_key(chain_id: str, target_id: str) -> str:
    """The key of a chain's record in `<stream>_CHAIN`."""
    return f"{chain_id}.{stream_token(target_id)}"


@dataclass(slots=True)
class _Record:
    """A chain's record as this process last wrote or read it, and the key's revision then
    (0: no record yet)."""

    value: dict[str, Any] | None = None
    revision: int = 0
    taken: bool = False  # this process took the key (heads) or made it
    unsure: bool = False  # a write got no answer: it may have landed; read it back first
    fenced: bool = False  # another process took the key since: no more writes
    announced: bool = False  # the fencing was logged
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


# A record before its first checkpoint (as a SQLite row kept with an ack).
_EMPTY: dict[str, Any] = {"seq": 0, "hash": "", "checkpoint": "", "at": 0.0, "plan": None}


class ChainRecords:
    """router/evidence's chain records in the KV bucket `<stream>_CHAIN`, one key per chain
    and target (`chain_key`), each a JSON object: the head (`seq`, `hash`), the last
    checkpoint and when, the planned object (`plan`), and the process that holds it
    (`holder`: the journal's instance).

    Fencing: the first read takes the key for this process (an update that names it holder,
    on the revision read), and every write is a compare-and-set on the revision this process
    last wrote. A write refused there means another process took the key since: the record
    is then theirs and this process's writes to it are refused from then on
    (ChainFencedError). A write that got no answer (it may have landed) is read back before
    the next: still held by this process, it goes on from the revision found."""

    def __init__(self, journal: JetStreamJournal) -> None:
        self.journal = journal
        self.bucket = f"{journal.js_config.stream}_CHAIN"
        self._kv: KeyValue | None = None
        self._records: dict[str, _Record] = {}

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            js = self.journal.js
            try:
                self._kv = await js.key_value(self.bucket)
            except BucketNotFoundError:
                config = KeyValueConfig(
                    bucket=self.bucket,
                    history=1,
                    replicas=self.journal.js_config.replicas,
                    storage=StorageType.FILE,
                )
                with contextlib.suppress(APIError):  # another router created it meanwhile
                    await placed(
                        lambda: js.create_key_value(config),
                        f"bucket {self.bucket}",
                        self.journal.js_config.start_timeout_s,
                    )
                self._kv = await js.key_value(self.bucket)
        return self._kv

    def _key(self, target_id: str) -> str:
        assert self.journal.chain_id, "the journal is not open"
        return chain_key(self.journal.chain_id, target_id)

    async def heads(
        self, target_ids: Iterable[str]
    ) -> dict[str, tuple[int, bytes, bytes | None, float | None]]:
        """Per target: the head, the last checkpoint (b"" before the first) and when."""
        found: dict[str, tuple[int, bytes, bytes | None, float | None]] = {}
        for target_id in target_ids:
            value = await self._taken(target_id)
            if value is not None and value["seq"]:
                checkpoint = base64.b64decode(value["checkpoint"])
                found[target_id] = (
                    int(value["seq"]),
                    bytes.fromhex(value["hash"]),
                    checkpoint,
                    float(value["at"]),
                )
        return found

    async def plans(
        self, target_ids: Iterable[str]
    ) -> dict[str, tuple[str, str, int, bytes, int, bytes, bytes, bytes, str]]:
        """Per target: the object planned before its last PUT."""
        found = {}
        for target_id in target_ids:
            value = await self._taken(target_id)
            plan = value.get("plan") if value is not None else None
            if plan is not None:
                b = base64.b64decode
                found[target_id] = (
                    str(plan["key"]),
                    str(plan["name"]),
                    int(plan["base_seq"]),
                    b(plan["base_hash"]),
                    int(plan["head_seq"]),
                    b(plan["head_prev"]),
                    b(plan["head_hash"]),
                    b(plan["body"]),
                    str(plan["md5"]),
                )
        return found

    async def keep_head(self, target_id: str, seq: int, head_hash: bytes) -> None:
        """Move the head forward (never back), keeping the last checkpoint."""

        def change(value: dict[str, Any]) -> dict[str, Any] | None:
            if value["seq"] >= seq:
                return None
            return {**value, "seq": seq, "hash": head_hash.hex()}

        await self._write(target_id, change)

    async def save(
        self, target_id: str, seq: int, head_hash: bytes, checkpoint: bytes, at: float
    ) -> None:
        """The head and the checkpoint just written for it."""
        kept = {"seq": seq, "hash": head_hash.hex()}
        kept |= {"checkpoint": base64.b64encode(checkpoint).decode(), "at": at}
        await self._write(target_id, lambda value: {**value, **kept})

    async def save_plan(
        self,
        target_id: str,
        plan: tuple[str, str, int, bytes, int, bytes, bytes, bytes, str] | None,
    ) -> None:
        """Keep (or, None, drop) the object a bucket target is about to PUT."""
        kept = None
        if plan is not None:
            key, name, base_seq, base_hash, head_seq, head_prev, head_hash, body, md5 = plan
            e = base64.b64encode
            kept = {
                "key": key,
                "name": name,
                "base_seq": base_seq,
                "base_hash": e(base_hash).decode(),
                "head_seq": head_seq,
                "head_prev": e(head_prev).decode(),
                "head_hash": e(head_hash).decode(),
                "body": e(body).decode(),
                "md5": md5,
            }

        def change(value: dict[str, Any]) -> dict[str, Any] | None:
            return None if value.get("plan") == kept else {**value, "plan": kept}

        await self._write(target_id, change)

    async def shared_key(self, proposed: bytes) -> bytes:
        """The receipt key every router of the stream issues with (router/evidence/receipt):
        the first one put in the bucket, `proposed` if none is yet."""
        kv = await self._bucket()
        with _unavailable("share", RECEIPT_KEY):
            try:
                await kv.create(RECEIPT_KEY, proposed)
                return proposed
            except KeyWrongLastSequenceError:
                shared = bytes((await kv.get(RECEIPT_KEY)).value or b"")
        if len(shared) != len(proposed):
            raise StorageUnavailableError(
                f"storage.jetstream: {self.bucket} holds a {RECEIPT_KEY} of {len(shared)} bytes, "
                f"not a receipt key of {len(proposed)}"
            )
        return shared

    def where(self, target_id: str) -> dict[str, Any]:
        """For /v1/status: the chain's record (`bucket:key`), and whether this process lost
        it to another one (fenced)."""
        record = self._records.get(target_id)
        return {
            "chain_record": f"{self.bucket}:{self._key(target_id)}",
            "chain_fenced": record is not None and record.fenced,
        }

    def announce_fenced(self, target_id: str) -> bool:
        """True the first time it is asked about a fenced record (log it once)."""
        record = self._records.get(target_id)
        if record is None or not record.fenced or record.announced:
            return False
        record.announced = True
        return True

    async def _taken(self, target_id: str) -> dict[str, Any] | None:
        """The record, taken for this process (once: later calls answer what it holds)."""
        record = self._records.setdefault(target_id, _Record())
        async with record.lock:
            if not record.taken:
                await self._take(target_id, record)
            return record.value

    async def _take(self, target_id: str, record: _Record) -> None:
        """Read the record and name this process its holder; the caller holds its lock."""
        kv = await self._bucket()
        key = self._key(target_id)
        with _unavailable("read", key):
            while True:
                try:
                    entry = await kv.get(key)
                except KeyNotFoundError:
                    record.value, record.revision = None, 0
                    break
                value = {**_EMPTY, **orjson.loads(entry.value or b"{}")}
                try:
                    revision = await kv.update(
                        key, _dump(value, self.journal.instance), last=entry.revision
                    )
                except KeyWrongLastSequenceError:
                    continue  # another process wrote it meanwhile: read it again
                record.value, record.revision = value, revision
                break
        record.taken = True
        record.unsure = False

    async def _write(
        self, target_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> None:
        """A compare-and-set of the record on the revision this process last wrote."""
        record = self._records.setdefault(target_id, _Record())
        async with record.lock:
            if record.fenced:
                raise ChainFencedError(self._fenced(target_id))
            if not record.taken:
                await self._take(target_id, record)
            elif record.unsure:
                await self._read_back(target_id, record)
            value = change(record.value or _EMPTY)
            if value is None:
                return
            kv = await self._bucket()
            key = self._key(target_id)
            data = _dump(value, self.journal.instance)
            try:
                if record.revision == 0:
                    revision = await kv.create(key, data)
                else:
                    revision = await kv.update(key, data, last=record.revision)
            except KeyWrongLastSequenceError as exc:
                record.fenced = True
                raise ChainFencedError(self._fenced(target_id)) from exc
            except STREAM_ERRORS as exc:
                record.unsure = True
                raise JournalUnavailableError(f"chain record {key}: no answer: {exc!r}") from exc
            record.value, record.revision = value, revision

    async def _read_back(self, target_id: str, record: _Record) -> None:
        """After a write without an answer: the record as it is, if this process still holds
        it (its write landed or not); fenced if another one took it."""
        kv = await self._bucket()
        key = self._key(target_id)
        with _unavailable("read", key):
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                record.value, record.revision = None, 0
            else:
                found = orjson.loads(entry.value or b"{}")
                if found.get("holder") != self.journal.instance:
                    record.fenced = True
                    raise ChainFencedError(self._fenced(target_id))
                record.value, record.revision = {**_EMPTY, **found}, entry.revision or 0
        record.unsure = False

    def _fenced(self, target_id: str) -> str:
        return (
            f"chain {self.journal.chain_id}: its record {self._key(target_id)} in "
            f"{self.bucket} was taken by another process (the same chain id, "
            f"{self.journal.directory / CHAIN_ID_FILE}, started elsewhere); this one no longer "
            "writes it"
        )


def _dump(value: Mapping[str, Any], holder: str) -> bytes:
    return orjson.dumps({**value, "holder": holder})


@contextlib.contextmanager
def _unavailable(what: str, key: str) -> Iterator[None]:
    """NATS away while reading a chain record: the journal's JournalUnavailableError."""
    try:
        yield
    except STREAM_ERRORS as exc:
        if isinstance(exc, KeyWrongLastSequenceError):
            raise
        raise JournalUnavailableError(f"chain record {key}: cannot {what}: {exc!r}") from exc


CONFIG_KEY = "config"
METADATA_KEY = "metadata"  # the management API's timestamps and versions (server.api.Metadata)


class SharedConfig:
    """The config every router of one stream runs: a KV bucket `<stream>_CONFIG` holding the
    config's data (references unresolved, as the management API keeps it) and who put it,
    and beside it the management API's metadata. The sections that belong to one router
    (LOCAL_SECTIONS) are the router's own and are neither shared nor taken."""

    LOCAL_SECTIONS = ("server", "storage")

    def __init__(self, journal: JetStreamJournal) -> None:
        self.journal = journal
        self.bucket = f"{journal.js_config.stream}_CONFIG"
        self.revision = 0  # the last config revision this router applied or put
        self.metadata_revision = 0  # the same for the metadata
        self.metadata: dict[str, Any] | None = None  # what `open` found
        self.failures = 0  # shared configs that raised while being applied
        self._kv: KeyValue | None = None

    @classmethod
    def shareable(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in data.items() if k not in cls.LOCAL_SECTIONS}

    @classmethod
    def merged(cls, shared: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
        """The shared config with this router's own local sections."""
        return {
            **cls.shareable(shared),
            **{k: own[k] for k in cls.LOCAL_SECTIONS if k in own},
        }

    async def open(self) -> dict[str, Any] | None:
        """The bucket (created if missing) and the config in it, if any."""
        js = self.journal.js
        try:
            self._kv = await js.key_value(self.bucket)
        except BucketNotFoundError:
            config = KeyValueConfig(
                bucket=self.bucket,
                history=10,
                replicas=self.journal.js_config.replicas,
                storage=StorageType.FILE,
            )
            self._kv = await placed(
                lambda: js.create_key_value(config),
                f"bucket {self.bucket}",
                self.journal.js_config.start_timeout_s,
            )
        try:
            entry = await self._kv.get(METADATA_KEY)
            self.metadata_revision = entry.revision or 0
            self.metadata = dict(orjson.loads(entry.value or b"{}")["metadata"])
        except KeyNotFoundError:
            self.metadata = None
        try:
            entry = await self._kv.get(CONFIG_KEY)
        except KeyNotFoundError:
            return None
        self.revision = entry.revision or 0
        return dict(orjson.loads(entry.value or b"{}")["data"])

    async def put(self, data: Mapping[str, Any]) -> None:
        """Share this router's config (its shareable sections) with every router."""
        assert self._kv is not None
        value = orjson.dumps({"origin": self.journal.instance, "data": self.shareable(data)})
        self.revision = await self._kv.put(CONFIG_KEY, value)

    async def share(self, data: Mapping[str, Any]) -> None:
        """`put`, for a change already applied here: NATS away is logged, not raised (the
        change stands on this router; the others get the next one, or this one on restart)."""
        try:
            await self.put(data)
        except STREAM_ERRORS as exc:
            log.error("the config change applies here but could not be shared: %s", exc)

    async def share_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Share the management API's metadata; NATS away is logged, as in `share`."""
        assert self._kv is not None
        value = orjson.dumps({"origin": self.journal.instance, "metadata": metadata})
        try:
            self.metadata_revision = await self._kv.put(METADATA_KEY, value)
        except STREAM_ERRORS as exc:
            log.error("the API metadata could not be shared: %s", exc)

    async def watch(
        self,
        apply: Callable[[dict[str, Any]], Awaitable[None]],
        adopt: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        """Apply every config, and adopt all metadata, another router puts, newest first seen,
        until cancelled; one that fails is logged, and the next one is awaited."""
        assert self._kv is not None
        watcher = await self._kv.watch(">")
        try:
            async for entry in watcher:
                if entry is None or entry.value is None:
                    continue
                revision = entry.revision or 0
                if entry.key == CONFIG_KEY and revision > self.revision:
                    self.revision = revision
                    what, take, field = "config", apply, "data"
                elif entry.key == METADATA_KEY and revision > self.metadata_revision:
                    self.metadata_revision = revision
                    what, take, field = "API metadata", adopt, "metadata"
                else:
                    continue
                document = orjson.loads(entry.value)
                if document.get("origin") == self.journal.instance:
                    continue
                try:
                    await take(dict(document[field]))
                except Exception:  # the task boundary: the next one is still awaited
                    self.failures += 1
                    log.exception("the shared %s (revision %d) failed to apply", what, revision)
        finally:
            with contextlib.suppress(*STREAM_ERRORS):
                await watcher.stop()  # type: ignore[no-untyped-call]


# A redriven event is published again under its id plus this and the letter's sequence, so
# that the stream's de-duplication (which remembers the id) does not drop it.
REDRIVE_SEP = "#redrive-"


class StreamDeadLetters(DeadLetters):
    """Dead letters in a stream per target, shared by every router: `write` publishes one
    message per letter (Nats-Msg-Id = the event's sequence in the target's stream, so a batch
    dead-lettered twice, by a router that died before its ack and by the next, is one letter);
    `take` reads them for a redrive and deletes those put back on the journal."""

    def __init__(self, journal: JetStreamJournal, directory: Path) -> None:
        super().__init__(directory)
        self.journal = journal
        # Per dead-letter stream: its letters summed up (GET /v1/deadletters), and the last
        # sequence they include.
        self._tallies: dict[str, tuple[int, LetterTally]] = {}

    async def write(self, target_id: str, entries: Sequence[Entry], failure: Failure) -> None:
        config = self.journal.js_config
        subject = letters_subject(config, target_id)
        js = self.journal.js
        results = await asyncio.gather(
            *(
                publish_until_acked(
                    js,
                    subject,
                    letter_bytes(target_id, entry, failure),
                    {"Nats-Msg-Id": str(entry.seq)},
                    timeout_s=config.publish_timeout_s,
                )
                for entry in entries
            ),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            # OSError: delivery keeps the batch pending and tries again, as for a full disk.
            raise OSError(f"cannot write dead letters to JetStream: {failed[0]!r}")
        key = (target_id, failure.reason)
        self.written[key] = self.written.get(key, 0) + len(entries)

    async def every_target(self) -> dict[str, list[Letter]]:
        """Every target's letters from its dead-letter stream (a removed target's too),
        whichever router wrote them: what `find` searches."""
        try:
            return await letters_by_target(self.journal.js, self.journal.js_config)
        except STREAM_ERRORS as exc:
            raise StorageUnavailableError(f"JetStream did not answer: {exc!r}") from exc

    async def summary(self) -> dict[str, Any]:
        """GET /v1/deadletters from the dead-letter streams (a removed target's too), whichever
        router wrote them: per target, the count from the stream's state; the reasons and the
        time span from its letters, each read once: a request reads the letters written since
        the one before (all of them again only after some were deleted: a redrive). Every
        read waits READ_TRY_S: NATS away is StorageUnavailableError (503), at once."""
        js = self.journal.reads
        prefix = f"{self.journal.js_config.stream}_DLQ_"
        targets: dict[str, Any] = {}
        try:
            streams = [
                (info.config.name, info.state)
                for info in await js.streams_info()
                if info.config.name is not None and info.config.name.startswith(prefix)
            ]
            for name, state in streams:
                if not state.messages:
                    self._tallies.pop(name, None)
                    continue
                tally = await self._tally(js, name, state)
                targets[target_of_token(name.removeprefix(prefix))] = tally.row(state.messages)
        except STREAM_ERRORS as exc:
            raise StorageUnavailableError(f"JetStream did not answer: {exc!r}") from exc
        return {"targets": dict(sorted(targets.items()))}

    async def _tally(self, js: JetStreamContext, name: str, state: StreamState) -> LetterTally:
        """The stream's letters up to `state.last_seq` summed up: the last tally and the
        letters written since, or, if that does not give the stream's count (letters were
        deleted), all of them read again."""
        last_seq, tally = self._tallies.get(name, (0, LetterTally()))
        if last_seq > state.last_seq:  # the stream was made again
            last_seq, tally = 0, LetterTally()
        async for _, letter in stream_letters(js, name, last_seq + 1, state.last_seq):
            tally.add(letter)
        if tally.letters != state.messages:
            tally = LetterTally()
            async for _, letter in stream_letters(js, name, state.first_seq, state.last_seq):
                tally.add(letter)
        self._tallies[name] = (state.last_seq, tally)
        return tally

    async def page(
        self, target_id: str, wanted: LetterFilter, offset: int, limit: int
    ) -> dict[str, Any]:
        """A page of one target's letters from its dead-letter stream, read a letter at a time
        and kept a page at a time, as from a file. Unfiltered, the total is the stream's
        count and the page is read from its sequence (from the first letter, skipping
        `offset`, where letters were deleted in between); filtered, every letter is read to
        count the matches, as a file is. The id comes from a URL: it is looked for among the
        streams' names before it becomes a subject, as a subject past the server's line
        limit has it close the connection."""
        name = letters_stream(self.journal.js_config, target_id)
        js = self.journal.reads
        try:
            states = {info.config.name: info.state for info in await js.streams_info()}
            state = states.get(name)
            if state is None or not state.messages:
                return page_answer([], offset, limit, 0)
            if wanted.reason is None and wanted.since is None:
                return await self._plain_page(js, name, state, offset, limit)
            found = LetterPage(wanted, offset, limit)
            async for _, letter in stream_letters(js, name, state.first_seq, state.last_seq):
                found.add(letter)
            return found.answer()
        except STREAM_ERRORS as exc:
            raise StorageUnavailableError(f"JetStream did not answer: {exc!r}") from exc

    async def _plain_page(
        self, js: JetStreamContext, name: str, state: StreamState, offset: int, limit: int
    ) -> dict[str, Any]:
        """`limit` letters from the `offset`th, of every letter in the stream."""
        if offset >= state.messages:
            return page_answer([], offset, limit, state.messages)
        skip = offset
        first = state.first_seq
        if not state.num_deleted:  # no gaps: the offset-th letter's sequence is known
            first, skip = state.first_seq + offset, 0
        kept = [
            letter
            async for _, letter in stream_letters(
                js, name, first, state.last_seq, limit=skip + limit
            )
        ]
        return page_answer(kept[skip:], offset, limit, state.messages)

    async def letters(self, target_id: str) -> list[tuple[int, Letter]]:
        """Every letter of the target, with its sequence in the dead-letter stream."""
        return await read_stream_letters(
            self.journal.js, letters_stream(self.journal.js_config, target_id)
        )

    async def find(self, event_id: str) -> dict[str, dict[str, Any]]:
        """Receipts' lookup: per target, the event's dead letter and its reason, from every
        dead-letter stream of the journal (whichever router wrote it; a removed target's
        too). A scan of the letters: an auditor's question, not the hot path."""
        found: dict[str, dict[str, Any]] = {}
        for target_id, letters in (await self.every_target()).items():
            for letter in letters:
                event = letter.get("event")
                if isinstance(event, dict) and event.get("id") == event_id:
                    found[target_id] = {
                        "state": "dead_lettered",
                        "reason": letter.get("reason"),
                        "message": letter.get("message"),
                        "seq": None,  # letters take no places on JetStream
                    }
                    break
        return found

    @asynccontextmanager
    async def take(
        self,
        target_id: str,
        wanted: Callable[[Letter], bool],
        refuse: Callable[[Letter], str | None] = lambda _: None,
    ) -> AsyncIterator[Taken]:
        async with self._lock(target_id):
            stored = await self.letters(target_id)
            taken = Taken([])
            seqs: dict[int, int] = {}
            for seq, letter in stored:
                if not wanted(letter):
                    continue
                why = unredrivable(letter) or refuse(letter)
                if why is None:
                    seqs[id(letter)] = seq
                    # The redriven event is published under a message id of its own.
                    event_id = str(letter["event"].get("id"))
                    self.journal.redriving[event_id] = f"{event_id}{REDRIVE_SEP}{seq}"
                    taken.letters.append(letter)
                else:
                    taken.skipped[why] = taken.skipped.get(why, 0) + 1
            try:
                yield taken
            finally:
                for letter in taken.letters:
                    self.journal.redriving.pop(str(letter["event"].get("id")), None)
                stream = letters_stream(self.journal.js_config, target_id)
                for letter in taken.letters[: taken.done]:
                    with contextlib.suppress(*STREAM_ERRORS):
                        await self.journal.js.delete_msg(stream, seqs[id(letter)])

    def close(self) -> None:
        return None


async def read_stream_letters(js: JetStreamContext, stream: str) -> list[tuple[int, Letter]]:
    """Every message of a dead-letter stream, decoded, in order."""
    try:
        state = (await js.stream_info(stream)).state
    except NotFoundError:
        return []
    if not state.messages:
        return []
    return [found async for found in stream_letters(js, stream, state.first_seq, state.last_seq)]


async def stream_letters(
    js: JetStreamContext, stream: str, first: int, last: int, *, limit: int | None = None
) -> AsyncIterator[tuple[int, Letter]]:
    """The letters of a dead-letter stream from sequence `first` to `last` (at most `limit`),
    decoded, with their sequences, skipping the deleted ones. An ephemeral consumer of its own
    (no acks, in memory) fetches them LETTERS_PER_FETCH at a time: read one request per letter,
    a filtered page of a 5,000-letter stream took 2.2 s, a 100,000-letter one minutes. The
    generator ends by itself at `last` or `limit`, so its consumer is deleted at once (a
    caller that stops early leaves it to LETTER_READER_IDLE_S)."""
    wanted = last - first + 1 if limit is None else min(limit, last - first + 1)
    if wanted <= 0:
        return
    info = await js.add_consumer(
        stream,
        ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=first,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=LETTER_READER_IDLE_S,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    assert info.name is not None
    try:
        pending = info.num_pending or 0
        sub = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
        try:
            while pending and wanted:
                try:
                    msgs = await sub.fetch(min(LETTERS_PER_FETCH, pending, wanted), READ_TRY_S)
                except nats.errors.TimeoutError:
                    # Nothing came: the rest was deleted meanwhile (a redrive), or NATS is
                    # away, in which case asking the consumer raises for the caller.
                    if not (await sub.consumer_info()).num_pending:
                        return
                    raise
                for msg in msgs:
                    seq, pending = msg.metadata.sequence.stream, msg.metadata.num_pending
                    if seq > last:
                        return
                    try:
                        letter = orjson.loads(msg.data or b"")
                    except orjson.JSONDecodeError:
                        letter = {"reason": "unreadable_line", "line": seq}
                    yield seq, letter
                    wanted -= 1
                    if seq == last or not wanted:
                        return
        finally:
            await sub.unsubscribe()
    finally:
        with contextlib.suppress(*STREAM_ERRORS):
            await js.delete_consumer(stream, info.name)


def target_of_token(token: str) -> str:
    """stream_token's inverse: the target id a stream name's last token stands for."""
    return re.sub(r"_([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), token)


async def all_letters(config: JetStreamConfig) -> dict[str, list[Letter]]:
    """Every target's dead letters (`event-router dlq list | show`), by target id in id order:
    each dead-letter stream of `config.stream`, also a removed target's."""
    nc = await connect(config, name="event-router dlq")
    try:
        return await letters_by_target(nc.jetstream(timeout=config.publish_timeout_s), config)
    finally:
        await nc.close()


async def letters_by_target(
    js: JetStreamContext, config: JetStreamConfig
) -> dict[str, list[Letter]]:
    """Every dead-letter stream of `config.stream`, by target id in id order."""
    prefix = f"{config.stream}_DLQ_"
    names = [info.config.name for info in await js.streams_info()]
    found = {
        target_of_token(name.removeprefix(prefix)): [
            letter for _, letter in await read_stream_letters(js, name)
        ]
        for name in names
        if name is not None and name.startswith(prefix)
    }
    return dict(sorted(found.items()))
