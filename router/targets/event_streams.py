"""The `event_streams` target: IBM Event Streams, which is Apache Kafka, through aiokafka.

One Kafka message per event: the key is the event id, the value the event's JSON as it was
stored, and the headers are atracker's own (`type`=`audit`, `account` from the logSourceCRN's
`a/<account>` scope, `region` the target's region, `location` the event's location). IBM
Event Streams takes SASL PLAIN over TLS with the user `token` and an API key as the password;
for other Kafka clusters `tls` may be off or trust another CA, and `sasl` may be SCRAM or none.

With the daemon's own identity as a trusted profile (top-level `iam`, for a target with
service_to_service_enabled or no api_key) there is no key to send: the client authenticates
with SASL OAUTHBEARER, the bearer being an IAM access token for the profile (router.iam: the
compute-resource token exchanged, cached and refreshed before it expires), as Event Streams
takes IAM tokens. `sasl.mechanism: oauthbearer` asks for the same with an API key (an IAM
token for the key instead of the key as a password). aiokafka asks for a token at every new
connection (`IamTokenProvider`); IAM refusing the grant is permanent and reported as IAM's
answer, Kafka refusing the token as Kafka's.

The producer is idempotent with acks=all, and a batch counts as delivered only when Kafka
acknowledged every one of its messages. Every message of a batch is handed to the producer at
once and the acknowledgements are awaited together, for at most `timeout_s`. A message's
future is kept across the worker's retries: a retry waits again for a message still in
flight and sends only what Kafka refused, never a message Kafka acknowledged.

Exactly once within a daemon's run, across broker outages: the one safe way to send a message
again whose answer was lost (Kafka may have stored it) is the producer's own retry, under the
same producer id and sequence number, which the broker recognises as a duplicate. So the
producer never gives a batch up while it waits for a partition leader (`_aiokafka.keep_batches`:
aiokafka would, after request_timeout_ms, even when idempotent), and this target sends a
message again itself only once Kafka has answered that it refused it. When Kafka no longer
accepts the producer's sequence numbers (a refused batch leaves a hole in them), a new
producer takes over, but only after every message the old one had in flight has its answer:
those it refused go again, nothing whose fate is unknown does.

Failures: connections, timeouts and what Kafka marks retriable are retryable; refused
credentials, topic and cluster authorisation are permanent for the batch; a message the broker
refuses as too large (sent alone, since Kafka judges a whole record batch) is permanent for
that event only, which the worker dead-letters while the rest of the batch counts as delivered.

Where the fate of a message cannot be known, the promise is at-least-once: across a crash or
a stop of the daemon (or a reload that replaces this target), a message Kafka stored whose
acknowledgement the journal never recorded is sent again, by a new producer, after restart.

With `evidence.event_streams` (router/evidence), `chain` is set before `start`: the value stays
the event's JSON, unchanged, and the message's place in the target's chain travels in headers
(`chain_seq`, `chain_prev`, `chain_hash`: router/evidence/canonical.py); checkpoints are
messages of their own in the topic (header `type`=`checkpoint`). A batch's events take their
places when the batch is first produced, under the chain's lock, and keep them until Kafka
acknowledged them: a retry (or a new producer, or a new target after a reload) sends a message
again with the very same headers, and an event given up has its letter stand at its place
(router/deadletter). The journal keeps the batch's lines before they are produced (the plan,
as for a bucket object): after kill -9 the next start sends them again first, byte for byte at
their places, and the events of the batch sent again are those very messages.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn

import aiohttp
import orjson

from router import __version__
from router.errors import PermanentDeliveryError, RetryableDeliveryError, RouterError
from router.events import Event, crn_parts
from router.evidence.canonical import (
    CHECKPOINT_TYPE,
    TYPE_HEADER,
    Link,
    chained_line,
    link_headers,
    next_link,
    split_line,
)
from router.evidence.chain import Chain, Planned
from router.iam import SET_BY_LOADER, IamTokenSource, TrustedProfileConfig, token_source
from router.targets._net import TLS_SCHEMA, AddressBound, batch_key, new_session

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.abc import AbstractTokenProvider

# aiokafka (with its workarounds and this target's classes of its errors, all in
# router/targets/_aiokafka.py) is imported by the first target of this type, not with this
# module: the config names this module's classes, and neither a worker process nor a daemon
# without this target type needs a Kafka client.

log = logging.getLogger(__name__)

EVENT_STREAMS_USER: Final = "token"
"""IBM Event Streams' SASL user name; the password is the API key."""

