"""`server.workers: 2` as real processes: worker processes take POST /v1/events on the shared
port and hand records to the journal owner; everything else is one daemon's.

kill -9 of a worker or of the owner under load loses nothing acknowledged; SIGTERM drains
every process; systemd hears READY and STOPPING once; status, metrics and the tail show one
daemon; a reload reaches the workers before it is reported done; a bad body gets the answer
one process gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import hashlib
import hmac
import os
import signal
import socket
import tempfile
import tracemalloc
from array import array
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
import yaml

from router.config import ServerConfig, parse_config
from router.deadletter import DeadLetters
from router.events import Event
from router.intake.accept import Acceptor
from router.intake.handoff import (
    CALL,
    HEADER,
    Channel,
    HandoffJournal,
    events,
    max_handoff_bytes,
    records,
)
from router.journal import JournalFullError
from router.observe.metrics import IngestStats
from router.reload import validator_for
from router.routing import RouteTable
from router.server.collector import YOUNG_THRESHOLD
from tests import helpers
from tests.conftest import StartDaemon
from tests.fakes import ScriptedReceiver, make_event, read_ndjson, wait_for
from tests.helpers import Load, drained, free_port, log_lines, ready, reap, spawn, terminate
from tests.integration.test_server_tls import client_context, post_event, tls_config

WORKERS = 2
INGEST_TOKEN = "ingest-token-for-the-workers-test"
ADMIN_TOKEN = "admin-token-for-the-workers-test"


# Three processes start on a machine the other tests keep busy: what `serve` waits for them
# (tests.helpers.serve), also how long a test waits for what they do under load.
START_TIMEOUT_S = helpers.SERVE_TIMEOUT_S
serve = helpers.serve


def workers_config(
    tmp_path: Path,
    port: int,
    *,
    workers: int = WORKERS,
    siem_url: str | None = None,
    auth: bool = False,
    **extra: Any,
) -> Path:
    """A daemon with a file target (and an http one), `workers` worker processes."""
    targets: list[dict[str, Any]] = [
        {
            "id": "archive",
            "target_type": "file",
            "file_endpoint": {"path": str(tmp_path / "var" / "archive.ndjson")},
        }
    ]
    if siem_url is not None:
        targets.append({"id": "siem", "target_type": "http", "http_endpoint": {"url": siem_url}})
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "workers": workers},
        "storage": {"path": str(tmp_path / "var"), "fsync": "always"},
        "startup": {"validate_targets": False},
        "targets": targets,
        "routes": [
            {
                "name": "all",
                "rules": [{"locations": ["*"], "target_ids": [t["id"] for t in targets]}],
            }
        ],
        **extra,
    }
    if auth:
        config["auth"] = {
            "ingest_tokens": [
                {"name": "producer", "sha256": hashlib.sha256(INGEST_TOKEN.encode()).hexdigest()}
            ],
            "admin_tokens": [
                {"name": "ops", "sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}
            ],
        }
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (the owner's workers)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def headers(token: str | None = None) -> dict[str, str]:
    found = {"Content-Type": "application/json"}
    if token is not None:
        found["Authorization"] = f"Bearer {token}"
    return found


async def status_of(port: int, token: str | None = None) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/v1/status", headers=headers(token)) as resp,
    ):
        assert resp.status == 200
        return dict(await resp.json())


async def nothing_pending(port: int, token: str) -> bool:
    status = await status_of(port, token)
    return all(t["pending"] == 0 for t in status["targets"].values())


def assert_books_balance(status: dict[str, Any]) -> None:
    for target_id, row in status["targets"].items():
        assert row["received"] == (
            row["delivered"] + row["dead_lettered"] + row["pending"] + row["lost"]
        ), (target_id, row)


def assert_all_delivered(acked: list[str], archive: Path, siem: ScriptedReceiver) -> None:
    archived = [e["id"] for e in read_ndjson(archive)]
    sent = [e["id"] for e in siem.delivered_events]
    for name, got in (("archive", archived), ("siem", sent)):
        missing = set(acked) - set(got)
        assert not missing, f"{name} lost {len(missing)} of {len(acked)} acknowledged events"


async def test_a_worker_killed_under_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    siem = await ScriptedReceiver(statuses=[200]).start()
    port = free_port()
    config = workers_config(tmp_path, port, siem_url=siem.url)
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(config, port)
        workers = children(proc.pid)
        assert len(workers) == WORKERS
        load = Load(port, through_restarts=True)
        acked = load.acked
        await wait_for(
            lambda: len(acked) >= 300,
            timeout_s=START_TIMEOUT_S,
            what="some load to be acknowledged",
        )
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        before = len(acked)
        await wait_for(
            lambda: len(acked) >= before + 300,
            timeout_s=START_TIMEOUT_S,
            what="load acknowledged after the kill",
        )
        await wait_for(
            lambda: len(children(proc.pid) - workers) == 1 and ready(port),
            timeout_s=START_TIMEOUT_S,
            what="the owner to start a worker in place of the killed one",
        )
        await load.stop()
        await wait_for(
            lambda: drained(port), timeout_s=START_TIMEOUT_S, what="the journal to drain"
        )
        status = await status_of(port)
        assert_books_balance(status)
        assert status["targets"]["archive"]["received"] >= len(acked)
        assert status["workers"] == {
            "setting": WORKERS,
            "configured": WORKERS,
            "basis": "server.workers",
            "running": WORKERS,
            "restarts": 1,
        }
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
        await siem.stop()
    assert_all_delivered(acked, tmp_path / "var" / "archive.ndjson", siem)


async def test_the_owner_killed_under_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    siem = await ScriptedReceiver(statuses=[200]).start()
    port = free_port()
    config = workers_config(tmp_path, port, siem_url=siem.url)
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(config, port)
        workers = children(proc.pid)
        load = Load(port, through_restarts=True)
        acked = load.acked
        await wait_for(
            lambda: len(acked) >= 500,
            timeout_s=START_TIMEOUT_S,
            what="some load to be acknowledged",
        )
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        await wait_for(
            lambda: not any(alive(pid) for pid in workers),
            timeout_s=START_TIMEOUT_S,
            what="the workers to stop once their owner is gone",
        )
        await load.stop()
        assert acked, "nothing was acknowledged before the kill"

        proc = await serve(config, port)
        await wait_for(
            lambda: drained(port), timeout_s=START_TIMEOUT_S, what="the journal to drain"
        )
        status = await status_of(port)
        assert_books_balance(status)
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
        await siem.stop()
    assert_all_delivered(acked, tmp_path / "var" / "archive.ndjson", siem)


async def test_sigterm_drains_every_process(tmp_path: Path) -> None:
    port = free_port()
    config = workers_config(tmp_path, port)
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as stderr:
        proc = await serve(config, port, stderr=stderr)
    try:
        workers = children(proc.pid)
        assert len(workers) == WORKERS
        load = Load(port, through_restarts=True, for_at_most_s=30)
        acked = load.acked
        await wait_for(
            lambda: len(acked) >= 200,
            timeout_s=START_TIMEOUT_S,
            what="some load to be acknowledged",
        )
        code = await terminate(proc)
        await load.stop()
        assert code == 0
        assert not any(alive(pid) for pid in workers), "a worker outlived its owner's stop"
    finally:
        await reap(proc)
    archived = [e["id"] for e in read_ndjson(tmp_path / "var" / "archive.ndjson")]
    assert set(acked) <= set(archived), "SIGTERM left acknowledged events undelivered"
    log = log_lines(log_path)
    stopped = [line["message"] for line in log if line["message"].startswith("event-router stop")]
    assert len(stopped) == 1 and "0 pending" in stopped[0], stopped
    assert f"accepted {len(set(archived))} events" in stopped[0], stopped


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    with (
        tempfile.TemporaryDirectory(prefix="sdn-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = os.path.join(directory, "notify")
        sock.bind(path)
        sock.setblocking(False)
        yield sock, path


async def receive(sock: socket.socket) -> list[str]:
    data = await asyncio.wait_for(
        asyncio.get_running_loop().sock_recv(sock, 65536), START_TIMEOUT_S
    )
    return data.decode().split("\n")


async def test_notify_says_ready_and_stopping_once_and_a_reload_reaches_the_workers_first(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    siem = await ScriptedReceiver(statuses=[200]).start()
    port = free_port()
    config = workers_config(tmp_path, port, siem_url=siem.url)
    data = yaml.safe_load(config.read_text())
    proc = await spawn(config, env={**os.environ, "NOTIFY_SOCKET": path})
    try:
        first = await receive(sock)
        assert first[0] == "READY=1"
        assert len(children(proc.pid)) == WORKERS, "READY=1 before the workers listen"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/readyz") as resp,
        ):
            assert resp.status == 200

        # The reload sends everything to siem only: once READY=1 says it is done, no worker
        # may still route to the archive.
        data["routes"] = [{"name": "siem", "rules": [{"locations": ["*"], "target_ids": ["siem"]}]}]
        config.write_text(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        assert (await receive(sock))[0] == "RELOADING=1"
        reloaded = await receive(sock)
        assert reloaded[0] == "READY=1" and "STATUS=reloaded" in reloaded
        ids = [f"after-reload-{n}" for n in range(40)]
        for event_id in ids:  # one connection each: the kernel spreads them over the workers
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"http://127.0.0.1:{port}/v1/events",
                    data=orjson.dumps(make_event(id=event_id)),
                    headers=headers(),
                ) as resp,
            ):
                assert resp.status == 202
        await wait_for(lambda: drained(port), what="delivery")
        status = await status_of(port)
        # Those, and the reload's own audit event (routed by the new routes, too).
        assert status["targets"]["siem"]["received"] == len(ids) + 1
        assert status["targets"]["archive"]["received"] == 0

        proc.send_signal(signal.SIGTERM)
        stopping = await receive(sock)
        assert stopping[0] == "STOPPING=1"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        with pytest.raises(BlockingIOError):
            sock.recv(65536)  # nothing more: no worker spoke to the service manager
    finally:
        await reap(proc)
        await siem.stop()
    assert set(ids) <= {e["id"] for e in siem.delivered_events}


async def test_status_metrics_and_tail_show_one_daemon(tmp_path: Path) -> None:
    port = free_port()
    config = workers_config(tmp_path, port, auth=True)
    base = f"http://127.0.0.1:{port}"
    proc = await serve(config, port)
    try:
        async with aiohttp.ClientSession() as session:
            tail = await session.get(f"{base}/v1/tail", headers=headers(ADMIN_TOKEN))
            assert tail.status == 200
            assert (await tail.content.readuntil(b"\n\n")).startswith(b"event: ready")
            ids = []
            for n in range(20):  # one connection each: both workers take some
                ids.append(f"one-daemon-{n}")
                async with (
                    aiohttp.ClientSession() as fresh,
                    fresh.post(
                        f"{base}/v1/events",
                        data=orjson.dumps(make_event(id=ids[-1])),
                        headers=headers(INGEST_TOKEN),
                    ) as resp,
                ):
                    assert resp.status == 202
            async with (
                aiohttp.ClientSession() as fresh,
                fresh.post(
                    f"{base}/v1/events", data=orjson.dumps(make_event()), headers=headers()
                ) as resp,
            ):
                assert resp.status == 401
            seen: set[str] = set()
            while not set(ids) <= seen:
                chunk = await asyncio.wait_for(tail.content.readuntil(b"\n\n"), 15)
                for line in chunk.split(b"\n"):
                    if line.startswith(b"data: "):
                        seen.add(orjson.loads(line[6:]).get("id"))
            tail.close()

            status = await status_of(port, ADMIN_TOKEN)
            assert status["ingest"]["requests"] == 20  # the 401 never reached ingest
            # The 20, and the refusal: an event of the router itself, journaled by the owner.
            assert status["ingest"]["accepted"] == 21
            assert status["auth"]["refused"] == {"Unauthorized": 1}
            assert status["auth"]["refusal_events"] == 1
            assert status["targets"]["archive"]["received"] == 21
            assert_books_balance(status)
            async with session.get(f"{base}/metrics", headers=headers(ADMIN_TOKEN)) as resp:
                metrics = await resp.text()
            assert "event_router_events_accepted_total 21.0" in metrics
            assert "event_router_ingest_requests_total 20.0" in metrics
            async with session.get(f"{base}/v1/status") as resp:
                assert resp.status == 401
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


BAD_BODIES: list[tuple[str, bytes, dict[str, str]]] = [
    ("malformed json", b'{"action": ', {}),
    ("empty", b"", {}),
    ("schema", orjson.dumps({"action": "x"}), {}),
    ("half bad", orjson.dumps([make_event(id="good-1"), {"id": "bad-1"}]), {}),
    ("reserved action", orjson.dumps(make_event(action="event-router.config.update")), {}),
    ("media type", b"{}", {"Content-Type": "text/plain"}),
    ("encoding", b"{}", {"Content-Encoding": "br"}),
    ("bad gzip", b"not gzip at all", {"Content-Encoding": "gzip"}),
    ("gzip bomb", gzip.compress(b" " * (3 * 1024 * 1024)), {"Content-Encoding": "gzip"}),
    ("too many", orjson.dumps([make_event() for _ in range(6)]), {}),
    ("ndjson line", b'{"x": 1}\nnot json\n', {"Content-Type": "application/x-ndjson"}),
    ("no token", orjson.dumps(make_event()), {"Authorization": "Bearer wrong"}),
]


async def answers(tmp_path: Path, workers: int) -> list[tuple[int, Any]]:
    port = free_port()
    directory = tmp_path / f"workers-{workers}"
    directory.mkdir()
    config = workers_config(directory, port, workers=workers, auth=True)
    data = yaml.safe_load(config.read_text())
    data["server"] |= {"max_events_per_request": 5, "max_inflated_bytes": 2 * 1024 * 1024}
    config.write_text(yaml.safe_dump(data))
    proc = await serve(config, port)
    found = []
    try:
        for _, body, extra in BAD_BODIES:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"http://127.0.0.1:{port}/v1/events",
                    data=body,
                    headers={**headers(INGEST_TOKEN), **extra},
                ) as resp,
            ):
                answer = await resp.json()
                for result in answer.get("results", []):
                    if result.get("status") == "accepted":
                        result.pop("id")  # assigned at random
                found.append((resp.status, answer))
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
    return found


async def test_a_bad_body_gets_the_same_answer_from_a_worker(tmp_path: Path) -> None:
    one, two = await answers(tmp_path, 1), await answers(tmp_path, WORKERS)
    for (name, _, _), alone, worker in zip(BAD_BODIES, one, two, strict=True):
        assert worker == alone, name
    assert all(status >= 400 for status, _ in one[:2])


async def test_receipts_and_an_api_route_change_work_through_the_workers(tmp_path: Path) -> None:
    """A worker issues receipts with the owner's key; GET /v1/receipts/{id} and a management
    API change pass through a worker to the owner, and the change reaches every worker before
    the API answers."""
    siem = await ScriptedReceiver(statuses=[200]).start()
    port = free_port()
    config = workers_config(tmp_path, port, siem_url=siem.url, auth=True)
    data = yaml.safe_load(config.read_text())
    data["evidence"] = {"receipts": True}
    data["routes"] = [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}]
    config.write_text(yaml.safe_dump(data))
    base = f"http://127.0.0.1:{port}"
    proc = await serve(config, port)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{base}/v1/events",
                data=orjson.dumps(make_event(id="with-receipt")),
                headers=headers(INGEST_TOKEN),
            ) as resp:
                assert resp.status == 202
                receipt = (await resp.json())["results"][0]["receipt"]
            key = (tmp_path / "var" / "receipts.key").read_bytes()
            message = f"{receipt['id']}\n{receipt['digest']}\n{receipt['received_at']}".encode()
            assert receipt["mac"] == hmac.new(key, message, hashlib.sha256).hexdigest()
            await wait_for(lambda: nothing_pending(port, ADMIN_TOKEN), what="delivery")
            async with session.get(
                f"{base}/v1/receipts/with-receipt", headers=headers(ADMIN_TOKEN)
            ) as resp:
                assert resp.status == 200
                where = await resp.json()
            assert where["targets"]["archive"]["state"] == "delivered"
            assert where["targets"]["archive"]["digest"] == receipt["digest"]

            async with session.put(
                f"{base}/api/v2/routes/all",
                data=orjson.dumps(
                    {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["siem"]}]}
                ),
                headers=headers(ADMIN_TOKEN),
            ) as resp:
                assert resp.status == 200, await resp.text()
        ids = [f"after-api-{n}" for n in range(20)]
        for event_id in ids:  # one connection each: the kernel spreads them over the workers
            async with (
                aiohttp.ClientSession() as fresh,
                fresh.post(
                    f"{base}/v1/events",
                    data=orjson.dumps(make_event(id=event_id)),
                    headers=headers(INGEST_TOKEN),
                ) as resp,
            ):
                assert resp.status == 202
        await wait_for(lambda: set(ids) <= {e["id"] for e in siem.delivered_events})
        archived = {e["id"] for e in read_ndjson(tmp_path / "var" / "archive.ndjson")}
        assert not archived & set(ids), "a worker routed with the routes the API replaced"
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
        await siem.stop()


async def http10_status(port: int, extra: bytes = b"") -> bytes:
    """GET /v1/status as HTTP/1.0 (no Host unless in `extra`): the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /v1/status HTTP/1.0\r\n" + extra + b"\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 15)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_without_auth_the_owner_checks_the_callers_host_not_the_workers(
    tmp_path: Path,
) -> None:
    port = free_port()
    proc = await serve(workers_config(tmp_path, port), port)
    try:
        assert b" 200 " in await http10_status(port), "a caller that sent no Host is answered"
        refused = await http10_status(port, b"Host: evil.example\r\n")
        assert b" 403 " in refused, "a rebinding page's Host is refused, as by one process"
        assert b" 200 " in await http10_status(port, f"Host: 127.0.0.1:{port}\r\n".encode())
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


