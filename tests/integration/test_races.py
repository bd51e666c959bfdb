"""Races between reload, ack, retire and shed, attacked with a real daemon, real loopback
receivers and real files: every event a target was owed reaches it or its dead letters exactly
once, and the books balance."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from router.config import StorageConfig, parse_config
from router.daemon import Daemon
from router.events import Event
from router.evidence.keys import generate, load_public
from router.evidence.verify import Verifier, VerifyOptions, verify_files
from router.journal import sqlite
from router.journal.sqlite import backlog as sqlite_backlog
from router.server.api import ConfigSource
from tests.conftest import StartDaemon
from tests.fakes import ScriptedReceiver, incompressible, make_event, read_ndjson, wait_for
from tests.helpers import (
    Load,
    ReceiverFactory,
    assert_books_balance,
    everything_to,
    file_target,
    free_port,
    http_target,
    journal_write_locked,
    patient,
    post,
    reap,
    settled,
    terminate,
)
from tests.integration.test_evidence import chained_file_target
from tests.integration.test_reload import with_base
from tests.integration.test_workers import (
    START_TIMEOUT_S,
    WORKERS,
    children,
    drained,
    serve,
    status_of,
    workers_config,
)


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
    async with Load(daemon.port, posters=4, strict=True) as load:
        acked = load.acked
        for n, (targets, routed) in enumerate(steps):
            await wait_for(lambda n=n: len(acked) >= 300 * (n + 1), timeout_s=30)
            await daemon.reload(config(daemon, targets, *routed), audit=False)
    await wait_for(lambda: settled(daemon), timeout_s=60)
    want = Counter(acked)
    assert lines(tmp_path / "a.ndjson") == want, "a: each acknowledged event once"
    assert not letters(daemon, "a")
    assert Counter(e["id"] for e in siem.delivered_events) == want, "c: each event once"
    got_b = lines(tmp_path / "b.ndjson") + letters(daemon, "b")
    assert not [i for i, count in got_b.items() if count > 1], "b: no event twice"
    assert set(got_b) <= set(want)
    assert_books_balance(daemon)


@pytest.mark.parametrize("moving_s", [sqlite_backlog.MOVING_S, 0.02])
async def test_a_target_down_and_back_while_memory_overflows_gets_each_event_once(
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    monkeypatch: pytest.MonkeyPatch,
    moving_s: float,
) -> None:
    """Posters outrun a target that takes batches, then refuses them, then takes them again,
    while more than its memory holds is pending: its batches come from memory, then from the
    journal for what memory lacks, then from memory again. With the "moving" window cut short
    (0.02 s) it expires again and again as batches fail and succeed, so memory is let go and
    taken up at every turn. Each acknowledged event reaches the target exactly once."""
    monkeypatch.setattr(sqlite_backlog, "MOVING_S", moving_s)
    siem = await receiver_factory([200] * 5 + [503] * 30 + [200] * 10 + [503] * 30 + [200])
    target = patient(http_target("siem", siem.url)) | {"batch": {"max_events": 300}}
    daemon = await start_daemon({"targets": [target], "routes": everything_to("siem")})
    filler = "x" * 1200
    acked: list[str] = []

    async def load(worker: int) -> None:
        async with aiohttp.ClientSession() as session:
            for n in range(40):
                ids = [f"w{worker}-{n}-{i}" for i in range(100)]
                async with session.post(
                    f"http://127.0.0.1:{daemon.port}/v1/events",
                    data=orjson.dumps([make_event(id=i, message=filler) for i in ids]),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    assert resp.status == 202
                    acked.extend(ids)

    await asyncio.gather(*(load(w) for w in range(4)))
    await wait_for(lambda: settled(daemon), timeout_s=60)
    assert Counter(e["id"] for e in siem.delivered_events) == Counter(acked)
    from_memory, from_disk = daemon.journal.batch_sources("siem")
    assert from_memory and from_disk, "both ways of taking a batch were taken"
    assert_books_balance(daemon)


@pytest.mark.parametrize("when_full", ["drop_oldest_per_target", "reject"])
async def test_a_full_journal_shedding_under_load_and_reloads_answers_truthfully(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path, when_full: str
) -> None:
    """The journal is full (storage.max_bytes small, a target down holds its backlog) while
    posters keep four requests in flight, the archive delivers and acks, and reloads restart
    the stuck target and remove and add back the archive. What was answered 2xx reaches each
    target it was routed to or its dead letters, exactly once; what was answered 503 is
    nowhere."""
    down = await receiver_factory([503])
    archive = tmp_path / "archive.ndjson"
    storage = {"path": str(tmp_path / "var"), "max_bytes": 1 << 20, "when_full": when_full}
    stuck = patient(http_target("down", down.url)) | {"batch": {"max_events": 10}}
    keep = file_target("archive", archive)
    daemon = await start_daemon(
        {"storage": storage, "targets": [stuck, keep], "routes": everything_to("down", "archive")}
    )
    acked: list[str] = []
    refused: list[str] = []
    done = asyncio.Event()

    async def load(worker: int) -> None:
        n = 0
        async with aiohttp.ClientSession() as session:
            while not done.is_set():
                ids = [f"w{worker}-{n}-{i}" for i in range(20)]
                n += 1
                async with session.post(
                    f"http://127.0.0.1:{daemon.port}/v1/events",
                    data=orjson.dumps(
                        [make_event(id=i, message=incompressible(1500)) for i in ids]
                    ),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    assert resp.status in (202, 503), resp.status
                    (acked if resp.status == 202 else refused).extend(ids)

    def reconfigure(targets: list[dict[str, Any]], *ids: str) -> Any:
        data = with_base(daemon, {"targets": targets, "routes": everything_to(*ids)})
        return parse_config(data | {"storage": storage})

    smaller = {"batch": {"max_events": 7}}
    steps = [
        ([stuck | smaller, keep], ("down", "archive")),
        ([stuck], ("down",)),
        ([stuck, keep], ("down", "archive")),
        ([stuck | smaller, keep], ("down", "archive")),
    ]
    posters = [asyncio.create_task(load(w), name=f"poster-{w}") for w in range(4)]
    try:
        await wait_for(lambda: daemon.journal.used_bytes >= 1 << 20, timeout_s=30)
        for n, (targets, routed) in enumerate(steps):
            await wait_for(lambda n=n: len(acked) + len(refused) >= 1000 * (n + 2), timeout_s=30)
            await daemon.reload(reconfigure(targets, *routed), audit=False)
    finally:
        done.set()
        await asyncio.gather(*posters)
    assert acked, "some requests were taken"
    if when_full == "reject":
        assert refused, "the full journal refused some requests"
    down.statuses = [200]
    await wait_for(lambda: settled(daemon), timeout_s=60)
    got_down = Counter(e["id"] for e in down.delivered_events) + letters(daemon, "down")
    assert got_down == Counter(acked), "down: each acknowledged event once, none refused"
    got_archive = lines(archive) + letters(daemon, "archive")
    assert not [i for i, count in got_archive.items() if count > 1], "archive: none twice"
    assert set(got_archive) <= set(acked), "archive: nothing refused"
    assert_books_balance(daemon)


async def test_sighups_while_workers_are_killed_lose_and_repeat_nothing(tmp_path: Path) -> None:
    """server.workers 2 under load: each round removes or adds back a target by SIGHUP and
    kills a worker with SIGKILL at once (the worker mid-request, its hand-offs routed with the
    table of either side of the reload). The archive, routed everything throughout, has every
    acknowledged event exactly once; the target that comes and goes has each event at most
    once, delivered or dead-lettered; the books balance across the restarts."""
    port = free_port()
    path = workers_config(tmp_path, port)
    base = yaml.safe_load(path.read_text())
    archive, extra = tmp_path / "var" / "archive.ndjson", tmp_path / "extra.ndjson"

    def write(with_extra: bool) -> None:
        targets = [file_target("archive", archive)]
        if with_extra:
            targets.append(file_target("extra", extra))
        routes = everything_to(*(t["id"] for t in targets))
        path.write_text(yaml.safe_dump({**base, "targets": targets, "routes": routes}))

    write(True)
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(path, port)
        load = Load(port, through_restarts=True)
        acked = load.acked
        for n in range(4):
            await wait_for(lambda n=n: len(acked) >= 300 * (n + 1), timeout_s=START_TIMEOUT_S)
            with_extra = n % 2 == 1
            write(with_extra)
            victim = min(children(proc.pid))
            proc.send_signal(signal.SIGHUP)
            os.kill(victim, signal.SIGKILL)

            async def applied(with_extra: bool = with_extra) -> bool:
                try:  # a connection the killed worker had taken fails: ask again
                    status = await status_of(port)
                except aiohttp.ClientError:
                    return False
                return ("extra" in status["targets"]) == with_extra

            await wait_for(applied, timeout_s=START_TIMEOUT_S, what="the reload applied")
            await wait_for(
                lambda victim=victim: (
                    len(children(proc.pid)) == WORKERS and victim not in children(proc.pid)
                ),
                timeout_s=START_TIMEOUT_S,
                what="a worker started in place of the killed one",
            )
        await load.stop()
        await wait_for(lambda: drained(port), timeout_s=START_TIMEOUT_S, what="the drain")
        status = await status_of(port)
        for target_id, row in status["targets"].items():
            assert row["received"] == row["delivered"] + row["dead_lettered"] + row["pending"], (
                target_id,
                row,
            )
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
    archived = lines(archive)
    assert set(acked) <= set(archived), f"{len(set(acked) - set(archived))} acknowledged lost"
    assert not [i for i, count in archived.items() if count > 1], "archive: nothing twice"
    letters_path = tmp_path / "var" / "deadletter" / "extra.ndjson"
    got_extra = lines(extra) + Counter(x["event"]["id"] for x in read_ndjson(letters_path))
    assert not [i for i, count in got_extra.items() if count > 1], "extra: nothing twice"
    assert set(got_extra) <= set(archived)


async def test_a_reload_fixing_a_down_targets_url_restarts_it_without_a_drain(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    """A target whose URL is wrong (its receiver answers 503, retried for an hour) holds a
    backlog; a reload changes its URL. A changed target restarts and keeps its backlog: the
    reload does not wait shutdown.drain_timeout_s (an hour here) for the old worker to drain
    into the wrong URL. Its batch in flight is not cut short mid-attempt either: each event
    reaches the new URL once."""
    wrong, right = await receiver_factory([503]), await receiver_factory([200])
    siem = patient(http_target("siem", wrong.url))
    daemon = await start_daemon(
        {"targets": [siem], "routes": everything_to("siem"), "shutdown": {"drain_timeout_s": 3600}}
    )
    ids = [f"e{n}" for n in range(30)]
    status, _ = await post(daemon, [make_event(id=i) for i in ids])
    assert status == 202
    await wait_for(lambda: len(wrong.requests) >= 3, what="the wrong URL tried")
    fixed = patient(http_target("siem", right.url))
    reload = asyncio.create_task(daemon.reload(config(daemon, [fixed], "siem"), audit=False))
    await wait_for(reload.done, timeout_s=30, what="the reload to restart the target")
    await reload
    await wait_for(lambda: settled(daemon))
    assert Counter(e["id"] for e in right.delivered_events) == Counter(ids)
    assert_books_balance(daemon)


async def test_a_chained_archive_restarted_by_reloads_under_load_verifies_with_no_resend(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Evidence on: a chained, signed file target is restarted by five reloads (its batch
    size changing) while posters keep four requests in flight; each restart checkpoints the
    chain and the new worker goes on from it. `verify` finds an intact chain with every
    acknowledged event once and nothing re-sent."""
    key, public = generate(tmp_path / "signing.key")
    archive = tmp_path / "archive" / "us.ndjson"
    us = chained_file_target(archive)
    evidence = {"signing_key_file": str(key), "checkpoint_every_events": 50}
    daemon = await start_daemon(
        {"targets": [us], "routes": everything_to("us"), "evidence": evidence}
    )
    async with Load(daemon.port, posters=4, strict=True) as load:
        acked = load.acked
        for n in range(5):
            await wait_for(lambda n=n: len(acked) >= 300 * (n + 1), timeout_s=30)
            batch = {"batch": {"max_events": 3 + n, "max_wait_s": 0.005}}
            data = with_base(daemon, {"targets": [us | batch], "routes": everything_to("us")})
            await daemon.reload(parse_config(data | {"evidence": evidence}), audit=False)
    await wait_for(lambda: settled(daemon), timeout_s=60)
    assert_books_balance(daemon)
    await daemon.stop()
    assert lines(archive) == Counter(acked)
    report = verify_files(
        sorted(archive.parent.glob("us.ndjson*")),
        Verifier(VerifyOptions(public_key=load_public(public))),
    )
    assert report.ok, report.broken
    assert (report.events, report.resent, report.dead_letters) == (len(acked), 0, 0)


