"""Every error the daemon answers is JSON in its one shape, including the answers aiohttp makes
by itself (no route, a method a route does not take, a body past the limit, a request that is
not HTTP), and a body framed with a transfer coding the daemon does not apply is refused, not
misread. Raw sockets, since aiohttp's client will not send most of these requests."""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web

from router.config import RefusalEventsConfig
from router.daemon import Daemon
from router.server.listener import ClientFaultLog, DeadlineSite
from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import (
    assert_books_balance,
    everything_to,
    file_target,
    free_port,
    reap,
    terminate,
)
from tests.integration.test_api import ADMIN, INGEST, auth
from tests.integration.test_workers import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    serve,
    workers_config,
)

MAX_BODY_BYTES = 100_000


@pytest.fixture
async def daemon(start_daemon: StartDaemon, tmp_path: Path) -> Daemon:
    return await start_daemon(
        {
            "server": {"host": "127.0.0.1", "port": 0, "max_body_bytes": MAX_BODY_BYTES},
            "auth": auth(),
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": everything_to("archive"),
        }
    )


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as it is, read the answer until the daemon closes the connection: the
    status, the headers (names in lower case) and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error_of(headers: dict[str, str], body: bytes) -> dict[str, str]:
    """The {"error": {"code", "message"}} of an answer, which must be JSON."""
    assert headers.get("content-type", "").startswith("application/json"), (headers, body)
    error = orjson.loads(body)["error"]
    assert set(error) == {"code", "message"} and all(isinstance(v, str) for v in error.values())
    return dict(error)


def api_error_of(headers: dict[str, str], body: bytes, status: int) -> dict[str, str]:
    """The one error of a management API answer, in atracker's shape: a trace, the status and
    a list of {"code", "message"}."""
    assert headers.get("content-type", "").startswith("application/json"), (headers, body)
    answer = orjson.loads(body)
    assert set(answer) == {"trace", "status_code", "errors"}, answer
    assert answer["status_code"] == status and len(answer["errors"]) == 1, answer
    return dict(answer["errors"][0])


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"


# -- what aiohttp answers by itself -------------------------------------------------------------


async def test_a_path_without_a_route_is_a_json_404_naming_it(daemon: Daemon) -> None:
    status, headers, body = await exchange(daemon.port, request("GET", "/no/such/thing"))
    assert status == 404
    error = error_of(headers, body)
    assert error["code"] == "not_found" and "/no/such/thing" in error["message"], error


async def test_a_method_a_route_does_not_take_is_a_json_405_with_allow(daemon: Daemon) -> None:
    status, headers, body = await exchange(daemon.port, request("DELETE", "/v1/events"))
    assert status == 405
    assert headers["allow"] == "POST"
    error = error_of(headers, body)
    assert error["code"] == "method_not_allowed", error
    assert "DELETE" in error["message"] and "POST" in error["message"], error


async def test_a_management_api_405_is_in_the_apis_own_error_shape(daemon: Daemon) -> None:
    """atracker's SDKs read `errors[0]` on /api/v2: a 405 there speaks their shape."""
    status, headers, body = await exchange(
        daemon.port, request("PATCH", "/api/v2/targets", f"Authorization: Bearer {ADMIN}")
    )
    assert status == 405
    assert set(headers["allow"].split(",")) == {"GET", "POST"}
    assert headers["content-type"].startswith("application/json")
    answer = orjson.loads(body)
    assert answer["status_code"] == 405 and answer["errors"][0]["code"] == "method_not_allowed"


async def test_management_api_refusals_of_auth_are_in_the_apis_own_error_shape(
    daemon: Daemon,
) -> None:
    """A 401 or 403 on /api/v2 (no token, an unknown one, an ingest token) is in atracker's
    shape, like every other answer there, so its SDKs read `errors[0]`; elsewhere the daemon's
    own shape. The auth middleware wrote its refusals in the daemon's shape everywhere."""
    for presented, status, code in (
        (None, 401, "unauthorized"),
        ("not-a-token-of-this-daemon", 401, "unauthorized"),
        (INGEST, 403, "forbidden"),
    ):
        headers = () if presented is None else (f"Authorization: Bearer {presented}",)
        got, answer_headers, body = await exchange(
            daemon.port, request("GET", "/api/v2/targets", *headers)
        )
        assert got == status, body
        assert api_error_of(answer_headers, body, status)["code"] == code
        if status == 401:
            assert answer_headers["www-authenticate"].startswith("Bearer"), answer_headers
    got, answer_headers, body = await exchange(daemon.port, request("GET", "/v1/status"))
    assert got == 401
    assert error_of(answer_headers, body)["code"] == "unauthorized"


