"""What an admin token sends that the daemon must refuse with a 4xx naming the field, against
a real daemon: values that are valid JSON and valid by type but that the running daemon could
not live with (an alert window too small to count in, a URL that cannot be a URL, an address
the operator's network keeps for itself, a query too large to run per event). Each case
checks the answer and that ingest still answers 202 afterwards."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from router.daemon import Daemon
from tests.conftest import StartDaemon
from tests.fakes import make_event
from tests.helpers import ReceiverFactory, assert_books_balance, everything_to, file_target

ADMIN = "an-admin-token-for-hostile-0001"
INGEST = "an-ingest-token-for-hostile-001"


def auth() -> dict[str, Any]:
    return {
        "admin_tokens": [{"name": "ops", "sha256": hashlib.sha256(ADMIN.encode()).hexdigest()}],
        "ingest_tokens": [{"name": "sm", "sha256": hashlib.sha256(INGEST.encode()).hexdigest()}],
    }


async def call(
    daemon: Daemon, method: str, path: str, body: Any = None, token: str = ADMIN
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"http://127.0.0.1:{daemon.port}{path}",
            data=None if body is None else orjson.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        ) as resp,
    ):
        text = await resp.text()
        try:
            return resp.status, orjson.loads(text) if text else None
        except orjson.JSONDecodeError:
            return resp.status, text


def message(answer: Any) -> str:
    assert isinstance(answer, dict), answer
    return "; ".join(error["message"] for error in answer["errors"])


@pytest.fixture
async def daemon(start_daemon: StartDaemon, tmp_path: Path) -> Daemon:
    return await start_daemon(
        {
            "auth": auth(),
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": everything_to("archive"),
        }
    )


async def ingest_still_works(daemon: Daemon, event_id: str) -> None:
    status, answer = await call(daemon, "POST", "/v1/events", [make_event(id=event_id)], INGEST)
    assert status == 202, answer
    assert_books_balance(daemon)


@pytest.mark.parametrize(
    ("alert", "field"),
    [
        ({"threshold": {"count": 1, "window_s": 1e-300}}, "threshold.window_s"),
        ({"threshold": {"count": 1, "window_s": 5e-324}}, "threshold.window_s"),
        ({"absence": {"window_s": 1e-300}}, "absence.window_s"),
        ({"absence": {"window_s": 1e308}}, "absence.window_s"),
        ({"threshold": {"count": 2**60, "window_s": 60}}, "threshold.count"),
        ({"threshold": {"count": 1, "window_s": 60}, "cooldown_s": 1e308}, "cooldown_s"),
    ],
)
async def test_an_alert_window_the_daemon_cannot_count_in_is_refused_naming_the_field(
    daemon: Daemon, alert: dict[str, Any], field: str
) -> None:
    """A presence window of 1e-300 s made every accepted event (the create's own audit event
    first) fail with OverflowError in the slot arithmetic: a 500 for the create, then for
    every ingest request, after the events were journaled."""
    body = {"name": "tiny", "query": "host:secrets-manager", "target_ids": ["archive"], **alert}
    status, answer = await call(daemon, "POST", "/api/v2/alerts", body)
    assert status == 400, answer
    assert field in message(answer)
    status, listed = await call(daemon, "GET", "/api/v2/alerts")
    assert status == 200 and listed["alerts"] == []
    await ingest_still_works(daemon, "after-tiny-window")
