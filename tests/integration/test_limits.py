"""Inputs past the limits get a clear 4xx, never a 5xx: nesting depth, string length, header
size and clients that send their body too slowly."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from router.config import RefusalEventsConfig
from router.daemon import Daemon
from tests.conftest import StartDaemon
from tests.fakes import make_event, wait_for
from tests.helpers import file_target, post


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


# -- slow bodies: a client that stalls holds its own bytes, not other producers' turns -------

# A normal POST while others stall used to wait 29.5 s, until server.read_timeout_s (30 s)
# freed a turn. No stopwatch: the tests answer well within it, and check that the stalled
# bodies are all still held when it does, so it cannot have waited for one of their turns.
ANSWER_S = 10.0


def everything_to_archive(tmp_path: Path, **server: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, **server},
        # The body's journey is under test here, not the disk's.
        "storage": {"path": str(tmp_path / "var"), "fsync": "never"},
        "targets": [file_target("archive", tmp_path / "archive.ndjson")],
        "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
    }


async def stall_body(
    daemon: Daemon, source: str, *, length: int = 1000, sent: bytes = b'{"action":'
) -> asyncio.StreamWriter:
    """A real connection from `source` (any 127.x address reaches the loopback listener) that
    sends its headers and the start of its body, then nothing more."""
    _, writer = await asyncio.open_connection("127.0.0.1", daemon.port, local_addr=(source, 0))
    writer.write(
        b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (length, sent)
    )
    await writer.drain()
    return writer


async def post_from(source: str, daemon: Daemon, body: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0))) as session,
        session.post(
            f"http://127.0.0.1:{daemon.port}/v1/events",
            data=orjson.dumps(body),
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def hang_up(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
        await writer.wait_closed()


async def test_stalled_bodies_do_not_hold_up_other_producers(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(everything_to_archive(tmp_path))
    assert daemon.config.server.max_concurrent_requests == 16
    # 16 producers' connections, from 4 addresses, each 10 bytes into its body and stalled:
    # they used to hold every request slot until server.read_timeout_s.
    stalled = [await stall_body(daemon, f"127.0.0.{2 + i % 4}") for i in range(16)]
    try:
        await wait_for(lambda: daemon.ingest_stats.requests == 16, what="16 bodies on their way")
        status, body = await asyncio.wait_for(post(daemon, make_event()), timeout=ANSWER_S)
        assert status == 202 and body["accepted"] == 1
        assert sum(daemon.ingest.bodies.reading(f"127.0.0.{2 + i}") for i in range(4)) == 16
    finally:
        await hang_up(stalled)
    await wait_for(lambda: daemon.ingest.bodies.held_bytes == 0, what="the bytes given back")


async def test_one_client_address_reads_a_bounded_number_of_bodies_at_once(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(everything_to_archive(tmp_path, max_bodies_per_client=2))
    bodies = daemon.ingest.bodies
    stalled = [await stall_body(daemon, "127.0.0.2") for _ in range(2)]
    try:
        await wait_for(lambda: bodies.reading("127.0.0.2") == 2, what="two bodies being read")
        # A third request from the same address waits its turn, its body unread...
        third = asyncio.create_task(post_from("127.0.0.2", daemon, make_event(id="third")))
        await wait_for(lambda: bodies.waiting("127.0.0.2") == 1, what="the third to wait")
        # ...while other addresses are served at once.
        status, _ = await asyncio.wait_for(post(daemon, make_event()), timeout=ANSWER_S)
        assert status == 202
        assert not third.done()
        await hang_up(stalled[:1])
        status, body = await asyncio.wait_for(third, timeout=10)
        assert status == 202 and body["results"][0]["id"] == "third"
    finally:
        await hang_up(stalled)
    await wait_for(lambda: bodies.reading("127.0.0.2") == 0, what="every turn given back")


async def test_bodies_in_flight_are_bounded_in_bytes(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        everything_to_archive(tmp_path, max_body_bytes=40_000, max_body_bytes_in_flight=64_000)
    )
    bodies = daemon.ingest.bodies
    sent = b"[" + b" " * 29_999
    stalled = [
        await stall_body(daemon, source, length=40_000, sent=sent)
        for source in ("127.0.0.2", "127.0.0.3")
    ]
    try:
        await wait_for(lambda: bodies.held_bytes == 60_000, what="60,000 bytes held")
        events = [make_event() for _ in range(5)]
        assert len(orjson.dumps(events)) > 4_000
        status, body = await asyncio.wait_for(post(daemon, events), timeout=ANSWER_S)
        assert status == 503 and body["error"]["code"] == "server_busy"
        assert "server.max_body_bytes_in_flight (64000 bytes)" in body["error"]["message"]
        await hang_up(stalled[:1])
        await wait_for(lambda: bodies.held_bytes == 30_000, what="the first body's bytes")
        status, body = await post(daemon, events)
        assert status == 202 and body["accepted"] == 5
    finally:
        await hang_up(stalled)
    await wait_for(lambda: bodies.held_bytes == 0, what="every byte given back")
    assert daemon.ingest_stats.refused_requests["server_busy"] == 1


# -- client faults: one WARNING line each, within a rate limit, never a traceback ------------

MALFORMED = [
    b"GET / HTTX/1.1\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
    b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n",
]


async def send_raw(daemon: Daemon, data: bytes) -> bytes:
    """Send `data` on a fresh connection; everything the daemon answers, until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_malformed_requests_log_one_warning_line_each_within_a_rate_limit(
    start_daemon: StartDaemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    daemon = await start_daemon(everything_to_archive(tmp_path))
    caplog.clear()
    sent = 1000
    for batch in range(sent // 20):
        answers = await asyncio.gather(
            *(send_raw(daemon, MALFORMED[(batch + i) % len(MALFORMED)]) for i in range(20))
        )
        assert all(b"HTTP/1.0 400 Bad Request" in answer for answer in answers)
    await daemon.stop()
    # It was 690 KB of ERROR tracebacks from aiohttp's parser.
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
    refused = [r for r in caplog.records if r.name == "router.server.listener"]
    one_by_one = [r for r in refused if r.getMessage().startswith("refused a request from")]
    burst = RefusalEventsConfig().per_client_burst
    assert 1 <= len(one_by_one) <= burst
    assert all(r.levelno == logging.WARNING and "\n" not in r.getMessage() for r in refused)
    assert "127.0.0.1: 400 " in one_by_one[0].getMessage()
    # What the limit held back is summed up, at the latest when the daemon stops.
    assert refused[-1].getMessage() == (
        f"{sent - len(one_by_one)} more refused requests, not logged one by one (rate limit); "
        "the most from 127.0.0.1 (" + str(sent - len(one_by_one)) + ")"
    )
    assert len(caplog.text) < 10_000


async def test_a_client_that_hangs_up_mid_body_is_a_warning_not_a_traceback(
    start_daemon: StartDaemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    daemon = await start_daemon(everything_to_archive(tmp_path))
    await hang_up([await stall_body(daemon, "127.0.0.2")])
    await wait_for(
        lambda: daemon.ingest_stats.refused_requests.get("client_disconnected") == 1,
        what="the hang-up to be noticed",
    )
    await wait_for(lambda: any(r.name == "router.server.listener" for r in caplog.records))
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "router.server.listener"]
    assert line.startswith("refused a request from 127.0.0.2: the client went away")
    # Nothing is held for it.
    assert daemon.ingest.bodies.held_bytes == 0
    status, _ = await post(daemon, make_event())
    assert status == 202


# -- hostile JSON: the decoder (msgspec first, orjson and the number scan behind it) answers
# each with a 4xx naming what is wrong, never a 5xx; tests/unit/test_decode.py holds the two
# decoders to the same answers on generated bodies.


def with_value(literal: bytes, **fields: Any) -> bytes:
    """An event whose requestData.n is `literal` exactly as written."""
    event = orjson.dumps(make_event(requestData={"n": "LITERAL GOES HERE"}, **fields))
    return event.replace(b'"LITERAL GOES HERE"', literal)


def deep(depth: int) -> bytes:
    return b'{"n":' * depth + b"1" + b"}" * depth


NDJSON = "application/x-ndjson"
HOSTILE = [
    # (body, content type, status, the refusal's code or None, text in its message or the
    # first event's first error)
    (with_value(b"1e400"), "application/json", 400, "malformed_json", "line 1 column"),
    (with_value(b"-1E+400"), NDJSON, 400, None, "line 1: invalid JSON at column"),
    (with_value(b"1" + b"0" * 400), "application/json", 400, "malformed_json", "(byte "),
    (with_value(b"NaN"), "application/json", 400, "malformed_json", "line 1 column"),
    (with_value(b"-Infinity"), NDJSON, 400, None, "line 1: invalid JSON at column"),
    (with_value(b'"\\ud800"'), "application/json", 400, "malformed_json", "surrogate"),
    (with_value(b'"\\udc00\\ud800"'), NDJSON, 400, None, "surrogate"),
    (with_value(b'"\xed\xa0\x80"'), "application/json", 400, "malformed_json", "invalid UTF-8"),
    (with_value(b'"\xff"'), NDJSON, 400, None, "line 1: invalid UTF-8 at column"),
    (b"\xef\xbb\xbf" + with_value(b"1"), "application/json", 400, "malformed_json", "(BOM)"),
    (with_value(b"1") + b"\x0c", "application/json", 400, "malformed_json", "after document"),
    (with_value(b"2" + b"0" * 30), "application/json", 400, None, "64-bit range"),
    (with_value(b"12345678.123456789"), NDJSON, 400, None, "a 64-bit float cannot hold"),
    (with_value(deep(1010)), "application/json", 400, None, "deeper than server.max_depth"),
    # A number the scan suspects, about 1,000 levels down: the exact parse ran out of stack (500).
    (
        deep(1000).replace(b"1}", b"0.1000000000000000055511151231257827}", 1),
        NDJSON,
        400,
        None,
        "deeper",
    ),
    (
        deep(1000).replace(b"1}", b"0.1000000000000000055511151231257827}", 1),
        "application/json",
        400,
        None,
        "deeper than server.max_depth",
    ),
    (with_value(deep(1030)), "application/json", 400, "malformed_json", "depth limit"),
    (
        b"[" + with_value(b"1") + b"," + b"[" * 1100 + b"]" * 1100 + b"]",
        "application/json",
        400,
        "malformed_json",
        "depth limit",
    ),
    (b"\n \r\n\t\n", NDJSON, 400, "no_events", "no event"),
]


@pytest.mark.parametrize(("body", "content_type", "status", "code", "text"), HOSTILE)
async def test_hostile_json_is_a_4xx_that_says_why(
    limited: Daemon, body: bytes, content_type: str, status: int, code: str | None, text: str
) -> None:
    answer_status, answer = await post(limited, body, content_type=content_type)
    assert answer_status == status, answer
    if code is not None:
        assert answer["error"]["code"] == code
        assert text in answer["error"]["message"], answer
    else:
        assert text in answer["results"][0]["errors"][0]["message"], answer
    assert limited.ingest_stats.accepted == 0


async def test_hostile_json_that_is_valid_is_kept_as_written(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Duplicate keys (the last one counts, as in every JSON decoder Python has), -0 and -0.0,
    integers at the 64-bit edges, floats a double holds, zeros with any exponent, escapes, and
    NDJSON with blank lines and CRLF: all accepted, and archived as orjson writes them."""
    daemon = await start_daemon(everything_to_archive(tmp_path))
    dup = orjson.dumps(make_event(id="first"))[:-1] + b',"id":"last"}'
    lines = [
        dup,
        with_value(b"-0", id="minus-zero"),
        with_value(b"-0.0", id="minus-zero-float"),
        with_value(b"18446744073709551615", id="max-u64"),
        with_value(b"-9223372036854775808", id="min-i64"),
        with_value(b"0.30000000000000004", id="long-float"),
        with_value(b"0e99999999999999999999", id="zero-exponent"),
        with_value(b'"\\ud83d\\ude00\\u0000"', id="escapes"),
    ]
    body = b"\r\n\n".join(lines) + b"\n\n \n"
    status, answer = await post(daemon, body, content_type=NDJSON)
    assert (status, answer["accepted"]) == (202, len(lines)), answer
    archive = tmp_path / "archive.ndjson"
    await wait_for(lambda: archive.exists() and len(archive.read_bytes().splitlines()) == 8)
    archived = archive.read_bytes().splitlines()
    assert [orjson.loads(line)["id"] for line in archived] == [
        "last",
        "minus-zero",
        "minus-zero-float",
        "max-u64",
        "min-i64",
        "long-float",
        "zero-exponent",
        "escapes",
    ]
    numbers = [line.split(b'"requestData":{"n":')[1].split(b"}")[0] for line in archived[1:]]
    assert numbers == [
        b"0",
        b"-0.0",
        b"18446744073709551615",
        b"-9223372036854775808",
        b"0.30000000000000004",
        b"0.0",
        orjson.dumps("\U0001f600\x00"),
    ]