async def test_an_in_process_daemon_with_workers_speaks_tls_through_them(
    start_daemon: StartDaemon, pki: Path, tmp_path: Path
) -> None:
    """port 0, TLS in the workers, and the owner told the caller's scheme: a same-origin
    change from https://host:port passes the owner's Origin check."""
    config = tls_config(pki, tmp_path)
    config["server"]["workers"] = WORKERS
    daemon = await start_daemon(config)
    url = f"https://127.0.0.1:{daemon.port}"
    context = client_context(pki, with_cert=False)
    assert await post_event(url, context) == 202
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/status", ssl=context) as resp:
            status = await resp.json()
        assert status["ingest"]["accepted"] == 1
        assert status["workers"]["running"] == WORKERS
        async with session.post(
            f"{url}/v1/deadletters/archive/redrive",
            ssl=context,
            headers={"Origin": url},
        ) as resp:
            assert resp.status == 200, await resp.text()  # nothing to redrive, and allowed
        async with session.post(
            f"{url}/v1/deadletters/archive/redrive",
            ssl=context,
            headers={"Origin": f"http://127.0.0.1:{daemon.port}"},
        ) as resp:
            assert resp.status == 403 and (await resp.json())["error"]["code"] == "cross_origin"


async def test_a_daemon_with_workers_routes_by_a_rules_filter_and_runs_a_views_alert(
    tmp_path: Path,
) -> None:
    """The config travels to each worker by pickle: a rule's filter, a view and an alert's
    query (compiled predicates) reach the workers, which route by the filter."""
    port = free_port()
    config = workers_config(tmp_path, port)
    data = yaml.safe_load(config.read_text())
    data["targets"].append(
        {
            "id": "denied",
            "target_type": "file",
            "file_endpoint": {"path": str(tmp_path / "var" / "denied.ndjson")},
        }
    )
    data["routes"] = [
        {
            "name": "denied",
            "rules": [
                {
                    "locations": ["*"],
                    "filter": "reason.reasonType:Unauthorized",
                    "target_ids": ["denied"],
                },
                {"locations": ["*"], "target_ids": ["archive"]},
            ],
        }
    ]
    data["views"] = [{"name": "refusals", "query": "reason.reasonType:Unauthorized"}]
    data["alerts"] = [
        {
            "name": "refused",
            "view": "refusals",
            "threshold": {"count": 1000},
            "target_ids": ["denied"],
        },
        {
            "name": "quiet",
            "query": "severity:critical",
            "absence": {"window_s": 3600},
            "target_ids": ["archive"],
        },
    ]
    config.write_text(yaml.safe_dump(data))
    proc = await serve(config, port)
    try:
        assert len(children(proc.pid)) == WORKERS
        denied = [f"denied-{n}" for n in range(10)]
        allowed = [f"allowed-{n}" for n in range(10)]
        for event_id in [x for pair in zip(denied, allowed, strict=True) for x in pair]:
            reason = "Unauthorized" if event_id in denied else "Created"
            event = make_event(id=event_id, reason={"reasonCode": 401, "reasonType": reason})
            async with (  # one connection each: the kernel spreads them over the workers
                aiohttp.ClientSession() as fresh,
                fresh.post(
                    f"http://127.0.0.1:{port}/v1/events",
                    data=orjson.dumps(event),
                    headers=headers(),
                ) as resp,
            ):
                assert resp.status == 202, await resp.text()
        await wait_for(lambda: drained(port), timeout_s=START_TIMEOUT_S, what="delivery")
        status = await status_of(port)
        assert_books_balance(status)
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
    got_denied = {e["id"] for e in read_ndjson(tmp_path / "var" / "denied.ndjson")}
    got_archive = {e["id"] for e in read_ndjson(tmp_path / "var" / "archive.ndjson")}
    assert got_denied == set(denied)
    assert set(allowed) <= got_archive and not got_archive & set(denied)


