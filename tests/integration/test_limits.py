"""Inputs past the limits get a clear 4xx, never a 5xx: nesting depth, string length, header
size and clients that send their body too slowly."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from router.app import Daemon
from tests.conftest import StartDaemon
from tests.fakes import make_event
from tests.integration.test_ingest import file_target, post


@pytest.fixture
async def limited(start_daemon: StartDaemon, tmp_path: Path) -> Daemon:
    return await start_daemon(
        {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "max_depth": 8,
                "max_string_chars": 1024,
                "max_header_bytes": 4096,
                "read_timeout_s": 0.3,
            },
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"n": value}
    return value


async def test_an_event_nested_too_deep_is_rejected_on_its_own(limited: Daemon) -> None:
    status, body = await post(limited, [make_event(requestData=nested(10)), make_event()])
    assert status == 202
    assert [r["status"] for r in body["results"]] == ["rejected", "accepted"]
    assert body["results"][0]["errors"] == [
        {
            "path": "/requestData/n/n/n/n/n/n/n",
            "message": "nested deeper than server.max_depth (8)",
        }
    ]


async def test_nesting_past_the_json_parser_is_malformed_json(limited: Daemon) -> None:
    status, body = await post(limited, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and body["error"]["code"] == "malformed_json"


async def test_a_string_too_long_is_rejected_with_its_path(limited: Daemon) -> None:
    status, body = await post(limited, make_event(message="x" * 2000))
    assert status == 400
    assert body["results"][0]["errors"] == [
        {
            "path": "/message",
            "message": "a string of 2000 characters; the limit is server.max_string_chars (1024)",
        }
    ]
    status, body = await post(limited, make_event(requestData={"k" * 2000: 1}))
    assert status == 400 and body["results"][0]["errors"][0]["path"] == "/requestData"


async def test_a_header_too_large_is_a_4xx(limited: Daemon) -> None:
    status, _ = await post_raw_status(limited, {"X-Big": "a" * 8000})
    assert 400 <= status < 500


async def post_raw_status(daemon: Daemon, headers: dict[str, str]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{daemon.port}/v1/events",
            data=orjson.dumps(make_event()),
            headers={"Content-Type": "application/json", **headers},
        ) as resp,
    ):
        return resp.status, await resp.read()


async def test_a_client_that_sends_its_body_too_slowly_gets_408(limited: Daemon) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    writer.write(
        b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"action": '
    )
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 408")
    assert orjson.loads(body)["error"]["code"] == "request_timeout"
    assert limited.status()["ingest"]["refused_requests"]["request_timeout"] == 1
    # Other clients are not held up.
    status, _ = await post(limited, make_event())
    assert status == 202


async def test_a_connection_that_trickles_its_headers_is_closed(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {
            "server": {"host": "127.0.0.1", "port": 0, "header_timeout_s": 0.3},
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), timeout=10) == b"", "the server closed it"
    writer.close()
    # Whole headers in time are served as usual, on a fresh connection and a kept-alive one.
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    for _ in range(2):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), timeout=10)).startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reader.readuntil(b'"alive"}'), timeout=10)
    writer.close()
