"""What the event_streams target changes in aiokafka 0.14, and why: each a defect met
against a real Kafka broker (tests/integration/test_event_streams*.py). aiokafka has no
setting for any of them, so each reaches into one of its internals and fails loudly at start
when a version no longer has it, rather than bring the defect back silently."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import client as aiokafka_client
from aiokafka import conn as aiokafka_conn
from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    IllegalSaslStateError,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownProducerId,
    UnsupportedSaslMechanismError,
)

from router.targets._net import AddressBound, AddressRefusedError, bound_address

__all__ = [
    "AIOKafkaConsumer",
    "AIOKafkaProducer",
    "AbstractTokenProvider",
    "KafkaError",
    "ProducerClosed",
    "TopicPartition",
    "create_conn",
]

log = logging.getLogger(__name__)

# How the event_streams target classes aiokafka's errors (router/targets/event_streams.py
# imports this module, and so aiokafka, with its first target).
# Refused for every message of the batch: retrying with the same credentials cannot help.
PERMANENT_FOR_BATCH: Final = (
    AuthenticationFailedError,
    SaslAuthenticationFailed,
    IllegalSaslStateError,
    UnsupportedSaslMechanismError,
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    InvalidTopicError,
)
# The producer's sequence numbers no longer match the broker's, for good (a batch Kafka refused
# for good took its numbers, and every later batch is then out of order), or the broker no
# longer knows the producer. Kafka refused these messages: retryable, with a new producer.
PRODUCER_BROKEN: Final = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    ProducerFenced,
)
RETRYABLE: Final = (*PRODUCER_BROKEN, KafkaTimeoutError, ProducerClosed, TimeoutError, OSError)
# Refused for one message: the others of its batch may go.
TOO_LARGE: Final = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)
PERMANENT_FOR_EVENT: Final = (*TOO_LARGE, CorruptRecordException)

METADATA_BACKOFF_S: Final = 0.1
METADATA_BACKOFF_MAX_S: Final = 2.0
"""How long aiokafka waits after a failed metadata update before the next: doubling from the
first to the second (Kafka's own client: reconnect.backoff.ms 50, reconnect.backoff.max.ms
1000). A broker back after an outage is seen within METADATA_BACKOFF_MAX_S."""


class _OAuthBearerAuthenticator(aiokafka_conn.OAuthAuthenticator):  # type: ignore[misc]
    """aiokafka 0.14 takes whatever the broker answers to the token for success. A broker that
    refuses it answers with an RFC 7628 error (a JSON challenge, `{"status":"invalid_token"}`)
    and waits for the client's %x01; aiokafka instead sends its next request (Metadata), which
    the broker answers with an error response aiokafka reads as "no brokers", and the
    producer then loops for ever on an empty cluster, never saying why. This answers the
    challenge with %x01, as Kafka's own client does, so the broker ends the exchange with its
    authentication failure (SaslAuthenticationFailed with its reason)."""

    def __init__(self, *, sasl_oauth_token_provider: AbstractTokenProvider) -> None:
        super().__init__(sasl_oauth_token_provider=sasl_oauth_token_provider)
        self._challenge: bytes | None = None

    async def step(self, payload: bytes | None) -> tuple[bytes, bool] | None:
        if not self._token_sent:
            result: tuple[bytes, bool] = await super().step(payload)
            return result
        if payload and self._challenge is None:
            self._challenge = bytes(payload)
            return b"\x01", True
        if self._challenge is not None:  # a broker that did not end it: refused all the same
            why = self._challenge.decode("utf-8", "replace")
            raise SaslAuthenticationFailed(f"the broker refused the token: {why}")
        return None


def check_oauth_answers() -> None:
    """Make aiokafka's connections read the broker's answer to an OAUTHBEARER token (see
    _OAuthBearerAuthenticator). aiokafka has no setting for the authenticator; a version
    without the method fails here, loudly, rather than loop silently on a refused token."""
    connection = aiokafka_conn.AIOKafkaConnection
    if not callable(getattr(connection, "authenticator_oauth", None)):
        raise RuntimeError(
            "aiokafka's AIOKafkaConnection no longer has authenticator_oauth; the event_streams "
            "target cannot check the broker's answer to its token (router/targets/_aiokafka.py)"
        )

    def authenticator_oauth(self: Any) -> _OAuthBearerAuthenticator:
        return _OAuthBearerAuthenticator(sasl_oauth_token_provider=self._sasl_oauth_token_provider)

    connection.authenticator_oauth = authenticator_oauth


def keep_batches(producer: AIOKafkaProducer) -> None:
    """Never let the producer give a batch up while it waits for a partition leader.

    aiokafka fails a batch that waited request_timeout_ms for a leader (its accumulator's
    batch time-to-live, checked in `drain_by_nodes`), idempotent or not. A broker shutting
    down answers "no leader" for its partitions, so a short outage does it: a batch sent
    before, whose answer was lost, fails although Kafka stored it (sent again, it would be
    stored twice), and one not sent yet leaves a hole in the sequence numbers. Only the
    producer's own retries send a batch again safely, so batches wait as long as it takes;
    how long a send waits for them is `timeout_s`, after which the worker retries and waits
    again. aiokafka has no setting for this; a version without the attribute fails here,
    loudly, rather than bring the duplicates back."""
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is None or not hasattr(accumulator, "_batch_ttl"):
        raise RuntimeError(
            "aiokafka's MessageAccumulator no longer has _batch_ttl; the event_streams target "
            "cannot keep its batches from expiring (see router/targets/_aiokafka.py)"
        )
    accumulator._batch_ttl = math.inf


def _client_method(client: Any, name: str, purpose: str) -> Any:
    """AIOKafkaClient's private method `name`, which a workaround here replaces; a version
    without it fails at start, loudly, rather than silently losing the workaround."""
    method = getattr(client, name, None)
    if method is None:
        raise RuntimeError(
            f"aiokafka's AIOKafkaClient no longer has {name}; the event_streams target "
            f"cannot {purpose} (see router/targets/_aiokafka.py)"
        )
    return method


@dataclass(slots=True)
class Connections:
    """One target's aiokafka client as `create_conn` sees it: whose it is, its bound (None:
    it connects where aiokafka would) and why its last connection failed (aiokafka logs that
    and tries again; a producer start that never ends names it, see event_streams.py)."""

    target_id: str
    bound: AddressBound | None
    failure: str | None = None


# The client that opens a connection now: set around its bootstrap and _get_conn
# (`watch_connections`), in the task that connects, and read by `create_conn`. Unset, a
# connection is aiokafka's own.
_CONNECTING: ContextVar[Connections | None] = ContextVar("event_router_kafka", default=None)
_aiokafka_create_conn: Final = aiokafka_conn.create_conn


@contextlib.contextmanager
def connecting(connections: Connections) -> Iterator[None]:
    """Connections `create_conn` opens in this block are `connections`'."""
    token = _CONNECTING.set(connections)
    try:
        yield
    finally:
        _CONNECTING.reset(token)