# What a worker never needs: the targets' clients (the owner delivers; botocore's exceptions
# too), the signing library (a worker signs nothing unless receipts have a signing key), NATS
# (the owner's journal), the management API, console and search (the owner answers them), a
# YAML parser (it is handed the config the owner read).
NOT_IN_A_WORKER = (
    "aiokafka",
    "aiobotocore",
    "botocore",
    "yaml",
    "cryptography",
    "nats",
    "router.daemon",
    "router.delivery",
    "router.journal.sqlite",
    "router.journal.jetstream",
    "router.server.api",
    "router.server.app",
    "router.server.console",
    "router.server.search",
    "router.server.tail",
)


async def test_a_worker_imports_no_target_client_even_when_the_config_names_every_type(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The config a worker receives names a target of every type: unpickling it loads their
    modules, not their clients (each worker's sys.modules, asked over its channel)."""
    closed = free_port()  # nothing listens: the owner's delivery retries, nothing is sent
    targets: list[dict[str, Any]] = [
        {
            "id": "archive",
            "target_type": "file",
            "file_endpoint": {"path": str(tmp_path / "var" / "archive.ndjson")},
        },
        {
            "id": "bucket",
            "target_type": "cloud_object_storage",
            "cos_endpoint": {
                "endpoint": f"http://127.0.0.1:{closed}",
                "target_crn": "crn:v1:bluemix:public:cloud-object-storage:global:a/abc123:def456::",
                "bucket": "audit-archive",
                "hmac_keys": {"access_key_id": "key-id", "secret_access_key": "secret-key-01"},
            },
        },
        {
            "id": "kafka",
            "target_type": "event_streams",
            "eventstreams_endpoint": {
                "target_crn": "crn:v1:bluemix:public:messagehub:us-south:a/abc123:def456::",
                "brokers": [f"127.0.0.1:{closed}"],
                "topic": "audit",
                "api_key": "an-event-streams-key-01",
                "tls": False,
            },
        },
    ]
    daemon = await start_daemon(
        {
            "server": {"host": "127.0.0.1", "port": 0, "workers": WORKERS},
            "evidence": {"receipts": True},
            "targets": targets,
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{daemon.port}/v1/events",
            data=orjson.dumps(make_event()),
            headers=headers(),
        ) as resp,
    ):
        assert resp.status == 202
        assert "receipt" in (await resp.json())["results"][0]
    assert daemon.worker_pool is not None
    found = await daemon.worker_pool.modules()
    assert len(found) == WORKERS
    for pid, modules in found.items():
        assert {"router.targets.cos", "router.targets.event_streams"} <= set(modules), pid
        heavy = sorted(
            m for m in modules if any(m == h or m.startswith(f"{h}.") for h in NOT_IN_A_WORKER)
        )
        assert heavy == [], f"worker {pid} imported {heavy}"


async def test_each_worker_freezes_what_its_setup_built_and_collects_young_less_often(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A worker's start-up heap (modules, config, validator, routes) is frozen out of the
    garbage collector's sight, as serve's is: a full collection walks only what came after
    (it walked ~47,000 objects in each worker before, ~1 us of CPU per batched event)."""
    daemon = await start_daemon(
        {
            "server": {"host": "127.0.0.1", "port": 0, "workers": WORKERS},
            "targets": [helpers.file_target("archive", tmp_path / "archive.ndjson")],
            "routes": helpers.everything_to("archive"),
        }
    )
    assert daemon.worker_pool is not None
    frozen = await daemon.worker_pool.frozen()
    assert len(frozen) == WORKERS
    assert all(count > 10_000 for count in frozen.values()), frozen
    # and its young collections wait for more than a few requests' events in flight
    for handle in daemon.worker_pool._handles.values():
        threshold = await handle.channel.call("collector")
        assert threshold[0] == YOUNG_THRESHOLD > 700, threshold


def mapped(pid: int) -> set[str]:
    """The files a process has mapped (its shared libraries among them)."""
    with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
        return {line.split()[-1] for line in f if "/" in line}


async def test_a_daemon_without_kafka_or_signing_loads_neither_library(tmp_path: Path) -> None:
    """The owner and its workers, as running processes: no Kafka target and no signing key,
    so neither aiokafka's nor cryptography's compiled modules are mapped in any of them."""
    port = free_port()
    proc = await serve(workers_config(tmp_path, port, evidence={"receipts": True}), port)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/v1/events",
                data=orjson.dumps(make_event()),
                headers=headers(),
            ) as resp,
        ):
            assert resp.status == 202
        await wait_for(lambda: drained(port), timeout_s=START_TIMEOUT_S, what="delivery")
        processes = {proc.pid, *children(proc.pid)}
        assert len(processes) == WORKERS + 1
        for pid in processes:
            libraries = mapped(pid)
            assert any("/aiohttp/" in path for path in libraries), "the check sees libraries"
            loaded = sorted(p for p in libraries if "/aiokafka/" in p or "/cryptography/" in p)
            assert loaded == [], f"process {pid} mapped {loaded}"
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


def environ(pid: int) -> dict[str, str]:
    """A running process's environment, as it was started."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [entry.partition(b"=") for entry in f.read().split(b"\0") if entry]
    return {key.decode(): value.decode() for key, _, value in pairs}


async def test_workers_start_with_mallocs_thresholds_pinned_unless_the_operator_set_them(
    tmp_path: Path,
) -> None:
    """Each worker process, as it runs, has glibc's mmap and trim thresholds pinned (left to
    itself glibc raises them to a worker's largest burst and keeps that memory); a threshold
    the operator set for the daemon is the worker's too."""
    port = free_port()
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "262144"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = await serve(workers_config(tmp_path, port), port, env=env)
    try:
        workers = children(proc.pid)
        assert len(workers) == WORKERS
        for pid in workers:
            found = environ(pid)
            assert found.get("MALLOC_MMAP_THRESHOLD_") == "131072", pid
            assert found.get("MALLOC_TRIM_THRESHOLD_") == "262144", pid
        assert "MALLOC_MMAP_THRESHOLD_" not in environ(proc.pid), "the owner's is left as it is"
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


def imported(log: Path) -> set[str]:
    """Every module the daemon's processes imported, from the lines PYTHONPROFILEIMPORTTIME
    writes to stderr (the owner's workers inherit both): one line per first import."""
    names = set()
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("import time:") and not line.endswith("| imported package"):
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def loaded(names: set[str], *packages: str) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(f"{p}.") for p in packages))


# What a daemon imports only when its config asks for it: NATS with storage.backend jetstream,
# botocore with a cloud_object_storage target, the round-trip YAML library when the management
# API writes the config file back.
NOT_CONFIGURED = ("nats", "router.journal.jetstream", "botocore", "ruamel")


@pytest.mark.parametrize("workers", [1, WORKERS])
async def test_a_daemon_imports_nats_botocore_and_ruamel_only_when_it_uses_them(
    tmp_path: Path, workers: int
) -> None:
    """The owner (or the one process) and its workers, as running processes: storage.backend
    sqlite and no cloud_object_storage target, so none imports NATS or botocore, and until
    the management API changes the config none imports the round-trip YAML library; an API
    change then writes the file back with it."""
    port = free_port()
    config = workers_config(tmp_path, port, workers=workers, auth=True)
    log = tmp_path / "daemon.log"
    with log.open("ab") as stderr:
        proc = await serve(
            config, port, stderr=stderr, env=os.environ | {"PYTHONPROFILEIMPORTTIME": "1"}
        )
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{port}/v1/events",
                data=orjson.dumps(make_event()),
                headers=headers(INGEST_TOKEN),
            ) as resp:
                assert resp.status == 202
            await wait_for(lambda: nothing_pending(port, ADMIN_TOKEN), what="delivery")
            assert_books_balance(await status_of(port, ADMIN_TOKEN))
            before = imported(log)
            assert "router.daemon" in before and "aiohttp" in before, "the check sees imports"
            assert loaded(before, *NOT_CONFIGURED) == []

            async with session.put(
                f"http://127.0.0.1:{port}/api/v2/routes/all",
                data=orjson.dumps(
                    {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}
                ),
                headers=headers(ADMIN_TOKEN),
            ) as resp:
                assert resp.status == 200, await resp.text()
        assert "ruamel.yaml" in imported(log)
        assert (tmp_path / "router.yaml.prev").exists(), "the API wrote the file back"
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
    assert loaded(imported(log), "nats", "router.journal.jetstream", "botocore") == []


