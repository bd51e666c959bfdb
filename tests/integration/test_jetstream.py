"""storage.backend: jetstream against a real nats-server (tests/peers/nats.py) on loopback.

In-process daemons here (the journal's promises one at a time): ingest answers after the
stream acknowledged, a producer's retry is stored once, a full stream answers 503, a long
send keeps its batch with in-progress acks, dead letters go to their stream and come back by
a redrive, and two daemons on one stream share each target's backlog. Routers as real
processes (kill -9, a NATS node killed) are in tests/integration/test_jetstream_cluster.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
import pytest
import yaml
from aiohttp import web

from router.clients.tail import sse_messages
from router.config import parse_config
from router.daemon import Daemon
from router.events import Event
from router.journal import Entry, JournalUnavailableError
from router.journal.jetstream import (
    STREAM_ERRORS,
    JetStreamJournal,
    letters_stream,
    queue_stream,
    queue_subject,
    read_stream_letters,
)
from router.journal.jetstream import journal as jetstream_journal
from router.server.api import ConfigSource
from tests.conftest import FAST_DELIVERY
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import (
    ReceiverFactory,
    assert_books_balance,
    everything_to,
    file_target,
    free_port,
    http_target,
    patient,
    post,
    ready,
    run_cli,
    settled,
    spawn,
)
from tests.peers.nats import NatsServer

pytestmark = pytest.mark.peers

_streams = itertools.count(1)
_ids = itertools.count(1)


def jetstream(servers: list[str], stream: str, **settings: Any) -> dict[str, Any]:
    """A storage section on JetStream (evidence keeps its chain heads in SQLite: off)."""
    return {"backend": "jetstream", "jetstream": {"servers": servers, "stream": stream, **settings}}


@pytest.fixture
async def start_router(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[Any]:
    """Start in-process daemons on one fresh stream: each its own storage.path and port, one
    process unless the test names server.workers (as tests.conftest's start_daemon): since
    the default became auto, each daemon here started a worker process per CPU, which the
    tests neither needed nor looked at, on a machine they share with the daemons' loop."""
    stream = f"T{next(_streams)}"
    daemons: list[Daemon] = []

    async def start(data: dict[str, Any], *, name: str = "r1", **settings: Any) -> Daemon:
        # The test server's store holds 1 GB: each stream reserves its max_bytes there.
        settings.setdefault("max_bytes", 16 * 1024 * 1024)
        storage = {"path": str(tmp_path / name), **jetstream([nats_server.url], stream, **settings)}
        data = {
            "server": {"host": "127.0.0.1", "port": 0},
            "storage": storage,
            "delivery": FAST_DELIVERY,
            "shutdown": {"drain_timeout_s": 5},
            "startup": {"validate_targets": False},
            "evidence": {"enabled": False},
            **data,
        }
        data["server"] = {"workers": 1, **data["server"]}
        daemon = Daemon(parse_config(data), ConfigSource(None, data))
        await daemon.start()
        daemons.append(daemon)
        return daemon

    start.stream = stream  # type: ignore[attr-defined]
    yield start
    for daemon in daemons:
        if daemon.ready:
            await daemon.stop()


async def stream_state(server: NatsServer, stream: str) -> Any:
    nc = await nats.connect(server.url)
    try:
        return (await nc.jetstream().stream_info(stream)).state
    finally:
        await nc.close()


def event(**fields: Any) -> dict[str, Any]:
    """A valid event with an id of its own (the producer's, so a retry can repeat it)."""
    fields.setdefault("id", f"js-{next(_ids)}")
    return make_event(**fields)


def one_batch(count: int) -> dict[str, Any]:
    """FAST_DELIVERY, but a batch waits (up to 5 s) until it holds `count` events: for a test
    that needs events posted together to go out together. An idle router's fetch comes back
    with the first event JetStream stored, and FAST_DELIVERY's max_wait_s (0.01 s) lingers
    for no more: three events posted at once came as batches of 1 and 2 in 27 of 200 tries."""
    return {**FAST_DELIVERY, "batch": {"max_events": count, "max_wait_s": 5}}


def books_of(daemon: Daemon, target_id: str) -> tuple[int, int, int, int]:
    row = daemon.status()["targets"][target_id]
    return row["received"], row["delivered"], row["dead_lettered"], row["pending"]


async def test_a_router_started_with_no_nats_server_to_reach_says_so_and_exits(
    tmp_path: Path,
) -> None:
    """nats-py, told to reconnect for ever, also tries its first connection for ever: serve
    hung at start-up, a warning every half second, never saying it could not start. It now
    gives up after storage.jetstream.start_timeout_s, exit 1, naming the servers."""
    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens there
    config = tmp_path / "router.yaml"
    storage = {"path": str(tmp_path / "var"), **jetstream([url], "T0", start_timeout_s=1)}
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": free_port()},
                "storage": storage,
                "evidence": {"enabled": False},
                "targets": [file_target("archive", tmp_path / "archive.ndjson")],
                "routes": everything_to("archive"),
            }
        ),
        encoding="utf-8",
    )
    proc = await spawn(config, stderr=asyncio.subprocess.PIPE)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:  # still trying: the defect
            proc.kill()
            await proc.wait()
    err = stderr.decode()
    assert proc.returncode == 1, err
    assert "cannot start" in err and url in err and "start_timeout_s (1 s)" in err, err


