"""The http target's auth, signing and TLS options against real loopback servers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from router.config import parse_config
from router.errors import ConfigError
from tests.conftest import StartDaemon
from tests.fakes import ScriptedReceiver, make_event, wait_for
from tests.helpers import ReceiverFactory, everything_to, http_target, post, settled

SECRET = "a-shared-secret-of-some-length"
TOLERANCE_S = 300


def verify_signature(header: str, body: bytes, secret: str, now: float) -> bool:
    """What a receiver does (as the README says): recompute, compare, refuse stale times."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    at = int(fields["t"])
    expected = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(now - at) <= TOLERANCE_S and hmac.compare_digest(expected, fields["v1"])


async def test_bearer_token_is_sent(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    siem = await receiver_factory([200])
    target = http_target("siem", siem.url, auth={"type": "bearer", "token": "t0ken"})
    daemon = await start_daemon({"targets": [target], "routes": everything_to("siem")})
    await post(daemon, make_event())
    await wait_for(lambda: settled(daemon))
    assert siem.requests[0].headers["Authorization"] == "Bearer t0ken"


async def test_basic_auth_is_sent(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    siem = await receiver_factory([200])
    target = http_target(
        "siem", siem.url, auth={"type": "basic", "username": "router", "password": "pa:ss"}
    )
    daemon = await start_daemon({"targets": [target], "routes": everything_to("siem")})
    await post(daemon, make_event())
    await wait_for(lambda: settled(daemon))
    scheme, value = siem.requests[0].headers["Authorization"].split(" ")
    assert scheme == "Basic" and base64.b64decode(value) == b"router:pa:ss"


class SignedReceiver(ScriptedReceiver):
    """Keeps the raw bodies so that signatures can be checked over the exact bytes."""

    raw: list[tuple[dict[str, str], bytes]]

    async def _handle(self, request: web.Request) -> web.Response:
        self.raw.append((dict(request.headers), await request.read()))
        return await super()._handle(request)


async def test_each_body_is_signed_with_a_timestamp(start_daemon: StartDaemon) -> None:
    siem = SignedReceiver()
    siem.raw = []
    await siem.start()
    try:
        target = http_target("siem", siem.url, signing={"secret": SECRET})
        daemon = await start_daemon({"targets": [target], "routes": everything_to("siem")})
        await post(daemon, [make_event() for _ in range(3)])
        await wait_for(lambda: settled(daemon))
        headers, body = siem.raw[0]
        signature = headers["X-Event-Router-Signature"]
        assert verify_signature(signature, body, SECRET, time.time())
        assert not verify_signature(signature, body + b" ", SECRET, time.time()), "body altered"
        assert not verify_signature(signature, body, "another-secret-entirely", time.time())
        assert not verify_signature(signature, body, SECRET, time.time() + 3600), "a replay"
    finally:
        await siem.stop()


def test_a_short_signing_secret_is_refused() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(
            {
                "targets": [http_target("siem", "https://x.example", signing={"secret": "short"})],
                "routes": everything_to("siem"),
            }
        )
    assert error.value.problems == [
        "targets[0].http_endpoint.signing.secret: at least 16 characters"
    ]


def test_an_unset_signing_secret_is_reported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable is not set: that is the problem; its (empty) length is not a second one."""
    monkeypatch.delenv("NO_SUCH_HMAC_SECRET", raising=False)
    with pytest.raises(ConfigError) as error:
        parse_config(
            {
                "targets": [
                    http_target(
                        "siem",
                        "https://x.example",
                        signing={"secret": "${env:NO_SUCH_HMAC_SECRET}"},
                    )
                ],
                "routes": everything_to("siem"),
            }
        )
    assert error.value.problems == [
        "targets[0].http_endpoint.signing.secret: "
        "environment variable 'NO_SUCH_HMAC_SECRET' is not set"
    ]


@pytest.fixture
async def mtls_server(pki: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTPS server that requires a client certificate signed by the test CA."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(x[0] for x in peer["subject"]) if peer else {}
        seen.append(str(subject.get("commonName")))
        return web.Response(status=200)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    context.verify_mode = ssl.CERT_REQUIRED
    app = web.Application()
    app.router.add_post("/ingest", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    yield f"https://127.0.0.1:{runner.addresses[0][1]}/ingest", seen
    await runner.cleanup()


async def test_mtls_with_a_custom_ca_bundle(
    start_daemon: StartDaemon, mtls_server: tuple[str, list[str]], pki: Path
) -> None:
    url, seen = mtls_server
    tls = {
        "ca_file": str(pki / "ca.pem"),
        "cert_file": str(pki / "client.pem"),
        "key_file": str(pki / "client.key"),
    }
    daemon = await start_daemon(
        {"targets": [http_target("siem", url, tls=tls)], "routes": everything_to("siem")}
    )
    await post(daemon, make_event())
    await wait_for(lambda: settled(daemon))
    assert seen == ["client"]
    assert daemon.status()["targets"]["siem"]["delivered"] == 1


async def test_without_the_client_certificate_the_handshake_fails_and_is_retried(
    start_daemon: StartDaemon, mtls_server: tuple[str, list[str]], pki: Path
) -> None:
    url, seen = mtls_server
    daemon = await start_daemon(
        {
            "targets": [
                http_target("siem", url, tls={"ca_file": str(pki / "ca.pem")})
                | {"retry": {"max_attempts": 1000}}
            ],
            "routes": everything_to("siem"),
            "shutdown": {"drain_timeout_s": 0.2},
        }
    )
    await post(daemon, make_event())
    await wait_for(lambda: daemon.status()["targets"]["siem"]["retries"] >= 2)
    assert seen == []
    assert daemon.status()["targets"]["siem"]["write_status"]["status"] == "failed"
