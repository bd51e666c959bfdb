"""The live tail: GET /v1/tail streams matching events as SSE; `event-router tail` follows it."""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from router.cli import main
from router.clients.tail import SseMessage, follow, sse_messages
from router.daemon import Daemon
from router.events import Event
from router.query import MAX_NESTING, parse
from router.server.tail import TailHub
from tests.conftest import StartDaemon
from tests.fakes import make_event, wait_for
from tests.helpers import file_target, post


def denied(event_id: str) -> dict[str, Any]:
    return make_event(
        id=event_id,
        action="secrets-manager.secret.read",
        outcome="failure",
        reason={"reasonCode": 401, "reasonType": "Unauthorized"},
    )


@pytest.fixture
async def daemon(start_daemon: StartDaemon, tmp_path: Path) -> Daemon:
    return await start_daemon(
        {
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )


async def open_tail(
    session: aiohttp.ClientSession, daemon: Daemon, query: str
) -> tuple[aiohttp.ClientResponse, AsyncIterator[SseMessage]]:
    resp = await session.get(f"http://127.0.0.1:{daemon.port}/v1/tail", params={"query": query})
    return resp, aiter(sse_messages(resp.content))


async def next_message(messages: AsyncIterator[SseMessage]) -> SseMessage:
    return await asyncio.wait_for(anext(messages), timeout=10)


async def test_tail_streams_only_matching_events_as_they_are_accepted(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as session:
        resp, messages = await open_tail(
            session, daemon, "host:secrets-manager reason.reasonType:Unauthorized"
        )
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        ready = await next_message(messages)
        assert ready == SseMessage(
            "ready", '{"query":"host:secrets-manager reason.reasonType:Unauthorized"}'
        )
        status, _ = await post(daemon, [make_event(id="ok-1"), denied("d-1"), make_event()])
        assert status == 202
        await post(daemon, denied("d-2"))
        first, second = await next_message(messages), await next_message(messages)
        assert [first.event, second.event] == ["event", "event"]
        assert [orjson.loads(m.data)["id"] for m in (first, second)] == ["d-1", "d-2"]
        assert orjson.loads(first.data)["reason"]["reasonType"] == "Unauthorized"
        resp.close()
    # A client that left is noticed at the next write (an event, or the keep-alive).
    await post(daemon, denied("d-3"))
    await wait_for(lambda: not daemon.tail.subscribers, what="the subscriber to go")


async def test_an_event_id_with_line_breaks_cannot_forge_a_message(daemon: Daemon) -> None:
    forged_id = "x\nevent: dropped\ndata: {}\n\nevent: event"
    async with aiohttp.ClientSession() as session:
        resp, messages = await open_tail(session, daemon, "")
        await next_message(messages)
        await post(daemon, [make_event(id=forged_id), make_event(id="next")])
        first, second = await next_message(messages), await next_message(messages)
        assert first.event == second.event == "event"
        assert [orjson.loads(m.data)["id"] for m in (first, second)] == [forged_id, "next"]
        resp.close()


async def test_rejected_events_are_not_tailed(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as session:
        resp, messages = await open_tail(session, daemon, "outcome:failure")
        await next_message(messages)
        bad = denied("bad")
        del bad["eventTime"]
        await post(daemon, [bad, denied("good")])
        message = await next_message(messages)
        assert orjson.loads(message.data)["id"] == "good"
        resp.close()


async def test_bad_tail_query_is_400_with_the_column(daemon: Daemon) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{daemon.port}/v1/tail", params={"query": "outcome:failure OR"}
        ) as resp,
    ):
        assert resp.status == 400
        body = await resp.json()
    assert body["error"]["code"] == "bad_query"
    assert body["error"]["column"] == 19
    assert "expected a term after OR" in body["error"]["message"]


@pytest.mark.parametrize("query", ["(" * 1000 + "outcome:failure" + ")" * 1000, "-" * 5000 + "x"])
async def test_a_tail_query_nested_too_deep_is_400_with_the_column(
    daemon: Daemon, query: str
) -> None:
    # It used to overflow the parser's stack: a 500 and a traceback in the log.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}/v1/tail", params={"query": query}) as resp,
    ):
        assert resp.status == 400
        body = await resp.json()
    assert body["error"]["code"] == "bad_query"
    assert body["error"]["column"] == MAX_NESTING + 1
    assert "nested deeper than" in body["error"]["message"]