async def test_events_reach_the_file_target_and_the_books_come_from_the_stream(
    start_router: Any, tmp_path: Path, nats_server: NatsServer
) -> None:
    archive = tmp_path / "a.ndjson"
    daemon = await start_router(
        {"targets": [file_target("archive", archive)], "routes": everything_to("archive")}
    )
    events = [event() for _ in range(20)]
    status, _ = await post(daemon, events)
    assert status == 202
    await wait_for(lambda: books_of(daemon, "archive") == (20, 20, 0, 0), what="the books")
    assert [e["id"] for e in read_ndjson(archive)] == [e["id"] for e in events]
    assert_books_balance(daemon)
    stream = queue_stream(daemon.config.storage.jetstream, "archive")
    state = await stream_state(nats_server, stream)
    assert (state.last_seq, state.messages) == (20, 0), "delivered events leave the stream"


async def test_a_producers_retry_with_the_same_event_ids_is_stored_once(
    start_router: Any, tmp_path: Path
) -> None:
    archive = tmp_path / "a.ndjson"
    daemon = await start_router(
        {"targets": [file_target("archive", archive)], "routes": everything_to("archive")}
    )
    events = [event() for _ in range(5)]
    assert (await post(daemon, events))[0] == 202
    # The answer was lost: the producer sends the same events again.
    assert (await post(daemon, events))[0] == 202
    await wait_for(lambda: books_of(daemon, "archive") == (5, 5, 0, 0), what="the books")
    assert [e["id"] for e in read_ndjson(archive)] == [e["id"] for e in events]


async def test_a_full_stream_answers_503_with_retry_after_and_takes_events_once_drained(
    start_router: Any, receiver_factory: ReceiverFactory
) -> None:
    siem = await receiver_factory([503] * 10_000)
    target = http_target("siem", siem.url) | {"retry": {"max_attempts": 100_000, "max_age_s": 3600}}
    daemon = await start_router(
        {"targets": [target], "routes": everything_to("siem")}, max_bytes=65536
    )
    big = "x" * 4000
    refused = None
    for _ in range(40):
        status, body = await post(daemon, [event(requestData={"pad": big})])
        if status == 503:
            refused = body
            break
        assert status == 202
    assert refused is not None, "a stream at max_bytes refuses"
    assert refused["error"]["code"] == "journal_full"
    assert "target siem's stream" in refused["error"]["message"]
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{daemon.port}/v1/events", json=event(requestData={"pad": big})
        ) as resp,
    ):
        assert resp.status == 503
        assert resp.headers["Retry-After"] == str(daemon.config.storage.full_retry_after_s)
    await wait_for(
        lambda: books_of(daemon, "siem")[0] == books_of(daemon, "siem")[3] > 0,
        what="the books to show the backlog pending",
    )
    siem.statuses = [200] * 10_000  # the target comes back: the stream drains
    await wait_for(lambda: settled(daemon), timeout_s=30, what="the backlog to drain")
    assert (await post(daemon, [event(requestData={"pad": big})]))[0] == 202


async def test_a_send_longer_than_ack_wait_keeps_its_batch_with_in_progress_acks(
    start_router: Any,
) -> None:
    seen: list[str] = []
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        seen.extend(event["id"] for event in orjson.loads(await request.read()))
        await release.wait()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        target = http_target("slow", f"http://127.0.0.1:{port}/", timeout_s=60)
        # The three events in one batch: sent alone, the first held the slow target and the
        # other two waited in the stream for the second router (the wait below timed out).
        config = {"targets": [target], "routes": everything_to("slow"), "delivery": one_batch(3)}
        # ack_wait 3 s, in-progress acks every second: these daemons share the test's event
        # loop, and starting the second one on a loaded machine can hold it for most of a
        # second (with 1 s, a late in-progress ack once let the batch go to the other router).
        first = await start_router(config, ack_wait_s=3, name="r1")
        assert (await post(first, [event() for _ in range(3)]))[0] == 202
        await wait_for(lambda: len(seen) == 3, what="the first router's send to start")
        # An idle router beside it, waiting for work.
        second = await start_router(config, ack_wait_s=3, name="r2")
        # Three times ack_wait: without in-progress acks JetStream would have handed the
        # batch to the second router, which would send it too.
        deadline = asyncio.get_running_loop().time() + 9.5
        await wait_for(lambda: asyncio.get_running_loop().time() > deadline, timeout_s=15)
        release.set()
        await wait_for(lambda: settled(first) and settled(second), what="the batch settled")
        assert len(seen) == 3, f"sent once, by one router: {seen}"
    finally:
        release.set()
        await runner.cleanup()


async def test_a_batch_gathered_longer_than_ack_wait_is_kept_and_sent_once(
    start_router: Any, receiver_factory: ReceiverFactory
) -> None:
    """What a router fetched and still gathers into a batch (max_wait_s) is its own too:
    kept with in-progress acks from the fetch, not only once the batch is out, or JetStream
    hands it to another router meanwhile and both send it."""
    siem = await receiver_factory([200])
    config = {
        "targets": [http_target("siem", siem.url)],
        "routes": everything_to("siem"),
        # A batch waits 6 s for more after its first event, twice ack_wait.
        "delivery": {"batch": {"max_wait_s": 6, "max_events": 1000}},
    }
    routers = [await start_router(config, ack_wait_s=3, name=n) for n in ("r1", "r2")]
    events = [event() for _ in range(5)]
    ids = [e["id"] for e in events]
    assert (await post(routers[0], events))[0] == 202
    await wait_for(
        lambda: all(settled(r) for r in routers) and bool(siem.requests),
        timeout_s=30,
        what="the batch to be delivered",
    )
    for router in routers:  # a batch still gathered goes out as its router stops
        await router.stop()
    sent = [e["id"] for e in siem.delivered_events]
    assert sorted(sent) == sorted(ids), f"each event once, by one router: {sent}"