async def test_a_killed_workers_counters_stay_in_status_and_metrics(tmp_path: Path) -> None:
    """kill -9 of every worker under load: what they accepted since the last status was asked
    stays counted (the owner banks what it journaled for them), and /v1/status's and
    /metrics' counters never go backwards."""
    port = free_port()
    proc = await serve(workers_config(tmp_path, port), port)
    seen: list[tuple[str, int]] = []
    polling = asyncio.Event()

    async def poll() -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                await polling.wait()
                try:
                    status = await status_of(port)
                    seen.append(("status", status["ingest"]["accepted"]))
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        text = await resp.text()
                except aiohttp.ClientConnectionError:
                    # No worker listens between the kill and the new ones: ask again. (This
                    # error ended the poller: no counter was seen after the kill.)
                    await asyncio.sleep(0.01)
                    continue
                accepted = [
                    line
                    for line in text.splitlines()
                    if line.startswith("event_router_events_accepted_total ")
                ]
                seen.append(("metrics", int(float(accepted[0].split()[1]))))

    poller = asyncio.create_task(poll(), name="poller")
    try:
        workers = children(proc.pid)
        load = Load(port, through_restarts=True, for_at_most_s=60)
        acked = load.acked
        polling.set()
        await wait_for(lambda: len(acked) >= 300, timeout_s=START_TIMEOUT_S, what="some load")
        polling.clear()
        await wait_for(lambda: len(seen) >= 2, timeout_s=START_TIMEOUT_S, what="a status")
        before = len(acked)
        # Unasked, the workers accept more; then both die before anyone asks again.
        await wait_for(
            lambda: len(acked) >= before + 300, timeout_s=START_TIMEOUT_S, what="more load"
        )
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        killed = len(seen)
        polling.set()
        await wait_for(
            lambda: len(children(proc.pid) - workers) == WORKERS,
            timeout_s=START_TIMEOUT_S,
            what="the owner to start new workers",
        )
        # Counters asked of the new workers, as soon as they answer (the poller used to end
        # at the kill, so that no counter after it was ever compared).
        await wait_for(
            lambda: len(seen) >= killed + 2, timeout_s=START_TIMEOUT_S, what="a status after"
        )
        await wait_for(lambda: len(acked) >= before + 600, timeout_s=START_TIMEOUT_S, what="load")
        await load.stop()
        await wait_for(lambda: drained(port), timeout_s=START_TIMEOUT_S, what="delivery")
        polling.clear()
        assert not poller.done(), poller.exception()
        status = await status_of(port)
        assert_books_balance(status)
        # Every event the journal took was accepted by a worker, and is counted once.
        assert status["ingest"]["accepted"] == status["targets"]["archive"]["received"]
        for kind in ("status", "metrics"):
            values = [value for what, value in seen if what == kind]
            assert values == sorted(values), f"{kind} went backwards: {values}"
        assert await terminate(proc) == 0
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        await reap(proc)


