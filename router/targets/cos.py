"""The `cloud_object_storage` target: gzip NDJSON objects in an IBM Cloud Object Storage bucket
(or any S3-compatible store).

Objects are named the way atracker names them since May 2025:
`<account>/<region>/<YYYY-MM-DDTHH>/<YYYY-MM-DDTHH:MM>+<SS>_<uuid>.log`, the time being the UTC
time the object is written and the uuid a version 7 UUID (time first, then random, so names
sort by time and writers never collide). `account` is the account of the events in the object
(the `a/<account>` scope of their logSourceCRN): a batch is cut into one object per account
(`requests`), each written and settled on its own, so objects never mix accounts. `region` is
the target's region (`region`, which the config loader fills from atracker's target `region`,
else the settings' metadata_region_primary; else the one an IBM COS endpoint names, else
DEFAULT_REGION).

An object is whole or absent: it is one PUT with a Content-MD5, so the store refuses a body
that arrives cut or changed, and S3 never shows a PUT that did not complete. Batches stay far
below the 5 GB a single PUT takes (see BATCH_DEFAULTS), so no multipart upload is needed and
none can be left half done. A retry of the same events reuses the name of the first attempt,
so a PUT whose answer was lost is overwritten on retry, not written twice.

An account's share of a batch is cut into objects of at most `max_object_bytes` of NDJSON
(MAX_OBJECT_BYTES, below S3's 5 GB single PUT, whatever batch.max_bytes says).

With evidence on (router/evidence), `chain` is set before `start`: every line of an object then
carries its `_chain` link, as a file target's line does. The lines are linked under the chain's
lock when the object is first written, and the body is kept for the retries, so a retried PUT
(which may overwrite a first one whose answer was lost) carries the very same bytes and places;
the head moves once a PUT succeeded, and the journal keeps it (a bucket is not read back at
start). Checkpoints are small objects of their own, named like the others under the account of
the target's `target_crn`.

Auth: HMAC keys sign each request with SigV4 (botocore's own signer), or an IAM API key (or
the daemon's trusted profile) is exchanged for a bearer token (router.iam) that goes in the
Authorization header of unsigned requests; on a 401/403 the token is refreshed and the request
tried once more.

Failures are classified like the http target's: connection errors, timeouts, 408, 429, 5xx and
S3's throttling codes (SlowDown, ...) are retryable; other 4xx (NoSuchBucket, AccessDenied)
are permanent, dead-lettered with S3's error code and message. botocore retries nothing
itself: retries live in router/delivery.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from router.errors import PermanentDeliveryError, RetryableDeliveryError, RouterError
from router.events import Event, crn_parts
from router.evidence.canonical import Link
from router.evidence.chain import Chain, Planned, same_head
from router.iam import SET_BY_LOADER, IamTokenSource, TrustedProfileConfig, token_source
from router.targets._net import (
    RETRYABLE_STATUSES,
    AddressBound,
    BoundResolver,
    address_refused,
    batch_key,
    new_session,
    parse_retry_after,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger(__name__)

MiB = 1024 * 1024

# atracker's region when neither the target nor its endpoint names one: the region of the
# atracker API's default service URL (us-south), where IBM's SDKs send requests by default.
DEFAULT_REGION = "us-south"
# The account of events whose logSourceCRN has no `a/<account>` scope (cannot happen for an
# event that passed validation; a placeholder keeps the name valid rather than refusing).
NO_ACCOUNT = "unknown-account"

# A batch becomes one object per account. An object closes on size or age:
# - max_bytes 8 MiB of NDJSON: varied audit events gzip about 14:1 (measured: 7.4 MB -> 0.53 MB,
#   0.12 s, in a thread), so objects under 1 MB, which a reader (event-router query, a SIEM
#   pulling the bucket) fetches in one request, a batch holds in memory without trouble, and
#   far below the 5 GB of a single PUT;
# - max_wait_s 60: an event is in the bucket within a minute of its arrival (atracker's objects
#   carry the minute in their names) and a quiet account makes at most 60 objects an hour;
# - max_events 20,000: ~400 bytes each at 8 MiB, so it rarely closes a batch before max_bytes.
# The operator's `delivery.batch` and the target's own `batch` override these.
# S3 takes at most 5 GB in one PUT (IBM COS: 5 GiB). An object's NDJSON is cut at this, so its
# gzip (at worst a few bytes and 0.03% over its input, for events that do not compress) stays
# one PUT whatever an operator sets as batch.max_bytes.
MAX_OBJECT_BYTES: Final = 4_000_000_000
CHAIN_MEMBER_BYTES: Final = 192  # a line's `_chain` member, counted whether evidence is on or not
BATCH_DEFAULTS: Final[Mapping[str, Any]] = {
    "max_events": 20_000,
    "max_bytes": 8 * MiB,
    "max_wait_s": 60.0,
}

# S3 error codes that say "later", whatever the status they come with.
RETRYABLE_CODES: Final = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
AUTH_STATUSES: Final = frozenset({401, 403})
# Object names of batches still being retried, so a retry reuses its first name.
MAX_PENDING_NAMES = 256
CHECKPOINT_TIMEOUT_S = 10.0
# The longest a HEAD asking whether a PUT without an answer was stored may take.
LANDED_TIMEOUT_S: Final = 10.0
# `s3[.private|.direct].<region>.cloud-object-storage.appdomain.cloud`
_IBM_COS_HOST = re.compile(
    r"^s3\.(?:(?:private|direct)\.)?([a-z0-9-]+)\.cloud-object-storage\.appdomain\.cloud$"
)
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class HmacKeysConfig:
    """HMAC credentials of the bucket (COS service credentials with HMAC, or any S3 store's
    access key), used to sign requests with SigV4 instead of an IAM token."""

    access_key_id: str
    secret_access_key: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class CosEndpointConfig:
    """atracker's `cos_endpoint` (endpoint, target_crn, bucket, api_key,
    service_to_service_enabled) plus our extensions: `endpoint` may be a URL
    (`http://host:port`) for an S3-compatible store, `hmac_keys` instead of an IAM API key,
    `region` for the object names, and the IAM URL, timeout and TLS check."""

    endpoint: str  # a host name (https) as atracker takes it, or a full URL
    target_crn: str
    bucket: str
    # The endpoint's own, or the daemon's identity (the top-level `iam` section) when the
    # endpoint has none or sets service_to_service_enabled (the config loader fills it in).
    api_key: str | None = field(default=None, repr=False)
    # The daemon's identity when it is a trusted profile (set by the loader, never in the YAML).
    trusted_profile: TrustedProfileConfig | None = field(default=None, metadata=SET_BY_LOADER)
    service_to_service_enabled: bool = False
    hmac_keys: HmacKeysConfig | None = None
    # default: the target's region, the metadata region, the endpoint's, else us-south
    region: str | None = None
    iam_url: str = "https://iam.cloud.ibm.com"
    timeout_s: float = 60.0
    tls_verify: bool = True
    # NDJSON bytes of one object at most; a batch's share of an account is cut into objects
    # of this size (never above MAX_OBJECT_BYTES: a single PUT).
    max_object_bytes: int = MAX_OBJECT_BYTES


_SECRET = {"type": "string", "minLength": 1, "description": "Use a reference: ${env:NAME}"}

# The JSON Schema of `cos_endpoint`.
ENDPOINT_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["endpoint", "target_crn", "bucket"],
    "properties": {
        "endpoint": {
            "type": "string",
            "minLength": 3,
            "pattern": r"^(https?://[^\s/]+/?|[A-Za-z0-9.:-]+)$",
            "description": "a COS host name (s3.us-south.cloud-object-storage.appdomain.cloud)"
            " or the URL of an S3-compatible store",
        },
        "target_crn": {"type": "string", "minLength": 3, "pattern": "^crn:"},
        "bucket": {"type": "string", "pattern": "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"},
        "api_key": _SECRET,
        "service_to_service_enabled": {"type": "boolean"},
        "hmac_keys": {
            "type": "object",
            "additionalProperties": False,
            "required": ["access_key_id", "secret_access_key"],
            "properties": {
                "access_key_id": {"type": "string", "minLength": 1},
                "secret_access_key": _SECRET,
            },
        },
        "region": {"type": "string", "pattern": "^[a-z0-9-]{2,64}$"},
        "iam_url": {"type": "string", "pattern": "^https?://"},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "tls_verify": {"type": "boolean"},
        "max_object_bytes": {"type": "integer", "minimum": 1024, "maximum": MAX_OBJECT_BYTES},
    },
}


def needs_api_key(endpoint: Mapping[str, Any]) -> bool:
    """atracker: an api_key is "required if service_to_service is not enabled"; with
    service_to_service_enabled it is the daemon's. HMAC keys stand in for either."""
    return "hmac_keys" not in endpoint


