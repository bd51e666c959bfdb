"""Rows the journal takes for a target a reload already retired (routed with the old table
just before the swap) are orphans: the journal hands them to its owner through a queue, never
by calling up into the daemon, and the daemon dead-letters them as target_removed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from router.config import StorageConfig, parse_config
from router.events import Event
from router.journal import Entry
from router.journal.sqlite import SqliteJournal
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


async def test_an_orphans_retire_that_runs_after_its_target_came_back_leaves_it_its_backlog(
    tmp_path: Path,
) -> None:
    """The other order of the race test_races' re-added target runs (there the orphan's retire
    always takes the target's retire lock first, and the reload's add_target waits for it):
    the reload adds the target back before the orphan's retire, a task of its own, runs. The
    rows are the running target's backlog then: the retire does nothing (no dead letter, the
    target kept), and its worker is given every one of them."""
    storage = StorageConfig(path=str(tmp_path / "var"), fsync="never")
    journal = SqliteJournal(storage, ["keep", "gone"])
    await journal.open()
    dead: list[str] = []

    async def dead_letter(entries: list[Entry]) -> int:
        dead.extend(entry.event.id for entry in entries)
        return 0

    try:
        assert await journal.retire("gone", dead_letter) == 0  # the reload that removed it
        ids = [f"late-{n}" for n in range(5)]
        await journal.append([(Event.from_body(make_event(id=i)), {"gone": "all"}) for i in ids])
        assert journal.orphans == {"gone"} and journal.orphaned.get_nowait() == "gone"
        await journal.add_target("gone")
        assert await journal.retire("gone", dead_letter, orphan=True) == 0
        assert dead == [], "the re-added target's backlog dead-lettered as an orphan's"
        taken: list[str] = []
        while journal.books("gone").pending:
            batch = await journal.next_batch(
                "gone", max_events=2, max_bytes=1 << 20, max_wait_s=0, stopping=asyncio.Event()
            )
            taken += [entry.event.id for entry in batch]
            await journal.ack("gone", batch, dead_lettered=0)
        assert taken == ids
        books = journal.books("gone")
        assert (books.received, books.delivered, books.dead_lettered) == (5, 5, 0)
    finally:
        await journal.close()
