"""Alert windows survive a real restart of the daemon process (kill -9 and SIGTERM): a
half-full presence window is not forgotten, an absence window keeps counting from the last
match, and an alert that fired does not fire again for the same burst or silence."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from router.selfevent import ALERT_TRIGGER_ACTION
from tests.fakes import ScriptedReceiver, make_event, wait_for
from tests.helpers import drained, free_port, reap, serve, terminate

# Each test starts `serve` three or four times: on a machine the other tests keep busy, more
# than the suite's 60 s.
pytestmark = pytest.mark.timeout(240)

UNAUTHORIZED = "host:secrets-manager reason.reasonType:Unauthorized"


def unauthorized(event_id: str) -> dict[str, Any]:
    return make_event(
        id=event_id,
        action="secrets-manager.secret.read",
        outcome="failure",
        reason={"reasonCode": 401, "reasonType": "Unauthorized"},
    )


def write_config(
    tmp_path: Path, port: int, receiver: ScriptedReceiver, alert: dict[str, Any]
) -> Path:
    config = tmp_path / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "storage": {"path": str(tmp_path / "var")},
                "targets": [
                    {
                        "id": "archive",
                        "target_type": "file",
                        "file_endpoint": {"path": str(tmp_path / "archive.ndjson")},
                    },
                    {
                        "id": "alerts-webhook",
                        "target_type": "http",
                        "http_endpoint": {"url": receiver.url},
                    },
                ],
                "routes": [
                    {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}
                ],
                "alerts": [{**alert, "target_ids": ["alerts-webhook"]}],
            }
        )
    )
    return config


async def send(port: int, *events: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/v1/events",
            data=orjson.dumps(list(events)),
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.status == 202, await resp.text()


async def alert_state(port: int, name: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/api/v2/alerts/{name}") as resp,
    ):
        assert resp.status == 200
        state: dict[str, Any] = await resp.json()
        return state


def triggers(receiver: ScriptedReceiver) -> list[dict[str, Any]]:
    return [e for e in receiver.delivered_events if e["action"] == ALERT_TRIGGER_ACTION]


async def kill_9(proc: asyncio.subprocess.Process) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()


async def test_a_half_full_presence_window_survives_restarts_and_fires_once(
    tmp_path: Path,
) -> None:
    receiver = await ScriptedReceiver().start()
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        receiver,
        {"name": "burst", "query": UNAUTHORIZED, "threshold": {"count": 3, "window_s": 60}},
    )
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(config, port)
        await send(port, unauthorized("u1"))
        await send(port, unauthorized("u2"))
        await kill_9(proc)  # acknowledged matches are on disk, not only in memory
        proc = await serve(config, port)
        state = await alert_state(port, "burst")
        assert (state["state"], state["matches_in_window"], state["matches"]) == ("ok", 2, 2)
        await send(port, unauthorized("u3"))
        await wait_for(lambda: len(triggers(receiver)) == 1, what="the trigger")
        data = triggers(receiver)[0]["requestData"]
        assert data["count"] == 3 and data["sample_event_ids"] == ["u1", "u2", "u3"]

        # Restarted while firing (SIGTERM this time): the same burst does not fire again.
        assert await terminate(proc) == 0
        proc = await serve(config, port)
        await send(port, unauthorized("u4"))
        state = await alert_state(port, "burst")
        assert (state["state"], state["firings"], state["matches_in_window"]) == ("firing", 1, 4)
        await wait_for(lambda: drained(port), what="nothing pending")
        assert len(triggers(receiver)) == 1
    finally:
        await reap(proc)
        await receiver.stop()


async def test_an_absence_window_keeps_counting_across_a_restart_and_fires_once(
    tmp_path: Path,
) -> None:
    receiver = await ScriptedReceiver().start()
    port = free_port()
    window_s = 4.0
    config = write_config(
        tmp_path,
        port,
        receiver,
        {"name": "silent", "query": "host:secrets-manager", "absence": {"window_s": window_s}},
    )
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(config, port)
        await send(port, make_event(id="m1"))
        matched_at = time.time()
        before = await alert_state(port, "silent")
        await kill_9(proc)
        proc = await serve(config, port)
        after = await alert_state(port, "silent")
        # The window still counts from the last match, not from the restart.
        assert after["last_match_at"] == before["last_match_at"]
        assert after["watched_since"] == before["watched_since"]
        await wait_for(
            lambda: len(triggers(receiver)) == 1, timeout_s=window_s + 10, what="the trigger"
        )
        assert receiver.requests[0].at >= matched_at + window_s - 0.1
        assert triggers(receiver)[0]["requestData"]["condition"] == "absence"

        # Restarted while firing: still firing, not fired again.
        assert await terminate(proc) == 0
        proc = await serve(config, port)
        state = await alert_state(port, "silent")
        assert (state["state"], state["firings"]) == ("firing", 1)
        await wait_for(lambda: drained(port), what="nothing pending")
        assert len(triggers(receiver)) == 1
    finally:
        await reap(proc)
        await receiver.stop()
