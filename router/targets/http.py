"""The `http` target: POSTs each batch as a JSON array to a URL.

Failures are classified like Fluent Bit's out_http: connection errors, timeouts, 408, 429 and
5xx may pass and are retryable (a Retry-After header is honoured); any other non-2xx answer is
permanent. Each batch carries an `Idempotency-Key` derived from its event ids, so a receiver
can drop a batch it already took when a retry follows a lost response.
"""

from __future__ import annotations

import email.utils
import hashlib
import time
from collections.abc import Sequence

import aiohttp

from router import __version__
from router.config import HttpEndpointConfig, TargetConfig
from router.errors import PermanentDeliveryError, RetryableDeliveryError
from router.events import Event

RETRYABLE_STATUSES = frozenset({408, 429})
EXCERPT_BYTES = 512


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


class HttpTarget:
    """Sends batches to one HTTP endpoint over a shared keep-alive session."""

    def __init__(self, target_id: str, endpoint: HttpEndpointConfig) -> None:
        self.id = target_id
        self.endpoint = endpoint
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, config: TargetConfig) -> HttpTarget:
        assert isinstance(config.endpoint, HttpEndpointConfig)
        return cls(config.id, config.endpoint)

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout_s),
                connector=aiohttp.TCPConnector(ssl=self.endpoint.tls_verify),
                headers={"User-Agent": f"event-router/{__version__}"},
            )

    async def send(self, batch: Sequence[Event]) -> None:
        await self.start()
        assert self._session is not None
        body = b"[" + b",".join(event.encoded() for event in batch) + b"]"
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": batch_key(batch),
            **self.endpoint.headers,
        }
        try:
            async with self._session.post(self.endpoint.url, data=body, headers=headers) as resp:
                if 200 <= resp.status < 300:
                    return
                excerpt = (await resp.content.read(EXCERPT_BYTES)).decode("utf-8", "replace")
                message = f"HTTP {resp.status} from {self.endpoint.url}"
                if resp.status in RETRYABLE_STATUSES or resp.status >= 500:
                    raise RetryableDeliveryError(
                        self.id,
                        message,
                        status=resp.status,
                        response_excerpt=excerpt,
                        retry_after_s=parse_retry_after(resp.headers.get("Retry-After")),
                    )
                raise PermanentDeliveryError(
                    self.id, message, status=resp.status, response_excerpt=excerpt
                )
        except (TimeoutError, aiohttp.ClientError) as exc:
            kind = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            raise RetryableDeliveryError(
                self.id, f"POST {self.endpoint.url}: {kind or type(exc).__name__}"
            ) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
