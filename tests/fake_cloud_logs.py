"""A loopback IBM Cloud Logs: the IAM token endpoint and the `/logs/v1/singles` ingress.

It speaks the documented protocol and checks every documented field, so a test that passes
against it sends what the real service takes: a form-encoded apikey grant for a token with an
`expires_in`, then JSON arrays of records with `applicationName`, `subsystemName`, `text`
(an object), `severity` 1-6, `timestamp` in ms, and `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from router.iam import GRANT_TYPE

API_KEY = "test-api-key-0123456789abcdef-DO-NOT-LEAK"
RECORD_TYPES = {
    "applicationName": str,
    "subsystemName": str,
    "computerName": str,
    "text": dict,
    "severity": int,
    "timestamp": int,
}


@dataclass
class FakeCloudLogs:
    """IAM and ingress on one aiohttp server; `ingress_statuses` script the ingress answers
    (the last repeats); a status of 0 means "answer normally"."""

    expires_in_s: float = 3600
    ingress_statuses: Sequence[int] = (0,)
    retry_after: str | None = None
    token_suffix: str = ""  # e.g. "\n": a token no HTTP client can put in a header
    token_requests: int = 0
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    requests: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> FakeCloudLogs:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/identity/token", self._token)
        app.router.add_post("/logs/v1/singles", self._singles)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def expire_all_tokens(self) -> None:
        self.tokens = dict.fromkeys(self.tokens, 0.0)

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        if request.content_type != "application/x-www-form-urlencoded":
            self.problems.append(f"token request content type {request.content_type}")
            return web.json_response({"errorMessage": "bad content type"}, status=400)
        form = await request.post()
        if form.get("grant_type") != GRANT_TYPE or form.get("apikey") != API_KEY:
            return web.json_response(
                {"errorCode": "BXNIM0415E", "errorMessage": "Provided API key could not be found"},
                status=400,
            )
        token = f"token-{self.token_requests}{self.token_suffix}"
        self.tokens[token] = time.monotonic() + self.expires_in_s
        return web.json_response(
            {
                "access_token": token,
                "refresh_token": "not-used",
                "token_type": "Bearer",
                "expires_in": self.expires_in_s,
                "expiration": int(time.time() + self.expires_in_s),
            }
        )

    async def _singles(self, request: web.Request) -> web.Response:
        index = min(len(self.requests), len(self.ingress_statuses) - 1)
        scripted = self.ingress_statuses[index]
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        body = await request.read()
        self.requests.append({"authorization": auth, "status": scripted, "bytes": len(body)})
        if scripted:
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response(
                {"error": f"scripted {scripted}"}, status=scripted, headers=headers
            )
        if not auth.startswith("Bearer ") or self.tokens.get(token, 0.0) < time.monotonic():
            self.requests[-1]["status"] = 401
            return web.json_response({"error": "token expired or unknown"}, status=401)
        records = orjson.loads(body)
        if not isinstance(records, list):
            self.problems.append("body is not a JSON array")
            return web.json_response({"error": "not an array"}, status=400)
        for record in records:
            for name, kind in RECORD_TYPES.items():
                if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
                    self.problems.append(f"record field {name}: {record.get(name)!r}")
            if not 1 <= record.get("severity", 0) <= 6:
                self.problems.append(f"severity {record.get('severity')!r} not in 1..6")
        if self.problems:
            return web.json_response({"error": self.problems}, status=400)
        self.requests[-1]["status"] = 200
        self.records.extend(records)
        return web.json_response({})