def owner_socket(pid: int) -> Path:
    """The unix socket the owner listens on for its workers (its listening socket's path)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    with open("/proc/net/unix", encoding="utf-8") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) == 8 and fields[6] in inodes and fields[7].endswith("/owner.sock"):
                return Path(fields[7])
    raise AssertionError(f"process {pid} listens on no owner.sock")


async def test_a_killed_owners_socket_directory_is_removed_at_the_next_start(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = workers_config(tmp_path, port)
    proc = await serve(config, port)
    try:
        left = owner_socket(proc.pid).parent
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert left.exists(), "kill -9 leaves it (nothing runs at a kill)"
        proc = await serve(config, port)
        assert not left.exists(), "the next start did not remove the dead owner's directory"
        mine = owner_socket(proc.pid).parent
        assert await terminate(proc) == 0
        assert not mine.exists(), "a clean stop removes its own"
    finally:
        await reap(proc)


def test_records_waiting_to_reach_the_owner_are_held_once() -> None:
    """Records the owner has not read yet wait in the worker's transport (on uvloop, as
    `serve` runs) once: the events let their own bytes go as they are sent (joined into one
    buffer, not also a pickled copy), so a worker holding a large request for a slow owner
    holds its events' bytes once. They arrive intact."""
    bodies = [make_event(id=f"event-{n:05d}") for n in range(4000)]
    size = sum(len(orjson.dumps(body)) for body in bodies)
    expected = [
        (body["id"], float(n), hashlib.sha256(orjson.dumps(body)).hexdigest(), {"a": "r"})
        for n, body in enumerate(bodies)
    ]

    async def hand_over() -> None:
        handed: list[Any] = []

        async def append(batch: list[Any], data: list[bytes]) -> None:
            handed.extend(events(batch, data))

        owner_side, worker_side = socket.socketpair()
        worker = await Channel.over(worker_side, {}, name="worker")
        worker.start()
        owner: Channel | None = None
        try:
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                routed = [
                    (Event.stored(i, orjson.dumps(body), at), targets)
                    for body, (i, at, _, targets) in zip(bodies, expected, strict=True)
                ]
                made = tracemalloc.get_traced_memory()[0] - before
                meta, data = records(routed)
                call = asyncio.create_task(worker.call("append", meta, data=data))
                del data
                for _ in range(10):  # the frame is queued, then written as far as it goes
                    await asyncio.sleep(0)
                waiting = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert not call.done(), "the owner has read nothing yet"
            assert made >= size, "the events' bytes are traced"
            assert waiting < made + size // 4, f"{waiting} bytes held for {size} bytes of events"
            owner = await Channel.over(owner_side, {"append": append}, name="owner")
            owner.start()
            await asyncio.wait_for(call, 30)
            got = [
                (e.id, e.received_at, hashlib.sha256(e.encoded()).hexdigest(), targets)
                for e, targets in handed
            ]
            assert got == expected
        finally:
            if owner is None:
                owner_side.close()  # else the worker's close waits for a reader forever
            await worker.close()
            if owner is not None:
                await owner.close()
            owner_side.close()

    uvloop.run(hand_over())