async def test_an_ack_that_comes_twice_counts_once_in_the_books_it_shows(tmp_path: Path) -> None:
    """The journal's books in memory (what /v1/status shows) follow its database: an ack of a
    batch that was settled already (the same seqs again) moves neither."""
    storage = StorageConfig(path=str(tmp_path / "var"), fsync="never")
    journal = sqlite.SqliteJournal(storage, ["t"])
    await journal.open()
    try:
        await journal.append(
            [(Event.from_body(make_event(id=f"e{n}")), {"t": "all"}) for n in range(10)]
        )
        stopping = asyncio.Event()
        take = {"max_events": 4, "max_bytes": 1 << 20, "max_wait_s": 0, "stopping": stopping}
        first = await journal.next_batch("t", **take)
        await journal.ack("t", first, dead_lettered=0)
        second = await journal.next_batch("t", **take)
        await journal.ack("t", second, dead_lettered=1)
        await journal.ack("t", second, dead_lettered=1)  # the same seqs again
        await journal.ack("t", first, dead_lettered=0)  # and an older batch
        shown = journal.books("t")
    finally:
        await journal.close()
    reopened = sqlite.SqliteJournal(storage, ["t"])
    await reopened.open()
    try:
        stored = reopened.books("t")
    finally:
        await reopened.close()
    assert (stored.received, stored.delivered, stored.dead_lettered, stored.pending) == (
        10,
        7,
        1,
        2,
    )
    assert (shown.received, shown.delivered, shown.dead_lettered, shown.pending) == (
        stored.received,
        stored.delivered,
        stored.dead_lettered,
        stored.pending,
    )