async def test_an_api_body_past_the_limit_is_a_json_413_and_audited(
    daemon: Daemon, tmp_path: Path
) -> None:
    """aiohttp's own 413 (its client_max_size) was plain text, and the refused change never
    reached the API's audit."""
    big = orjson.dumps({"name": "v", "query": "x" * MAX_BODY_BYTES})
    status, headers, body = await exchange(
        daemon.port,
        request(
            "POST",
            "/api/v2/views",
            f"Authorization: Bearer {ADMIN}",
            "Content-Type: application/json",
            f"Content-Length: {len(big)}",
            body=big,
        ),
    )
    assert status == 413 and headers["content-type"].startswith("application/json")
    answer = orjson.loads(body)
    assert answer["errors"][0]["code"] == "body_too_large"
    assert f"server.max_body_bytes ({MAX_BODY_BYTES} bytes)" in answer["errors"][0]["message"]

    def refusals() -> list[dict[str, Any]]:
        return [
            e
            for e in read_ndjson(tmp_path / "archive.ndjson")
            if e["action"] == "event-router.view.create" and e["outcome"] == "failure"
        ]

    await wait_for(lambda: len(refusals()) == 1, what="the refused change audited")


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("not HTTP", b"GARBAGE\r\n\r\n"),
        ("an unknown HTTP version", b"GET /healthz HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n"),
        ("a space in a header name", request("GET", "/healthz", "Bad Header: x")),
        ("a header past the limit", request("GET", "/healthz", "X-Big: " + "a" * 10_000)),
        (
            "a chunk size that is not hex",
            request(
                "POST",
                "/v1/events",
                f"Authorization: Bearer {INGEST}",
                "Content-Type: application/json",
                "Transfer-Encoding: chunked",
                body=b"zz\r\n{}\r\n0\r\n\r\n",
            ),
        ),
        (
            "both Content-Length and Transfer-Encoding",
            request(
                "POST",
                "/v1/events",
                "Content-Type: application/json",
                "Transfer-Encoding: chunked",
                "Content-Length: 2",
                body=b"{}",
            ),
        ),
    ],
    ids=[
        "not-http",
        "http-9.9",
        "space-in-name",
        "header-too-large",
        "bad-chunk",
        "length-and-chunked",
    ],
)
async def test_a_request_aiohttp_cannot_parse_is_a_json_400(
    daemon: Daemon, name: str, raw: bytes
) -> None:
    status, headers, body = await exchange(daemon.port, raw)
    assert status == 400, name
    error = error_of(headers, body)
    assert error["code"] == "malformed_request", (name, error)
    assert error["message"], name


async def test_an_unexpected_error_in_a_handler_is_a_json_500_with_the_trace_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No route of the daemon is known to fail, so a handler that does stands in for the one
    that someday will: the listener answers JSON, never a traceback, and the log keeps it."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application()
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app, logger=ClientFaultLog(RefusalEventsConfig()))
    await runner.setup()
    site = DeadlineSite(runner, "127.0.0.1", 0, header_timeout_s=5)
    await site.start()
    try:
        port = runner.addresses[0][1]
        with caplog.at_level(logging.ERROR):
            status, headers, body = await exchange(port, request("GET", "/broken"))
    finally:
        await runner.cleanup()
    assert status == 500
    error = error_of(headers, body)
    assert error["code"] == "internal_error" and "a bug" not in error["message"], error
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)


# -- transfer codings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("coding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("x-custom", lambda data: data)],
)
async def test_a_transfer_coding_besides_chunked_is_refused_naming_the_header(
    daemon: Daemon, coding: str, compress: Any
) -> None:
    """`Transfer-Encoding: gzip, chunked` was read as chunked with the gzip ignored: the
    compressed bytes were taken as JSON. The daemon does not apply transfer codings; it says
    so, naming the header, and accepts nothing of the request."""
    status, headers, body = await exchange(
        daemon.port,
        request(
            "POST",
            "/v1/events",
            f"Authorization: Bearer {INGEST}",
            "Content-Type: application/json",
            f"Transfer-Encoding: {coding}, chunked",
            body=chunked(compress(orjson.dumps([make_event(id="compressed")]))),
        ),
    )
    assert status == 400
    error = error_of(headers, body)
    assert error["code"] == "unsupported_transfer_encoding", error
    assert "Transfer-Encoding" in error["message"] and coding in error["message"], error
    assert headers.get("connection", "").lower() == "close"
    assert daemon.status()["targets"]["archive"]["received"] == 0
    # The same events, chunked and gzipped the way the daemon takes them, are accepted.
    status, headers, body = await exchange(
        daemon.port,
        request(
            "POST",
            "/v1/events",
            f"Authorization: Bearer {INGEST}",
            "Content-Type: application/json",
            "Content-Encoding: gzip",
            "Transfer-Encoding: chunked",
            body=chunked(gzip.compress(orjson.dumps([make_event(id="chunked")]))),
        ),
    )
    assert status == 202, body
    assert_books_balance(daemon)


