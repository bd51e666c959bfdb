"""Rows the journal takes for a target a reload already retired (routed with the old table
just before the swap) are orphans: the journal hands them to its owner through a queue, never
by calling up into the daemon, and the daemon dead-letters them as target_removed."""

from __future__ import annotations

from pathlib import Path

from router.config import parse_config
from router.events import Event
from tests.conftest import FAST_DELIVERY, StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import assert_books_balance, everything_to, file_target, settled


async def test_rows_for_a_retired_target_are_dead_lettered_target_removed(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    keep, gone = file_target("keep", tmp_path / "keep.ndjson"), file_target("gone", tmp_path / "g")
    daemon = await start_daemon({"targets": [keep, gone], "routes": everything_to("keep", "gone")})
    running = daemon.config
    await daemon.reload(
        parse_config(
            {
                "server": {"host": "127.0.0.1", "port": 0, "workers": running.server.workers},
                "storage": {"path": running.storage.path},
                "startup": {"validate_targets": False},
                "shutdown": {"drain_timeout_s": 5},
                "delivery": FAST_DELIVERY,
                "targets": [keep],
                "routes": everything_to("keep"),
            }
        ),
        audit=False,
    )
    # What an offer routed with the old table a moment before the swap hands the journal.
    await daemon.journal.append([(Event.from_body(make_event(id="late")), {"gone": "all"})])
    letters = tmp_path / "var" / "deadletter" / "gone.ndjson"
    await wait_for(lambda: any(x["event"]["id"] == "late" for x in read_ndjson(letters)))
    letter = next(x for x in read_ndjson(letters) if x["event"]["id"] == "late")
    assert letter["reason"] == "target_removed"
    await wait_for(lambda: not daemon.journal.orphans, what="the orphan retired")
    await wait_for(lambda: settled(daemon))
    assert_books_balance(daemon)
