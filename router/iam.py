"""IBM Cloud IAM access tokens from an API key, for targets that send to IBM services.

A token is fetched with `POST <iam_url>/identity/token` (grant type apikey), cached, and
refreshed once 80% of its lifetime has passed (as IBM's own SDK core does), or at once when the
service answers 401/403 (`invalidate`). Concurrent callers share one refresh. Sources are shared
per (IAM URL, API key), so several targets with the same key make one token request between
them. The API key is never logged, never part of an error message, never returned anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import ClassVar

import aiohttp

from router.errors import RetryableDeliveryError

GRANT_TYPE = "urn:ibm:params:oauth:grant-type:apikey"
REFRESH_AT_FRACTION = 0.8
EXCERPT_BYTES = 300


class IamTokenSource:
    """Caches one IAM access token for one API key."""

    _shared: ClassVar[dict[tuple[str, str], IamTokenSource]] = {}

    def __init__(
        self, iam_url: str, api_key: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.token_url = iam_url.rstrip("/") + "/identity/token"
        self._api_key = api_key
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    @classmethod
    def shared(cls, iam_url: str, api_key: str) -> IamTokenSource:
        """The one source for this IAM URL and key (the key is stored hashed in the index)."""
        key = (iam_url.rstrip("/"), hashlib.sha256(api_key.encode()).hexdigest())
        source = cls._shared.get(key)
        if source is None:
            source = cls._shared[key] = cls(iam_url, api_key)
        return source

    def __repr__(self) -> str:  # never show the key, even in a debugger or a traceback
        return f"IamTokenSource({self.token_url!r})"

    async def token(self, session: aiohttp.ClientSession, target_id: str) -> str:
        """A valid access token, fetched only when missing or past 80% of its lifetime."""
        if self._token is not None and self._clock() < self._refresh_at:
            return self._token
        async with self._lock:
            # Another caller may have refreshed while this one waited for the lock.
            if self._token is None or self._clock() >= self._refresh_at:
                await self._fetch(session, target_id)
            assert self._token is not None
            return self._token

    def invalidate(self, token: str) -> None:
        """The service refused `token`: the next `token()` fetches a new one (unless another
        caller already did)."""
        if self._token == token:
            self._token = None

    async def _fetch(self, session: aiohttp.ClientSession, target_id: str) -> None:
        self.fetches += 1
        try:
            async with session.post(
                self.token_url,
                data={"grant_type": GRANT_TYPE, "apikey": self._api_key},
                headers={"Accept": "application/json"},
                allow_redirects=False,  # a redirect would carry the request elsewhere as a GET
            ) as resp:
                if resp.status != 200:
                    excerpt = (await resp.content.read(EXCERPT_BYTES)).decode("utf-8", "replace")
                    raise RetryableDeliveryError(
                        target_id,
                        f"IAM token request to {self.token_url} answered {resp.status}",
                        status=resp.status,
                        response_excerpt=self._redact(excerpt),
                    )
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise RetryableDeliveryError(
                target_id, f"IAM token request to {self.token_url} failed: {type(exc).__name__}"
            ) from None  # the cause could carry the form body, and with it the key
        try:
            token = str(body["access_token"])
            lifetime = float(body.get("expires_in") or body["expiration"] - time.time())
        except (KeyError, TypeError, ValueError):
            raise RetryableDeliveryError(
                target_id, f"IAM token response from {self.token_url} has no usable token"
            ) from None
        self._token = token
        self._refresh_at = self._clock() + REFRESH_AT_FRACTION * max(lifetime, 0.0)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[REDACTED]") if self._api_key else text