async def test_a_workers_request_waiting_for_the_owner_keeps_only_its_events_bytes(
    tmp_path: Path,
) -> None:
    """In a worker nothing after the journal reads an event's body (no tail, no alerts: the
    owner runs them on the bytes), so a request waiting for the owner's durable answer holds
    only its events' bytes: the parsed items (most of a large request's memory) are let go.
    The answer and what the owner journals are unchanged."""
    handed: list[Any] = []
    answer = asyncio.Event()

    async def append(records: list[Any], data: list[bytes]) -> None:
        handed.extend(events(records, data))
        await answer.wait()

    async with channel_pair(append) as worker:
        acceptor = _acceptor_over(worker, tmp_path)
        bodies = [make_event() for _ in range(5)]
        accepting = asyncio.create_task(acceptor.accept([*bodies, {"not": "an event"}]))
        await wait_for(lambda: len(handed) == 5, what="the records handed to the owner")
        gc.collect()
        for body in bodies:
            held_by = [r for r in gc.get_referrers(body) if r is not bodies]
            assert not held_by, f"a parsed item is kept while waiting: {held_by!r:.200}"
        answer.set()
        outcome = await accepting
        assert outcome.accepted == 5 and acceptor.stats.rejected == 1
        assert [r["id"] for r in outcome.results[:5]] == [body["id"] for body in bodies]
        assert [orjson.loads(event.encoded()) for event, _ in handed] == bodies
        assert [targets for _, targets in handed] == [{"archive": "all"}] * 5