async def test_a_stop_during_a_reload_lets_the_reload_finish_first(
    receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    """SIGTERM while a reload drains a removed target (down) and is about to start a new one:
    the stop waits for the reload, so the removed target's backlog is dead-lettered once, the
    new target's worker is stopped with the others (none left running on a closed journal),
    and the next start finds the books balanced and nothing to redo."""
    down = await receiver_factory([503])
    a = file_target("a", tmp_path / "a.ndjson")
    data = {
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "shutdown": {"drain_timeout_s": 1},
        "targets": [a, patient(http_target("down", down.url))],
        "routes": everything_to("a", "down"),
    }
    daemon = Daemon(parse_config(data), ConfigSource(None, data))
    await daemon.start()
    ids = [f"e{n}" for n in range(50)]
    status, _ = await post(daemon, [make_event(id=i) for i in ids])
    assert status == 202
    await wait_for(lambda: len(down.requests) >= 2, what="the down target tried")
    b = file_target("b", tmp_path / "b.ndjson")
    new = data | {"targets": [a, b], "routes": everything_to("a", "b")}
    reload = asyncio.create_task(daemon.reload(parse_config(new), audit=False))
    await wait_for(lambda: "b" in {t.id for t in daemon.config.targets}, what="the swap")
    await daemon.stop()
    assert reload.done()
    plan = await reload
    assert plan.removed == ("down",) and plan.added == ("b",)
    running = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("deliver:")]
    assert not running, f"delivery workers left running after the stop: {running}"
    again = Daemon(parse_config(new), ConfigSource(None, new))
    await again.start()
    try:
        assert not again.journal.orphans, "the removed target's backlog was retired before"
        await wait_for(lambda: settled(again))
        assert_books_balance(again)
    finally:
        await again.stop()
    assert letters(again, "down") == Counter(ids)
    assert lines(tmp_path / "a.ndjson") == Counter(ids)