def endpoint_url(endpoint: str) -> str:
    """The URL of an endpoint given as atracker's host name or as a URL."""
    if "://" in endpoint:
        return endpoint.rstrip("/")
    return f"https://{endpoint}"


def endpoint_region(endpoint: str) -> str | None:
    """The region an IBM COS endpoint names (`s3.private.us-east...` -> `us-east`), if any."""
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    match = _IBM_COS_HOST.match(host)
    return match.group(1) if match else None


def event_account(event: Event) -> str:
    """The account of an event: the `a/<account>` scope of its logSourceCRN."""
    return crn_account(str(event.body.get("logSourceCRN", "")))


def crn_account(crn: str) -> str:
    """The account of a CRN's `a/<account>` scope (NO_ACCOUNT when it has none)."""
    kind, _, account = crn_parts(crn)[6].partition("/")
    if kind == "a" and _SAFE_SEGMENT.match(account):
        return account
    return NO_ACCOUNT


def uuid7(now: float, random: bytes | None = None) -> uuid.UUID:
    """A version 7 UUID (RFC 9562): 48 bits of Unix milliseconds, then random bits."""
    rand = int.from_bytes(random if random is not None else os.urandom(10), "big")
    value = (int(now * 1000) & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return uuid.UUID(int=value)


def object_key(account: str, region: str, now: float, unique: uuid.UUID) -> str:
    """`<account>/<region>/<YYYY-MM-DDTHH>/<YYYY-MM-DDTHH:MM>+<SS>_<uuid>.log` in UTC, as in
    atracker's own example `.../2025-04-10T21/2025-04-10T21:02+01_0196361c-....log`."""
    at = datetime.fromtimestamp(now, UTC)
    return f"{account}/{region}/{at:%Y-%m-%dT%H}/{at:%Y-%m-%dT%H:%M}+{at:%S}_{unique}.log"


def ndjson_gzip(events: Sequence[Event]) -> bytes:
    """The events as NDJSON (their stored JSON, one per line), gzipped."""
    return gzip.compress(b"".join(event.encoded() + b"\n" for event in events), compresslevel=6)


def packed(events: Sequence[Event]) -> tuple[bytes, str]:
    """The object's body and its Content-MD5 (base64 of the body's MD5)."""
    body = ndjson_gzip(events)
    return body, base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def line_bytes(event: Event) -> int:
    """What an event takes in an object: its JSON, the newline, and room for a `_chain`
    member (`,"_chain":{"seq":N,"prev":"<64 hex>","hash":"<64 hex>"}`) if evidence is on."""
    return len(event.encoded()) + 1 + CHAIN_MEMBER_BYTES


def cut(events: Sequence[Event], max_bytes: int) -> Iterator[list[Event]]:
    """The events in order, in parts of at most `max_bytes` of NDJSON each (an event alone
    larger than that is refused before, as unsendable)."""
    part: list[Event] = []
    size = 0
    for event in events:
        length = line_bytes(event)
        if part and size + length > max_bytes:
            yield part
            part, size = [], 0
        part.append(event)
        size += length
    if part:
        yield part


def packed_lines(lines: Sequence[bytes]) -> tuple[bytes, str]:
    """Lines (no newlines) as a gzip NDJSON body, and its Content-MD5."""
    body = gzip.compress(b"".join(line + b"\n" for line in lines), compresslevel=6)
    return body, base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def object_lines(body: bytes) -> list[bytes]:
    """The lines (no newlines) of a gzip NDJSON body packed_lines made."""
    return gzip.decompress(body).split(b"\n")[:-1]


@dataclass(frozen=True, slots=True)
class Linked:
    """A chained object's body, linked from `base` to `head`: what every attempt PUTs."""

    base: Link | None
    head: Link | None
    body: bytes
    md5: str


def _link(chain: Chain, events: Sequence[Event]) -> Linked:
    """The chained object for these events from the chain's head (the head does not move)."""
    lines, head = chain.link([event.encoded() for event in events])
    return Linked(chain.head, head, *packed_lines(lines))


def by_account(batch: Sequence[Event]) -> dict[str, list[Event]]:
    """The batch's events per account, accounts in order of first appearance."""
    groups: dict[str, list[Event]] = {}
    for event in batch:
        groups.setdefault(event_account(event), []).append(event)
    return groups


class CosTarget:
    """Writes each account's share of a batch as one object in one bucket."""

    def __init__(self, target_id: str, endpoint: CosEndpointConfig) -> None:
        self.id = target_id
        self.endpoint = endpoint
        self.url = endpoint_url(endpoint.endpoint)
        self.region = endpoint.region or endpoint_region(endpoint.endpoint) or DEFAULT_REGION
        self.account = crn_account(endpoint.target_crn)
        self.tokens: IamTokenSource | None = None
        if endpoint.hmac_keys is None:
            # The loader requires a key or the daemon's identity where there are no HMAC keys.
            self.tokens = token_source(endpoint.iam_url, endpoint.api_key, endpoint.trusted_profile)
        self._bearer = ""
        self._names: OrderedDict[str, str] = OrderedDict()
        self.chain: Chain | None = None
        # Chained bodies of objects still being retried, by batch key (as their names).
        self._linked: OrderedDict[str, Linked] = OrderedDict()
        self._kept: Linked | None = None  # the body whose plan the journal holds now
        # Bodies whose places are taken, until their PUT succeeds or the places go back.
        self._reserved: OrderedDict[str, Linked] = OrderedDict()
        self._putting = asyncio.Lock()  # one chained object PUT at a time
        # Objects whose lines the chain holds (a PUT failed, places kept): batch key -> the
        # id of its first event, whose letter taking the place tells they were given up.
        self._held: dict[str, str] = {}
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: S3Client | None = None
        self._session: aiohttp.ClientSession | None = None  # for IAM tokens only
        self.bound: AddressBound | None = None  # set by build_target (targets/__init__.py)

    async def start(self) -> None:
        if self._client is not None:
            return
        # The S3 client is imported by the process that sends (about 10 MB: not in a worker
        # process, nor in a daemon without this target type); botocore with it.
        import aiobotocore.session
        import botocore
        from aiobotocore.config import AioConfig

        endpoint = self.endpoint
        config = AioConfig(
            region_name=self.region,
            # IAM: unsigned requests carrying the bearer token (added in _authorize).
            signature_version="s3v4" if endpoint.hmac_keys else botocore.UNSIGNED,
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},  # retries are delivery.py's, with backoff
            connect_timeout=min(endpoint.timeout_s, 10.0),
            read_timeout=endpoint.timeout_s,
            # Content-MD5 checks each body; the newer default checksums (aws-chunked trailers)
            # are refused by some S3-compatible stores.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # A bucket endpoint the management API set is checked where it resolves.
            connector_args={"resolver": BoundResolver(self.bound)} if self.bound else None,
        )
        keys = endpoint.hmac_keys
        stack = contextlib.AsyncExitStack()
        session = aiobotocore.session.get_session()
        client = await stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=self.url,
                verify=endpoint.tls_verify,
                config=config,
                aws_access_key_id=keys.access_key_id if keys else None,
                aws_secret_access_key=keys.secret_access_key if keys else None,
            )
        )
        if self.tokens is not None:
            client.meta.events.register("before-send.s3", self._authorize)
            self._session = new_session(endpoint.timeout_s, endpoint.tls_verify, self.bound)
        self._stack, self._client = stack, client

    def _authorize(self, request: Any, **_: Any) -> None:
        """Put the IAM bearer token on a request about to go out (IAM mode only)."""
        request.headers["Authorization"] = f"Bearer {self._bearer}"

    def unsendable(self, event: Event) -> str | None:
        if line_bytes(event) > self.endpoint.max_object_bytes:
            return "too_large"
        return None

    def requests(self, batch: Sequence[Event]) -> Iterator[Sequence[Event]]:
        """One object per account, cut at max_object_bytes; the worker writes and settles
        each on its own."""
        for events in by_account(batch).values():
            yield from cut(events, self.endpoint.max_object_bytes)

    async def send(self, batch: Sequence[Event]) -> None:
        await self.start()
        for account, events in by_account(batch).items():
            await self._write(account, events)

    def _name(self, account: str, events: Sequence[Event]) -> str:
        """The object's name, chosen at the first attempt and kept for the retries."""
        key = batch_key(events)
        name = self._names.get(key)
        if name is None:
            now = time.time()
            name = self._names[key] = object_key(account, self.region, now, uuid7(now))
            while len(self._names) > MAX_PENDING_NAMES:
                self._names.popitem(last=False)
        return name

    async def _write(self, account: str, events: Sequence[Event]) -> None:
        chain = self.chain
        if chain is None:
            name = self._name(account, events)
            # Off the event loop: 8 MiB take ~0.2 s to gzip, a pause ingest would feel.
            body, md5 = await asyncio.to_thread(packed, events)
            await self._put_authorized(name, body, md5)
        else:
            # Shielded as the file target's chained write is: the PUT, the head and the lock
            # end together.
            name = await asyncio.shield(
                asyncio.ensure_future(self._write_chained(chain, account, events))
            )
        self._names.pop(batch_key(events), None)
        log.debug("target %s: wrote %s (%d events)", self.id, name, len(events))

    async def _write_chained(self, chain: Chain, account: str, events: Sequence[Event]) -> str:
        """Take the object's places under the chain's lock, then PUT with the lock let go:
        a dead letter for this target written meanwhile (a full journal shedding) takes the
        places after the object's instead of waiting for the store's answer (up to
        timeout_s). Objects still go one at a time, in the order of their places. Returns
        the object's name."""
        key = batch_key(events)
        async with self._putting:
            async with chain.lock:
                await self._resend_planned(chain, key)
                self._forget_given_up(chain)
                name = self._name(account, events)
                linked = self._reserved.get(key)
                if linked is None:
                    linked = await self._take_places(chain, key, name, events)
                chain.in_flight += 1
            try:
                await self._put_authorized(name, linked.body, linked.md5)
            except Exception as exc:
                async with chain.lock:
                    chain.in_flight -= 1
                    await self._give_back_places(
                        chain, key, linked, events, unanswered=unanswered(exc)
                    )
                raise
            async with chain.lock:
                chain.in_flight -= 1
                self._reserved.pop(key, None)
                self._linked.pop(key, None)
                self._held.pop(key, None)
                for event in events:
                    chain.held.pop(event.id, None)
                if chain.after_write is not None:
                    await chain.after_write(chain)
        return name

    async def _take_places(
        self, chain: Chain, key: str, name: str, events: Sequence[Event]
    ) -> Linked:
        """Link the events from the chain's head (or reuse the body a first attempt linked
        from this same head), keep the plan in the journal, and move the head past the
        object's places: they are this object's until its PUT succeeds or they are given
        back. The caller holds the chain's lock."""
        linked = self._linked.get(key)
        if linked is None or not same_head(linked.base, chain.head):
            # Off the event loop: hashing and gzipping 20,000 lines take a good part of a
            # second. Nothing moves the head meanwhile: this task holds the lock.
            linked = self._linked[key] = await asyncio.to_thread(_link, chain, events)
            while len(self._linked) > MAX_PENDING_NAMES:
                self._linked.popitem(last=False)
        await self._keep_plan(chain, key, name, linked)
        chain.advance(linked.head)
        self._reserved[key] = linked
        while len(self._reserved) > MAX_PENDING_NAMES:
            self._reserved.popitem(last=False)
        return linked

    async def _give_back_places(
        self,
        chain: Chain,
        key: str,
        linked: Linked,
        events: Sequence[Event],
        *,
        unanswered: bool = False,
    ) -> None:
        """A PUT failed: its places go back to the chain when nothing took a place after
        them (its retry links the same events from the same head: the same bytes). Else (a
        dead letter was written meanwhile, chained after them), or when the PUT got no answer
        (the store may yet write the object, after its HEAD found nothing), the object keeps
        its places and a retry PUTs the very same bytes there; its lines are held in the
        chain, so that if its events are given up their letters stand at those places
        (router/deadletter), and an object that lands after all holds the lines its letters
        carry. The caller holds the chain's lock."""
        if unanswered or not same_head(chain.head, linked.head):
            if key not in self._held:
                lines = await asyncio.to_thread(object_lines, linked.body)
                chain.held.update(zip((event.id for event in events), lines, strict=True))
                self._held[key] = events[0].id
            return
        if chain.drop_plan is not None:
            try:
                await chain.drop_plan()  # before another line can take those places
            except (RouterError, OSError):
                log.exception("target %s: cannot drop the planned object", self.id)
                return  # kept: a restart sends it again at its places
        self._kept = None
        self._reserved.pop(key, None)
        chain.advance(linked.base)

    def _forget_given_up(self, chain: Chain) -> None:
        """Objects whose places were held and whose events were then given up: letters stand
        at their places now, so those events (redriven, the same batch again) take new
        places, in a new object. The caller holds the chain's lock."""
        for key, first_id in list(self._held.items()):
            if first_id not in chain.held:
                del self._held[key]
                self._reserved.pop(key, None)
                self._linked.pop(key, None)
                self._names.pop(key, None)

    async def _keep_plan(self, chain: Chain, key: str, name: str, linked: Linked) -> None:
        """The journal keeps the object before its (first) PUT: what a restart after kill -9
        sends again first (Chain.planned)."""
        if chain.keep_plan is None or linked.head is None or self._kept is linked:
            return
        try:
            await chain.keep_plan(
                Planned(key, name, linked.base, linked.head, linked.body, linked.md5)
            )
        except (RouterError, OSError) as exc:
            raise RetryableDeliveryError(
                self.id, f"cannot keep the planned object {name} in the journal: {exc}"
            ) from exc
        self._kept = linked

    async def _resend_planned(self, chain: Chain, key: str) -> None:
        """The first chained write after a start: an object planned before a crash, whose
        places the journal's head did not cover, may be in the bucket; its places are taken
        (Evidence.chain). The same batch sent again IS that object (its name and body are
        reused); anything else first sends that object again, byte for byte under its name.
        The caller holds the chain's lock."""
        planned = chain.planned
        if planned is None:
            return
        linked = Linked(planned.base, planned.head, planned.body, planned.md5)
        if planned.key == key:
            self._names[key], self._linked[key], self._reserved[key] = planned.name, linked, linked
            self._kept = linked  # the journal holds its plan already
        else:
            log.warning(
                "target %s: sending %s again (places %d-%d), planned before a crash",
                self.id,
                planned.name,
                (planned.base.seq if planned.base is not None else 0) + 1,
                planned.head.seq,
            )
            # A failure raises for this write (retried): the plan stays, and its places.
            await self._put_authorized(planned.name, planned.body, planned.md5)
        chain.planned = None
        chain.in_flight -= 1
        if planned.key != key and chain.after_write is not None:
            await chain.after_write(chain)

    async def write_line(self, line: bytes) -> None:
        """Write one line that is not an event (a checkpoint) as an object of its own, under
        the account of the target's CRN; the caller holds the chain lock."""
        now = time.time()
        name = object_key(self.account, self.region, now, uuid7(now))
        body, md5 = packed_lines([line])
        # A checkpoint is a few hundred bytes: a store that does not take it within
        # CHECKPOINT_TIMEOUT_S is down, and must not hold up a shutdown for timeout_s (the
        # journal keeps the head; the next checkpoint covers these places).
        async with asyncio.timeout(min(self.endpoint.timeout_s, CHECKPOINT_TIMEOUT_S)):
            await self.start()
            await self._put_authorized(name, body, md5)

    async def _put_authorized(self, name: str, body: bytes, md5: str) -> None:
        """One PUT, once more with a new IAM token when the first one was refused."""
        for attempt in (1, 2):
            token = await self._token()
            try:
                await self._put(name, body, md5)
            except PermanentDeliveryError as exc:
                if self.tokens is None or exc.status not in AUTH_STATUSES or attempt == 2:
                    raise
                # The token expired or was revoked early: fetch a new one and try once more.
                self.tokens.invalidate(token)
                continue
            return

    async def _token(self) -> str:
        if self.tokens is None:
            return ""
        assert self._session is not None
        self._bearer = await self.tokens.token(self._session, self.id)
        return self._bearer

    async def _put(self, name: str, body: bytes, md5: str) -> None:
        """One PUT; what fails is classified as retryable or permanent."""
        import botocore.exceptions  # imported by start(), with the client

        assert self._client is not None
        where = f"PUT {self.url}/{self.endpoint.bucket}/{name}"
        try:
            # A deadline for the whole request: with a hung store, botocore's read timeout
            # alone did not end a PUT (still waiting after 10 s with read_timeout 0.5 s; the
            # PUT first waits for `100 Continue`, which aiohttp's read timeout seems not to
            # cover).
            async with asyncio.timeout(self.endpoint.timeout_s):
                await self._client.put_object(
                    Bucket=self.endpoint.bucket,
                    Key=name,
                    Body=body,
                    ContentMD5=md5,
                    ContentType="application/x-ndjson",
                    ContentEncoding="gzip",
                )
        except botocore.exceptions.ClientError as exc:
            raise classify(self.id, where, exc.response) from exc
        except TimeoutError as exc:
            if await self._landed(name, md5):
                return
            raise RetryableDeliveryError(
                self.id, f"{where}: no answer within {self.endpoint.timeout_s:g}s"
            ) from exc
        except (
            botocore.exceptions.HTTPClientError,
            botocore.exceptions.ConnectionError,
            aiohttp.ClientError,
        ) as exc:
            if await self._landed(name, md5):
                return
            refused = address_refused(exc)
            raise RetryableDeliveryError(self.id, f"{where}: {refused or exc}") from exc

    async def _landed(self, name: str, md5: str) -> bool:
        """Whether an object whose PUT got no answer (a timeout, a lost connection) is in the
        bucket with these very bytes: a single PUT's ETag is its body's MD5. The store may
        have written it and its answer been lost: then it is delivered, once, and the books
        say so as `verify` does; else (or when the store does not answer this either) the PUT
        failed, and its retry writes the same name and bytes."""
        import botocore.exceptions  # imported by start(), with the client

        assert self._client is not None
        try:
            async with asyncio.timeout(min(self.endpoint.timeout_s, LANDED_TIMEOUT_S)):
                head = await self._client.head_object(Bucket=self.endpoint.bucket, Key=name)
        except (
            botocore.exceptions.ClientError,
            botocore.exceptions.HTTPClientError,
            botocore.exceptions.ConnectionError,
            aiohttp.ClientError,
            TimeoutError,
        ):
            return False
        landed = str(head.get("ETag", "")).strip('"') == base64.b64decode(md5).hex()
        if landed:
            log.info("target %s: %s was stored though its PUT got no answer", self.id, name)
        return landed

    async def objects(self, prefix: str = "") -> AsyncIterator[tuple[str, bytes]]:
        """The objects under `prefix` in key order, as (key, body as stored): what
        `event-router query cos://TARGET/PREFIX` reads. A failure raises a DeliveryError."""
        await self.start()
        import botocore.exceptions  # imported by start(), with the client

        assert self._client is not None
        where = f"{self.url}/{self.endpoint.bucket}/{prefix}"
        try:
            pages = self._client.get_paginator("list_objects_v2")
            await self._token()
            async for page in pages.paginate(Bucket=self.endpoint.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    key = item["Key"]
                    await self._token()  # the bearer of a long listing may need renewing
                    got = await self._client.get_object(Bucket=self.endpoint.bucket, Key=key)
                    async with got["Body"] as stream:
                        body = await stream.read()
                    yield key, body
        except botocore.exceptions.ClientError as exc:
            raise classify(self.id, f"GET {where}", exc.response) from exc
        except (
            botocore.exceptions.HTTPClientError,
            botocore.exceptions.ConnectionError,
            aiohttp.ClientError,
            TimeoutError,
        ) as exc:
            raise RetryableDeliveryError(self.id, f"GET {where}: {exc}") from exc

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None


def unanswered(exc: BaseException) -> bool:
    """Whether a failed PUT may yet have been stored: it got no answer (a timeout, a
    connection lost once it was sent), rather than a refusal or no connection at all."""
    import botocore.exceptions  # a COS target's: imported by its start()

    cause = exc.__cause__
    if isinstance(cause, botocore.exceptions.EndpointConnectionError):
        return False  # never connected: nothing was sent
    return isinstance(
        cause,
        TimeoutError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.ConnectionError
        | aiohttp.ClientError,
    )


def classify(
    target_id: str, where: str, response: Mapping[str, Any]
) -> RetryableDeliveryError | PermanentDeliveryError:
    """The delivery error for an S3 error answer: S3's code and message, and whether it may
    pass (408, 429, 5xx, a throttling code) or not (NoSuchBucket, AccessDenied, ...)."""
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    status = int(meta.get("HTTPStatusCode") or 0) or None
    code = str(error.get("Code") or "")
    text = str(error.get("Message") or "")
    message = f"{where}: {code or 'error'}" + (f": {text}" if text else "")
    message += f" (HTTP {status})" if status else ""
    excerpt = f"{code}: {text}" if code else text
    later = status is not None and (status in RETRYABLE_STATUSES or status >= 500)
    if later or code in RETRYABLE_CODES:
        retry_after = parse_retry_after((meta.get("HTTPHeaders") or {}).get("retry-after"))
        return RetryableDeliveryError(
            target_id, message, status=status, response_excerpt=excerpt, retry_after_s=retry_after
        )
    return PermanentDeliveryError(target_id, message, status=status, response_excerpt=excerpt)