@contextlib.asynccontextmanager
async def channel_pair(append: Any) -> AsyncIterator[Channel]:
    """A worker's channel to an owner whose `append` is given, over a socket pair, both
    started; closed when done."""
    owner_side, worker_side = socket.socketpair()
    owner = await Channel.over(owner_side, {"append": append}, name="owner")
    worker = await Channel.over(worker_side, {}, name="worker")
    owner.start()
    worker.start()
    try:
        yield worker
    finally:
        await worker.close()
        await owner.close()


def _acceptor_over(channel: Channel, tmp_path: Path) -> Acceptor:
    """A worker's Acceptor as worker.py builds it, over a HandoffJournal on `channel`."""
    config = parse_config(
        {
            "storage": {"path": str(tmp_path / "var")},
            "targets": [helpers.file_target("archive", tmp_path / "archive.ndjson")],
            "routes": helpers.everything_to("archive"),
        }
    )
    return Acceptor(
        server=config.server,
        validator=validator_for(config),
        routes=RouteTable(config.routes, config.settings.default_targets),
        journal=HandoffJournal(channel),
        stats=IngestStats(),
        storage=config.storage,
        dead_letters=DeadLetters(config.storage.dead_letter_dir()),
    )


async def test_a_workers_request_lets_its_events_bytes_go_once_the_owner_has_them(
    tmp_path: Path,
) -> None:
    """The owner has an offer's records (it journals them): the worker, waiting for the durable
    answer, no longer holds the events' bytes it made (about 1 MB per waiting 1,000-event
    request before). Measured as the memory still allocated by router/events.py, where intake
    makes an event's bytes, while the request waits. The answer and what the owner journals
    are unchanged."""
    digests: list[str] = []
    answer = asyncio.Event()

    async def append(records: list[Any], data: list[bytes]) -> None:
        digests.extend(hashlib.sha256(blob).hexdigest() for blob in data)
        del data[:]  # the owner's copies: journaled and let go here
        await answer.wait()

    async with channel_pair(append) as worker:
        acceptor = _acceptor_over(worker, tmp_path)
        bodies = [make_event(requestData={"note": "x" * 2000}) for _ in range(300)]
        size = sum(len(orjson.dumps(body)) for body in bodies)
        tracemalloc.start(10)
        try:
            accepting = asyncio.create_task(acceptor.accept(list(bodies)))
            await wait_for(lambda: len(digests) == len(bodies), what="the owner has the records")
            gc.collect()
            snapshot = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        made = snapshot.filter_traces([tracemalloc.Filter(True, "*/router/events.py")])
        # Only blocks of at least an event's size: events.py also keeps small things made
        # meanwhile that are not an event's bytes (the Event objects the request still holds,
        # and the rest of a block of fresh ids, by how many earlier tests left).
        smallest = min(len(orjson.dumps(body)) for body in bodies)
        held = sum(trace.size for trace in made.traces if trace.size >= smallest)
        assert held < size // 10, f"{held} bytes still held for {size} bytes of events"
        answer.set()
        outcome = await accepting
        assert outcome.accepted == len(bodies) and outcome.refusal is None
        assert [r["id"] for r in outcome.results] == [body["id"] for body in bodies]
        assert digests == [hashlib.sha256(orjson.dumps(body)).hexdigest() for body in bodies]