CLOSE_FLUSH_S: Final = 5.0
"""How long closing waits for messages in flight. Their batch is still pending in the journal
and goes again after a restart whatever happens; waiting only spares duplicates."""

RECORD_OVERHEAD_BYTES: Final = 512
"""Room a message takes beside its key, value and headers (record and batch framing)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaTlsConfig:
    """A CA bundle to trust instead of the system's, and a client certificate for mTLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaSaslConfig:
    """How the client authenticates: a password mechanism with the endpoint's `api_key` as
    the password, or OAUTHBEARER with an IAM token (for the key, or the daemon's trusted
    profile, which makes OAUTHBEARER the mechanism whatever this says)."""

    mechanism: Literal["plain", "scram-sha-256", "scram-sha-512", "oauthbearer", "none"] = "plain"
    username: str = EVENT_STREAMS_USER


@dataclass(frozen=True, slots=True, kw_only=True)
class EventStreamsEndpointConfig:
    """An Event Streams instance (or any Kafka cluster) and the topic events go to.

    atracker's fields are `target_crn`, `brokers` (the `kafka_brokers_sasl` values), `topic`,
    `api_key` and `service_to_service_enabled`; the rest are extensions with the defaults
    Event Streams needs."""

    brokers: Sequence[str]
    topic: str
    target_crn: str | None = None
    # The SASL password: the endpoint's own, or the daemon's identity (the top-level `iam`
    # section) when the endpoint has none or sets service_to_service_enabled.
    api_key: str | None = field(default=None, repr=False)
    # The daemon's identity when it is a trusted profile (set by the loader from the top-level
    # `iam` section), and where IAM exchanges it or the key for tokens (SASL OAUTHBEARER).
    trusted_profile: TrustedProfileConfig | None = field(default=None, metadata=SET_BY_LOADER)
    iam_url: str = "https://iam.cloud.ibm.com"
    service_to_service_enabled: bool = False
    # true: TLS with the system's CAs (Event Streams); false: plaintext; or a CA/cert to use.
    tls: KafkaTlsConfig | bool = True
    sasl: KafkaSaslConfig = field(default_factory=KafkaSaslConfig)
    # The `region` header; default: the region of target_crn, else each event's location.
    region: str | None = None
    client_id: str = f"event-router/{__version__}"
    # How long one attempt waits for Kafka to acknowledge a batch's messages.
    timeout_s: float = 30.0
    # Event Streams and Kafka take 1 MB per message by default (max.message.bytes).
    max_message_bytes: int = 1_000_000


# The JSON Schema of `eventstreams_endpoint`. The character rules of atracker's own fields are
# its API's (3-1000 characters, `^[a-zA-Z0-9 -._:\/]+$`); whether an `api_key` is needed is
# `needs_api_key`'s to say (the daemon's own may stand in).
ENDPOINT_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["brokers", "topic"],
    "properties": {
        "target_crn": {"type": "string", "minLength": 3, "maxLength": 1000},
        "brokers": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "string", "pattern": "^[^\\s:/]+:[0-9]{1,5}$"},
        },
        "topic": {"type": "string", "pattern": "^[a-zA-Z0-9._-]{1,249}$"},
        "api_key": {
            "type": "string",
            "minLength": 1,
            "description": "Use a reference: ${env:NAME} or ${file:/path}",
        },
        "service_to_service_enabled": {"type": "boolean"},
        "iam_url": {"type": "string", "pattern": "^https?://"},
        "tls": {"oneOf": [{"type": "boolean"}, TLS_SCHEMA]},
        "sasl": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "mechanism": {
                    "enum": ["plain", "scram-sha-256", "scram-sha-512", "oauthbearer", "none"]
                },
                "username": {"type": "string", "minLength": 1},
            },
        },
        "region": {"type": "string", "minLength": 1},
        "client_id": {"type": "string", "minLength": 1},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "max_message_bytes": {"type": "integer", "minimum": 1024},
    },
}


def needs_api_key(endpoint: Mapping[str, Any]) -> bool:
    """The API key is the SASL password (or what IAM exchanges for the OAUTHBEARER token):
    needed unless SASL is off or the daemon's trusted profile stands in."""
    sasl = endpoint.get("sasl")
    mechanism = sasl.get("mechanism", "plain") if isinstance(sasl, Mapping) else "plain"
    return mechanism != "none"


