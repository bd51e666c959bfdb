"""IBM Cloud IAM access tokens for targets that send to IBM services: from an API key, or from
a trusted profile with a compute-resource token, as IBM workloads authenticate without a key.

A token is fetched with `POST <iam_url>/identity/token`, form-encoded:
- API key: grant type `urn:ibm:params:oauth:grant-type:apikey`, `apikey`.
- Trusted profile (IBM's SDK ContainerAuthenticator): grant type
  `urn:ibm:params:oauth:grant-type:cr-token`, `cr_token` (the file Kubernetes, Code Engine or
  IKS mount into the workload) and one of `profile_id`, `profile_name` or `profile_crn`. IAM
  looks a profile_name up in the account of the compute resource the token belongs to, so the
  grant takes no account id. The file is read again at every fetch (off the event loop):
  Kubernetes rotates a projected service-account token well before it expires.
The token is cached and refreshed once 80% of its lifetime has passed (as IBM's own SDK core
does), or at once when the service answers 401/403 (`invalidate`). Concurrent callers share
one refresh. Sources are shared per (IAM URL, identity), so several targets with the same
identity make one token request between them.

Failures: IAM refusing the grant (a 4xx but 408/429: a wrong key, a profile the compute
resource is not trusted by, an expired CR token) and a token file that cannot be read are
permanent, so the batch dead-letters with the reason rather than retrying for ever; IAM's 5xx,
408, 429, a timeout or a lost connection are retryable. The API key and the CR token are never
logged, never part of an error message, never returned anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Final

import aiohttp

from router.errors import PermanentDeliveryError, RetryableDeliveryError

GRANT_TYPE = "urn:ibm:params:oauth:grant-type:apikey"
CR_TOKEN_GRANT_TYPE = "urn:ibm:params:oauth:grant-type:cr-token"
REFRESH_AT_FRACTION = 0.8
EXCERPT_BYTES = 300
RETRYABLE_STATUSES: Final = frozenset({408, 429})

DEFAULT_CR_TOKEN_FILES: Final = (
    "/var/run/secrets/tokens/vault-token",
    "/var/run/secrets/tokens/sa-token",
    "/var/run/secrets/codeengine.cloud.ibm.com/compute-resource-token/token",
)
"""Where IBM's SDK cores (Go, Node, Java, Python) look for the CR token when no file is named,
in this order, the first that exists winning: IKS's projected volumes, then Code Engine's."""

MAX_CR_TOKEN_BYTES: Final = 64 * 1024
"""A CR token is a JWT of a few KB; a larger file is not one (and is not read whole)."""

PROFILE_SELECTORS: Final = ("profile_id", "profile_name", "profile_crn")

SET_BY_LOADER: Final = MappingProxyType({"set_by": "config loader"})
"""The metadata of an endpoint field the config loader fills in from the top-level `iam`
section and no endpoint schema names: neither the YAML's endpoint nor the API can set it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustedProfileConfig:
    """The trusted profile the daemon's compute resource assumes: exactly one of its id, name
    or CRN, and the file that holds the compute-resource token (unset: IBM's default list)."""

    profile_id: str | None = None
    profile_name: str | None = None
    profile_crn: str | None = None
    cr_token_file: str | None = None

    @property
    def selector(self) -> tuple[str, str]:
        """The form field naming the profile and its value (`("profile_id", "Profile-...")`)."""
        for name in PROFILE_SELECTORS:
            value = getattr(self, name)
            if value:
                return name, value
        raise ValueError("a trusted profile names none of profile_id, profile_name, profile_crn")


class CrTokenError(Exception):
    """The compute-resource token file cannot be used; the message says which and why."""


def read_cr_token(cr_token_file: str | None) -> str:
    """The CR token from `cr_token_file`, else from the first of DEFAULT_CR_TOKEN_FILES that
    exists. Blocking: call it in a thread. Only a regular file is read (never a FIFO or a
    device, which could block), at most MAX_CR_TOKEN_BYTES, and an empty one is refused."""
    if cr_token_file is not None:
        return _read_token_file(cr_token_file)
    for path in DEFAULT_CR_TOKEN_FILES:
        if os.path.exists(path):
            return _read_token_file(path)
    raise CrTokenError(
        "cr_token_file is not set and none of IBM's default compute-resource token files "
        f"exists ({', '.join(DEFAULT_CR_TOKEN_FILES)})"
    )


