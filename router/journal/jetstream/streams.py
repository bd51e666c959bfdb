"""What every part of the JetStream journal shares: the names of its streams and subjects, the
connection, setting up the streams and the consumer (waiting for a cluster that cannot place
them yet), and publishing until JetStream acknowledged.

A target's backlog is the work-queue stream `<stream>_<target>` (subject `<stream>.q.<target>`),
its dead letters the stream `<stream>_DLQ_<target>` (subject `<stream>.dlq.<target>`), both with
`storage.jetstream.replicas` replicas; a target id becomes one token of those names
(stream_token; target_of_token reads it back). Every batch a router accepts is also published on
the core NATS subject `<stream>.tail`. The journal (journal.py), its dead letters (letters.py),
its KV buckets (chains.py, sharedconfig.py) and `event-router dlq` (all_letters) use these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
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
)
from nats.js.errors import APIError, BucketNotFoundError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue

from router.config import JetStreamConfig
from router.errors import StorageUnavailableError

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
# One publish try waits this long for its ack; tries go on until publish_timeout_s, after a
# pause that starts here and doubles.
PUBLISH_TRY_S = 2.0
PUBLISH_RETRY_S = 0.05
# How long a read (the books, the dead letters) waits for its answer. Not publish_timeout_s:
# a request whose answer was lost (its server died on the way) waited all of that, and the
# books of a router connected to a killed node stood still for 24 of publish_timeout_s's 30 s.
READ_TRY_S = 2.0
STREAM_ERRORS = (nats.errors.Error, TimeoutError, OSError)


def stream_token(target_id: str) -> str:
    """A target id as one token of a stream name and a subject: target ids may hold `.` and
    `:`, which neither allows; every character but letters, digits and `-` becomes `_XX`."""
    return re.sub(r"[^A-Za-z0-9-]", lambda m: f"_{ord(m.group()):02X}", target_id)


def target_of_token(token: str) -> str:
    """stream_token's inverse: the target id a stream name's last token stands for."""
    return re.sub(r"_([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), token)


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


async def open_bucket(
    js: JetStreamContext, config: JetStreamConfig, bucket: str, *, history: int
) -> KeyValue:
    """The KV bucket, created if missing (on file, with the journal's replicas, waiting for
    the cluster to place it: see `placed`); one another router created meanwhile is opened."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        pass
    wanted = KeyValueConfig(
        bucket=bucket, history=history, replicas=config.replicas, storage=StorageType.FILE
    )
    with contextlib.suppress(APIError):  # another router created it meanwhile
        return await placed(
            lambda: js.create_key_value(wanted), f"bucket {bucket}", config.start_timeout_s
        )
    return await js.key_value(bucket)


async def ensure_target_streams(
    js: JetStreamContext, config: JetStreamConfig, target_id: str
) -> None:
    """The target's stream and its dead-letter stream (see ensure_stream)."""
    for name, subject, retention, max_bytes in (
        (
            queue_stream(config, target_id),
            queue_subject(config, target_id),
            RetentionPolicy.WORK_QUEUE,
            config.max_bytes,
        ),
        (
            letters_stream(config, target_id),
            letters_subject(config, target_id),
            RetentionPolicy.LIMITS,
            -1,
        ),
    ):
        wanted = StreamConfig(
            name=name,
            subjects=[subject],
            retention=retention,
            max_bytes=max_bytes,
            discard=DiscardPolicy.NEW,
            storage=StorageType.FILE,
            num_replicas=config.replicas,
            duplicate_window=config.duplicate_window_s,
        )
        await ensure_stream(js, wanted, config.start_timeout_s)


async def ensure_consumer(js: JetStreamContext, config: JetStreamConfig, stream: str) -> float:
    """Create the stream's shared consumer if missing, or bring its ack_wait to the
    config's (otherwise a consumer kept the ack_wait it was made with, whatever
    ack_wait_s said since); the ack_wait the consumer has."""
    consumer = ConsumerConfig(
        durable_name=CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=config.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=-1,
        num_replicas=config.replicas,
    )
    try:
        info = await js.consumer_info(stream, CONSUMER)
    except NotFoundError:
        with contextlib.suppress(APIError):  # another router created it meanwhile
            await placed(
                lambda: js.add_consumer(stream, consumer),
                f"consumer {stream}/{CONSUMER}",
                config.start_timeout_s,
            )
        info = await js.consumer_info(stream, CONSUMER)
    else:
        if info.config.ack_wait != config.ack_wait_s:
            try:
                info = await js.add_consumer(stream, consumer)  # an update
            except APIError as exc:
                log.warning(
                    "stream %s: consumer %s keeps ack_wait %ss: %s",
                    stream,
                    CONSUMER,
                    info.config.ack_wait,
                    exc.description,
                )
    return float(info.config.ack_wait or config.ack_wait_s)


def transient(exc: BaseException) -> bool:
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
    failure is transient (`transient`), after a pause that starts at PUBLISH_RETRY_S and
    doubles up to a second, until `timeout_s` has passed; then its failure is raised."""
    deadline = time.monotonic() + timeout_s
    pause = PUBLISH_RETRY_S
    while True:
        left = deadline - time.monotonic()
        try:
            await attempt(max(min(left, PUBLISH_TRY_S), 0.05))
            return
        except (nats.errors.Error, TimeoutError) as exc:
            if not transient(exc) or deadline - time.monotonic() < pause:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)