def describe(exc: BaseException) -> str:
    """`MessageSizeTooLargeError: [Error 10] ...`: the class says what Kafka answered."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_retryable(exc: BaseException) -> bool:
    """What may pass: lost connections, timeouts, leader elections and what Kafka itself
    marks retriable. A producer closed under us (a reload) is retried by a new one."""
    import router.targets._aiokafka as kafka

    if isinstance(exc, kafka.PERMANENT_FOR_BATCH + kafka.PERMANENT_FOR_EVENT):
        return False
    if isinstance(exc, kafka.RETRYABLE):
        return True
    return bool(getattr(exc, "retriable", False))


def sasl_mechanism(endpoint: EventStreamsEndpointConfig) -> str:
    """The mechanism in use: a trusted profile has no password, so it is OAUTHBEARER."""
    if endpoint.sasl.mechanism == "none":
        return "none"
    if not endpoint.api_key and endpoint.trusted_profile is not None:
        return "oauthbearer"
    return endpoint.sasl.mechanism


def security_protocol(endpoint: EventStreamsEndpointConfig) -> str:
    sasl = sasl_mechanism(endpoint) != "none"
    if endpoint.tls is False:
        return "SASL_PLAINTEXT" if sasl else "PLAINTEXT"
    return "SASL_SSL" if sasl else "SSL"


def ssl_context(endpoint: EventStreamsEndpointConfig) -> ssl.SSLContext | None:
    """The system's trust store, or the configured CA (and client certificate)."""
    if endpoint.tls is False:
        return None
    tls = endpoint.tls if isinstance(endpoint.tls, KafkaTlsConfig) else KafkaTlsConfig()
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def client_settings(
    endpoint: EventStreamsEndpointConfig, tokens: AbstractTokenProvider | None = None
) -> dict[str, Any]:
    """What aiokafka needs to reach and authenticate to the cluster (producer and probe);
    `tokens` gives the OAUTHBEARER tokens when that is the mechanism."""
    settings: dict[str, Any] = {
        "client_id": endpoint.client_id,
        "security_protocol": security_protocol(endpoint),
        "ssl_context": ssl_context(endpoint),
        "request_timeout_ms": int(endpoint.timeout_s * 1000),
    }
    if sasl_mechanism(endpoint) == "oauthbearer":
        settings |= {"sasl_mechanism": "OAUTHBEARER", "sasl_oauth_token_provider": tokens}
    elif endpoint.sasl.mechanism != "none":
        settings |= {
            "sasl_mechanism": endpoint.sasl.mechanism.upper(),
            "sasl_plain_username": endpoint.sasl.username,
            "sasl_plain_password": endpoint.api_key,
        }
    return settings


def headers(event: Event, region: str | None) -> list[tuple[str, bytes]]:
    """atracker's headers: `type`, `account` (the logSourceCRN's `a/<account>` scope),
    `region` (the target's region) and `location` (the event's)."""
    scope = crn_parts(event.body.get("logSourceCRN", ""))[6]
    account = scope[2:] if scope.startswith("a/") else ""
    return [
        ("type", b"audit"),
        ("account", account.encode()),
        ("region", (region or event.location).encode()),
        ("location", event.location.encode()),
    ]


class IamTokenProvider:
    """aiokafka's OAUTHBEARER callback: an IAM access token (router.iam, cached and refreshed
    before it expires) for every connection aiokafka opens. aiokafka copes only with Kafka's
    own errors while it connects, so an IAM failure is kept in `error`, for the target to
    report as what it is, and raised to aiokafka as a connection error it retries. aiokafka's
    AbstractTokenProvider by registration (EventStreamsTarget, which imports aiokafka)."""

    def __init__(self, target_id: str, source: IamTokenSource, timeout_s: float) -> None:
        self.target_id = target_id
        self.source = source
        self.timeout_s = timeout_s
        self.error: RetryableDeliveryError | PermanentDeliveryError | None = None
        self._session: aiohttp.ClientSession | None = None
        self.bound: AddressBound | None = None  # the target's (EventStreamsTarget.bound)

    async def token(self) -> str:
        if self._session is None:
            self._session = new_session(self.timeout_s, True, self.bound)
        try:
            token = await self.source.token(self._session, self.target_id)
        except (RetryableDeliveryError, PermanentDeliveryError) as exc:
            from aiokafka.errors import KafkaConnectionError

            self.error = exc
            raise KafkaConnectionError(f"no IAM token for SASL OAUTHBEARER: {exc}") from None
        self.error = None
        return token

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(slots=True)
class _Flight:
    """One event's message: its future from the producer, and whether it went alone."""

    future: asyncio.Future[Any]
    alone: bool = False