def _read_token_file(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise CrTokenError(f"compute-resource token file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CrTokenError(f"compute-resource token file {path}: not a regular file")
        if info.st_size > MAX_CR_TOKEN_BYTES:
            raise CrTokenError(
                f"compute-resource token file {path}: {info.st_size} bytes, more than a token "
                f"({MAX_CR_TOKEN_BYTES} at most)"
            )
        data = os.read(fd, MAX_CR_TOKEN_BYTES + 1)
    except OSError as exc:
        raise CrTokenError(f"compute-resource token file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    token = data.decode("utf-8", "replace").strip()
    if not token:
        raise CrTokenError(f"compute-resource token file {path} is empty")
    return token


class IamTokenSource:
    """Caches one IAM access token for one identity: an API key or a trusted profile."""

    _shared: ClassVar[dict[tuple[str, str], IamTokenSource]] = {}

    def __init__(
        self,
        iam_url: str,
        api_key: str | None = None,
        *,
        profile: TrustedProfileConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (api_key is None) == (profile is None):
            raise ValueError("an IAM token source takes an API key or a trusted profile")
        self.token_url = iam_url.rstrip("/") + "/identity/token"
        self._api_key = api_key
        self.profile = profile
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    @classmethod
    def shared(cls, iam_url: str, api_key: str) -> IamTokenSource:
        """The one source for this IAM URL and key (the key is stored hashed in the index)."""
        identity = "apikey:" + hashlib.sha256(api_key.encode()).hexdigest()
        return cls._one(iam_url, identity, lambda: cls(iam_url, api_key))

    @classmethod
    def shared_profile(cls, iam_url: str, profile: TrustedProfileConfig) -> IamTokenSource:
        """The one source for this IAM URL, trusted profile and token file."""
        name, value = profile.selector
        identity = f"profile:{name}={value}:{profile.cr_token_file}"
        return cls._one(iam_url, identity, lambda: cls(iam_url, profile=profile))

    @classmethod
    def _one(
        cls, iam_url: str, identity: str, make: Callable[[], IamTokenSource]
    ) -> IamTokenSource:
        key = (iam_url.rstrip("/"), identity)
        source = cls._shared.get(key)
        if source is None:
            source = cls._shared[key] = make()
        return source

    def __repr__(self) -> str:  # never show the key, even in a debugger or a traceback
        return f"IamTokenSource({self.token_url!r})"

    def describe(self) -> str:
        """Which identity this is, for error messages: never the key itself."""
        if self.profile is None:
            return "API key"
        name, value = self.profile.selector
        return f"trusted profile {name}={value}"

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

    async def _form(self, target_id: str) -> dict[str, str]:
        """The token request's form; the CR token is read from its file now, every time."""
        if self.profile is None:
            assert self._api_key is not None
            return {"grant_type": GRANT_TYPE, "apikey": self._api_key}
        try:
            cr_token = await asyncio.to_thread(read_cr_token, self.profile.cr_token_file)
        except CrTokenError as exc:
            raise PermanentDeliveryError(
                target_id, f"cannot get an IAM token for {self.describe()}: {exc}"
            ) from None
        name, value = self.profile.selector
        return {"grant_type": CR_TOKEN_GRANT_TYPE, "cr_token": cr_token, name: value}

    async def _fetch(self, session: aiohttp.ClientSession, target_id: str) -> None:
        self.fetches += 1
        form = await self._form(target_id)
        secret = form.get("apikey") or form.get("cr_token") or ""
        try:
            async with session.post(
                self.token_url,
                data=form,
                headers={"Accept": "application/json"},
                allow_redirects=False,  # a redirect would carry the request elsewhere as a GET
            ) as resp:
                if resp.status != 200:
                    excerpt = (await resp.content.read(EXCERPT_BYTES)).decode("utf-8", "replace")
                    refused = resp.status < 500 and resp.status not in RETRYABLE_STATUSES
                    error = PermanentDeliveryError if refused else RetryableDeliveryError
                    raise error(
                        target_id,
                        f"IAM token request to {self.token_url} ({self.describe()}) answered "
                        f"{resp.status}" + (": IAM refused the grant" if refused else ""),
                        status=resp.status,
                        response_excerpt=_redact(excerpt, secret),
                    )
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # A connection that could not be made says why (host, port and the socket's
            # reason: refused, no such name, an address a target's AddressBound refuses);
            # it never holds the form. Anything else is named by its class only.
            why = str(exc) if isinstance(exc, aiohttp.ClientConnectorError) else ""
            raise RetryableDeliveryError(
                target_id,
                f"IAM token request to {self.token_url} failed: {why or type(exc).__name__}",
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


def token_source(
    iam_url: str, api_key: str | None, profile: TrustedProfileConfig | None
) -> IamTokenSource:
    """The shared source of an endpoint's identity: its API key (its own or the daemon's),
    else the daemon's trusted profile."""
    if api_key:
        return IamTokenSource.shared(iam_url, api_key)
    if profile is not None:
        return IamTokenSource.shared_profile(iam_url, profile)
    raise ValueError("an endpoint without an api_key or a trusted profile has no IAM identity")


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "[REDACTED]") if secret else text
