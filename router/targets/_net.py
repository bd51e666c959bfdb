"""What every target that speaks HTTP shares: its session, client TLS, the POST, and how an
answer is classified.

Failures are classified like Fluent Bit's out_http: connection errors, timeouts, 408, 429 and
5xx may pass and are retryable (a Retry-After header is honoured); any other non-2xx answer is
permanent. Redirects are never followed: a client that follows a 301/302/303 turns the POST
into a body-less GET whose 200 would count as delivered (an SSO gateway or an http->https
proxy does this), so a 3xx is a permanent failure that names its Location. A batch's
idempotency key is derived from its event ids, so a receiver (or an object name) can recognise
a batch it already took when a retry follows a lost response.
"""

from __future__ import annotations

import email.utils
import hashlib
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from router import __version__
from router.errors import PermanentDeliveryError, RetryableDeliveryError
from router.events import Event
from router.masking import mask_url

RETRYABLE_STATUSES = frozenset({408, 429})
EXCERPT_BYTES = 512


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsClientConfig:
    """A CA bundle to trust instead of the system's, and a client certificate for mTLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


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


async def raise_for_status(target_id: str, url: str, resp: aiohttp.ClientResponse) -> None:
    """Classify an answer: 2xx returns; 408, 429 and 5xx are retryable (with Retry-After);
    any other status is permanent, a redirect included (it is never followed, see above)."""
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