async def test_a_transfer_coding_split_over_two_headers_is_a_json_400(daemon: Daemon) -> None:
    status, headers, body = await exchange(
        daemon.port,
        request(
            "POST",
            "/api/v2/views",
            f"Authorization: Bearer {ADMIN}",
            "Content-Type: application/json",
            "Transfer-Encoding: gzip",
            "Transfer-Encoding: chunked",
            body=chunked(gzip.compress(b'{"name": "v", "query": "x"}')),
        ),
    )
    assert status == 400, body
    assert error_of(headers, body)["code"] in ("malformed_request", "unsupported_transfer_encoding")
    assert daemon.config.views == ()


async def test_worker_processes_answer_json_and_refuse_transfer_codings(tmp_path: Path) -> None:
    """With server.workers, a worker reads the body and passes it to the owner without its
    framing: the transfer coding must be refused where it arrives, and a worker's own
    answers (405 on its ingest route, 413 on what it would pass on) be JSON too."""
    port = free_port()
    config = workers_config(tmp_path, port, auth=True)
    data = yaml.safe_load(config.read_text())
    data["server"]["max_body_bytes"] = MAX_BODY_BYTES
    config.write_text(yaml.safe_dump(data))
    proc = await serve(config, port)
    try:
        for path, token in (("/v1/events", INGEST_TOKEN), ("/api/v2/views", ADMIN_TOKEN)):
            status, headers, body = await exchange(
                port,
                request(
                    "POST",
                    path,
                    f"Authorization: Bearer {token}",
                    "Content-Type: application/json",
                    "Transfer-Encoding: gzip, chunked",
                    body=chunked(gzip.compress(b'{"name": "v", "query": "x"}')),
                ),
            )
            assert status == 400, (path, body)
            # Each path's own error shape, as one process answers it: atracker's for its API.
            error = (
                api_error_of(headers, body, 400)
                if path.startswith("/api/")
                else error_of(headers, body)
            )
            assert error["code"] == "unsupported_transfer_encoding", path
        status, headers, body = await exchange(port, request("DELETE", "/v1/events"))
        assert status == 405 and headers["allow"] == "POST"
        assert error_of(headers, body)["code"] == "method_not_allowed"
        status, headers, body = await exchange(port, request("GET", "/nope"))
        assert status == 404 and error_of(headers, body)["code"] == "not_found"
        # A change too large to take is refused by the owner, which audits it (a worker
        # that refused it itself left it unaudited); however large, it gets its answer.
        big = orjson.dumps({"name": "v", "query": "x" * 50 * MAX_BODY_BYTES})
        status, headers, body = await exchange(
            port,
            request(
                "POST",
                "/api/v2/views",
                f"Authorization: Bearer {ADMIN_TOKEN}",
                "Content-Type: application/json",
                f"Content-Length: {len(big)}",
                body=big,
            ),
        )
        assert status == 413 and headers["content-type"].startswith("application/json"), body
        assert orjson.loads(body)["errors"][0]["code"] == "body_too_large"
        archive = tmp_path / "var" / "archive.ndjson"
        await wait_for(
            lambda: any(
                e["action"] == "event-router.view.create" and e["outcome"] == "failure"
                for e in read_ndjson(archive)
            ),
            what="the refused change audited",
        )
        status, _, body = await exchange(port, b"GARBAGE\r\n\r\n")
        assert status == 400 and orjson.loads(body)["error"]["code"] == "malformed_request"
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


async def test_an_expectation_aiohttp_does_not_know_is_a_json_417(daemon: Daemon) -> None:
    """aiohttp answers `Expect:` before any middleware runs."""
    status, headers, body = await exchange(
        daemon.port, request("POST", "/v1/events", "Expect: something-else", "Content-Length: 0")
    )
    assert status == 417
    error = error_of(headers, body)
    assert error["code"] == "expectation_failed" and "something-else" in error["message"], error
