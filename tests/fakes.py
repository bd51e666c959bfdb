"""Real servers and real events for tests: no mocks, everything speaks HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ACCOUNT = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
INSTANCE = "0b5a3c6e-1f2d-4e5a-9b8c-7d6e5f4a3b2c"


def sm_crn(location: str = "us-south", service: str = "secrets-manager") -> str:
    """A logSourceCRN for a Secrets Manager instance (or another service) in a location."""
    loc = "" if location == "" else location
    return f"crn:v1:bluemix:public:{service}:{loc}:a/{ACCOUNT}:{INSTANCE}::"


BASE_EVENT: dict[str, Any] = {
    "action": "secrets-manager.secret.create",
    "eventTime": "2024-05-01T12:00:00.12+0000",
    "initiator": {
        "id": "IBMid-550000AB12",
        "name": "alice@example.com",
        "typeURI": "service/security/account/user",
        "credential": {"type": "token"},
        "host": {"address": "192.0.2.10", "addressType": "IPv4", "agent": "curl/8.0"},
    },
    "target": {
        "id": f"crn:v1:bluemix:public:secrets-manager:us-south:a/{ACCOUNT}:{INSTANCE}:secret:"
        "3f0c6a2e-1111-2222-3333-444455556666",
        "name": "db-password",
        "typeURI": "secrets-manager/secret",
    },
    "outcome": "success",
    "reason": {"reasonCode": 201, "reasonType": "Created"},
    "severity": "normal",
    "observer": {"name": "ActivityTracker"},
    "logSourceCRN": sm_crn(),
    "message": "Secrets Manager: create secret db-password",
    "saveServiceCopy": True,
    "dataEvent": False,
    "requestData": {"secret_type": "arbitrary"},
    "responseData": {},
}


def incompressible(chars: int) -> str:
    """`chars` characters that deflate can hardly shrink (random base64): a message that takes
    its room in the journal, which packs large frames (router/journal/salvage.py `pack`)."""
    return base64.b64encode(os.urandom(chars)).decode()[:chars]


def make_event(
    *, location: str = "us-south", action: str | None = None, **fields: Any
) -> dict[str, Any]:
    """A valid Secrets Manager event; `location` sets the logSourceCRN, fields override keys."""
    event = copy.deepcopy(BASE_EVENT)
    event["logSourceCRN"] = sm_crn(location)
    if action is not None:
        event["action"] = action
    event.update(fields)
    return event


@dataclass
class Received:
    """One request a ScriptedReceiver got."""

    headers: dict[str, str]
    body: Any
    status: int
    at: float


@dataclass
class ScriptedReceiver:
    """An HTTP endpoint that answers a scripted list of statuses and records every request.

    The last status repeats once the script runs out. `hang_s` makes a status entry of 0
    mean "sleep this long before answering 200" (to test client timeouts).
    """

    statuses: Sequence[int] = (200,)
    headers: dict[int, dict[str, str]] = field(default_factory=dict)
    hang_s: float = 0.0
    requests: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> ScriptedReceiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/ingest"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        index = min(len(self.requests), len(self.statuses) - 1)
        status = self.statuses[index]
        body = orjson.loads(await request.read())
        self.requests.append(Received(dict(request.headers), body, status or 200, time.time()))
        if status == 0:
            await asyncio.sleep(self.hang_s)
            status = 200
        return web.Response(
            status=status, text=f"status {status}", headers=self.headers.get(status)
        )

    @property
    def delivered_events(self) -> list[dict[str, Any]]:
        """Events in requests that were answered 2xx."""
        return [e for r in self.requests if 200 <= r.status < 300 for e in r.body]


@dataclass
class RedirectingReceiver:
    """An SSO gateway or an http->https proxy in front of a SIEM: a POST to any path but
    /landing is answered `status` (302) with a Location to /landing, which answers 200 to any
    method. It records
    every request as (method, path, body), so a test sees whether a client followed."""

    status: int = 302
    location_userinfo: str = ""  # e.g. "user:secret@", to check it is masked where shown
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)
    url: str = ""
    base: str = ""
    location: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> RedirectingReceiver:
        app = web.Application()
        app.router.add_route("*", "/landing", self._land)
        app.router.add_post("/{tail:.*}", self._redirect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port = self._runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/ingest"
        self.location = f"http://{self.location_userinfo}127.0.0.1:{port}/landing"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _redirect(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, await request.read()))
        return web.Response(status=self.status, headers={"Location": self.location})

    async def _land(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, await request.read()))
        return web.Response(status=200, text="welcome")


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], *, timeout_s: float = 10.0, what: str = ""
) -> None:
    """Wait until `predicate()` is true, failing the test after `timeout_s` (no bare sleeps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def read_ndjson(path: Any) -> list[dict[str, Any]]:
    """Every JSON line of a file (an empty list when it does not exist), but the checkpoint
    lines of an evidence chain: they are not events (tests/integration/test_evidence.py)."""
    try:
        with open(path, "rb") as f:
            return [
                orjson.loads(line)
                for line in f
                if line.strip() and not line.startswith(b'{"_checkpoint":')
            ]
    except FileNotFoundError:
        return []


# -- IBM Cloud IAM, with trusted profiles and signed tokens ---------------------------------

IAM_ISSUER = "https://iam.cloud.ibm.com/identity"
"""The `iss` of IBM Cloud IAM's access tokens."""
IAM_AUDIENCE = "event-router-tests"
"""The `aud` a consumer of these tokens (the test Kafka broker) is told to expect."""
CR_TOKEN_GRANT = "urn:ibm:params:oauth:grant-type:cr-token"
APIKEY_GRANT = "urn:ibm:params:oauth:grant-type:apikey"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class IamSigningKey:
    """An RSA key pair whose public half IAM publishes as a JWKS (`/identity/keys`)."""

    kid: str = "test-key-1"
    private: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def jwks(self) -> dict[str, Any]:
        numbers = self.private.public_key().public_numbers()

        def encode(n: int) -> str:
            return _b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))

        key = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid}
        return {"keys": [key | {"n": encode(numbers.n), "e": encode(numbers.e)}]}

    def sign(self, claims: dict[str, Any]) -> str:
        """An RS256 JWT (RFC 7515 compact form) of `claims`."""
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{_b64url(orjson.dumps(header))}.{_b64url(orjson.dumps(claims))}"
        signature = self.private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