class _PinnedLoop:
    """The event loop as one aiokafka connection sees it while it connects, except that its
    socket goes to `address`, the one the connection's check resolved, while TLS still names
    the broker's host (SNI and the certificate's name check), as asyncio does for a name."""

    def __init__(self, loop: asyncio.AbstractEventLoop, address: str) -> None:
        self.loop, self.address, self.used = loop, address, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)

    async def create_connection(
        self, factory: Any, host: str, port: int, *, ssl: Any = None, **kwargs: Any
    ) -> Any:
        self.used = True
        return await self.loop.create_connection(
            factory, self.address, port, ssl=ssl, server_hostname=host if ssl else None, **kwargs
        )


async def create_conn(host: str, port: int, **settings: Any) -> Any:
    """aiokafka's create_conn, which its clients call for every connection (`pin_connections`);
    inside `connecting`, a failure is remembered for the target.

    For a target the management API made (a bound), the broker's name is looked up once,
    every address checked against the bound, and the connection opened to the address that
    passed: aiokafka would look the name up again itself in loop.create_connection, and a
    name rebinding in between would take it to an address no check saw (with the SASL
    credentials). A refused broker is one it cannot connect to: an OSError, which aiokafka
    logs and tries again later, as for a broker that is down."""
    connections = _CONNECTING.get()
    if connections is None:
        return await _aiokafka_create_conn(host, port, **settings)
    try:
        if connections.bound is None:
            conn = await _aiokafka_create_conn(host, port, **settings)
        else:
            conn = await _pinned_conn(host, port, connections.bound, settings)
    except (OSError, KafkaError, TimeoutError) as exc:
        connections.failure = f"{host}:{port}: {type(exc).__name__}: {exc}"
        raise
    connections.failure = None
    return conn