async def test_stopping_the_daemon_ends_open_tails(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as session:
        resp, messages = await open_tail(session, daemon, "outcome:failure")
        await next_message(messages)
        await asyncio.wait_for(daemon.stop(), timeout=5)
        with pytest.raises(StopAsyncIteration):
            await next_message(messages)
        resp.close()


def run_cli(*argv: str) -> int:
    """main() as a thread runs it: asyncio would not let a SystemExit pass through a task."""
    try:
        main(list(argv))
    except SystemExit as exited:
        return int(exited.code or 0)
    return 0


async def test_tail_command_prints_matching_events_as_ndjson(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{daemon.port}"
    # The command runs its own event loop (asyncio.run), so it gets a thread of its own.
    command = asyncio.create_task(
        asyncio.to_thread(run_cli, "tail", "reason.reasonCode:>=400", "--url", url, "--limit", "2")
    )
    await wait_for(lambda: len(daemon.tail.subscribers) == 1, what="the command to subscribe")
    await post(daemon, [denied("d-1"), make_event(id="ok"), denied("d-2"), denied("d-3")])
    assert await asyncio.wait_for(command, timeout=10) == 0
    out, err = capsys.readouterr()
    assert [orjson.loads(line)["id"] for line in out.splitlines()] == ["d-1", "d-2"]
    assert f"tailing {url} for reason.reasonCode:>=400" in err


async def test_tail_command_points_at_a_bad_query(daemon: Daemon) -> None:
    err = io.StringIO()
    code = await follow(f"http://127.0.0.1:{daemon.port}", "(outcome:failure", err=err)
    assert code == 2
    assert err.getvalue().splitlines() == [
        "bad query: this '(' is never closed",
        "  (outcome:failure",
        "  ^",
    ]


async def test_tail_command_without_a_daemon_exits_1(unused_tcp_port: int) -> None:
    err = io.StringIO()
    assert await follow(f"http://127.0.0.1:{unused_tcp_port}", "x", err=err) == 1
    assert "cannot reach the daemon" in err.getvalue()


# -- the hub: a slow subscriber loses its own events, ingest never waits -------------------


def accepted(body: dict[str, Any]) -> Event:
    return Event.from_body(body)


async def test_slow_subscriber_drops_and_counts_without_blocking_publish() -> None:
    hub = TailHub(queue_events=3)
    hub.start()
    try:
        slow = hub.subscribe(parse("outcome:failure"))
        everything = hub.subscribe(None)
        hub.publish([accepted(denied(f"d-{i}")) for i in range(5)])
        hub.publish([accepted(make_event(id="ok"))])
        await wait_for(lambda: hub.backlog == 0, what="the fan-out to take both batches")
        await wait_for(lambda: everything.dropped == 3, what="the fan-out to finish")
        assert len(slow.pending) == 3 and slow.dropped == 2
        assert len(everything.pending) == 3
        kept = [message.split(b"\nid: ")[1].split(b"\n")[0] for message in slow.take()]
        assert kept == [b"d-0", b"d-1", b"d-2"]
    finally:
        await hub.stop()


async def test_ingest_queues_a_batch_once_however_many_clients_tail(daemon: Daemon) -> None:
    # 300 idle tails made ingest 10x slower: it matched and queued every event for every one.
    subscribers = [daemon.tail.subscribe(None) for _ in range(300)]
    await daemon.acceptor.accept([make_event(id=f"e-{i}") for i in range(20)])
    # Ingest has returned; the fan-out task has not run yet: one batch queued, no client fed.
    assert daemon.tail.backlog == 1
    assert not any(s.pending for s in subscribers)
    await wait_for(
        lambda: all(len(s.pending) == 20 for s in subscribers), what="every client to be fed"
    )
    # One SSE message per event, encoded once and shared by every client.
    assert len({id(message) for s in subscribers for message in s.pending}) == 20


async def test_a_tail_client_that_does_not_read_is_dropped(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {
            "server": {"host": "127.0.0.1", "port": 0, "tail_write_timeout_s": 0.5},
            "storage": {"path": str(tmp_path / "var"), "fsync": "never"},
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few events
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", daemon.port))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /v1/tail HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # and never read a byte
    try:
        await wait_for(lambda: len(daemon.tail.subscribers) == 1, what="the client to subscribe")
        batch = [make_event() for _ in range(200)]
        deadline = asyncio.get_running_loop().time() + 30
        while daemon.tail.subscribers:
            assert asyncio.get_running_loop().time() < deadline, "the client was never dropped"
            status, _ = await post(daemon, batch)
            assert status == 202  # ingest never waits for the tail
        assert daemon.tail.dropped_clients == 1
        # Others tail on as usual.
        async with aiohttp.ClientSession() as session:
            resp, messages = await open_tail(session, daemon, "")
            assert (await next_message(messages)).event == "ready"
            await post(daemon, make_event(id="after"))
            assert orjson.loads((await next_message(messages)).data)["id"] == "after"
            resp.close()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_tail_clients_past_the_cap_are_refused_with_503(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {
            "server": {"host": "127.0.0.1", "port": 0, "max_tail_clients": 2},
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )
    url = f"http://127.0.0.1:{daemon.port}"
    async with aiohttp.ClientSession() as session:
        first, _ = await open_tail(session, daemon, "")
        second, _ = await open_tail(session, daemon, "outcome:failure")
        assert first.status == second.status == 200
        async with session.get(f"{url}/v1/tail") as third:
            assert third.status == 503
            assert third.headers["Retry-After"]
            error = (await third.json())["error"]
        assert error["code"] == "too_many_tail_clients"
        assert "server.max_tail_clients (2)" in error["message"]
        err = io.StringIO()
        assert await follow(url, "", err=err) == 1
        assert "tail refused: 503" in err.getvalue()
        first.close()
        await wait_for(lambda: len(daemon.tail.subscribers) == 1, what="the first to leave")
        third_again, messages = await open_tail(session, daemon, "")
        assert third_again.status == 200 and (await next_message(messages)).event == "ready"
        second.close()
        third_again.close()


async def test_dropped_events_are_announced_before_the_next_event(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as session:
        resp, messages = await open_tail(session, daemon, "outcome:failure")
        await next_message(messages)
        [subscriber] = daemon.tail.subscribers
        subscriber.dropped = 7  # as if a burst had overflowed its queue
        await post(daemon, denied("after"))
        dropped, event = await next_message(messages), await next_message(messages)
        assert dropped == SseMessage("dropped", '{"dropped":7}')
        assert orjson.loads(event.data)["id"] == "after"
        resp.close()


async def test_tail_command_sends_the_admin_token(
    start_daemon: StartDaemon,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import hashlib

    admin = "an-admin-token-long-enough-0001"
    daemon = await start_daemon(
        {
            "auth": {
                "admin_tokens": [
                    {"name": "ops", "sha256": hashlib.sha256(admin.encode()).hexdigest()}
                ]
            },
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )
    url = f"http://127.0.0.1:{daemon.port}"
    assert await asyncio.to_thread(run_cli, "tail", "--url", url, "--limit", "1") == 1
    assert "401" in capsys.readouterr().err
    (tmp_path / "admin.token").write_text(admin + "\n")
    command = asyncio.create_task(
        asyncio.to_thread(
            run_cli,
            "tail",
            "--url",
            url,
            "--limit",
            "1",
            "--token-file",
            str(tmp_path / "admin.token"),
        )
    )
    await wait_for(lambda: len(daemon.tail.subscribers) == 1, what="the command to subscribe")
    await daemon.acceptor.accept([make_event(id="seen")])
    assert await asyncio.wait_for(command, timeout=10) == 0
    assert orjson.loads(capsys.readouterr().out)["id"] == "seen"


async def test_a_slow_tail_reader_of_large_events_holds_a_bounded_number_of_bytes(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A tail client that reads nothing (but is not yet dropped) had up to 1000 events queued
    whatever their size: with 30 KB events, 30 MB per client, 32 clients a gigabyte. The
    queue is bounded in bytes too (server.tail_queue_bytes); what does not fit is dropped
    for that client and counted, as the count bound does. /v1/status shows what it holds:
    the messages queued for each client and those written that it has not read yet."""
    limit = 1024 * 1024
    daemon = await start_daemon(
        {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "tail_write_timeout_s": 120,
                "tail_queue_bytes": limit,
            },
            "storage": {"path": str(tmp_path / "var"), "fsync": "never"},
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", daemon.port))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /v1/tail HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # and never read a byte
    try:
        await wait_for(lambda: len(daemon.tail.subscribers) == 1, what="the client to subscribe")
        [subscriber] = daemon.tail.subscribers
        large = [make_event(requestData={"blob": "x" * 30_000}) for _ in range(20)]
        deadline = asyncio.get_running_loop().time() + 60
        while subscriber.dropped == 0:
            assert asyncio.get_running_loop().time() < deadline, "nothing was ever dropped"
            status, _ = await post(daemon, large)
            assert status == 202  # ingest never waits for the tail
            await wait_for(lambda: daemon.tail.backlog == 0, what="the fan-out")
        assert daemon.tail.subscribers == {subscriber}  # not dropped: only slow
        tail = daemon.status()["tail"]
        queued = sum(len(message) for message in subscriber.pending)
        assert queued <= tail["held_bytes"] <= limit, (queued, tail)
        assert tail["clients"] == 1 and tail["dropped_events"] == subscriber.dropped > 0
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_subscriber_keeps_what_fits_in_bytes_and_counts_the_rest() -> None:
    """The byte bound keeps the oldest messages that fit, counts the rest as dropped, and
    counts a write the client has not taken yet as held; one message always fits a client
    that holds nothing, however large."""
    hub = TailHub(queue_bytes=1000)
    hub.start()
    try:
        client = hub.subscribe(None)
        hub.publish([accepted(make_event(id=f"e-{i}")) for i in range(50)])
        await wait_for(lambda: hub.backlog == 0 and bool(client.pending), what="the fan-out")
        size = len(client.pending[0])
        assert len(client.pending) == 1000 // size and client.dropped == 50 - 1000 // size
        assert client.held_bytes == sum(map(len, client.pending)) <= 1000
        taken = client.take()  # being written, not yet read by the client: still held
        assert client.held_bytes == sum(map(len, taken))
        client.written()
        assert client.held_bytes == 0
        huge = make_event(id="huge", requestData={"blob": "x" * 5000})
        hub.publish([accepted(huge)])
        await wait_for(lambda: bool(client.pending), what="the large event")
        assert hub.status()["held_bytes"] == len(client.pending[0]) > 1000
    finally:
        await hub.stop()


async def test_batches_waiting_for_the_fan_out_are_bounded_in_bytes() -> None:
    """While the fan-out is behind (here: not running), ingest's batches wait for it: up to
    1000 batches whatever their size, a gigabyte of large events. They are bounded in bytes
    too (server.tail_queue_bytes, one batch always fits); a batch past it is dropped for
    every client and counted, as a batch past the count is."""
    hub = TailHub(queue_bytes=100_000)
    client = hub.subscribe(None)
    large = [accepted(make_event(requestData={"blob": "x" * 30_000})) for _ in range(2)]
    for _ in range(20):
        hub.publish(large)
    waiting = hub.status()["backlog_bytes"]
    assert 0 < waiting <= 100_000 and 1 <= hub.backlog < 20, waiting
    hub.start()
    try:
        await wait_for(lambda: hub.backlog == 0 and bool(client.pending), what="the fan-out")
        # Every event reached the client or was counted as dropped for it.
        assert len(client.pending) + client.dropped == 40
        assert hub.status()["backlog_bytes"] == 0
    finally:
        await hub.stop()