@dataclass
class IamGrant:
    """One token request IAM got: its form, what it answered, the token it gave (if any)."""

    form: dict[str, str]
    status: int
    token: str | None = None


@dataclass
class FakeIam:
    """IBM Cloud IAM's token endpoint on loopback: the API key grant and the compute-resource
    token grant of a trusted profile (IBM SDK's ContainerAuthenticator), each form field
    checked as IAM documents it; access tokens are RS256 JWTs whose keys `/identity/keys`
    publishes, so a consumer can validate them (Kafka's OAuthBearerValidatorCallbackHandler).

    A cr-token grant is honoured when `cr_token` is one of `cr_tokens` and it names exactly
    one of profile_id/profile_name/profile_crn, being `profile`'s; anything else is the 400
    IAM answers. `statuses` script the first answers (0: answer normally)."""

    api_keys: set[str] = field(default_factory=set)
    cr_tokens: set[str] = field(default_factory=set)
    profile: tuple[str, str] = ("profile_id", "Profile-9f0e6a3c-5d4b-4c2a-8e1f-0a9b8c7d6e5f")
    expires_in_s: float = 3600
    statuses: Sequence[int] = (0,)
    key: IamSigningKey = field(default_factory=IamSigningKey)
    # What a test may get wrong on purpose: the tokens' audience, or a key that signs them
    # but that /identity/keys does not publish (a forged token).
    audience: str = IAM_AUDIENCE
    forger: IamSigningKey | None = None
    grants: list[IamGrant] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> FakeIam:
        app = web.Application()
        app.router.add_post("/identity/token", self._token)
        app.router.add_get("/identity/keys", self._keys)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/identity/keys"

    @property
    def issued(self) -> list[str]:
        """The access tokens handed out, in order."""
        return [grant.token for grant in self.grants if grant.token is not None]

    async def _keys(self, request: web.Request) -> web.Response:
        return web.json_response(self.key.jwks())

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        scripted = self.statuses[min(len(self.grants), len(self.statuses) - 1)]
        grant = IamGrant(form, scripted or 200)
        self.grants.append(grant)
        if scripted:
            return web.json_response({"errorMessage": f"scripted {scripted}"}, status=scripted)
        if request.content_type != "application/x-www-form-urlencoded":
            return self._refuse(grant, "BXNIM0109E", "content type is not form-encoded")
        subject = self._subject(form)
        if isinstance(subject, tuple):
            return self._refuse(grant, *subject)
        now = int(time.time())
        claims = {
            "iss": IAM_ISSUER,
            "aud": self.audience,
            "sub": subject,
            "iam_id": subject,
            "grant_type": form["grant_type"],
            "scope": "ibm openid",
            "iat": now,
            "exp": now + int(self.expires_in_s),
            "jti": f"grant-{len(self.grants)}",
        }
        grant.token = (self.forger or self.key).sign(claims)
        return web.json_response(
            {
                "access_token": grant.token,
                "token_type": "Bearer",
                "expires_in": self.expires_in_s,
                "expiration": now + int(self.expires_in_s),
            }
        )

    def _subject(self, form: dict[str, str]) -> str | tuple[str, str]:
        """The token's subject, or (code, message) of IAM's refusal."""
        if form.get("grant_type") == APIKEY_GRANT:
            if form.get("apikey") in self.api_keys:
                return "iam-ServiceId-0f1e2d3c"
            return ("BXNIM0415E", "Provided API key could not be found")
        if form.get("grant_type") != CR_TOKEN_GRANT:
            return ("BXNIM0103E", f"unsupported grant type {form.get('grant_type')!r}")
        named = [name for name in ("profile_id", "profile_name", "profile_crn") if name in form]
        if len(named) != 1:
            return ("BXNIM0301E", f"exactly one profile selector expected, got {named}")
        if form.get("cr_token") not in self.cr_tokens:
            return ("BXNIM0438E", "the compute resource token is not valid")
        if (named[0], form[named[0]]) != self.profile:
            return ("BXNIM0440E", "the compute resource is not trusted by this profile")
        return f"iam-{self.profile[1]}"

    @staticmethod
    def _refuse(grant: IamGrant, code: str, message: str) -> web.Response:
        grant.status = 400
        return web.json_response({"errorCode": code, "errorMessage": message}, status=400)


class IamThread:
    """A FakeIam on its own event loop in a thread, for a peer that outlives each test's loop
    (a Kafka broker fetching `/identity/keys` for as long as it runs)."""

    def __init__(self, iam: FakeIam) -> None:
        self.iam = iam
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FakeIam:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.iam.start(), self._loop).result(timeout=10)
        return self.iam

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.iam.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
