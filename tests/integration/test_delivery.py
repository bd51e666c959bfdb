"""Delivery against real loopback receivers: retries, dead letters, isolation, rotation, drain."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.config import parse_config
from router.daemon import Daemon
from router.events import Event
from router.server.api import ConfigSource
from router.targets.file import FileTarget
from tests.conftest import StartDaemon
from tests.fakes import RedirectingReceiver, ScriptedReceiver, make_event, read_ndjson, wait_for
from tests.helpers import (
    ReceiverFactory,
    assert_books_balance,
    everything_to,
    file_target,
    http_target,
    journal_write_locked,
    post,
    settled,
)


async def test_503_503_200_delivers_once_after_two_retries(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    siem = await receiver_factory([503, 503, 200])
    daemon = await start_daemon(
        {"targets": [http_target("siem", siem.url)], "routes": everything_to("siem")}
    )
    status, body = await post(daemon, [make_event(), make_event()])
    assert status == 202
    await wait_for(lambda: settled(daemon), what="delivery")
    assert [r.status for r in siem.requests] == [503, 503, 200]
    assert [e["id"] for e in siem.delivered_events] == [r["id"] for r in body["results"]]
    keys = {r.headers["Idempotency-Key"] for r in siem.requests}
    assert len(keys) == 1, "every retry of a batch carries the same Idempotency-Key"
    row = daemon.status()["targets"]["siem"]
    assert (row["delivered"], row["dead_lettered"], row["retries"]) == (2, 0, 2)
    assert row["write_status"]["status"] == "success"
    assert "503" in row["write_status"]["reason_for_last_failure"]
    assert_books_balance(daemon)


async def test_400_is_permanent_and_dead_lettered_with_the_reason(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    siem = await receiver_factory([400])
    daemon = await start_daemon(
        {"targets": [http_target("siem", siem.url)], "routes": everything_to("siem")}
    )
    await post(daemon, make_event(id="e-400"))
    await wait_for(lambda: settled(daemon))
    assert len(siem.requests) == 1, "a permanent failure is not retried"
    letters = read_ndjson(tmp_path / "var" / "deadletter" / "siem.ndjson")
    assert len(letters) == 1
    letter = letters[0]
    assert letter["event"]["id"] == "e-400"
    assert (letter["target_id"], letter["route"], letter["reason"]) == (
        "siem",
        "all",
        "permanent_status",
    )
    assert letter["status"] == 400 and letter["response_excerpt"] == "status 400"
    assert letter["attempts"] == 1
    assert letter["first_attempt_at"] and letter["last_attempt_at"]
    row = daemon.status()["targets"]["siem"]
    assert (row["delivered"], row["dead_lettered"]) == (0, 1)
    assert row["write_status"]["status"] == "failed"
    assert row["write_status"]["last_failure"].endswith("Z")
    assert_books_balance(daemon)


async def test_retries_exhausted_go_to_dead_letters(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    siem = await receiver_factory([500])
    daemon = await start_daemon(
        {
            "targets": [http_target("siem", siem.url) | {"retry": {"max_attempts": 3}}],
            "routes": everything_to("siem"),
        }
    )
    await post(daemon, make_event())
    await wait_for(lambda: settled(daemon))
    assert len(siem.requests) == 3
    [letter] = read_ndjson(tmp_path / "var" / "deadletter" / "siem.ndjson")
    assert (letter["reason"], letter["status"], letter["attempts"]) == ("retries_exhausted", 500, 3)
    assert_books_balance(daemon)


async def test_a_hang_past_the_timeout_is_retried(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    siem = await receiver_factory([0, 200], hang_s=2.0)
    daemon = await start_daemon(
        {"targets": [http_target("siem", siem.url, timeout_s=0.2)], "routes": everything_to("siem")}
    )
    await post(daemon, make_event(id="slow"))
    await wait_for(lambda: settled(daemon))
    assert len(siem.requests) == 2
    assert daemon.status()["targets"]["siem"]["delivered"] == 1
    assert (
        "timed out" in daemon.status()["targets"]["siem"]["write_status"]["reason_for_last_failure"]
    )


async def test_429_retry_after_is_honoured(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    siem = await receiver_factory([429, 200], headers={429: {"Retry-After": "1"}})
    daemon = await start_daemon(
        {
            # Retry-After is honoured within max_backoff_s (see the cap below).
            "targets": [http_target("siem", siem.url) | {"retry": {"max_backoff_s": 5}}],
            "routes": everything_to("siem"),
        }
    )
    await post(daemon, make_event())
    await wait_for(lambda: settled(daemon))
    first, second = siem.requests
    # A lower bound, not a timing budget: the router must not come back before Retry-After.
    assert second.at - first.at >= 0.9


async def test_connection_refused_is_retried_until_the_endpoint_comes_up(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, unused_tcp_port: int
) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}/ingest"
    daemon = await start_daemon(
        {
            "targets": [http_target("siem", url) | {"retry": {"max_attempts": 1000}}],
            "routes": everything_to("siem"),
        }
    )
    await post(daemon, make_event(id="late"))
    await wait_for(lambda: daemon.status()["targets"]["siem"]["retries"] >= 2)
    assert daemon.status()["targets"]["siem"]["write_status"]["status"] == "failed"
    receiver = ScriptedReceiver()
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/{tail:.*}", receiver._handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        await wait_for(lambda: settled(daemon))
        assert [e["id"] for e in receiver.delivered_events] == ["late"]
        assert daemon.status()["targets"]["siem"]["write_status"]["status"] == "success"
    finally:
        await runner.cleanup()


async def test_a_failing_target_does_not_hold_up_ingest_or_other_targets(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    down = await receiver_factory([503])
    archive = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {
            "targets": [
                http_target("down", down.url) | {"retry": {"max_attempts": 10_000}},
                file_target("archive", archive),
            ],
            "routes": everything_to("down", "archive"),
            "shutdown": {"drain_timeout_s": 0.2},
        }
    )
    for _ in range(5):
        status, _ = await post(daemon, [make_event() for _ in range(20)])
        assert status == 202
    await wait_for(lambda: len(read_ndjson(archive)) == 100, what="the archive to get every event")
    row = daemon.status()["targets"]["down"]
    assert row["delivered"] == 0 and row["pending"] == 100
    assert row["oldest_pending_age_s"] >= 0
    assert_books_balance(daemon)


async def test_each_target_gets_each_event_once_even_when_another_fails(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    flaky = await receiver_factory([503, 503, 503, 200])
    steady = await receiver_factory([200])
    daemon = await start_daemon(
        {
            "targets": [http_target("flaky", flaky.url), http_target("steady", steady.url)],
            "routes": everything_to("flaky", "steady"),
        }
    )
    await post(daemon, [make_event() for _ in range(10)])
    await wait_for(lambda: settled(daemon))
    assert len(steady.delivered_events) == 10
    assert len({e["id"] for e in steady.delivered_events}) == 10
    assert len(flaky.delivered_events) == 10


async def test_batches_respect_max_events(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    siem = await receiver_factory([200])
    daemon = await start_daemon(
        {
            "targets": [
                http_target("siem", siem.url) | {"batch": {"max_events": 7, "max_wait_s": 0.2}}
            ],
            "routes": everything_to("siem"),
        }
    )
    await post(daemon, [make_event() for _ in range(30)])
    await wait_for(lambda: settled(daemon))
    sizes = [len(r.body) for r in siem.requests]
    assert sum(sizes) == 30 and max(sizes) <= 7


async def test_custom_headers_are_sent(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIEM_TOKEN", "s3cret-token")
    siem = await receiver_factory([200])
    daemon = await start_daemon(
        {
            "targets": [
                http_target("siem", siem.url, headers={"Authorization": "Bearer ${env:SIEM_TOKEN}"})
            ],
            "routes": everything_to("siem"),
        }
    )
    await post(daemon, make_event())
    await wait_for(lambda: settled(daemon))
    headers = siem.requests[0].headers
    assert headers["Authorization"] == "Bearer s3cret-token"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("event-router/")


async def test_file_target_rotates_by_size_with_private_modes(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    directory = tmp_path / "archive" / "deep"
    path = directory / "events.ndjson"
    target = file_target("archive", path)
    target["file_endpoint"] |= {"max_bytes": 4096, "max_files": 3}
    daemon = await start_daemon(
        {"targets": [target | {"batch": {"max_events": 2}}], "routes": everything_to("archive")}
    )
    for _ in range(10):
        await post(daemon, [make_event() for _ in range(2)])
    await wait_for(lambda: settled(daemon))
    files = [path, *(path.with_name(f"{path.name}.{n}") for n in (1, 2, 3))]
    present = [f for f in files if f.exists()]
    assert len(present) == 4, "three rotated files and the live one"
    assert not path.with_name(f"{path.name}.4").exists()
    for f in present:
        assert f.stat().st_size <= 4096
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "archive").stat().st_mode) == 0o700
    lines = [e for f in present for e in read_ndjson(f)]
    assert len(lines) <= 20 and len(lines) == len({e["id"] for e in lines})


async def test_a_failed_ack_is_retried_without_sending_the_batch_again(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    siem = await receiver_factory([0, 200], hang_s=1.0)
    daemon = await start_daemon(
        {"targets": [http_target("siem", siem.url)], "routes": everything_to("siem")}
    )
    _, body = await post(daemon, [make_event() for _ in range(3)])
    ids = [r["id"] for r in body["results"]]
    await wait_for(lambda: len(siem.requests) >= 1, what="the batch to be in flight")
    # The receiver answers 200 while the journal cannot be written for longer than SQLite's
    # busy timeout (5 s): the ack fails at least once.
    with journal_write_locked(tmp_path / "var"):
        await wait_for(
            lambda: not daemon.journal.healthy or len(siem.requests) > 1,
            timeout_s=30,
            what="the ack to fail",
        )
    await wait_for(lambda: settled(daemon), timeout_s=30)
    assert [e["id"] for e in siem.delivered_events] == ids, "the batch was sent exactly once"
    assert len(siem.requests) == 1
    row = daemon.status()["targets"]["siem"]
    assert (row["received"], row["delivered"], row["dead_lettered"]) == (3, 3, 0)
    assert daemon.journal.healthy, "the successful ack cleared the journal's unhealthy flag"
    assert_books_balance(daemon)


@pytest.mark.parametrize("status", [302, 307])
async def test_a_redirect_is_not_followed_and_dead_letters_with_its_location(
    start_daemon: StartDaemon, tmp_path: Path, status: int
) -> None:
    gateway = await RedirectingReceiver(status=status, location_userinfo="sso:hunter2@").start()
    try:
        daemon = await start_daemon(
            {"targets": [http_target("siem", gateway.url)], "routes": everything_to("siem")}
        )
        await post(daemon, [make_event(id=f"r{i}") for i in range(5)])
        await wait_for(lambda: settled(daemon), what="the batch to settle")
        assert [(method, path) for method, path, _ in gateway.requests] == [("POST", "/ingest")]
        letters = read_ndjson(tmp_path / "var" / "deadletter" / "siem.ndjson")
        assert sorted(letter["event"]["id"] for letter in letters) == [f"r{i}" for i in range(5)]
        for letter in letters:
            assert (letter["reason"], letter["status"]) == ("permanent_status", status)
            assert gateway.location.replace("sso:hunter2@", "sso:REDACTED@") in letter["message"]
            assert "hunter2" not in letter["message"]
        row = daemon.status()["targets"]["siem"]
        assert (row["delivered"], row["dead_lettered"]) == (0, 5)
        assert row["write_status"]["status"] == "failed"
        assert_books_balance(daemon)
    finally:
        await gateway.stop()


async def test_a_retry_after_longer_than_max_age_dead_letters_now(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    siem = await receiver_factory([503], headers={503: {"Retry-After": "3600"}})
    daemon = await start_daemon(
        {
            "targets": [http_target("siem", siem.url) | {"retry": {"max_age_s": 3}}],
            "routes": everything_to("siem"),
        }
    )
    await post(daemon, [make_event(id="a"), make_event(id="b")])
    # Generous: the point is that it happens at all (before this, it waited an hour).
    await wait_for(lambda: settled(daemon), timeout_s=15, what="the batch to be dead-lettered")
    letters = read_ndjson(tmp_path / "var" / "deadletter" / "siem.ndjson")
    assert sorted(letter["event"]["id"] for letter in letters) == ["a", "b"]
    for letter in letters:
        assert (letter["reason"], letter["status"]) == ("retry_after_exceeds_max_age", 503)
        assert "3600" in letter["message"]
    assert len(siem.requests) == 1, "no retry can come before the server's Retry-After"
    row = daemon.status()["targets"]["siem"]
    assert (row["delivered"], row["dead_lettered"]) == (0, 2)
    assert_books_balance(daemon)


async def test_a_retry_after_is_capped_at_max_backoff(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    siem = await receiver_factory([503, 200], headers={503: {"Retry-After": "120"}})
    daemon = await start_daemon(
        {
            "targets": [http_target("siem", siem.url) | {"retry": {"max_backoff_s": 0.5}}],
            "routes": everything_to("siem"),
        }
    )
    await post(daemon, make_event(id="capped"))
    await wait_for(lambda: settled(daemon), timeout_s=15, what="the retry within max_backoff_s")
    assert [r.status for r in siem.requests] == [503, 200]
    assert [e["id"] for e in siem.delivered_events] == ["capped"]
    assert_books_balance(daemon)


class FlawedFileTarget(FileTarget):
    """A real file target with a bug in its own code while `flawed`: its per-event check
    raises, outside any send, so the worker itself fails on every batch (as it would on a
    journal it cannot read) and can only restart."""

    flawed = True

    def unsendable(self, event: Event) -> str | None:
        if self.flawed:
            raise RuntimeError("bug: cannot classify the event")
        return None


async def readyz(daemon: Daemon) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}/readyz") as resp,
    ):
        return resp.status, await resp.json()


async def test_a_worker_that_keeps_failing_shows_in_write_status_metrics_and_readyz(
    tmp_path: Path,
) -> None:
    from tests.integration.test_metrics import scrape, value

    archive = tmp_path / "archive.ndjson"
    data = {
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "targets": [file_target("archive", archive)],
        "routes": everything_to("archive"),
    }
    config = parse_config(data)
    daemon = Daemon(config, ConfigSource(None, data))
    target = FlawedFileTarget("archive", config.target("archive").endpoint)
    daemon.targets["archive"] = target
    await daemon.start()
    try:
        assert (await readyz(daemon))[0] == 200
        await post(daemon, make_event(id="kept"))

        async def not_ready() -> bool:
            return (await readyz(daemon))[0] == 503

        await wait_for(not_ready, timeout_s=20, what="/readyz to show the failing worker")
        assert (await readyz(daemon))[1] == {"status": "delivery failing", "targets": ["archive"]}
        row = daemon.status()["targets"]["archive"]
        assert row["worker_failing"] and row["worker_errors"] >= 3
        assert row["write_status"]["status"] == "failed"
        assert "RuntimeError: bug" in row["write_status"]["reason_for_last_failure"]
        assert (row["pending"], row["delivered"], row["dead_lettered"]) == (1, 0, 0)
        assert_books_balance(daemon)
        samples = await scrape(daemon)
        assert value(samples, "event_router_target_worker_failing", target="archive") == 1
        assert value(samples, "event_router_ready") == 0

        target.flawed = False  # fixed (a reload, a journal back): the backlog goes, /readyz too
        await wait_for(lambda: settled(daemon), timeout_s=20, what="the kept event to go out")
        assert [e["id"] for e in read_ndjson(archive)] == ["kept"]
        assert await readyz(daemon) == (200, {"status": "ready"})
        assert not daemon.status()["targets"]["archive"]["worker_failing"]
        assert_books_balance(daemon)
    finally:
        await daemon.stop()
