"""Views and alerts against a real daemon: presence and absence alerts fire, resolve and
respect their cooldown; their events reach their targets through the journal (a down target
dead-letters them); the management API manages them with their live state."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from router.cli import main
from router.config import load_config, parse_config
from router.daemon import Daemon
from router.selfevent import ALERT_RESOLVE_ACTION, ALERT_TRIGGER_ACTION
from router.server.api import ConfigSource
from tests.conftest import StartDaemon
from tests.fakes import ScriptedReceiver, make_event, read_ndjson, wait_for
from tests.helpers import (
    ReceiverFactory,
    assert_books_balance,
    everything_to,
    file_target,
    http_target,
    post,
    settled,
)

UNAUTHORIZED = "host:secrets-manager reason.reasonType:Unauthorized"
CREATES = "host:secrets-manager action:secrets-manager.secret.create"
ADMIN = "an-admin-token-for-alerts-0001"


def unauthorized(event_id: str) -> dict[str, Any]:
    return make_event(
        id=event_id,
        action="secrets-manager.secret.read",
        outcome="failure",
        reason={"reasonCode": 401, "reasonType": "Unauthorized"},
    )


def alert_events(receiver: ScriptedReceiver) -> list[dict[str, Any]]:
    return [
        e
        for e in receiver.delivered_events
        if e["action"] in (ALERT_TRIGGER_ACTION, ALERT_RESOLVE_ACTION)
    ]


def kinds(receiver: ScriptedReceiver) -> list[str]:
    return [e["action"].rsplit(".", 1)[-1] for e in alert_events(receiver)]


async def api(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"http://127.0.0.1:{daemon.port}{path}",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as resp,
    ):
        text = await resp.text()
        return resp.status, (await resp.json(content_type=None) if text else None)


def base_config(tmp_path: Path, webhook: ScriptedReceiver, **sections: Any) -> dict[str, Any]:
    """An archive for every event, and a webhook that only alerts are sent to."""
    return {
        "targets": [
            file_target("archive", tmp_path / "archive.ndjson"),
            http_target("alerts-webhook", webhook.url),
        ],
        "routes": everything_to("archive"),
        **sections,
    }


async def test_presence_fires_once_per_cooldown_and_resolves_when_the_window_empties(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    webhook = await receiver_factory()
    cooldown_s = 8.0  # longer than the window and the resolve's delivery, even under load
    daemon = await start_daemon(
        base_config(
            tmp_path,
            webhook,
            alerts=[
                {
                    "name": "unauthorized-burst",
                    "query": UNAUTHORIZED,
                    "threshold": {"count": 3, "window_s": 2},
                    "target_ids": ["alerts-webhook"],
                    "cooldown_s": cooldown_s,
                }
            ],
        )
    )
    # Two matches and events that do not match: nothing yet.
    status, _ = await post(daemon, [unauthorized("u1"), make_event(id="ok1"), unauthorized("u2")])
    assert status == 202
    assert daemon.alerts.snapshot()["unauthorized-burst"]["matches_in_window"] == 2
    # The third match in the window triggers, once, however many follow.
    await post(daemon, [unauthorized(f"u{i}") for i in range(3, 9)])
    await wait_for(lambda: kinds(webhook) == ["trigger"], what="the trigger")
    trigger = alert_events(webhook)[0]
    data = trigger["requestData"]
    assert data["alert"] == "unauthorized-burst" and data["query"] == UNAUTHORIZED
    assert data["condition"] == "presence" and data["threshold"] == 3 and data["window_s"] == 2
    # The batch that crossed the threshold is counted whole.
    assert data["count"] == 8
    assert data["sample_event_ids"] == [f"u{i}" for i in range(1, 9)]
    assert trigger["target"]["name"] == "unauthorized-burst"
    assert "triggered" in trigger["message"]
    # The window empties: resolved.
    await wait_for(lambda: kinds(webhook) == ["trigger", "resolve"], what="the resolve")
    fired_at = time.time()
    # A new burst within the cooldown does not trigger...
    await post(daemon, [unauthorized(f"v{i}") for i in range(3)])
    assert daemon.alerts.snapshot()["unauthorized-burst"]["state"] == "ok"
    # ... a burst after it does.
    await wait_for(lambda: time.time() > fired_at + cooldown_s, timeout_s=cooldown_s + 1)
    await post(daemon, [unauthorized(f"w{i}") for i in range(3)])
    await wait_for(lambda: kinds(webhook)[2:] == ["trigger"], what="the second trigger")
    assert alert_events(webhook)[2]["requestData"]["sample_event_ids"][-3:] == ["w0", "w1", "w2"]
    assert daemon.alerts.snapshot()["unauthorized-burst"]["firings"] == 2
    # Metrics per alert: matches, firings, state, matches in the window.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}/metrics") as resp,
    ):
        metrics = await resp.text()
    label = '{alert="unauthorized-burst"}'
    assert f"event_router_alert_matches_total{label} 14.0" in metrics
    assert f"event_router_alert_firings_total{label} 2.0" in metrics
    # (the window is 2 s: the state may have moved on since; test_views_and_alerts_... reads it)
    assert f"event_router_alert_firing{label} " in metrics
    assert "event_router_alert_save_errors_total 0.0" in metrics
    # Alert events went to the alert's targets only; every producer event to the archive.
    await wait_for(lambda: settled(daemon))
    archived = read_ndjson(tmp_path / "archive.ndjson")
    assert not [e for e in archived if e["action"].startswith("event-router.alert")]
    assert not [e for e in webhook.delivered_events if e["action"].startswith("secrets-manager")]
    assert_books_balance(daemon)


async def test_absence_fires_after_the_window_and_resolves_on_the_next_match(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    webhook = await receiver_factory()
    window_s = 1.0
    started = time.time()
    daemon = await start_daemon(
        base_config(
            tmp_path,
            webhook,
            views=[{"name": "secret-creates", "query": CREATES}],
            alerts=[
                {
                    "name": "creates-silent",
                    "view": "secret-creates",
                    "absence": {"window_s": window_s},
                    "target_ids": ["alerts-webhook"],
                }
            ],
        )
    )
    await wait_for(lambda: kinds(webhook) == ["trigger"], what="the absence trigger")
    trigger = alert_events(webhook)[0]
    assert time.time() - started >= window_s
    data = trigger["requestData"]
    assert data["condition"] == "absence" and data["view"] == "secret-creates"
    assert data["query"] == CREATES and data["count"] == 0
    assert daemon.alerts.snapshot()["creates-silent"]["state"] == "firing"
    # An event that does not match changes nothing; the next match resolves.
    await post(daemon, unauthorized("u1"))
    await post(daemon, make_event(id="create-1"))
    await wait_for(lambda: kinds(webhook) == ["trigger", "resolve"], what="the resolve")
    assert alert_events(webhook)[1]["requestData"]["sample_event_ids"] == ["create-1"]
    assert daemon.alerts.snapshot()["creates-silent"]["state"] == "ok"
    await wait_for(lambda: settled(daemon))
    assert_books_balance(daemon)


async def test_an_alert_on_a_down_target_is_dead_lettered_like_any_event(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    down = await receiver_factory([503])
    config = base_config(
        tmp_path,
        down,
        alerts=[
            {
                "name": "any-unauthorized",
                "query": UNAUTHORIZED,
                "threshold": {"count": 1, "window_s": 60},
                "target_ids": ["alerts-webhook"],
            }
        ],
    )
    config["targets"][1]["retry"] = {"max_attempts": 2, "initial_backoff_s": 0.01}
    daemon = await start_daemon(config)
    await post(daemon, unauthorized("u1"))
    await wait_for(lambda: settled(daemon), what="the alert event settled")
    letters = read_ndjson(tmp_path / "var" / "deadletter" / "alerts-webhook.ndjson")
    assert [letter["event"]["action"] for letter in letters] == [ALERT_TRIGGER_ACTION]
    assert letters[0]["reason"] == "retries_exhausted"
    assert letters[0]["event"]["requestData"]["sample_event_ids"] == ["u1"]
    assert len(down.requests) == 2
    row = daemon.status()["targets"]["alerts-webhook"]
    assert (row["received"], row["dead_lettered"]) == (1, 1)
    assert_books_balance(daemon)


@pytest.fixture
async def managed(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> tuple[Daemon, ScriptedReceiver]:
    webhook = await receiver_factory()
    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    daemon = await start_daemon(
        base_config(tmp_path, webhook, auth={"admin_tokens": [{"name": "ops", "sha256": digest}]})
    )
    return daemon, webhook


async def test_views_and_alerts_through_the_api_with_live_state(
    managed: tuple[Daemon, ScriptedReceiver], tmp_path: Path
) -> None:
    daemon, webhook = managed
    status, view = await api(
        daemon, "POST", "/api/v2/views", {"name": "unauthorized", "query": UNAUTHORIZED}
    )
    assert status == 201, view
    assert view["name"] == "unauthorized" and view["query"] == UNAUTHORIZED
    assert view["crn"].endswith(":view:unauthorized") and view["created_at"]
    status, alert = await api(
        daemon,
        "POST",
        "/api/v2/alerts",
        {
            "name": "burst",
            "view": "unauthorized",
            "threshold": {"count": 2, "window_s": 60},
            "target_ids": ["alerts-webhook"],
        },
    )
    assert status == 201, alert
    assert alert["state"] == "ok" and alert["matches_in_window"] == 0
    assert alert["last_fired_at"] is None and alert["effective_query"] == UNAUTHORIZED
    assert alert["cooldown_s"] == 300 and alert["condition"] == "presence"
    # Applied at once (hot reload): the alert counts and fires.
    await daemon.acceptor.accept([unauthorized("u1"), unauthorized("u2")])
    await wait_for(lambda: kinds(webhook) == ["trigger"], what="the trigger")
    status, listed = await api(daemon, "GET", "/api/v2/alerts")
    assert status == 200
    (shown,) = listed["alerts"]
    assert shown["name"] == "burst" and shown["state"] == "firing"
    assert shown["matches_in_window"] == 2 and shown["firings"] == 1
    assert shown["last_fired_at"].endswith("Z")
    assert (await api(daemon, "GET", "/api/v2/alerts/burst"))[1]["state"] == "firing"
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{daemon.port}/metrics",
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as resp,
    ):
        metrics = await resp.text()
    assert 'event_router_alert_firing{alert="burst"} 1.0' in metrics
    assert 'event_router_alert_window_matches{alert="burst"} 2.0' in metrics
    assert (await api(daemon, "GET", "/api/v2/views"))[1]["views"] == [
        view | {"updated_at": view["updated_at"]}
    ]

    # What a client read it may send back as it is.
    status, same = await api(daemon, "PUT", "/api/v2/alerts/burst", shown)
    assert status == 200 and same["state"] == "firing" and same["threshold"] == shown["threshold"]
    # Replace: the same question keeps its state; another one starts again.
    status, replaced = await api(
        daemon,
        "PUT",
        "/api/v2/alerts/burst",
        {
            "view": "unauthorized",
            "threshold": {"count": 2, "window_s": 60},
            "target_ids": ["alerts-webhook"],
            "cooldown_s": 10,
        },
    )
    assert status == 200 and replaced["cooldown_s"] == 10 and replaced["state"] == "firing"
    status, replaced = await api(
        daemon,
        "PUT",
        "/api/v2/alerts/burst",
        {"query": CREATES, "absence": {"window_s": 600}, "target_ids": ["alerts-webhook"]},
    )
    assert status == 200 and replaced["state"] == "ok" and replaced["condition"] == "absence"

    # Refusals name the field; nothing changes.
    refusals = [
        (
            {"name": "x", "query": "a AND", "threshold": {}, "target_ids": ["alerts-webhook"]},
            "alerts[1].query: column 6: expected a term after AND",
        ),
        (
            {"name": "x", "query": "a", "threshold": {}, "target_ids": ["pager"]},
            "alerts[1].target_ids[0]: unknown target 'pager'",
        ),
        (
            {"name": "x", "view": "nope", "absence": {}, "target_ids": ["alerts-webhook"]},
            "alerts[1].view: unknown view 'nope'",
        ),
        (
            {
                "name": "x",
                "query": "a",
                "threshold": {},
                "absence": {},
                "target_ids": ["alerts-webhook"],
            },
            "alerts[1]: give either threshold",
        ),
        (
            {
                "name": "x",
                "query": "a",
                "threshold": {"count": 0},
                "target_ids": ["alerts-webhook"],
            },
            "alerts[1].threshold.count: 0 is less than the minimum of 1",
        ),
        (
            {"name": "burst", "query": "a", "threshold": {}, "target_ids": ["alerts-webhook"]},
            "alerts[1].name: duplicate alert name 'burst'",
        ),
        (
            {
                "name": "x",
                "query": "a",
                "threshold": {},
                "target_ids": ["alerts-webhook"],
                "severity": 1,
            },
            "unknown field(s) of the alert: severity",
        ),
    ]
    for body, expected in refusals:
        status, error = await api(daemon, "POST", "/api/v2/alerts", body)
        assert status == 400, (body, error)
        assert expected in error["errors"][0]["message"], error
    assert [a.name for a in daemon.config.alerts] == ["burst"]
    status, error = await api(daemon, "POST", "/api/v2/views", {"name": "bad", "query": "(x"})
    assert status == 400
    assert "views[1].query: column 1: this '(' is never closed" in error["errors"][0]["message"]

    # A view an alert uses, or a target, cannot go; once unused they can.
    status, _ = await api(
        daemon,
        "PUT",
        "/api/v2/alerts/burst",
        {"view": "unauthorized", "threshold": {}, "target_ids": ["alerts-webhook"]},
    )
    assert status == 200
    status, error = await api(daemon, "DELETE", "/api/v2/views/unauthorized")
    assert status == 409 and error["errors"][0]["code"] == "view_in_use"
    status, error = await api(daemon, "DELETE", "/api/v2/targets/alerts-webhook")
    assert status == 409 and "alert 'burst'" in error["errors"][0]["message"]
    assert (await api(daemon, "DELETE", "/api/v2/alerts/burst"))[0] == 204
    assert (await api(daemon, "DELETE", "/api/v2/views/unauthorized"))[0] == 204
    assert (await api(daemon, "GET", "/api/v2/alerts/burst"))[0] == 404
    assert (await api(daemon, "GET", "/api/v2/alerts"))[1] == {"alerts": []}
    assert daemon.config.alerts == () and daemon.config.views == ()

    # Every change is audited, applied or refused.
    def audited() -> list[str]:
        return [
            e["action"].removeprefix("event-router.") + ("!" if e["outcome"] == "failure" else "")
            for e in read_ndjson(tmp_path / "archive.ndjson")
            if e["action"].startswith(("event-router.view", "event-router.alert."))
            and not e["action"].endswith(("trigger", "resolve"))
        ]

    expected = ["view.create", "alert.create"] + ["alert.update"] * 3
    expected += ["alert.create!"] * 7 + ["view.create!", "alert.update", "view.delete!"]
    expected += ["alert.delete", "view.delete"]
    await wait_for(lambda: audited() == expected, what=f"the audit trail {expected}")
    refused = [
        e["target"]["name"]
        for e in read_ndjson(tmp_path / "archive.ndjson")
        if e["action"] == "event-router.alert.create" and e["outcome"] == "failure"
    ]
    assert refused == ["x"] * 5 + ["burst", "x"]  # the name each refused create asked for


# -- event-router query --view and tail --view --------------------------------------------------


def run_main(*argv: str) -> int:
    """main() as a thread runs it: asyncio would not let a SystemExit pass through a task."""
    try:
        main(list(argv))
    except SystemExit as exited:
        return int(exited.code or 0)
    return 0


def test_query_view_searches_archives_with_the_views_query(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "events.ndjson"
    archive.write_bytes(
        b"".join(
            orjson.dumps(e) + b"\n"
            for e in (make_event(id="c1"), unauthorized("u1"), make_event(id="c2"))
        )
    )
    config = tmp_path / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "targets": [file_target("archive", archive)],
                "views": [{"name": "secret-creates", "query": CREATES}],
            }
        )
    )
    code = run_main("query", "--view", "secret-creates", str(archive), "--config", str(config))
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert [orjson.loads(line)["id"] for line in out.splitlines()] == ["c1", "c2"]
    # An unknown view, or neither a view nor a query, is a usage error naming what exists.
    assert run_main("query", "--view", "nope", str(archive), "--config", str(config)) == 2
    assert "no view 'nope' in " in (err := capsys.readouterr().err)
    assert "(views: secret-creates)" in err
    assert run_main("query", str(archive)) == 2
    assert "give a QUERY, or --view NAME" in capsys.readouterr().err


async def test_tail_view_follows_the_running_daemons_view(
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    webhook = await receiver_factory()
    daemon = await start_daemon(
        base_config(tmp_path, webhook, views=[{"name": "unauthorized", "query": UNAUTHORIZED}])
    )
    url = f"http://127.0.0.1:{daemon.port}"
    command = asyncio.create_task(
        asyncio.to_thread(run_main, "tail", "--view", "unauthorized", "--url", url, "--limit", "2")
    )
    await wait_for(lambda: len(daemon.tail.subscribers) == 1, what="the command to subscribe")
    await post(daemon, [unauthorized("u1"), make_event(id="ok"), unauthorized("u2")])
    assert await asyncio.wait_for(command, timeout=10) == 0
    out, err = capsys.readouterr()
    assert [orjson.loads(line)["id"] for line in out.splitlines()] == ["u1", "u2"]
    assert f"tailing {url} for view unauthorized ({UNAUTHORIZED})" in err
    # A query narrows the view; an unknown view is a usage error.
    command = asyncio.create_task(
        asyncio.to_thread(
            run_main,
            "tail",
            "initiator.name:bob",
            "--view",
            "unauthorized",
            "--url",
            url,
            "--limit",
            "1",
        )
    )
    await wait_for(lambda: len(daemon.tail.subscribers) == 1, what="the command to subscribe")
    bob = unauthorized("u-bob")
    bob["initiator"]["name"] = "bob@example.com"
    await post(daemon, [unauthorized("u3"), make_event(id="ok2", initiator=bob["initiator"]), bob])
    assert await asyncio.wait_for(command, timeout=10) == 0
    assert [orjson.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == ["u-bob"]
    assert await asyncio.to_thread(run_main, "tail", "--view", "nope", "--url", url) == 2
    assert "no view named 'nope'" in capsys.readouterr().err


async def test_alerts_see_events_as_redacted(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    webhook = await receiver_factory()

    def on(name: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "query": query,
            "threshold": {"count": 1},
            "target_ids": ["alerts-webhook"],
        }

    daemon = await start_daemon(
        base_config(
            tmp_path,
            webhook,
            redaction={"keys": [{"key": "requestData.token", "action": "mask"}]},
            alerts=[
                on("secret-value", "requestData.token:hunter2"),
                on("masked", 'requestData.token:"[REDACTED]"'),
            ],
        )
    )
    await post(daemon, make_event(id="t1", requestData={"token": "hunter2-and-more"}))
    await wait_for(lambda: kinds(webhook) == ["trigger"], what="the masked alert's trigger")
    assert alert_events(webhook)[0]["requestData"]["alert"] == "masked"
    assert daemon.alerts.snapshot()["secret-value"]["matches"] == 0


async def test_a_reload_from_the_yaml_adds_changes_and_removes_alerts(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    webhook = await receiver_factory()
    burst = {
        "name": "burst",
        "query": UNAUTHORIZED,
        "threshold": {"count": 5, "window_s": 60},
        "target_ids": ["alerts-webhook"],
    }
    data = base_config(tmp_path, webhook, alerts=[burst])
    daemon = await start_daemon(data)
    await post(daemon, [unauthorized("u1"), unauthorized("u2")])
    path = tmp_path / "router.yaml"
    # What the fixture adds, so that only the alerts differ (server and storage need a restart).
    fixed = {
        "server": {"host": "127.0.0.1", "port": 0, "workers": daemon.config.server.workers},
        "storage": {"path": str(tmp_path / "var")},
        "shutdown": {"drain_timeout_s": 5},
    }

    async def reload(**sections: Any) -> bool:
        path.write_text(yaml.safe_dump({**fixed, **data, **sections}))
        return await daemon.reload_from(path)

    # Same question, another cooldown, and a new alert: the window is kept.
    silent = {"name": "silent", "query": CREATES, "absence": {"window_s": 600}}
    silent["target_ids"] = ["alerts-webhook"]
    assert await reload(alerts=[burst | {"cooldown_s": 10}, silent])
    snapshot = daemon.alerts.snapshot()
    assert snapshot["burst"]["matches_in_window"] == 2 and set(snapshot) == {"burst", "silent"}
    # A refused reload (an unknown target) changes nothing.
    assert not await reload(alerts=[burst | {"target_ids": ["pager"]}])
    assert set(daemon.alerts.snapshot()) == {"burst", "silent"}
    # Another question starts again; a removed alert is gone.
    assert await reload(alerts=[burst | {"query": "outcome:failure"}])
    snapshot = daemon.alerts.snapshot()
    assert set(snapshot) == {"burst"} and snapshot["burst"]["matches_in_window"] == 0


async def test_views_and_alerts_made_through_the_api_are_written_back_to_the_yaml(
    receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    webhook = await receiver_factory()
    path = tmp_path / "router.yaml"
    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    data = base_config(
        tmp_path,
        webhook,
        server={"host": "127.0.0.1", "port": 0},
        storage={"path": str(tmp_path / "var")},
        auth={"admin_tokens": [{"name": "ops", "sha256": digest}]},
    )
    path.write_text(yaml.safe_dump(data))
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        view = {"name": "unauthorized", "query": UNAUTHORIZED}
        assert (await api(daemon, "POST", "/api/v2/views", view))[0] == 201
        alert = {"name": "burst", "view": "unauthorized", "threshold": {"count": 2}}
        alert["target_ids"] = ["alerts-webhook"]
        assert (await api(daemon, "POST", "/api/v2/alerts", alert))[0] == 201
    finally:
        await daemon.stop()
    # A restart comes back with them.
    written = yaml.safe_load(path.read_text())
    assert written["views"] == [view] and written["alerts"] == [alert]
    restarted = load_config(path)
    assert [a.name for a in restarted.alerts] == ["burst"]
    assert str(restarted.alerts[0].query) == UNAUTHORIZED


async def test_a_save_that_fails_is_tried_again_and_ingest_still_answers(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    webhook = await receiver_factory()
    daemon = await start_daemon(
        base_config(
            tmp_path,
            webhook,
            alerts=[
                {
                    "name": "any",
                    "query": UNAUTHORIZED,
                    "threshold": {"count": 1},
                    "target_ids": ["alerts-webhook"],
                }
            ],
        )
    )
    # Another connection holds alerts.db's write lock: every save fails (database is locked)
    # once SQLite's busy timeout passes, as a full disk would fail it.
    blocker = sqlite3.connect(tmp_path / "var" / "alerts.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        status, answer = await post(daemon, unauthorized("u1"))
        assert status == 202 and answer["accepted"] == 1  # the event is journaled: answered
        assert daemon.alerts.save_errors >= 1 and not webhook.requests
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    await wait_for(lambda: kinds(webhook) == ["trigger"], what="the trigger, once saved")
    await wait_for(lambda: settled(daemon))
    assert_books_balance(daemon)


async def test_a_damaged_alert_state_is_moved_aside_and_the_daemon_starts(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    webhook = await receiver_factory()
    storage = tmp_path / "var"
    storage.mkdir(mode=0o700)
    (storage / "alerts.db").write_bytes(b"this is not a database" * 100)
    daemon = await start_daemon(
        base_config(
            tmp_path,
            webhook,
            alerts=[
                {
                    "name": "any",
                    "query": UNAUTHORIZED,
                    "threshold": {"count": 1},
                    "target_ids": ["alerts-webhook"],
                }
            ],
        )
    )
    (aside,) = storage.glob("alerts.db.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not a database")
    await post(daemon, unauthorized("u1"))
    await wait_for(lambda: kinds(webhook) == ["trigger"], what="the trigger")


async def test_the_api_creates_no_more_alerts_or_views_than_the_server_limit(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    """Each alert runs its query on every accepted event and each view is kept in memory: an
    admin token may not add them without end. Past the limit, a 400 names the field and the
    setting; deleting one makes room again."""
    webhook = await receiver_factory()
    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    daemon = await start_daemon(
        base_config(
            tmp_path,
            webhook,
            auth={"admin_tokens": [{"name": "ops", "sha256": digest}]},
            server={"max_alerts": 2, "max_views": 1},
        )
    )

    def alert(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "query": UNAUTHORIZED,
            "threshold": {"count": 2, "window_s": 60},
            "target_ids": ["alerts-webhook"],
        }

    for name in ("a1", "a2"):
        status, answer = await api(daemon, "POST", "/api/v2/alerts", alert(name))
        assert status == 201, answer
    status, answer = await api(daemon, "POST", "/api/v2/alerts", alert("a3"))
    assert status == 400, answer
    message = answer["errors"][0]["message"]
    assert message.startswith("alerts: ") and "server.max_alerts (2)" in message, message
    assert [a.name for a in daemon.config.alerts] == ["a1", "a2"]
    assert (await api(daemon, "DELETE", "/api/v2/alerts/a1", None))[0] == 204
    assert (await api(daemon, "POST", "/api/v2/alerts", alert("a3")))[0] == 201

    assert (await api(daemon, "POST", "/api/v2/views", {"name": "v1", "query": "x"}))[0] == 201
    status, answer = await api(daemon, "POST", "/api/v2/views", {"name": "v2", "query": "x"})
    assert status == 400, answer
    assert "views: " in answer["errors"][0]["message"]
    assert "server.max_views (1)" in answer["errors"][0]["message"]
    assert [v.name for v in daemon.config.views] == ["v1"]