async def _pinned_conn(host: str, port: int, bound: AddressBound, settings: Any) -> Any:
    """A connection to the one address of `host` that `bound` checked (see create_conn)."""
    address = await bound_address(host, port, bound, every_host=True)
    conn = aiokafka_conn.AIOKafkaConnection(host, port, **settings)
    loop = _PinnedLoop(conn._loop, address)
    conn._loop = loop
    try:
        await conn.connect()
    finally:
        conn._loop = loop.loop  # the streams made while connecting keep the pinned view
    if not loop.used:  # an aiokafka that connects otherwise: refused, loudly
        conn.close()
        raise AddressRefusedError(
            "aiokafka's AIOKafkaConnection.connect no longer opens its socket through its "
            "loop's create_connection; the event_streams target cannot connect to the address "
            "it checked (see router/targets/_aiokafka.py)"
        )
    return conn


def pin_connections() -> None:
    """Have aiokafka's clients open their connections through `create_conn` (which changes
    nothing for a client outside `connecting`). aiokafka has no setting for where a
    connection goes; a version whose client no longer calls create_conn, or whose connection
    no longer connects through its loop, fails here, loudly, rather than reopen the window."""
    names = aiokafka_conn.AIOKafkaConnection.connect.__code__.co_names
    if getattr(aiokafka_client, "create_conn", None) not in (
        _aiokafka_create_conn,
        create_conn,
    ) or ("_loop" not in names or "create_connection" not in names):
        raise RuntimeError(
            "aiokafka's client no longer connects through aiokafka.conn.create_conn and the "
            "connection's loop; the event_streams target cannot connect to the address it "
            "checked (see router/targets/_aiokafka.py)"
        )
    aiokafka_client.create_conn = create_conn


def watch_connections(producer: AIOKafkaProducer, connections: Connections) -> None:
    """Open every connection of the producer's client, to the bootstrap brokers and to those
    their metadata names, through `create_conn` as `connections`': a target the management
    API made reaches only the addresses its bound lets it (router/targets/_net.AddressBound),
    each the one its check resolved, and each time a connection is opened; every target
    keeps why its last connection failed. aiokafka has no setting for this; a version
    without `bootstrap` or `_get_conn` fails here, loudly."""
    client = producer.client
    bootstrap = _client_method(client, "bootstrap", "check where it connects")
    get_conn = _client_method(client, "_get_conn", "check where it connects")

    async def watched_bootstrap() -> Any:
        with connecting(connections):
            return await bootstrap()

    async def watched(node_id: Any, **kwargs: Any) -> Any:
        with connecting(connections):
            return await get_conn(node_id, **kwargs)

    client.bootstrap = watched_bootstrap
    client._get_conn = watched


def pace_metadata_updates(producer: AIOKafkaProducer) -> None:
    """Back off after a failed metadata update, as Kafka's own client does between reconnects.

    aiokafka 0.14 has none: with the broker down, its sender asks for metadata, the update
    fails at once (connection refused), and it asks again at once, so one outage of a few
    seconds logged ~3,600 "Unable connect" and as many "Unable to update metadata" ERROR lines
    and kept a core busy. Its retry_backoff_ms paces produce retries, not this loop. A version
    without the method fails here, loudly."""
    client = producer.client
    update = _client_method(client, "_metadata_update", "pace its metadata updates")
    failures = 0

    async def paced(cluster_metadata: Any, topics: Any) -> bool:
        nonlocal failures
        updated = bool(await update(cluster_metadata, topics))
        if updated:
            failures = 0
        else:
            failures += 1
            await asyncio.sleep(
                min(METADATA_BACKOFF_MAX_S, METADATA_BACKOFF_S * 2 ** min(failures - 1, 16))
            )
        return updated

    client._metadata_update = paced


async def stop_producer(producer: AIOKafkaProducer, timeout_s: float, target_id: str) -> None:
    """Flush for at most `timeout_s`, then stop: an idempotent producer retries for ever, so
    its sender task is cancelled first when the flush does not end (aiokafka's stop() would
    wait for it)."""
    try:
        await asyncio.wait_for(producer.flush(), timeout_s)
    except (KafkaError, TimeoutError) as exc:
        log.warning(
            "target %s: closing a producer with messages unacknowledged (%r)", target_id, exc
        )
        sender = getattr(producer, "_sender", None)
        task = getattr(sender, "sender_task", None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, KafkaError):
                await task
    await producer.stop()


# At import, that is, as the first event_streams target is made: fails then, loudly.
check_oauth_answers()
pin_connections()