async def test_the_owner_killed_during_a_sighup_loses_no_acknowledged_event(
    tmp_path: Path,
) -> None:
    """server.workers 2 under load: a SIGHUP removes a target with a backlog (its receiver is
    down) and the journal owner is killed with SIGKILL while that reload drains or retires it.
    Started again with the new config, the daemon retires what was still owed to the removed
    target (dead letters), the archive has every acknowledged event (at most the batch in
    flight twice, the at-least-once of a crash), and the books balance."""
    down = await ScriptedReceiver(statuses=[503]).start()
    port = free_port()
    path = workers_config(tmp_path, port, shutdown={"drain_timeout_s": 5})
    base = yaml.safe_load(path.read_text())
    archive = tmp_path / "var" / "archive.ndjson"
    retry = {"max_attempts": 100_000, "max_age_s": 3600, "max_backoff_s": 0.05}
    stuck = http_target("down", down.url) | {"retry": retry}

    def write(with_down: bool) -> None:
        targets = [file_target("archive", archive), *([stuck] if with_down else [])]
        routes = everything_to(*(t["id"] for t in targets))
        path.write_text(yaml.safe_dump({**base, "targets": targets, "routes": routes}))

    write(True)
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(path, port)
        load = Load(port, through_restarts=True)
        acked = load.acked
        await wait_for(lambda: len(acked) >= 500, timeout_s=START_TIMEOUT_S)
        write(False)
        tried = len(down.requests)
        proc.send_signal(signal.SIGHUP)
        # The reload drains the removed target for 5 s: killed while it still tries.
        await wait_for(lambda: len(down.requests) >= tried + 3, what="the removed target tried")
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        await load.stop()
        proc = await serve(path, port)
        await wait_for(lambda: drained(port), timeout_s=START_TIMEOUT_S, what="the drain")
        status = await status_of(port)
        assert list(status["targets"]) == ["archive"]
        row = status["targets"]["archive"]
        assert row["received"] == row["delivered"] + row["dead_lettered"] + row["pending"]
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
        await down.stop()
    archived = lines(archive)
    assert set(acked) <= set(archived), f"{len(set(acked) - set(archived))} acknowledged lost"
    assert sum(count - 1 for count in archived.values()) <= 2000, "more than a batch twice"
    letters_path = tmp_path / "var" / "deadletter" / "down.ndjson"
    dead = Counter(x["event"]["id"] for x in read_ndjson(letters_path))
    assert dead, "the removed target's backlog was dead-lettered"
    assert set(dead) <= set(archived), "every event owed to it was routed to the archive too"


