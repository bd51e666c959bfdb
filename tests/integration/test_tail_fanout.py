"""The tail against hostile queries: matching a round of events for many clients with large
queries runs on the event loop, so it must let the loop serve everything else meanwhile
(ingest, probes, the other clients), a slice at a time; a query narrowing a view is a query
of its own."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from router.events import Event
from router.query import parse
from router.server.tail import TailHub
from tests.conftest import StartDaemon
from tests.fakes import make_event, wait_for
from tests.helpers import everything_to, file_target


async def test_the_fan_out_lets_the_loop_run_while_it_matches_heavy_queries() -> None:
    """32 clients, each with a query of 850 terms that every event matches (~2.5 ms an
    event), and 60 events: the round took ~5 s during which the daemon answered nothing,
    not even /healthz. Now some clients have their share while the others' are still being
    matched: this test's own polling ran in between."""
    hub = TailHub()
    subscribers = [
        hub.subscribe(parse(" ".join(f"-{chr(97 + c % 26)}{c}q{i}" for i in range(850))))
        for c in range(32)
    ]
    hub.start()
    try:
        hub.publish([Event.from_body(make_event(id=f"e{i}")) for i in range(60)])
        await wait_for(lambda: any(s.pending for s in subscribers), timeout_s=60, what="a share")
        served = [s for s in subscribers if s.pending]
        assert all(len(s.pending) == 60 for s in served)
        assert len(served) < len(subscribers), "the whole round ran without letting the loop run"
        await wait_for(
            lambda: all(len(s.pending) == 60 for s in subscribers),
            timeout_s=120,
            what="every share",
        )
    finally:
        await hub.stop()


@pytest.mark.parametrize(
    ("query", "column"),
    [
        ("x:[a", 3),  # the column in what the caller typed, not in the view joined to it
        ("a) OR (b", 2),  # a query that does not parse alone is refused, view or not
    ],
)
async def test_a_query_narrowing_a_view_is_parsed_on_its_own(
    start_daemon: StartDaemon, tmp_path: Path, query: str, column: int
) -> None:
    """The view's text and the caller's were joined as `(view) (query)` and parsed together:
    a bad query's column pointed into that joined text (the console put its caret there),
    and `a) OR (b`, which is no query, was taken because the joined text balanced it."""
    daemon = await start_daemon(
        {
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": everything_to("archive"),
            "views": [{"name": "creates", "query": "action:secrets-manager.secret.create"}],
        }
    )
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{daemon.port}/v1/tail",
            params={"view": "creates", "query": query},
        ) as resp,
    ):
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "bad_query" and error["column"] == column, error
