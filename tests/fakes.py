"""Real servers and real events for tests: no mocks, everything speaks HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

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