@pytest.mark.parametrize("reload_does", ["remove", "change"])
async def test_a_batch_delivered_whose_ack_fails_at_the_drain_timeout_is_not_sent_or_letter_again(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path, reload_does: str
) -> None:
    """A batch the target took, whose ack cannot be recorded (the journal's write lock held
    longer than SQLite's busy timeout, 5 s) when a reload stops the worker at the drain
    timeout (2 s): the removed target does not dead-letter it as target_removed, and the
    changed one does not send it again. Its outcome is recorded once the journal can take it:
    delivered, in the books."""
    siem = await receiver_factory([503])
    target = patient(http_target("siem", siem.url))
    keep = file_target("keep", tmp_path / "keep.ndjson")
    daemon = await start_daemon(
        {
            "targets": [target, keep],
            "routes": everything_to("siem", "keep"),
            "shutdown": {"drain_timeout_s": 2},
        }
    )
    ids = [f"e{n}" for n in range(5)]
    status, _ = await post(daemon, [make_event(id=i) for i in ids])
    assert status == 202
    await wait_for(lambda: len(siem.requests) >= 1, what="the batch tried")
    keep_row = lambda: daemon.status()["targets"]["keep"]  # noqa: E731
    await wait_for(lambda: keep_row()["pending"] == 0, what="the other target's share")
    if reload_does == "remove":
        new = config(daemon, [keep], "keep")
    else:
        new = config(daemon, [target | {"batch": {"max_events": 50}}, keep], "siem", "keep")
    with journal_write_locked(tmp_path / "var"):
        siem.statuses = [200]
        await wait_for(lambda: len(siem.delivered_events) == len(ids), what="the delivery")
        reload = asyncio.create_task(daemon.reload(new, audit=False), name="reload")
        # The ack waits for the lock for SQLite's busy timeout, then fails: only then is the
        # lock let go.
        await wait_for(lambda: not daemon.journal.healthy, timeout_s=30, what="the ack to fail")
    await reload
    await wait_for(lambda: settled(daemon), timeout_s=30)
    assert Counter(e["id"] for e in siem.delivered_events) == Counter(ids), "delivered once"
    assert not letters(daemon, "siem"), "nothing delivered is dead-lettered"
    if reload_does == "change":
        row = daemon.status()["targets"]["siem"]
        assert (row["received"], row["delivered"], row["dead_lettered"]) == (5, 5, 0)
    assert_books_balance(daemon)
