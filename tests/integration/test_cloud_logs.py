"""The cloud_logs target against a loopback IAM + Cloud Logs ingress speaking the real protocol."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.daemon import Daemon
from router.iam import IamTokenSource
from router.targets.cloud_logs import ingress_url
from tests.conftest import StartDaemon
from tests.fake_cloud_logs import API_KEY, FakeCloudLogs
from tests.fakes import INSTANCE, RedirectingReceiver, make_event, read_ndjson, wait_for
from tests.helpers import assert_books_balance, everything_to, post, settled
from tests.integration.test_api import INGEST, Client, loopback_auth
from tests.integration.test_hostile_admin import dns

__all__ = ["dns"]  # a fixture, used by name

LOGS_CRN = "crn:v1:bluemix:public:logs:us-south:a/a1b2c3d4:4a7e3c1b-0000-4c1d-9e2f-5a6b7c8d9e0f::"


@pytest.fixture
async def cloud_logs() -> AsyncIterator[FakeCloudLogs]:
    server = await FakeCloudLogs().start()
    IamTokenSource._shared.clear()  # each test gets its own token cache
    yield server
    await server.stop()


def logs_target(server: FakeCloudLogs, **endpoint: Any) -> dict[str, Any]:
    return {
        "id": "logs",
        "target_type": "cloud_logs",
        "cloudlogs_endpoint": {
            "target_crn": LOGS_CRN,
            "api_key": "${env:IBMCLOUD_API_KEY}",
            "ingress_url": server.url,
            "iam_url": server.url,
            "computer_name": "router-1",
            **endpoint,
        },
        "retry": {"max_attempts": 5},
    }


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IBMCLOUD_API_KEY", API_KEY)


def now_iso(delta: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + delta).isoformat(timespec="milliseconds").replace("+00:00", "+0000")


async def start(start_daemon: StartDaemon, server: FakeCloudLogs, **endpoint: Any) -> Daemon:
    return await start_daemon(
        {"targets": [logs_target(server, **endpoint)], "routes": everything_to("logs")}
    )


def test_ingress_url_is_derived_from_the_instance_crn() -> None:
    assert ingress_url(LOGS_CRN) == (
        "https://4a7e3c1b-0000-4c1d-9e2f-5a6b7c8d9e0f.ingress.us-south.logs.cloud.ibm.com"
    )
    assert ingress_url(LOGS_CRN, private=True) == (
        "https://4a7e3c1b-0000-4c1d-9e2f-5a6b7c8d9e0f.ingress.private.us-south.logs.cloud.ibm.com"
    )


async def test_events_arrive_with_every_documented_field(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, api_key: None
) -> None:
    daemon = await start(start_daemon, cloud_logs)
    when = now_iso()
    events = [
        make_event(id="n", severity="normal", eventTime=when),
        make_event(id="w", severity="warning", eventTime=when),
        make_event(id="c", severity="critical", eventTime=when),
    ]
    await post(daemon, events)
    await wait_for(lambda: settled(daemon))
    assert cloud_logs.problems == []
    by_id = {record["text"]["id"]: record for record in cloud_logs.records}
    assert {k: by_id[k]["severity"] for k in "nwc"} == {"n": 3, "w": 4, "c": 6}
    record = by_id["n"]
    assert record["applicationName"] == "ibm-audit-event"
    assert record["subsystemName"] == f"secrets-manager:{INSTANCE}"
    assert record["computerName"] == "router-1"
    assert record["timestamp"] == int(datetime.fromisoformat(when).timestamp() * 1000)
    assert record["text"]["action"] == "secrets-manager.secret.create"
    assert cloud_logs.requests[0]["authorization"] == "Bearer token-1"


async def test_the_token_is_cached_between_batches(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, api_key: None
) -> None:
    daemon = await start(start_daemon, cloud_logs)
    for _ in range(3):
        await post(daemon, make_event(eventTime=now_iso()))
        await wait_for(lambda: settled(daemon))
    assert len(cloud_logs.records) == 3
    assert cloud_logs.token_requests == 1


async def test_an_expired_token_is_refreshed_once_and_the_batch_goes_through(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, api_key: None
) -> None:
    daemon = await start(start_daemon, cloud_logs)
    await post(daemon, make_event(eventTime=now_iso()))
    await wait_for(lambda: settled(daemon))
    cloud_logs.expire_all_tokens()  # the server forgets the token before its stated lifetime
    await post(daemon, make_event(id="after-expiry", eventTime=now_iso()))
    await wait_for(lambda: settled(daemon))
    assert [r["status"] for r in cloud_logs.requests] == [200, 401, 200]
    assert cloud_logs.token_requests == 2
    assert cloud_logs.records[-1]["text"]["id"] == "after-expiry"
    row = daemon.status()["targets"]["logs"]
    assert (row["delivered"], row["dead_lettered"], row["retries"]) == (2, 0, 0)


async def test_a_token_is_refreshed_at_80_percent_of_its_lifetime(
    cloud_logs: FakeCloudLogs,
) -> None:
    import aiohttp

    now = [1000.0]
    source = IamTokenSource(cloud_logs.url, API_KEY, clock=lambda: now[0])
    async with aiohttp.ClientSession() as session:
        first = await source.token(session, "logs")
        now[0] += 0.79 * cloud_logs.expires_in_s
        assert await source.token(session, "logs") == first
        now[0] += 0.02 * cloud_logs.expires_in_s
        assert await source.token(session, "logs") != first
    assert cloud_logs.token_requests == 2


async def test_concurrent_callers_share_one_refresh(cloud_logs: FakeCloudLogs) -> None:
    import asyncio

    import aiohttp

    source = IamTokenSource(cloud_logs.url, API_KEY)
    async with aiohttp.ClientSession() as session:
        tokens = await asyncio.gather(*(source.token(session, "logs") for _ in range(10)))
    assert set(tokens) == {"token-1"}
    assert cloud_logs.token_requests == 1


async def test_401_twice_is_permanent_and_dead_lettered(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, api_key: None, tmp_path: Path
) -> None:
    cloud_logs.ingress_statuses = [401]
    daemon = await start(start_daemon, cloud_logs)
    await post(daemon, make_event(eventTime=now_iso()))
    await wait_for(lambda: settled(daemon))
    assert len(cloud_logs.requests) == 2, "one retry with a fresh token, then give up"
    assert cloud_logs.token_requests == 2
    [letter] = read_ndjson(tmp_path / "var" / "deadletter" / "logs.ndjson")
    assert (letter["reason"], letter["status"]) == ("permanent_status", 401)


async def test_429_with_retry_after_then_200(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, api_key: None
) -> None:
    cloud_logs.ingress_statuses = [429, 0]
    cloud_logs.retry_after = "1"
    daemon = await start(start_daemon, cloud_logs)
    await post(daemon, make_event(eventTime=now_iso()))
    await wait_for(lambda: settled(daemon))
    assert [r["status"] for r in cloud_logs.requests] == [429, 200]
    assert daemon.status()["targets"]["logs"]["retries"] == 1


async def test_500s_are_retried(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, api_key: None
) -> None:
    cloud_logs.ingress_statuses = [500, 502, 503, 0]
    daemon = await start(start_daemon, cloud_logs)
    await post(daemon, make_event(eventTime=now_iso()))
    await wait_for(lambda: settled(daemon))
    assert [r["status"] for r in cloud_logs.requests] == [500, 502, 503, 200]
    assert len(cloud_logs.records) == 1


async def test_unsendable_events_are_dead_lettered_at_once_and_the_rest_delivered(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, api_key: None, tmp_path: Path
) -> None:
    daemon = await start(start_daemon, cloud_logs)
    events = [
        make_event(id="ok", eventTime=now_iso()),
        make_event(id="big", eventTime=now_iso(), requestData={"blob": "x" * 40_000}),
        make_event(id="old", eventTime=now_iso(-timedelta(hours=25))),
        make_event(id="future", eventTime=now_iso(timedelta(hours=5))),
    ]
    await post(daemon, events)
    await wait_for(lambda: settled(daemon))
    assert [r["text"]["id"] for r in cloud_logs.records] == ["ok"]
    letters = {
        r["event"]["id"]: r for r in read_ndjson(tmp_path / "var" / "deadletter" / "logs.ndjson")
    }
    assert {k: v["reason"] for k, v in letters.items()} == {
        "big": "too_large",
        "old": "too_old",
        "future": "too_far_in_future",
    }
    assert all(v["attempts"] == 0 for v in letters.values())
    assert len(cloud_logs.requests) == 1
    assert_books_balance(daemon)


async def test_batches_are_split_under_the_request_size_limit(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, api_key: None
) -> None:
    daemon = await start(start_daemon, cloud_logs, max_request_bytes=20_000)
    await post(daemon, [make_event(eventTime=now_iso(), message="m" * 2000) for _ in range(40)])
    await wait_for(lambda: settled(daemon))
    assert len(cloud_logs.records) == 40
    assert len(cloud_logs.requests) > 1
    assert all(r["bytes"] <= 20_000 for r in cloud_logs.requests)


async def test_the_api_key_never_leaks(
    start_daemon: StartDaemon,
    cloud_logs: FakeCloudLogs,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong_key = "wrong-key-SHOULD-NOT-APPEAR-anywhere-42"
    monkeypatch.setenv("IBMCLOUD_API_KEY", wrong_key)
    caplog.set_level(logging.DEBUG)
    daemon = await start_daemon(
        {
            "targets": [logs_target(cloud_logs) | {"retry": {"max_attempts": 2}}],
            "routes": everything_to("logs"),
        }
    )
    await post(daemon, make_event(eventTime=now_iso()))
    await wait_for(lambda: settled(daemon))
    status = daemon.status()
    write_status = status["targets"]["logs"]["write_status"]
    assert write_status["status"] == "failed"
    assert "IAM token request" in write_status["reason_for_last_failure"]
    letters = (tmp_path / "var" / "deadletter" / "logs.ndjson").read_text()
    assert "Provided API key could not be found" in letters
    for where, text in (
        ("logs", caplog.text),
        ("status", orjson.dumps(status).decode()),
        ("dead letters", letters),
        ("target repr", repr(daemon.targets["logs"].__dict__)),
    ):
        assert wrong_key not in text, f"the API key leaked into {where}"


async def test_a_redirected_ingress_is_not_followed_and_dead_letters_with_its_location(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, api_key: None, tmp_path: Path
) -> None:
    gateway = await RedirectingReceiver(status=302).start()
    try:
        daemon = await start(start_daemon, cloud_logs, ingress_url=gateway.base)
        await post(daemon, [make_event(id=f"r{i}", eventTime=now_iso()) for i in range(3)])
        await wait_for(lambda: settled(daemon), what="the batch to settle")
        assert [(m, p) for m, p, _ in gateway.requests] == [("POST", "/logs/v1/singles")]
        letters = read_ndjson(tmp_path / "var" / "deadletter" / "logs.ndjson")
        assert len(letters) == 3
        assert all(gateway.location in letter["message"] for letter in letters)
        assert {(letter["reason"], letter["status"]) for letter in letters} == {
            ("permanent_status", 302)
        }
        assert_books_balance(daemon)
    finally:
        await gateway.stop()


@pytest.mark.parametrize(("second", "stored", "dead"), [(503, 6, 0), (400, 3, 3)])
async def test_each_request_of_a_split_batch_settles_on_its_own(
    start_daemon: StartDaemon,
    cloud_logs: FakeCloudLogs,
    api_key: None,
    tmp_path: Path,
    second: int,
    stored: int,
    dead: int,
) -> None:
    """A batch too big for one request goes as several; a failure of the second must not
    send the first again (503) nor dead-letter events the first already stored (400)."""
    cloud_logs.ingress_statuses = [0, second, 0]
    daemon = await start(start_daemon, cloud_logs, max_request_bytes=20_000)
    ids = [f"s{i}" for i in range(6)]
    await post(daemon, [make_event(id=i, eventTime=now_iso(), message="m" * 5000) for i in ids])
    await wait_for(lambda: settled(daemon), what="the batch to settle")
    assert cloud_logs.requests[0]["status"] == 200 and cloud_logs.requests[1]["status"] == second
    stored_ids = [record["text"]["id"] for record in cloud_logs.records]
    assert len(stored_ids) == len(set(stored_ids)) == stored, "no event stored twice"
    letters = read_ndjson(tmp_path / "var" / "deadletter" / "logs.ndjson")
    lettered = {letter["event"]["id"] for letter in letters}
    assert len(letters) == dead
    assert lettered.isdisjoint(stored_ids), "dead letters only for events not stored"
    assert lettered | set(stored_ids) == set(ids)
    row = daemon.status()["targets"]["logs"]
    assert (row["delivered"], row["dead_lettered"]) == (stored, dead)
    assert_books_balance(daemon)


async def test_an_unexpected_error_in_send_is_a_permanent_failure_not_a_stall(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, api_key: None, tmp_path: Path
) -> None:
    """An IAM token with a newline (no config check can see it) makes aiohttp raise a
    ValueError, not a DeliveryError; the batch is dead-lettered with the exception's class and
    message instead of being retried by a restarting worker for ever."""
    cloud_logs.token_suffix = "\n"
    daemon = await start_daemon(
        {
            "targets": [logs_target(cloud_logs) | {"retry": {"max_age_s": 3}}],
            "routes": everything_to("logs"),
        }
    )
    await post(daemon, [make_event(id=i, eventTime=now_iso()) for i in ("u1", "u2")])
    await wait_for(lambda: settled(daemon), timeout_s=15, what="the batch to be dead-lettered")
    letters = read_ndjson(tmp_path / "var" / "deadletter" / "logs.ndjson")
    assert sorted(letter["event"]["id"] for letter in letters) == ["u1", "u2"]
    for letter in letters:
        assert letter["reason"] == "unexpected_error"
        assert "ValueError" in letter["message"] and "control character" in letter["message"]
    assert cloud_logs.records == []
    row = daemon.status()["targets"]["logs"]
    assert (row["delivered"], row["dead_lettered"], row["worker_errors"]) == (0, 2, 0)
    assert row["write_status"]["status"] == "failed"
    assert "ValueError" in row["write_status"]["reason_for_last_failure"]
    assert_books_balance(daemon)


async def test_a_test_write_that_raises_unexpectedly_is_a_failed_validation(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, api_key: None
) -> None:
    """The API's validate (and the start-up test write) report the exception, not a 500."""
    cloud_logs.token_suffix = "\n"
    daemon = await start(start_daemon, cloud_logs)
    result = await daemon.probe_target("logs")
    assert not result.ok and "ValueError" in result.message
    row = daemon.status()["targets"]["logs"]
    assert row["write_status"]["status"] == "failed"
    assert "ValueError" in row["write_status"]["reason_for_last_failure"]
    assert_books_balance(daemon)