class GatedReceiver:
    """An HTTP target that holds every request until `release` is set, recording the events
    of each request it answered 200 (delivered once released)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived: list[list[str]] = []
        self.delivered: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> GatedReceiver:
        async def take(request: web.Request) -> web.Response:
            ids = [e["id"] for e in orjson.loads(await request.read())]
            self.arrived.append(ids)
            await self.release.wait()
            self.delivered.extend(ids)
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/", take)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/"
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.mark.timeout(120)
async def test_what_a_stopping_routers_last_pull_request_brings_goes_to_the_next_router_at_once(
    start_router: Any, tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router that stopped while a fetch waited for more events cut the fetch short: the
    events the fetch had taken were dropped with it, and its pull request stayed on the server
    until it expired, JetStream handing it the events that came meanwhile, which reached the
    router's inbox after the fetch was gone. Neither acked nor handed back, they went to no
    router until ack_wait passed (300 s here; 30 s by default, at every stop of a rolling
    restart). The stopping router hands them back (nak): the next router sends them at once,
    each once."""
    # The gathering fetch (max_wait_s) waits 25 s: time enough, on a loaded machine, for the
    # events below to reach it before and after the stop (10 s was not, once, in a CI run
    # beside another session's tests). The test takes about that long.
    monkeypatch.setattr(jetstream_journal, "FETCH_WAIT_S", 25.0)
    siem = await GatedReceiver().start()
    try:
        target = http_target("siem", siem.url) | {"batch": {"max_events": 100, "max_wait_s": 25}}
        config = {"targets": [target], "routes": everything_to("siem")}
        first = await start_router(config, ack_wait_s=300, name="r1", share_config=False)
        stream = start_router.stream
        first_event = event()
        assert (await post(first, [first_event]))[0] == 202
        # Another router that only takes events in (no delivery worker): the producer below.
        producer = await open_journal(
            tmp_path / "producer", nats_server, ["siem"], stream, ack_wait_s=300
        )
        try:
            consumer = (queue_stream(producer.js_config, "siem"), "delivery")

            async def held_by_the_first(count: int) -> bool:
                info = await producer.js.consumer_info(*consumer)
                return (info.num_ack_pending, info.num_pending) == (count, 0)

            # The first router fetched the event and gathers more for its batch: it has one
            # more when it stops.
            await wait_for(lambda: held_by_the_first(1), what="the first router to fetch")
            gathered = event()
            assert (await post(first, [gathered]))[0] == 202
            await wait_for(lambda: held_by_the_first(2), what="the fetch to take one more")
            stopping = asyncio.create_task(first.stop())
            # It stops gathering and sends its batch of one (the target holds it).
            await wait_for(lambda: bool(siem.arrived), what="the batch sent as it stops")
            later = [event() for _ in range(3)]
            await producer.append(
                [(Event.from_body(e, received_at=time.time()), {"siem": "all"}) for e in later]
            )
            # JetStream handed them to the stopping router's last pull request.
            await wait_for(lambda: held_by_the_first(5), what="the events to reach the pull")
            siem.release.set()
            await stopping
            second = await start_router(config, ack_wait_s=300, name="r2", share_config=False)
            ids = sorted(e["id"] for e in [first_event, gathered, *later])
            await wait_for(
                lambda: set(siem.delivered) >= set(ids),
                timeout_s=60,
                what=f"every event delivered (ack_wait 300 s): {siem.arrived}",
            )
            await wait_for(lambda: books_of(second, "siem") == (5, 5, 0, 0), what="the books")
            assert sorted(siem.delivered) == ids, "each event once"
        finally:
            await producer.close()
    finally:
        await siem.stop()


def stopped(pid: int) -> bool:
    """Has SIGSTOP stopped every thread of the process (it acts on each thread on its own)?"""
    tasks = Path(f"/proc/{pid}/task")
    return all(
        (t / "stat").read_text().rsplit(")", 1)[1].split()[0] in "tT" for t in tasks.iterdir()
    )


async def open_journal(
    path: Path, server: NatsServer, target_ids: list[str], stream: str = "", **settings: Any
) -> JetStreamJournal:
    """A JetStreamJournal of its own, on `stream` (a fresh one if not named), open."""
    settings.setdefault("max_bytes", 16 * 1024 * 1024)
    stream = stream or f"T{next(_streams)}"
    storage = {"path": str(path), **jetstream([server.url], stream, **settings)}
    journal = JetStreamJournal(parse_config({"storage": storage}).storage, target_ids)
    await journal.open()
    return journal


