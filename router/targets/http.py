"""The `http` target: POSTs each batch as a JSON array to a URL.

Optional: bearer or basic auth, an HMAC-SHA256 signature of each body with a timestamp (so a
receiver can check the body and refuse replays), a CA bundle and a client certificate (mTLS).

Failures are classified like Fluent Bit's out_http: connection errors, timeouts, 408, 429 and
5xx may pass and are retryable (a Retry-After header is honoured); any other non-2xx answer is
permanent. Redirects are never followed: a client that follows a 301/302/303 turns the POST
into a body-less GET whose 200 would count as delivered (an SSO gateway or an http->https
proxy does this), so a 3xx is a permanent failure that names its Location. Each batch carries
an `Idempotency-Key` derived from its event ids, so a receiver can drop a batch it already took
when a retry follows a lost response.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp

from router import __version__
from router.errors import PermanentDeliveryError, RetryableDeliveryError
from router.events import Event
from router.masking import mask_url

RETRYABLE_STATUSES = frozenset({408, 429})
EXCERPT_BYTES = 512


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpAuthConfig:
    """`bearer` sends `Authorization: Bearer <token>`; `basic` sends username and password."""

    type: Literal["bearer", "basic"]
    token: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class SigningConfig:
    """HMAC-SHA256 over `<unix time>.<body>` with a shared secret, sent as
    `<header>: t=<unix time>,v1=<hex>` so a receiver can verify the body and refuse replays."""

    secret: str = field(repr=False)
    header: str = "X-Event-Router-Signature"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsClientConfig:
    """A CA bundle to trust instead of the system's, and a client certificate for mTLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpEndpointConfig:
    """An HTTP(S) endpoint that takes a JSON array of events per POST."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    tls_verify: bool = True
    auth: HttpAuthConfig | None = None
    signing: SigningConfig | None = None
    tls: TlsClientConfig | None = None


# The JSON Schema of a `tls` object (the http and syslog endpoints have one).
TLS_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "ca_file": {"type": "string", "minLength": 1},
        "cert_file": {"type": "string", "minLength": 1},
        "key_file": {"type": "string", "minLength": 1},
    },
    "dependentRequired": {"key_file": ["cert_file"]},
}

# The JSON Schema of `http_endpoint` (the config loader puts it in the target section).
ENDPOINT_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["url"],
    "properties": {
        "url": {"type": "string", "pattern": "^https?://"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "tls_verify": {"type": "boolean"},
        "auth": {
            "oneOf": [
                {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["type", "token"],
                    "properties": {
                        "type": {"const": "bearer"},
                        "token": {"type": "string", "minLength": 1},
                    },
                },
                {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["type", "username", "password"],
                    "properties": {
                        "type": {"const": "basic"},
                        "username": {"type": "string", "minLength": 1},
                        "password": {"type": "string"},
                    },
                },
            ]
        },
        "signing": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secret"],
            "properties": {
                "secret": {
                    "type": "string",
                    "minLength": 1,
                    "description": "Use a reference: ${env:NAME} or ${file:/path}",
                },
                "header": {"type": "string", "pattern": "^[A-Za-z0-9-]+$"},
            },
        },
        "tls": TLS_SCHEMA,
    },
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def batch_key(batch: Sequence[Event]) -> str:
    """The same events in the same order always give the same key."""
    digest = hashlib.sha256()
    for event in batch:
        digest.update(event.id.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def new_session(timeout_s: float, tls: bool | ssl.SSLContext) -> aiohttp.ClientSession:
    """A keep-alive session for one target, with its timeout and TLS settings."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=aiohttp.TCPConnector(ssl=tls),
        headers={"User-Agent": f"event-router/{__version__}"},
    )


def tls_context(verify: bool, tls: TlsClientConfig | None) -> bool | ssl.SSLContext:
    """aiohttp's `ssl=`: the default checks, none, or a context with our CA and client cert."""
    if tls is None:
        return verify
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def sign(secret: str, body: bytes, at: int) -> str:
    """`t=<at>,v1=<hex HMAC-SHA256(secret, "<at>." + body)>`: what a receiver recomputes, after
    refusing a `t` too far from its own clock (a replay)."""
    mac = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def auth_header(auth: HttpAuthConfig | None) -> dict[str, str]:
    if auth is None:
        return {}
    if auth.type == "bearer":
        return {"Authorization": f"Bearer {auth.token}"}
    credentials = f"{auth.username or ''}:{auth.password or ''}".encode()
    return {"Authorization": "Basic " + base64.b64encode(credentials).decode("ascii")}


async def raise_for_status(target_id: str, url: str, resp: aiohttp.ClientResponse) -> None:
    """Classify an answer: 2xx returns; 408, 429 and 5xx are retryable (with Retry-After);
    any other status is permanent, a redirect included (it is never followed, see above).
    Shared by every target that speaks HTTP."""
    if 200 <= resp.status < 300:
        return
    excerpt = (await resp.content.read(EXCERPT_BYTES)).decode("utf-8", "replace")
    message = f"HTTP {resp.status} from {url}"
    if 300 <= resp.status < 400:
        location = mask_url(resp.headers.get("Location", "(none)"))
        message += f": a redirect to {location}, not followed (configure the final URL)"
    if resp.status in RETRYABLE_STATUSES or resp.status >= 500:
        raise RetryableDeliveryError(
            target_id,
            message,
            status=resp.status,
            response_excerpt=excerpt,
            retry_after_s=parse_retry_after(resp.headers.get("Retry-After")),
        )
    raise PermanentDeliveryError(target_id, message, status=resp.status, response_excerpt=excerpt)


async def post(
    session: aiohttp.ClientSession,
    target_id: str,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    on_status: Callable[[aiohttp.ClientResponse], Awaitable[None]] | None = None,
) -> None:
    """POST one body; connection errors and timeouts become retryable errors. `on_status` may
    look at the answer first (e.g. a 401 that calls for a new token)."""
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            if on_status is not None:
                await on_status(resp)
            await raise_for_status(target_id, url, resp)
    except (aiohttp.ClientError, TimeoutError) as exc:
        kind = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        raise RetryableDeliveryError(
            target_id, f"POST {url}: {kind or type(exc).__name__}"
        ) from exc


class HttpTarget:
    """Sends batches to one HTTP endpoint over a shared keep-alive session."""

    def __init__(self, target_id: str, endpoint: HttpEndpointConfig) -> None:
        self.id = target_id
        self.endpoint = endpoint
        self._headers = {
            "Content-Type": "application/json",
            **auth_header(endpoint.auth),
            **endpoint.headers,
        }
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = new_session(
                self.endpoint.timeout_s, tls_context(self.endpoint.tls_verify, self.endpoint.tls)
            )

    def unsendable(self, event: Event) -> str | None:
        return None

    def requests(self, batch: Sequence[Event]) -> Iterator[Sequence[Event]]:
        yield batch  # one request (one write) takes the whole batch

    async def send(self, batch: Sequence[Event]) -> None:
        await self.start()
        assert self._session is not None
        body = b"[" + b",".join(event.encoded() for event in batch) + b"]"
        headers = {**self._headers, "Idempotency-Key": batch_key(batch)}
        if self.endpoint.signing is not None:
            signing = self.endpoint.signing
            headers[signing.header] = sign(signing.secret, body, int(time.time()))
        await post(self._session, self.id, self.endpoint.url, body, headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
