"""The `http` target: POSTs each batch as a JSON array to a URL.

Optional: bearer or basic auth, an HMAC-SHA256 signature of each body with a timestamp (so a
receiver can check the body and refuse replays), a CA bundle and a client certificate (mTLS).

Failures are classified in `_net` like Fluent Bit's out_http (connection errors, timeouts, 408,
429 and 5xx are retryable; any other non-2xx answer, a never-followed redirect included, is
permanent). Each batch carries an `Idempotency-Key` derived from its event ids, so a receiver
can drop a batch it already took when a retry follows a lost response.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp

from router.events import Event
from router.targets._net import (
    TLS_SCHEMA,
    AddressBound,
    TlsClientConfig,
    batch_key,
    new_session,
    post,
    tls_context,
)


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
class HttpEndpointConfig:
    """An HTTP(S) endpoint that takes a JSON array of events per POST."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    tls_verify: bool = True
    auth: HttpAuthConfig | None = None
    signing: SigningConfig | None = None
    tls: TlsClientConfig | None = None


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


class HttpTarget:
    """Sends batches to one HTTP endpoint over a shared keep-alive session."""

    def __init__(self, target_id: str, endpoint: HttpEndpointConfig) -> None:
        self.id = target_id
        self.endpoint = endpoint
        self.bound: AddressBound | None = None  # set by build_target (targets/__init__.py)
        self._headers = {
            "Content-Type": "application/json",
            **auth_header(endpoint.auth),
            **endpoint.headers,
        }
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = new_session(
                self.endpoint.timeout_s,
                tls_context(self.endpoint.tls_verify, self.endpoint.tls),
                self.bound,
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