async def test_names_the_api_set_that_rebind_after_its_check_are_not_connected_to(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, dns: dict[str, str]
) -> None:
    """DNS rebinding, for Cloud Logs: the ingress and IAM names of targets the management API
    made resolve inside auth.api_target_networks when it checks them, then to 0.0.0.0 (this
    host's own listeners, as 169.254.169.254 would be a cloud's metadata service). Each
    connection checks its address again: nothing is sent to a rebound ingress, and no API key
    to a rebound IAM; their events are dead-lettered with the reason, while a target whose
    names still resolve inside the networks is delivered to."""
    port = cloud_logs.url.rpartition(":")[2]
    names = {
        "good": ("good-logs.example", "good-iam.example"),
        "ingress": ("logs.example", "ingress-iam.example"),
        "iam": ("iam-logs.example", "iam.example"),
    }
    dns.update({name: "127.0.0.1" for pair in names.values() for name in pair})
    daemon = await start_daemon(
        {
            "auth": {**loopback_auth(), "api_target_networks": ["127.0.0.1/32"]},
            "delivery": {"retry": {"max_attempts": 2, "initial_backoff_s": 0.05}},
            "targets": [],
            "routes": [],
        }
    )
    api = Client(daemon)
    made = {}
    for name, (ingress, iam) in names.items():
        endpoint = {
            "target_crn": LOGS_CRN,
            "api_key": API_KEY,
            "ingress_url": f"http://{ingress}:{port}",
            "iam_url": f"http://{iam}:{port}",
        }
        body = {"name": name, "target_type": "cloud_logs", "cloudlogs_endpoint": endpoint}
        status, answer = await api.call("POST", "/api/v2/targets", body)
        assert status == 201, answer
        made[name] = answer["id"]
    # The names' owner points them elsewhere once the checks are done.
    dns.update({"logs.example": "0.0.0.0", "iam.example": "0.0.0.0"})
    route = {"name": "all-api", "rules": [{"locations": ["*"], "target_ids": list(made.values())}]}
    assert (await api.call("POST", "/api/v2/routes", route))[0] == 201
    ids = [f"rebound-{n}" for n in range(3)]
    events = [make_event(id=i, eventTime=now_iso()) for i in ids]
    status, _ = await post(daemon, events, headers={"Authorization": f"Bearer {INGEST}"})
    assert status == 202
    await wait_for(lambda: settled(daemon), timeout_s=30, what="every target settled")
    rows = daemon.status()["targets"]
    # (the route's own change event reaches the targets too)
    assert rows[made["good"]]["delivered"] == rows[made["good"]]["received"] > len(ids)
    delivered = [r["text"]["id"] for r in cloud_logs.records]
    assert len(delivered) == rows[made["good"]]["delivered"], "the good target's only"
    assert set(ids) <= set(delivered)
    # One token for the good target, one for the target whose ingress rebound (its IAM name
    # did not): the rebound IAM name was never sent the key.
    assert cloud_logs.token_requests == 2
    for name in ("ingress", "iam"):
        row = rows[made[name]]
        assert row["delivered"] == 0 and row["dead_lettered"] == row["received"] > len(ids), row
        why = row["write_status"]["reason_for_last_failure"]
        assert "0.0.0.0" in why and "auth.api_target_networks" in why, (name, why)
    assert_books_balance(daemon)
    saved = {t["id"]: t for t in daemon.source.data["targets"]}
    assert saved[made["iam"]]["api_hosts"] == ["iam-logs.example", "iam.example"]