async def test_a_worker_asks_the_owner_once_when_the_journal_is_full(tmp_path: Path) -> None:
    """The owner answers journal_full only after it has shed (storage.when_full) and tried
    again itself, so the worker refuses the offer at once: it does not send the records a
    second time (it no longer holds their bytes once sent)."""
    calls: list[int] = []

    async def append(records: list[Any], data: list[bytes]) -> None:
        calls.append(len(records))
        raise JournalFullError("the journal holds storage.max_bytes")

    async with channel_pair(append) as worker:
        acceptor = _acceptor_over(worker, tmp_path)
        outcome = await acceptor.accept([make_event() for _ in range(3)])
        assert outcome.refusal is not None and outcome.refusal.code == "journal_full"
        assert outcome.accepted == 0 and acceptor.stats.journal_full == 1
        assert calls == [3]


async def test_a_calls_data_goes_out_as_one_buffer_however_many_events_it_holds() -> None:
    """The transport writes a frame's events as one joined buffer: written as a thousand
    buffers they cost the worker 0.7-1.4 us an event (uvloop walks each one), joined about
    0.1 us. The blobs arrive as they were sent, each its own bytes."""
    blobs = [orjson.dumps(make_event(id=f"event-{n:04d}")) for n in range(1000)]
    got: list[list[bytes]] = []

    async def append(meta: list[Any], data: list[bytes]) -> None:
        got.append(data)

    owner_side, worker_side = socket.socketpair()
    owner = await Channel.over(owner_side, {"append": append}, name="owner")
    worker = await Channel.over(worker_side, {}, name="worker")
    written: list[int] = []
    transport = worker._transport
    assert transport is not None
    writelines = transport.writelines

    def counted(buffers: Any) -> None:
        buffers = list(buffers)
        written.append(len(buffers))
        writelines(buffers)

    transport.writelines = counted  # type: ignore[method-assign]
    owner.start()
    worker.start()
    try:
        await worker.call("append", ["meta"], data=blobs)
        assert written == [4], "header, payload, lengths, the blobs joined"
        assert got == [blobs]
        assert len({id(blob) for blob in got[0]}) == len(blobs)
    finally:
        await worker.close()
        await owner.close()


@pytest.mark.parametrize("claim", ["payload", "blobs"])
async def test_a_frame_claiming_more_than_a_worker_can_send_drops_its_channel_unallocated(
    claim: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame header from a worker may claim up to 1 GiB (its payload's length, or the
    lengths of its blobs after it): the owner grew its read buffer to the claim, and waited
    for the rest. A worker sends at most one request's events and their records
    (max_handoff_bytes, from the server limits): a larger claim is the worker's protocol
    fault. The owner drops the channel at once, allocating nothing for it, and says why
    (the worker then stops and is started again, as after a crash)."""
    faults: list[str] = []
    owner_side, worker_side = socket.socketpair()
    owner = await Channel.over(
        owner_side, {"append": lambda *_: None}, name="worker-7", on_fault=faults.append
    )
    owner.start()
    claimed = 512 << 20
    assert max_handoff_bytes(ServerConfig()) < claimed
    if claim == "payload":
        frame = HEADER.pack(claimed, CALL, 1, 0)
    else:
        frame = HEADER.pack(4, CALL, 1, 2) + b"\x80\x05N." + array("I", [1, claimed]).tobytes()
    loop = asyncio.get_running_loop()
    worker_side.setblocking(False)
    tracemalloc.start()
    try:
        await loop.sock_sendall(worker_side, frame)
        await wait_for(owner.closed.is_set, what="the owner to drop the channel")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await owner.close()
    assert peak < 4 << 20, f"the owner allocated {peak} bytes for the claim"
    assert await loop.sock_recv(worker_side, 1) == b"", "the worker sees its channel closed"
    worker_side.close()
    whole = HEADER.size + claimed + (0 if claim == "payload" else 4 + 2 * 4 + 1)
    assert f"worker-7: a frame of {whole} bytes" in caplog.text
    assert len(faults) == 1


async def test_a_worker_refuses_an_offer_larger_than_its_owner_takes_and_keeps_its_channel(
    tmp_path: Path,
) -> None:
    """An offer whose records would come to more than the owner takes from a worker
    (max_handoff_bytes, set at the worker's setup) is not sent: the owner would take it for a
    protocol fault and stop the worker, so a producer could stop workers at will. It is
    refused (journal_unavailable), and the channel goes on taking the next offer."""
    calls: list[int] = []

    async def append(meta: list[Any], data: list[bytes]) -> None:
        calls.append(len(data))

    async with channel_pair(append) as worker:
        worker.max_send_bytes = 64 * 1024
        acceptor = _acceptor_over(worker, tmp_path)
        large = [make_event(requestData={"note": "x" * 2000}) for _ in range(100)]
        outcome = await acceptor.accept(large)
        assert outcome.refusal is not None and outcome.refusal.code == "journal_unavailable"
        assert calls == [] and not worker.closed.is_set()
        outcome = await acceptor.accept([make_event() for _ in range(3)])
        assert outcome.refusal is None and outcome.accepted == 3
        assert calls == [3]