async def test_a_consumer_made_with_another_ack_wait_gets_the_configs(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The shared consumer is made once; a router whose storage.jetstream.ack_wait_s differs
    (changed in the config, or a stream made by an older router) brings it to its own, and
    keeps its in-progress acks to what the consumer has."""
    first = await open_journal(tmp_path / "a", nats_server, ["t"], ack_wait_s=30)
    stream = first.js_config.stream
    await first.close()
    second = await open_journal(tmp_path / "b", nats_server, ["t"], stream, ack_wait_s=7)
    try:
        info = await second.js.consumer_info(queue_stream(second.js_config, "t"), "delivery")
        assert info.config.ack_wait == 7
    finally:
        await second.close()


async def three_taken(journal: JetStreamJournal) -> list[Entry]:
    """Three events appended for target `t`, then taken by it as one batch (held, unacked)."""
    await journal.append(
        [(Event.from_body(event(), received_at=time.time()), {"t": "all"}) for _ in range(3)]
    )
    batch = await journal.next_batch(
        "t", max_events=10, max_bytes=1 << 20, max_wait_s=0.2, stopping=asyncio.Event()
    )
    assert len(batch) == 3
    return batch


async def ack_refused_while_paused(
    journal: JetStreamJournal, nats_server: NatsServer, batch: list[Entry]
) -> None:
    """The server paused (SIGSTOP: it hangs, its socket open): the batch's ack gets no
    confirmation and raises. The caller brings the server back (or kills it)."""
    nats_server.pause()
    await wait_for(lambda: stopped(nats_server.pid), what="the server to stop")
    with pytest.raises(JournalUnavailableError):
        await journal.ack("t", batch, dead_lettered=0)


async def test_an_ack_tried_again_after_an_unconfirmed_one_settles_the_batch(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The delivery worker tries a batch's ack again after it raised (no confirmation: the
    server hung). The first try's plain acks went out; the second must send them again, not
    refuse because they were sent (nats-py's Msg.ack refuses a message it acked before):
    refused, the batch was never settled and stayed held, for ever, after a node died."""
    journal = await open_journal(tmp_path / "var", nats_server, ["t"], publish_timeout_s=1)
    try:
        batch = await three_taken(journal)
        try:
            await ack_refused_while_paused(journal, nats_server, batch)
        finally:
            nats_server.resume()
        await journal.ack("t", batch, dead_lettered=0)

        async def settled_in_stream() -> bool:
            return bool(
                (await stream_state(nats_server, queue_stream(journal.js_config, "t"))).messages
                == 0
            )

        await wait_for(settled_in_stream, what="the batch to leave the stream")
    finally:
        await journal.close()


async def test_a_batch_whose_acks_were_lost_is_acked_again_as_the_router_stops(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """A settled batch whose acks got no answer and were lost (the server hung, then died
    with them unread, and came back): the router still holds it when it stops. Handed back
    with a nak, it went at once to another router, which sent the target what it has; the
    stopping router acks it again instead, and the batch leaves the stream."""
    journal = await open_journal(
        tmp_path / "var", nats_server, ["t"], publish_timeout_s=1, ack_wait_s=300
    )
    stream = queue_stream(journal.js_config, "t")
    try:
        batch = await three_taken(journal)
        try:
            await ack_refused_while_paused(journal, nats_server, batch)
        finally:
            await nats_server.akill()  # a stopped process dies too, its socket unread
        await nats_server.astart()

        async def delivered_unacked() -> bool:
            with contextlib.suppress(*STREAM_ERRORS):
                info = await journal.reads.consumer_info(stream, "delivery")
                return (info.num_ack_pending, info.num_pending) == (3, 0)
            return False

        await wait_for(delivered_unacked, what="the router back, the acks lost")
    finally:
        await journal.close()

    async def left_the_stream() -> bool:
        return bool((await stream_state(nats_server, stream)).messages == 0)

    await wait_for(left_the_stream, what="the batch acked, not handed back")


async def test_dead_letters_go_to_their_stream_and_dlq_lists_shows_and_redrives_them(
    start_router: Any, receiver_factory: ReceiverFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    siem = await receiver_factory([400, 200])
    # Both events in the batch the target refuses: in two, the second was delivered.
    daemon = await start_router(
        {
            "targets": [http_target("siem", siem.url)],
            "routes": everything_to("siem"),
            "delivery": one_batch(2),
        }
    )
    events = [event() for _ in range(2)]
    await post(daemon, events)
    await wait_for(lambda: books_of(daemon, "siem") == (2, 0, 2, 0), what="two dead letters")
    config = daemon.config.storage.jetstream
    state = await stream_state(nats_server, letters_stream(config, "siem"))
    assert state.messages == 2
    # `event-router dlq` reads the letters from their stream, from any machine with the config.
    config_file = tmp_path / "router.yaml"
    config_file.write_text(yaml.safe_dump(daemon.source.data))
    code, out, err = await run_cli("dlq", "list", "--config", str(config_file))
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [["siem", "2"]]
    assert "permanent_status=2" in out
    code, out, err = await run_cli(
        "dlq", "show", "--config", str(config_file), "--target", "siem", "--format", "ndjson"
    )
    assert code == 0, err
    shown = [orjson.loads(line) for line in out.splitlines()]
    assert [letter["event"]["id"] for letter in shown] == [e["id"] for e in events]
    assert {letter["reason"] for letter in shown} == {"permanent_status"}
    code, _, err = await run_cli(
        "dlq",
        "redrive",
        "--config",
        str(config_file),
        "--target",
        "siem",
        "--url",
        f"http://127.0.0.1:{daemon.port}",
    )
    assert code == 0, err
    assert "redrove 2 dead letters" in err
    await wait_for(lambda: books_of(daemon, "siem") == (4, 2, 2, 0), what="the redrive delivered")
    assert {e["id"] for e in siem.delivered_events} == {e["id"] for e in events}
    assert (await stream_state(nats_server, letters_stream(config, "siem"))).messages == 0
    assert_books_balance(daemon)
    code, out, _ = await run_cli("dlq", "list", "--config", str(config_file))
    assert (code, out.split()[:3]) == (0, ["no", "dead", "letters"])


async def test_the_http_dead_letter_reads_come_from_the_streams_whichever_router_wrote_them(
    start_router: Any, receiver_factory: ReceiverFactory
) -> None:
    """GET /v1/deadletters and /v1/deadletters/{target} (what the console shows) read the
    dead-letter streams on JetStream, as `event-router dlq` does: they read the local
    dead-letter files, which this backend never writes, so every router answered "no dead
    letters" with letters in the streams."""
    siem = await receiver_factory([400])
    config = {"targets": [http_target("siem", siem.url)], "routes": everything_to("siem")}
    first = await start_router(config, name="r1", share_config=False)
    second = await start_router(config, name="r2", share_config=False)
    events = [event() for _ in range(3)]
    await post(first, events)
    await wait_for(lambda: books_of(first, "siem") == (3, 0, 3, 0), what="three dead letters")
    for daemon in (first, second):  # the second router wrote none of them
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{daemon.port}/v1/deadletters"
            async with session.get(base) as resp:
                assert resp.status == 200
                listed = (await resp.json())["targets"]
            async with session.get(f"{base}/siem", params={"limit": "2"}) as resp:
                assert resp.status == 200
                shown = await resp.json()
            async with session.get(f"{base}/siem", params={"offset": "2"}) as resp:
                rest = await resp.json()
            async with session.get(f"{base}/siem", params={"reason": "expired"}) as resp:
                none = await resp.json()
        assert list(listed) == ["siem"], listed
        assert listed["siem"]["letters"] == 3
        assert listed["siem"]["reasons"] == {"permanent_status": 3}
        assert (shown["total"], shown["next_offset"], len(shown["letters"])) == (3, 2, 2)
        # (one batch's letters are published together: the stream holds them in any order)
        pages = [letter["event"]["id"] for letter in shown["letters"] + rest["letters"]]
        assert sorted(pages) == sorted(e["id"] for e in events)
        assert none["total"] == 0 and none["letters"] == []
    # A target id past NATS's subject line limit is no stream: read as none, and the router's
    # connection stays (a request naming it had the server close the connection).
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{first.port}/v1/deadletters/{'x' * 5000}") as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["total"] == 0
    assert (await post(first, [event()]))[0] == 202
    assert_books_balance(first)


async def get_json(daemon: Daemon, path: str, **params: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(f"http://127.0.0.1:{daemon.port}{path}", params=params) as resp,
    ):
        return resp.status, await resp.json()


def nats_requests(server: NatsServer) -> int:
    """Messages the server received from its clients so far (every JetStream API request)."""
    return int(server.monitor("/varz")["in_msgs"])


async def test_dead_letter_pages_are_read_a_page_at_a_time_and_the_summary_counts_from_the_stream(
    start_router: Any, receiver_factory: ReceiverFactory, nats_server: NatsServer
) -> None:
    """GET /v1/deadletters/{target} on JetStream reads the page, not the whole stream (it read
    every letter, one request each, for every page), and GET /v1/deadletters counts from the
    stream's state and reads each letter once (it read every letter of every stream per
    request); the answers are the file layout's: the same pages, totals and reasons."""
    siem = await receiver_factory([400])
    daemon = await start_router(
        {"targets": [http_target("siem", siem.url)], "routes": everything_to("siem")}
    )
    count = 250  # more than MAX_PAGE (200)
    assert (await post(daemon, [event() for _ in range(count)]))[0] == 202
    await wait_for(
        lambda: books_of(daemon, "siem") == (count, 0, count, 0), what="the dead letters"
    )
    stream = letters_stream(daemon.config.storage.jetstream, "siem")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        stored = [letter["event"]["id"] for _, letter in await read_stream_letters(js, stream)]
        assert len(stored) == count

        before = nats_requests(nats_server)
        status, page = await get_json(daemon, "/v1/deadletters/siem", offset="200", limit="50")
        asked = nats_requests(nats_server) - before
        assert status == 200
        assert [letter["event"]["id"] for letter in page["letters"]] == stored[200:250]
        assert (page["offset"], page["total"], page["next_offset"]) == (200, count, None)
        # 50 letters and the streams' list, not 250 letters (plus the books read meanwhile).
        assert asked < 120, f"{asked} requests to NATS for a page of 50"

        status, summary = await get_json(daemon, "/v1/deadletters")
        assert status == 200
        assert summary["targets"]["siem"]["letters"] == count
        assert summary["targets"]["siem"]["reasons"] == {"permanent_status": count}
        before = nats_requests(nats_server)
        status, again = await get_json(daemon, "/v1/deadletters")
        asked = nats_requests(nats_server) - before
        assert (status, again) == (200, summary)
        assert asked < 40, f"{asked} requests to NATS for a summary whose letters were read"

        # Letters taken out in between (as a redrive deletes them): pages skip the gap.
        for seq in range(11, 21):
            await js.delete_msg(stream, seq)
        left = stored[:10] + stored[20:]
        pages: list[str] = []
        offset: int | None = 0
        while offset is not None:
            status, page = await get_json(
                daemon, "/v1/deadletters/siem", offset=str(offset), limit="200"
            )
            assert status == 200 and page["total"] == len(left)
            pages += [letter["event"]["id"] for letter in page["letters"]]
            offset = page["next_offset"]
        assert pages == left
        before = nats_requests(nats_server)
        status, page = await get_json(
            daemon, "/v1/deadletters/siem", reason="permanent_status", offset="230", limit="200"
        )
        asked = nats_requests(nats_server) - before
        assert [letter["event"]["id"] for letter in page["letters"]] == left[230:]
        assert (page["total"], page["next_offset"]) == (len(left), None)
        # A filtered page counts every letter, read in batches, not one request per letter
        # (240 requests; a 100,000-letter stream took minutes); the reader leaves no consumer.
        assert asked < 40, f"{asked} requests to NATS for a filtered page of 240 letters"
        assert (await js.stream_info(stream)).state.consumer_count == 0
        status, page = await get_json(daemon, "/v1/deadletters/siem", reason="expired")
        assert (page["total"], page["letters"]) == (0, [])
        status, summary = await get_json(daemon, "/v1/deadletters")
        assert summary["targets"]["siem"]["letters"] == len(left)
        assert summary["targets"]["siem"]["reasons"] == {"permanent_status": len(left)}
    finally:
        await nc.close()


async def test_the_dead_letter_reads_answer_503_at_once_while_nats_does_not_answer(
    start_router: Any, receiver_factory: ReceiverFactory, nats_server: NatsServer
) -> None:
    """Hung (SIGSTOP) or stopped, NATS gives GET /v1/deadletters[/{target}] a 503
    journal_unavailable within the read's wait, never a 500 or a request left hanging."""
    siem = await receiver_factory([400])
    daemon = await start_router(
        {"targets": [http_target("siem", siem.url)], "routes": everything_to("siem")}
    )
    await post(daemon, [event() for _ in range(2)])
    await wait_for(lambda: books_of(daemon, "siem") == (2, 0, 2, 0), what="two dead letters")
    paths = ("/v1/deadletters", "/v1/deadletters/siem")
    nats_server.pause()
    try:
        for path in paths:
            status, answer = await get_json(daemon, path)
            assert (status, answer["error"]["code"]) == (503, "journal_unavailable"), answer
    finally:
        nats_server.resume()
    await nats_server.astop()
    try:
        for path in paths:
            status, answer = await get_json(daemon, path)
            assert (status, answer["error"]["code"]) == (503, "journal_unavailable"), answer
    finally:
        await nats_server.astart()

    async def answered() -> bool:
        return (await get_json(daemon, "/v1/deadletters/siem"))[0] == 200

    await wait_for(answered, timeout_s=30, what="the reads to come back with NATS")


async def test_two_routers_on_one_stream_deliver_each_event_once_and_agree_on_the_books(
    start_router: Any, tmp_path: Path
) -> None:
    a, b = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    config = {
        "targets": [file_target("a", a), file_target("b", b)],
        "routes": everything_to("a", "b"),
    }
    first = await start_router(config, name="r1", share_config=False)
    # The second router's file targets write beside the first's (each router its own config,
    # as on machines of their own): both archives together must hold every event once.
    a2, b2 = tmp_path / "a2.ndjson", tmp_path / "b2.ndjson"
    second = await start_router(
        {"targets": [file_target("a", a2), file_target("b", b2)], "routes": config["routes"]},
        name="r2",
        share_config=False,
    )
    ids: list[str] = []
    for i in range(20):
        events = [event() for _ in range(10)]
        ids += [e["id"] for e in events]
        assert (await post(first if i % 2 else second, events))[0] == 202

    def done() -> bool:
        return all(books_of(d, t) == (200, 200, 0, 0) for d in (first, second) for t in ("a", "b"))

    await wait_for(done, timeout_s=30, what="both routers' books to show every event delivered")
    for archive, other in ((a, a2), (b, b2)):
        got = [e["id"] for e in read_ndjson(archive) + read_ndjson(other)]
        assert sorted(got) == sorted(ids), "each event once per target"
    for daemon in (first, second):
        assert_books_balance(daemon)


async def test_a_tail_on_one_router_sees_the_events_every_router_accepted(
    start_router: Any, tmp_path: Path
) -> None:
    config = {"targets": [file_target("a", tmp_path / "a.ndjson")], "routes": everything_to("a")}
    first = await start_router(config, name="r1")
    second = await start_router(config, name="r2")
    async with aiohttp.ClientSession() as session:
        resp = await session.get(
            f"http://127.0.0.1:{second.port}/v1/tail", params={"query": "outcome:success"}
        )
        messages = aiter(sse_messages(resp.content))
        assert (await asyncio.wait_for(anext(messages), 10)).event == "ready"
        # One accepted by the router being tailed, two by the other one.
        await post(second, [event(id="local")])
        await post(first, [event(id="remote-1"), event(id="remote-2")])
        seen = [await asyncio.wait_for(anext(messages), 10) for _ in range(3)]
        assert [orjson.loads(m.data)["id"] for m in seen] == ["local", "remote-1", "remote-2"]
        resp.close()


ADMIN = "an-admin-token-for-the-routers-01"
INGEST = "an-ingest-token-for-the-routers-1"


def auth() -> dict[str, Any]:
    return {
        "admin_tokens": [{"name": "ops", "sha256": hashlib.sha256(ADMIN.encode()).hexdigest()}],
        "ingest_tokens": [{"name": "sm", "sha256": hashlib.sha256(INGEST.encode()).hexdigest()}],
        # The API makes targets on loopback receivers, which the operator must allow.
        "api_target_networks": ["127.0.0.0/8"],
    }


async def api_call(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"http://127.0.0.1:{daemon.port}{path}",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def add_target_and_route(daemon: Daemon, url: str) -> tuple[dict[str, Any], Any]:
    """Through `daemon`'s management API: an http target `other` at `url` and a route of
    every location to it."""
    status, target = await api_call(
        daemon,
        "POST",
        "/api/v2/targets",
        {"name": "other", "target_type": "http", "http_endpoint": {"url": url}},
    )
    assert status == 201, target
    status, route = await api_call(
        daemon,
        "POST",
        "/api/v2/routes",
        {"name": "to-other", "rules": [{"locations": ["*"], "target_ids": [target["id"]]}]},
    )
    assert status == 201, route
    return target, route


async def test_an_api_change_on_one_router_reaches_the_others_and_a_router_started_later(
    start_router: Any, receiver_factory: ReceiverFactory
) -> None:
    siem, other = await receiver_factory([200]), await receiver_factory([200])
    bootstrap = {
        "auth": auth(),
        "targets": [http_target("siem", siem.url)],
        "routes": everything_to("siem"),
    }
    first = await start_router(bootstrap, name="r1")
    second = await start_router(bootstrap, name="r2")
    target, _ = await add_target_and_route(first, other.url)
    await wait_for(
        lambda: target["id"] in second.targets and len(second.config.routes) == 2,
        what="the second router to apply the shared config",
    )
    # An event the second router accepts now goes to the new target too (sent once, by
    # either router: the target's consumer is shared).
    token = {"Authorization": f"Bearer {INGEST}"}
    assert (await post(second, [event(id="after")], headers=token))[0] == 202
    await wait_for(lambda: "after" in [e["id"] for e in other.delivered_events], what="delivery")
    await wait_for(lambda: settled(first) and settled(second), what="nothing pending")
    assert [e["id"] for e in other.delivered_events].count("after") == 1
    # A router started later from the same bootstrap YAML runs the shared config.
    third = await start_router(bootstrap, name="r3")
    assert target["id"] in third.targets
    assert [r.name for r in third.config.routes] == ["all", "to-other"]


@pytest.mark.timeout(120)
async def test_the_batch_a_reload_cut_short_goes_to_the_changed_targets_next_worker(
    start_router: Any, receiver_factory: ReceiverFactory
) -> None:
    """A reload that changes a target (here through the management API: a new URL) stops
    its worker at once, in the middle of the batch the old endpoint refuses; the target's
    next worker sends that batch again, as the SQLite journal's cursor has it. The JetStream
    journal kept the batch held (with in-progress acks) and gave the next worker only what
    it fetched since: the batch went to no endpoint until the router stopped."""
    refusing = await receiver_factory([503])
    siem = await receiver_factory([200])
    config = {
        "auth": auth(),
        "targets": [patient(http_target("siem", refusing.url))],
        "routes": everything_to("siem"),
    }
    router = await start_router(config, ack_wait_s=300)
    token = {"Authorization": f"Bearer {INGEST}"}
    events = [event() for _ in range(3)]
    assert (await post(router, events, headers=token))[0] == 202
    await wait_for(lambda: len(refusing.requests) >= 2, what="the old endpoint to refuse")
    status, answer = await api_call(
        router, "PUT", "/api/v2/targets/siem", {"http_endpoint": {"url": siem.url}}
    )
    assert status == 200, answer
    later = [event() for _ in range(2)]
    assert (await post(router, later, headers=token))[0] == 202
    ids = {e["id"] for e in events + later}

    def delivered() -> list[str]:
        return [e["id"] for e in siem.delivered_events]

    await wait_for(
        lambda: set(delivered()) >= ids,
        timeout_s=60,
        what=f"every event at the new endpoint (ack_wait 300 s): {ids - set(delivered())}",
    )
    # The events and the router's own (its target.update) each once, nothing pending.
    await wait_for(lambda: books_of(router, "siem") == (6, 6, 0, 0), what="the books")
    assert len(delivered()) == len(set(delivered())) == 6, delivered()


async def test_every_router_answers_the_same_timestamps_and_route_versions(
    start_router: Any, receiver_factory: ReceiverFactory
) -> None:
    """The management API's metadata (created_at, updated_at, route versions, settings) is
    shared with the config: the SDK sees one service whichever router answers."""
    siem = await receiver_factory([200])
    bootstrap = {
        "auth": auth(),
        "targets": [http_target("siem", siem.url)],
        "routes": everything_to("siem"),
    }
    first = await start_router(bootstrap, name="r1")
    second = await start_router(bootstrap, name="r2")
    # The YAML's target gets its creation time when a router first shows it.
    status, listed = await api_call(first, "GET", "/api/v2/targets")
    assert status == 200, listed
    target, route = await add_target_and_route(first, siem.url)
    changed = {**route, "name": "to-other-renamed"}
    status, route = await api_call(first, "PUT", f"/api/v2/routes/{route['id']}", changed)
    assert status == 200, route
    assert route["version"] == 1
    paths = ["/api/v2/targets", f"/api/v2/targets/{target['id']}", f"/api/v2/routes/{route['id']}"]
    expected = [(await api_call(first, "GET", path))[1] for path in paths]

    async def answers(daemon: Daemon) -> list[Any]:
        return [(await api_call(daemon, "GET", path))[1] for path in paths]

    async def agree(daemon: Daemon) -> bool:
        return await answers(daemon) == expected

    await wait_for(lambda: agree(second), what="the second router's answers to match")
    third = await start_router(bootstrap, name="r3")  # joins later: takes what is shared
    assert await answers(third) == expected


async def test_with_nats_down_ingest_answers_503_and_readyz_too_until_it_is_back(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "a.ndjson"
    with NatsServer(tmp_path / "own-nats") as server:
        data = {
            "server": {"host": "127.0.0.1", "port": 0},
            "storage": {
                "path": str(tmp_path / "var"),
                **jetstream([server.url], "DOWN", publish_timeout_s=1, max_bytes=1 << 24),
            },
            "delivery": FAST_DELIVERY,
            "evidence": {"enabled": False},
            "targets": [file_target("archive", archive)],
            "routes": everything_to("archive"),
        }
        daemon = Daemon(parse_config(data), ConfigSource(None, data))
        await daemon.start()
        try:
            assert (await post(daemon, [event(id="before")]))[0] == 202
            await server.astop()
            status, body = await post(daemon, [event(id="during")])
            assert (status, body["error"]["code"]) == (503, "journal_unavailable")
            await wait_for(
                lambda: not_ready(daemon.port),
                what="/readyz to turn 503",
            )
            await server.astart()
            await wait_for(lambda: ready(daemon.port), timeout_s=20, what="/readyz back to 200")
            assert (await post(daemon, [event(id="during")]))[0] == 202  # the producer's retry
            await wait_for(
                lambda: [e["id"] for e in read_ndjson(archive)] == ["before", "during"],
                timeout_s=20,
                what="both delivered once",
            )
        finally:
            await daemon.stop()


async def not_ready(port: int) -> bool:
    return not await ready(port)


async def test_an_alert_fires_through_a_jetstream_journal(
    start_router: Any, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    # The alerts' windows live in <storage.path>/alerts.db whatever the backend; their
    # events go to their targets through the stream like any event.
    webhook = await receiver_factory()
    daemon = await start_router(
        {
            "targets": [
                file_target("archive", tmp_path / "a.ndjson"),
                http_target("alerts-webhook", webhook.url),
            ],
            "routes": everything_to("archive"),
            "alerts": [
                {
                    "name": "creates",
                    "query": "action:secrets-manager.secret.create",
                    "threshold": {"count": 2, "window_s": 60},
                    "target_ids": ["alerts-webhook"],
                }
            ],
        }
    )
    status, _ = await post(daemon, [event(), event()])
    assert status == 202
    await wait_for(lambda: len(webhook.delivered_events) == 1, what="the alert's trigger")
    (trigger,) = webhook.delivered_events
    assert trigger["requestData"]["alert"] == "creates" and trigger["requestData"]["count"] == 2
    assert (tmp_path / "r1" / "alerts.db").exists()
    await wait_for(lambda: books_of(daemon, "alerts-webhook") == (1, 1, 0, 0), what="the books")
    assert_books_balance(daemon)


async def test_worker_processes_hand_to_a_jetstream_journal_and_every_event_arrives_once(
    start_router: Any, tmp_path: Path
) -> None:
    """server.workers: 2 over JetStream: the workers (real processes) hand their records to
    the owner, which publishes them to the stream; a producer's retry, through whichever
    worker takes its new connection, is stored once."""
    archive = tmp_path / "a.ndjson"
    daemon = await start_router(
        {
            "server": {"host": "127.0.0.1", "port": 0, "workers": 2},
            "targets": [file_target("archive", archive)],
            "routes": everything_to("archive"),
        }
    )
    batches = [[event() for _ in range(5)] for _ in range(40)]
    # One connection each (post opens its own): the kernel spreads them over the workers.
    answers = await asyncio.gather(*(post(daemon, batch) for batch in batches))
    assert [status for status, _ in answers] == [202] * len(batches)
    assert (await post(daemon, batches[0]))[0] == 202  # a retry: the same ids again
    total = sum(len(batch) for batch in batches)
    await wait_for(lambda: books_of(daemon, "archive") == (total, total, 0, 0), what="the books")
    ids = [e["id"] for e in read_ndjson(archive)]
    assert sorted(ids) == sorted(e["id"] for batch in batches for e in batch)
    assert_books_balance(daemon)
    async with (  # through a worker: the owner asks every worker for its counters first
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}/v1/status") as resp,
    ):
        status = await resp.json()
    assert status["workers"]["running"] == 2
    assert status["ingest"]["accepted"] == total + len(batches[0])


@pytest.mark.timeout(120)
async def test_a_batch_held_by_a_router_whose_reload_removes_the_target_goes_to_another_at_once(
    start_router: Any, receiver_factory: ReceiverFactory
) -> None:
    """A reload that removes a target from one router (the stream stays, shared: other routers
    keep the target) hands back what that router held of it, as a stopping router does:
    here a batch its endpoint kept refusing. Another router that keeps the target sends it
    at once, each event once, not after ack_wait (300 s here)."""
    refusing = await receiver_factory([503])
    siem = await receiver_factory([200])
    other = await receiver_factory([200])
    config = {
        "targets": [patient(http_target("siem", refusing.url))],
        "routes": everything_to("siem"),
    }
    first = await start_router(config, ack_wait_s=300, name="r1", share_config=False)
    events = [event() for _ in range(3)]
    assert (await post(first, events))[0] == 202
    await wait_for(lambda: len(refusing.requests) >= 2, what="the first router to hold the batch")
    second = await start_router(
        {"targets": [http_target("siem", siem.url)], "routes": everything_to("siem")},
        ack_wait_s=300,
        name="r2",
        share_config=False,
    )
    assert first.source is not None
    without = {
        **first.source.data,
        "targets": [http_target("other", other.url)],
        "routes": everything_to("other"),
    }
    await first.reload(parse_config(without))
    ids = sorted(e["id"] for e in events)

    def delivered() -> list[str]:
        return sorted(e["id"] for e in siem.delivered_events)

    await wait_for(
        lambda: set(delivered()) >= set(ids),
        timeout_s=60,
        what=f"the held batch at the second router's endpoint (ack_wait 300 s): {delivered()}",
    )
    await wait_for(lambda: books_of(second, "siem") == (3, 3, 0, 0), what="the books")
    assert delivered() == ids, "each event once"
    assert "siem" not in first.status()["targets"]


async def test_a_message_with_an_impossible_arrival_time_is_dead_lettered_not_delivered(
    start_router: Any, tmp_path: Path, nats_server: NatsServer
) -> None:
    """The arrival time comes from a header of the stored message: one that is not a finite
    time a date can hold ("nan", "1e300", as a damaged or foreign message may have) is not an
    arrival time, so the message is quarantined (journal_corrupt) as one without it is; an
    event after it is delivered as ever."""
    archive = tmp_path / "a.ndjson"
    daemon = await start_router(
        {"targets": [file_target("archive", archive)], "routes": everything_to("archive")}
    )
    config = daemon.config.storage.jetstream
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        for n, arrival in enumerate(("nan", "1e300", "-inf")):
            body = orjson.dumps(event(id=f"odd-{n}"))
            headers = {"Nats-Msg-Id": f"odd-{n}", "Router-Received-At": arrival}
            headers["Router-Route"] = "all"
            await js.publish(queue_subject(config, "archive"), body, headers=headers)
    finally:
        await nc.close()
    after = event()
    assert (await post(daemon, [after]))[0] == 202
    await wait_for(lambda: books_of(daemon, "archive") == (4, 1, 3, 0), what="the books")
    assert [e["id"] for e in read_ndjson(archive)] == [after["id"]]
    status, page = await get_json(daemon, "/v1/deadletters/archive")
    assert status == 200, page
    assert [letter["reason"] for letter in page["letters"]] == ["journal_corrupt"] * 3