async def test_a_target_on_the_daemons_own_identity_exchanges_it_at_the_operators_iam(
    start_daemon: StartDaemon, cloud_logs: FakeCloudLogs, dns: dict[str, str]
) -> None:
    """A Cloud Logs target the management API makes without a key of its own authenticates
    with the daemon's identity (the top-level iam section), exchanged at the IAM URL the
    operator set there. That host is the operator's choice, not the admin token's: it lies
    outside auth.api_target_networks here, and the target must still be made (it was
    refused: "cloudlogs_endpoint.iam_url: ... outside auth.api_target_networks"), must not
    be bound to the networks at its connections, and must deliver. The ingress the API set
    is still checked and written down in api_hosts."""
    port = cloud_logs.url.rpartition(":")[2]
    # 0.0.0.0 reaches this host's listeners, and is outside 127.0.0.1/32.
    dns.update({"logs.example": "127.0.0.1", "operator-iam.example": "0.0.0.0"})
    daemon = await start_daemon(
        {
            "auth": {**loopback_auth(), "api_target_networks": ["127.0.0.1/32"]},
            "iam": {"api_key": API_KEY, "iam_url": f"http://operator-iam.example:{port}"},
            "targets": [],
            "routes": [],
        }
    )
    api = Client(daemon)
    endpoint = {"target_crn": LOGS_CRN, "ingress_url": f"http://logs.example:{port}"}
    body = {"name": "own-identity", "target_type": "cloud_logs", "cloudlogs_endpoint": endpoint}
    status, answer = await api.call("POST", "/api/v2/targets", body)
    assert status == 201, answer
    target_id = answer["id"]
    saved = {t["id"]: t for t in daemon.source.data["targets"]}
    assert saved[target_id]["api_hosts"] == ["logs.example"]
    # An ingress the API sets outside the networks is still refused.
    outside = {**endpoint, "ingress_url": f"http://operator-iam.example:{port}"}
    status, answer = await api.call(
        "POST",
        "/api/v2/targets",
        {"name": "outside", "target_type": "cloud_logs", "cloudlogs_endpoint": outside},
    )
    assert status == 400, answer
    assert "cloudlogs_endpoint.ingress_url" in str(answer), answer
    route = {"name": "all-api", "rules": [{"locations": ["*"], "target_ids": [target_id]}]}
    assert (await api.call("POST", "/api/v2/routes", route))[0] == 201
    ids = [f"own-identity-{n}" for n in range(3)]
    events = [make_event(id=i, eventTime=now_iso()) for i in ids]
    status, _ = await post(daemon, events, headers={"Authorization": f"Bearer {INGEST}"})
    assert status == 202
    await wait_for(lambda: settled(daemon), timeout_s=30, what="the target settled")
    row = daemon.status()["targets"][target_id]
    assert row["delivered"] == row["received"] >= len(ids), row
    assert set(ids) <= {r["text"]["id"] for r in cloud_logs.records}
    assert cloud_logs.token_requests >= 1
    assert_books_balance(daemon)