class EventStreamsTarget:
    """Produces each event as one Kafka message to one topic."""

    def __init__(self, target_id: str, endpoint: EventStreamsEndpointConfig) -> None:
        import router.targets._aiokafka as kafka  # checks aiokafka's internals: fails here, loudly

        kafka.AbstractTokenProvider.register(IamTokenProvider)
        self.id = target_id
        self.endpoint = endpoint
        crn_region = crn_parts(endpoint.target_crn)[5] if endpoint.target_crn else ""
        self.region = endpoint.region or crn_region or None
        self._producer: AIOKafkaProducer | None = None
        self._bound: AddressBound | None = None
        self._connecting = asyncio.Lock()
        self.tokens: IamTokenProvider | None = None
        if sasl_mechanism(endpoint) == "oauthbearer":
            source = token_source(endpoint.iam_url, endpoint.api_key, endpoint.trusted_profile)
            self.tokens = IamTokenProvider(target_id, source, endpoint.timeout_s)
        # event id -> its message in flight or acknowledged, kept until its batch is settled.
        self._flights: dict[str, _Flight] = {}
        # Every message the current producer has and Kafka has not answered yet, whatever its
        # batch: a new producer may take over only once this is empty.
        self._unanswered: set[asyncio.Future[Any]] = set()
        self.chain: Chain | None = None
        # With a chain: the places of the batch being sent, event id -> link (Chain.held).
        self._links: dict[str, Link] = {}

    @property
    def bound(self) -> AddressBound | None:
        """Where the management API lets this target connect (set by build_target): every
        broker connection aiokafka opens, bootstrap included, goes to the address its check
        resolved (_aiokafka.watch_connections), and its IAM URL is checked when the token
        session connects."""
        return self._bound

    @bound.setter
    def bound(self, bound: AddressBound | None) -> None:
        self._bound = bound
        if self.tokens is not None:
            self.tokens.bound = bound

    async def start(self) -> None:
        """Connect; a failure is raised classified, and the next send tries again."""
        await self._connect()

    async def _connect(self) -> AIOKafkaProducer:
        import router.targets._aiokafka as kafka

        async with self._connecting:
            if self._producer is not None:
                return self._producer
            producer = kafka.AIOKafkaProducer(
                bootstrap_servers=list(self.endpoint.brokers),
                acks="all",
                enable_idempotence=True,
                max_request_size=self.endpoint.max_message_bytes + RECORD_OVERHEAD_BYTES,
                **client_settings(self.endpoint, self.tokens),
            )
            kafka.keep_batches(producer)
            kafka.pace_metadata_updates(producer)
            connections = kafka.Connections(self.id, self._bound)
            kafka.watch_connections(producer, connections)
            # Bootstrapping tries each broker for up to timeout_s, and the producer id takes
            # one request more; past that, aiokafka would wait for ever for a broker the
            # metadata names to answer, and with it the daemon's start or this worker.
            limit_s = self.endpoint.timeout_s * (len(self.endpoint.brokers) + 1)
            try:
                await asyncio.wait_for(producer.start(), limit_s)
            except TimeoutError as exc:  # before OSError, of which it is one
                await producer.stop()
                why = connections.failure or "no broker the cluster's metadata names answered"
                raise RetryableDeliveryError(
                    self.id, f"cannot connect to Kafka: no producer id within {limit_s:g} s ({why})"
                ) from exc
            except (kafka.KafkaError, OSError) as exc:
                await producer.stop()
                raise await self._why_unreachable(exc) from exc
            self._producer = producer
            return producer

    async def _why_unreachable(
        self, exc: BaseException
    ) -> RetryableDeliveryError | PermanentDeliveryError:
        """aiokafka says only "Unable to bootstrap"; one connection of our own to each broker
        says why: refused credentials are permanent, an unreachable broker is not."""
        import router.targets._aiokafka as kafka

        reasons = []
        settings = client_settings(self.endpoint, self.tokens)
        for broker in self.endpoint.brokers:
            host, _, port = broker.rpartition(":")
            try:
                with kafka.connecting(kafka.Connections(self.id, self._bound)):
                    conn = await kafka.create_conn(host.strip("[]"), int(port), **settings)
            except (kafka.KafkaError, OSError, TimeoutError) as error:
                if self.tokens is not None and self.tokens.error is not None:
                    # No token to show Kafka: IAM's answer is the reason, permanent or not.
                    return self.tokens.error
                if isinstance(error, kafka.PERMANENT_FOR_BATCH):
                    return PermanentDeliveryError(
                        self.id,
                        f"Kafka at {broker} refused {self._credentials()}: {describe(error)}",
                    )
                reasons.append(f"{broker}: {describe(error)}")
            else:
                conn.close()
        detail = "; ".join(reasons) or describe(exc)
        return RetryableDeliveryError(self.id, f"cannot connect to Kafka ({detail})")

    def _credentials(self) -> str:
        """What Kafka refused, in words an operator can act on."""
        if self.tokens is not None:
            return (
                f"the IAM token of {self.tokens.source.describe()} (SASL OAUTHBEARER; does the "
                "cluster trust IAM's tokens, and may this identity write to it?)"
            )
        sasl = self.endpoint.sasl
        return f"the credentials (SASL {sasl.mechanism} as {sasl.username!r}; is api_key right?)"

    def unsendable(self, event: Event) -> str | None:
        if len(event.encoded()) + len(event.id) > self.endpoint.max_message_bytes:
            return "too_large"
        return None

    def requests(self, batch: Sequence[Event]) -> Iterator[Sequence[Event]]:
        yield batch  # every message goes at once; the batch is settled when all are acked

    async def send(self, batch: Sequence[Event]) -> None:
        import router.targets._aiokafka as kafka

        if self._producer is not None and self._broken():
            await self._await(list(self._unanswered))
            if self._unanswered:
                raise RetryableDeliveryError(
                    self.id,
                    "Kafka refused the producer's sequence; a new producer takes over once the "
                    f"{len(self._unanswered)} messages still in flight are answered",
                )
            await self._renew()
        producer = await self._connect()
        if self.chain is not None:
            await self._take_places(self.chain, producer, batch)
        self._forget_others(batch)
        refused: dict[str, str] = {}
        try:
            for event in batch:
                flight = self._flights.get(event.id)
                if flight is None:
                    await self._produce(producer, event, refused)
                elif flight.future.done() and (error := _failure(flight.future)) is not None:
                    if isinstance(error, kafka.TOO_LARGE) and not flight.alone:
                        continue  # goes alone below
                    if not is_retryable(error):
                        refused[event.id] = describe(error)
                    else:
                        await self._produce(producer, event, refused)
                # else: acknowledged by an earlier attempt, or still in flight: not sent again
            await self._await([f.future for i, f in self._flights.items() if i in self._ids(batch)])
            for event in batch:
                flight = self._flights.get(event.id)
                if flight is None or flight.alone or not flight.future.done():
                    continue
                if isinstance(_failure(flight.future), kafka.TOO_LARGE):
                    # Kafka judges a whole record batch: alone, the message is judged itself.
                    await self._produce(producer, event, refused, alone=True)
                    if event.id in self._flights:
                        await self._await([self._flights[event.id].future])
        except (kafka.KafkaError, OSError) as exc:
            self._raise_for(exc)
        try:
            self._settle(batch, refused)
        except PermanentDeliveryError as exc:
            if self.chain is not None and exc.refused is not None:
                await self._placed(self.chain, batch, exc.refused)  # the rest were acknowledged
            raise
        if self.chain is not None:
            await self._placed(self.chain, batch, {})

    def _broken(self) -> bool:
        """Did Kafka refuse a message because the producer's own state is off, or did the
        producer's sender task end (aiokafka ends it on some of those errors)?"""
        import router.targets._aiokafka as kafka

        sender = getattr(self._producer, "_sender", None)
        task = getattr(sender, "sender_task", None)
        if task is not None and task.done():
            return True
        return any(
            f.future.done() and isinstance(_failure(f.future), kafka.PRODUCER_BROKEN)
            for f in self._flights.values()
        )

    async def _renew(self) -> None:
        """Replace a broken producer with a new one (a new producer id), once Kafka answered
        every message the old one sent: what it refused is sent again by the new one, and
        nothing is left whose fate is unknown."""
        import router.targets._aiokafka as kafka

        log.warning("target %s: Kafka refused the producer's sequence; starting a new one", self.id)
        producer, self._producer = self._producer, None
        self._unanswered.clear()
        self._flights = {
            event_id: flight
            for event_id, flight in self._flights.items()
            if flight.future.done() and _failure(flight.future) is None
        }
        if producer is not None:
            await kafka.stop_producer(
                producer, min(self.endpoint.timeout_s, CLOSE_FLUSH_S), self.id
            )

    @staticmethod
    def _ids(batch: Sequence[Event]) -> set[str]:
        return {event.id for event in batch}

    def _forget_others(self, batch: Sequence[Event]) -> None:
        """Drop what was kept for batches given up on (dead-lettered) once they are done."""
        wanted = self._ids(batch)
        for event_id in [i for i, f in self._flights.items() if i not in wanted]:
            if self._flights[event_id].future.done():
                del self._flights[event_id]

    async def _produce(
        self,
        producer: AIOKafkaProducer,
        event: Event,
        refused: dict[str, str],
        *,
        alone: bool = False,
    ) -> None:
        """Hand one message to the producer; one it refuses at once is refused for good."""
        import router.targets._aiokafka as kafka

        try:
            link = self._links.get(event.id)
            future = await producer.send(
                self.endpoint.topic,
                value=event.encoded(),
                key=event.id.encode(),
                headers=headers(event, self.region) + (link_headers(link) if link else []),
            )
        except kafka.PERMANENT_FOR_EVENT as exc:
            self._flights.pop(event.id, None)
            refused[event.id] = describe(exc)
            return
        self._flights[event.id] = _Flight(future, alone=alone)
        self._unanswered.add(future)
        future.add_done_callback(self._unanswered.discard)

    async def _await(self, futures: list[asyncio.Future[Any]]) -> None:
        """Wait for the acknowledgements, at most timeout_s; what is still in flight stays so
        (the producer keeps sending it) and is waited for again by the next attempt."""
        if futures:
            await asyncio.wait(futures, timeout=self.endpoint.timeout_s)

    def _settle(self, batch: Sequence[Event], refused: dict[str, str]) -> None:
        """Raise unless Kafka acknowledged every message that was not refused for good."""
        import router.targets._aiokafka as kafka

        waiting = 0
        failures: dict[str, int] = {}
        for event in batch:
            if event.id in refused:
                continue
            flight = self._flights[event.id]
            if not flight.future.done():
                waiting += 1
                continue
            error = _failure(flight.future)
            if error is None:
                continue
            if isinstance(error, kafka.PERMANENT_FOR_BATCH):
                self._refuse_all(batch, error)
            if is_retryable(error):
                failures[describe(error)] = failures.get(describe(error), 0) + 1
            else:
                refused[event.id] = describe(error)
        if waiting and self.tokens is not None and self.tokens.error is not None:
            # The producer cannot reconnect without a token: IAM's answer is the reason.
            raise self.tokens.error
        if waiting or failures:
            parts = [f"{waiting} not acknowledged within {self.endpoint.timeout_s:g}s"] * bool(
                waiting
            )
            parts += [f"{n} failed: {why}" for why, n in failures.items()]
            raise RetryableDeliveryError(
                self.id,
                f"{len(batch)} messages to topic {self.endpoint.topic!r}: " + "; ".join(parts),
            )
        self._forget(batch)
        if refused:
            raise PermanentDeliveryError(
                self.id,
                f"Kafka refused {len(refused)} of {len(batch)} messages to topic "
                f"{self.endpoint.topic!r}; the rest were acknowledged",
                refused=refused,
            )

    def _refuse_all(self, batch: Sequence[Event], error: BaseException) -> NoReturn:
        """Credentials or authorisation refused: permanent for every message not yet
        acknowledged (one Kafka took before the refusal stays delivered)."""
        acked = {
            event.id
            for event in batch
            if (flight := self._flights.get(event.id)) is not None
            and flight.future.done()
            and _failure(flight.future) is None
        }
        self._forget(batch)
        message = f"Kafka refused the messages to topic {self.endpoint.topic!r}: {describe(error)}"
        if not acked:
            raise PermanentDeliveryError(self.id, message)
        why = describe(error)
        refused = {event.id: why for event in batch if event.id not in acked}
        raise PermanentDeliveryError(self.id, message, refused=refused)

    def _forget(self, batch: Sequence[Event]) -> None:
        for event in batch:
            self._flights.pop(event.id, None)

    def _raise_for(self, exc: BaseException) -> None:
        if is_retryable(exc):
            raise RetryableDeliveryError(self.id, f"producing to Kafka: {describe(exc)}") from exc
        raise PermanentDeliveryError(self.id, f"producing to Kafka: {describe(exc)}") from exc

    # -- the chain (evidence.event_streams) ------------------------------------------------

    async def _take_places(
        self, chain: Chain, producer: AIOKafkaProducer, batch: Sequence[Event]
    ) -> None:
        """Each event of the batch gets its place: the one it holds (`Chain.held`: placed by
        an earlier attempt, a reload's former target, or the plan a restart sent again), else
        the next one, taken under the chain's lock after the journal kept the new lines (the
        plan). A place stays held until Kafka acknowledged the event's whole batch (or its
        letter stands there), so every attempt sends the very same headers."""
        async with chain.lock:
            await self._resend_planned(chain, producer, batch)
            await self._fill_orphans(chain, producer, batch)
            self._links = {}
            new: list[Event] = []
            for event in batch:
                held = chain.held.get(event.id)
                found = split_line(held) if held is not None else None
                if found is not None and found[0] == event.encoded():
                    self._links[event.id] = found[1]
                else:
                    new.append(event)
            if not new:
                return
            base = head = chain.head
            placed: list[tuple[Event, Link, bytes]] = []
            for event in new:
                head = next_link(head, event.encoded())
                placed.append((event, head, chained_line(event.encoded(), head)))
            if chain.keep_plan is not None and head is not None:
                body = b"".join(line + b"\n" for _, _, line in placed)
                try:
                    await chain.keep_plan(Planned(batch_key(new), "", base, head, body, ""))
                except (RouterError, OSError) as exc:
                    raise RetryableDeliveryError(
                        self.id, f"cannot keep the batch's chain places in the journal: {exc}"
                    ) from exc
            for event, link, line in placed:
                self._links[event.id] = link
                chain.held[event.id] = line
            chain.advance(head)

    async def _resend_planned(
        self, chain: Chain, producer: AIOKafkaProducer, batch: Sequence[Event]
    ) -> None:
        """The first chained send after a start: the lines planned before a crash, whose
        places the journal's head did not cover, may be in the topic; they are sent again
        first, byte for byte at their places (a copy of one Kafka kept is the same message
        twice), and the batch's events among them are those messages, acknowledged, not sent
        again. A failure raises for this send (retried): the plan stays, and its places. The
        caller holds the chain's lock."""
        planned = chain.planned
        if planned is None:
            return
        log.warning(
            "target %s: sending messages again at their places %d-%d, planned before a crash",
            self.id,
            (planned.base.seq if planned.base is not None else 0) + 1,
            planned.head.seq,
        )
        sent = await self._send_again(producer, planned.body.splitlines())
        wanted = self._ids(batch)
        for line, event, future in sent:
            if event.id in wanted:  # this batch's: sent, held until the batch is settled
                self._flights[event.id] = _Flight(future)
                chain.held[event.id] = line
        chain.planned = None
        chain.in_flight -= 1

    async def _fill_orphans(
        self, chain: Chain, producer: AIOKafkaProducer, batch: Sequence[Event]
    ) -> None:
        """Places held by events that are not in this batch and whose message is not in
        flight: a test write that failed (it is never sent again), or a batch a reload cut
        differently. A message Kafka acknowledged is in the topic; any other is sent again,
        byte for byte at its place, so no place stays empty (the event's own batch, if it
        comes, takes that place again: the same message twice). The caller holds the lock."""
        wanted = self._ids(batch)
        orphans: list[bytes] = []
        for event_id, line in list(chain.held.items()):
            flight = self._flights.get(event_id)
            if event_id in wanted or (flight is not None and not flight.future.done()):
                continue
            if flight is not None and _failure(flight.future) is None:
                del chain.held[event_id]
            else:
                orphans.append(line)
        if orphans:
            for _, event, _ in await self._send_again(producer, orphans):
                chain.held.pop(event.id, None)

    async def _send_again(
        self, producer: AIOKafkaProducer, lines: Sequence[bytes]
    ) -> list[tuple[bytes, Event, asyncio.Future[Any]]]:
        """Produce chained lines again as they were, each at its place, and wait until Kafka
        acknowledged every one (else raise, retryable)."""
        import router.targets._aiokafka as kafka

        placed = [
            (line, Event.from_body(orjson.loads(found[0]), encoded=found[0]), found[1])
            for line in lines
            if (found := split_line(line)) is not None
        ]
        try:
            futures = [
                await producer.send(
                    self.endpoint.topic,
                    value=event.encoded(),
                    key=event.id.encode(),
                    headers=headers(event, self.region) + link_headers(link),
                )
                for _, event, link in placed
            ]
            await self._await(futures)
        except (kafka.KafkaError, OSError) as exc:
            self._raise_for(exc)
        done: list[tuple[bytes, Event, asyncio.Future[Any]]] = []
        for (line, event, link), future in zip(placed, futures, strict=True):
            error = _failure(future) if future.done() else kafka.ProducerClosed()
            if error is not None and is_retryable(error):
                raise RetryableDeliveryError(
                    self.id,
                    f"{len(futures)} messages sent again at their places are not all "
                    f"acknowledged yet ({describe(error)})",
                )
            if error is not None:
                # Refused for good: that place stays empty, and verify names it as a gap.
                log.error(
                    "target %s: Kafka refused the message at seq %d for good (%s); its place "
                    "in the chain stays empty",
                    self.id,
                    link.seq,
                    describe(error),
                )
            done.append((line, event, future))
        return done

    async def _placed(self, chain: Chain, batch: Sequence[Event], refused: dict[str, str]) -> None:
        """The batch is settled: the acknowledged events' places are in the topic (no longer
        held; the journal keeps the head, and a checkpoint when one is due); a refused
        event's place stays held for its letter."""
        async with chain.lock:
            for event in batch:
                if event.id not in refused:
                    chain.held.pop(event.id, None)
            self._links = {}
            if chain.after_write is not None:
                await chain.after_write(chain)

    async def write_line(self, line: bytes) -> None:
        """Produce one message that is not an event (a checkpoint), marked by its `type`
        header, and wait for Kafka to acknowledge it; the caller holds the chain lock."""
        producer = await self._connect()
        async with asyncio.timeout(min(self.endpoint.timeout_s, CLOSE_FLUSH_S * 2)):
            future = await producer.send(
                self.endpoint.topic,
                value=line,
                key=b"checkpoint",
                headers=[(TYPE_HEADER, CHECKPOINT_TYPE)],
            )
            await future

    async def close(self) -> None:
        """Flush what is in flight for a few seconds, then stop. Messages still
        unacknowledged stay pending in the journal and go again after a restart."""
        import router.targets._aiokafka as kafka

        producer, self._producer = self._producer, None
        self._flights.clear()
        self._unanswered.clear()
        if producer is not None:
            await kafka.stop_producer(
                producer, min(self.endpoint.timeout_s, CLOSE_FLUSH_S), self.id
            )
        if self.tokens is not None:
            await self.tokens.close()


