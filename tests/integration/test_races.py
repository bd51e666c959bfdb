"""Races between reload, ack, retire and shed, attacked with a real daemon, real loopback
receivers and real files: every event a target was owed reaches it or its dead letters exactly
once, and the books balance."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from router.config import parse_config
from router.daemon import Daemon
from router.events import Event
from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import (
    ReceiverFactory,
    assert_books_balance,
    everything_to,
    file_target,
    http_target,
    post,
    settled,
)
from tests.integration.test_reload import with_base


def lines(path: Path) -> Counter[str]:
    """How many times each event id is in a file target's archive."""
    return Counter(event["id"] for event in read_ndjson(path))


def letters(daemon: Daemon, target_id: str) -> Counter[str]:
    """How many times each event id is in a target's dead letters."""
    path = Path(daemon.config.storage.path) / "deadletter" / f"{target_id}.ndjson"
    return Counter(letter["event"]["id"] for letter in read_ndjson(path))


def config(daemon: Daemon, targets: list[dict[str, Any]], *ids: str) -> Any:
    return parse_config(with_base(daemon, {"targets": targets, "routes": everything_to(*ids)}))


async def test_a_target_re_added_while_its_orphans_are_retired_keeps_its_own_events(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A reload removes `gone`; rows routed to it with the old table land after its retire
    (orphans, retired on their own); a reload adds `gone` back at once. The orphans' retire
    must not take the re-added target's place in the journal: its new events reach its file,
    none dead-lettered as target_removed, and each orphan is delivered or dead-lettered once."""
    keep = file_target("keep", tmp_path / "keep.ndjson")
    gone = file_target("gone", tmp_path / "gone.ndjson")
    daemon = await start_daemon({"targets": [keep, gone], "routes": everything_to("keep", "gone")})
    await daemon.reload(config(daemon, [keep], "keep"), audit=False)
    # What offers routed with the old table a moment before the swap hand the journal: enough
    # that their retire takes a few chunks.
    orphans = [f"orphan-{n}" for n in range(2500)]
    await daemon.journal.append(
        [(Event.from_body(make_event(id=i)), {"gone": "all"}) for i in orphans]
    )
    await daemon.reload(config(daemon, [keep, gone], "keep", "gone"), audit=False)
    ids = [f"new-{n}" for n in range(200)]
    for start in range(0, len(ids), 50):
        status, _ = await post(daemon, [make_event(id=i) for i in ids[start : start + 50]])
        assert status == 202
    await wait_for(lambda: not daemon.journal.orphans, what="the orphans retired")
    await wait_for(lambda: settled(daemon), timeout_s=30)
    delivered, dead = lines(tmp_path / "gone.ndjson"), letters(daemon, "gone")
    assert {i: delivered[i] for i in ids} == dict.fromkeys(ids, 1), "new events delivered once"
    assert not set(ids) & set(dead), "no new event of the re-added target dead-lettered"
    assert Counter(delivered + dead) == Counter(orphans + ids), "each orphan settled once"
    assert lines(tmp_path / "keep.ndjson") == Counter(ids)
    assert_books_balance(daemon)


async def test_reloads_under_load_send_each_event_once_to_each_target(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    """Posters keep four requests in flight while reloads change a target's batch size,
    remove a target, add it back (also within one reload of its removal), route away from it
    and back: without a crash nothing is sent twice, so each target that was routed every
    event has each acknowledged event exactly once, and the one that came and went has each
    event it got at most once, delivered or dead-lettered."""
    siem = await receiver_factory([200])
    a = file_target("a", tmp_path / "a.ndjson")
    b = file_target("b", tmp_path / "b.ndjson")
    c = http_target("c", siem.url)
    smaller = {"batch": {"max_events": 7, "max_wait_s": 0.005}}
    daemon = await start_daemon(
        {
            "targets": [a, b, c],
            "routes": everything_to("a", "b", "c"),
            "shutdown": {"drain_timeout_s": 1},
        }
    )
    steps = [
        ([a, b, c | smaller], ("a", "b", "c")),  # c restarts with a smaller batch
        ([a, c], ("a", "c")),  # b removed: its backlog drained or dead-lettered
        ([a, b, c], ("a", "b", "c")),  # b back
        ([a | smaller, b, c], ("a", "c")),  # a restarts; b no longer routed to
        ([a, c], ("a", "c")),  # b removed ...
        ([a, b, c | smaller], ("a", "b", "c")),  # ... and back at once
        ([a, b | smaller, c], ("a", "b", "c")),
    ]
    acked: list[str] = []
    done = asyncio.Event()

    async def load(worker: int) -> None:
        n = 0
        async with aiohttp.ClientSession() as session:
            while not done.is_set():
                ids = [f"w{worker}-{n}-{i}" for i in range(10)]
                n += 1
                async with session.post(
                    f"http://127.0.0.1:{daemon.port}/v1/events",
                    data=orjson.dumps([make_event(id=i) for i in ids]),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    assert resp.status == 202
                    acked.extend(ids)

    posters = [asyncio.create_task(load(w), name=f"poster-{w}") for w in range(4)]
    try:
        for n, (targets, routed) in enumerate(steps):
            await wait_for(lambda n=n: len(acked) >= 300 * (n + 1), timeout_s=30)
            await daemon.reload(config(daemon, targets, *routed), audit=False)
    finally:
        done.set()
        await asyncio.gather(*posters)
    await wait_for(lambda: settled(daemon), timeout_s=60)
    want = Counter(acked)
    assert lines(tmp_path / "a.ndjson") == want, "a: each acknowledged event once"
    assert not letters(daemon, "a")
    assert Counter(e["id"] for e in siem.delivered_events) == want, "c: each event once"
    got_b = lines(tmp_path / "b.ndjson") + letters(daemon, "b")
    assert not [i for i, count in got_b.items() if count > 1], "b: no event twice"
    assert set(got_b) <= set(want)
    assert_books_balance(daemon)