def _failure(future: asyncio.Future[Any]) -> BaseException | None:
    """A done future's exception (a cancelled one counts as a retryable failure)."""
    if future.cancelled():
        import router.targets._aiokafka as kafka

        closed: BaseException = kafka.ProducerClosed()
        return closed
    return future.exception()


async def read_topic(
    target: EventStreamsTarget,
) -> AsyncIterator[tuple[str, dict[str, bytes], bytes]]:
    """Every message of the target's topic, every partition, from its start to the end
    offsets it had when reading began: (`topic[partition]@offset`, headers, value), with the
    target's own connection settings and credentials. For `event-router verify
    kafka://TARGET`; a topic that cannot be read raises DeliveryError."""
    import router.targets._aiokafka as kafka

    target_id, endpoint = target.id, target.endpoint
    consumer = kafka.AIOKafkaConsumer(
        bootstrap_servers=list(endpoint.brokers),
        enable_auto_commit=False,
        **client_settings(endpoint, target.tokens),
    )
    try:
        await consumer.start()
        # The consumer's own partitions_for_topic knows only topics it subscribed to.
        cluster = await consumer._client.fetch_all_metadata()
    except (kafka.KafkaError, OSError) as exc:
        await consumer.stop()
        raise RetryableDeliveryError(target_id, f"cannot read from Kafka: {describe(exc)}") from exc
    try:
        numbers = cluster.partitions_for_topic(endpoint.topic)
        if not numbers:
            raise PermanentDeliveryError(target_id, f"Kafka has no topic {endpoint.topic!r}")
        partitions = [kafka.TopicPartition(endpoint.topic, n) for n in sorted(numbers)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        left = {tp for tp in partitions if end[tp] > 0}
        while left:
            got = await consumer.getmany(*left, timeout_ms=int(endpoint.timeout_s * 1000))
            if not got:
                raise RetryableDeliveryError(
                    target_id, f"Kafka sent nothing for {endpoint.timeout_s:g}s while reading"
                )
            for tp, records in sorted(got.items(), key=lambda item: item[0].partition):
                for record in records:
                    if record.offset < end[tp]:
                        name = f"{tp.topic}[{tp.partition}]@{record.offset}"
                        yield name, dict(record.headers), record.value or b""
                if await consumer.position(tp) >= end[tp]:
                    left.discard(tp)
    except kafka.KafkaError as exc:
        raise RetryableDeliveryError(target_id, f"reading from Kafka: {describe(exc)}") from exc
    finally:
        await consumer.stop()
