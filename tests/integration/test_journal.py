"""The durable journal: restarts, removed targets, a full journal, corrupt records and files."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import shutil
import sqlite3
import struct
import sys
import threading
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml

from router.config import StorageConfig
from router.daemon import Daemon
from router.events import Event
from router.journal import Entry
from router.journal import sqlite as sqlite_journal
from router.journal.salvage import (
    COVERED,
    DEFAULT_BOUND,
    PACKED,
    RECORD,
    frame,
    frame_offsets,
    pack,
    record_at,
    unpack,
)
from router.journal.sqlite import FREE_BYTES_BEFORE_SHRINK, SqliteJournal
from router.journal.sqlite import backlog as sqlite_backlog
from router.journal.sqlite import commit as sqlite_commit
from router.journal.sqlite import database as sqlite_database
from router.journal.sqlite import migrate as sqlite_migrate
from router.journal.sqlite import space as sqlite_space
from tests.conftest import StartDaemon
from tests.fakes import ScriptedReceiver, incompressible, make_event, read_ndjson, wait_for
from tests.helpers import (
    assert_books_balance,
    everything_to,
    file_target,
    free_port,
    http_target,
    journal_write_locked,
    overwrite_root_page,
    patient,
    post,
    reap,
    serve,
    settled,
    spawn,
    terminate,
)

ReceiverFactory = Callable[..., Awaitable[ScriptedReceiver]]


def damage(path: Path) -> None:
    """Garbage over two pages in the middle of the file (the events b-tree lives there)."""
    with sqlite3.connect(path) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2 // page_size * page_size)
        f.write(b"\xff" * 2 * page_size)


def tamper_record(path: Path, seq: int, body: bytes) -> float:
    """Put other bytes in the body of record `seq` in its batch, keeping its CRC (which then
    fails); returns the record's arrival time."""
    with sqlite3.connect(path) as db:
        [(first, last, stored)] = db.execute(
            "SELECT first_seq, last_seq, records FROM batches WHERE first_seq <= ? "
            "ORDER BY first_seq DESC LIMIT 1",
            (seq,),
        )
        blob = unpack(stored, DEFAULT_BOUND.of(first, last))
        records = [record_at(blob, at) for at in frame_offsets(blob, first, last).values()]
        [received_at] = [r[2] for r in records if r[0] == seq]
        tampered = [(s, i, at, body if s == seq else b, crc) for s, i, at, b, crc in records]
        db.execute("UPDATE batches SET records = ? WHERE first_seq = ?", (frame(tampered), first))
    return received_at


async def test_pending_events_survive_a_restart_and_the_books_too(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    siem = await receiver_factory([503])
    config = {
        "targets": [patient(http_target("siem", siem.url))],
        "routes": everything_to("siem"),
        "shutdown": {"drain_timeout_s": 0.2},
    }
    first = await start_daemon(config)
    _, body = await post(first, [make_event() for _ in range(5)])
    ids = [r["id"] for r in body["results"]]
    await wait_for(lambda: len(siem.requests) >= 1)
    await first.stop()
    assert first.status()["targets"]["siem"]["pending"] == 5

    siem.statuses = [200]
    second = await start_daemon(config)
    await wait_for(lambda: settled(second))
    assert [e["id"] for e in siem.delivered_events] == ids
    row = second.status()["targets"]["siem"]
    assert (row["received"], row["delivered"], row["dead_lettered"]) == (5, 5, 0)
    assert_books_balance(second)


async def test_the_stop_line_says_which_counts_are_this_runs_and_which_all_time(
    start_daemon: StartDaemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.daemon")
    archive = tmp_path / "archive.ndjson"
    config = {"targets": [file_target("archive", archive)], "routes": everything_to("archive")}
    for run, count in enumerate((3, 2)):
        daemon = await start_daemon(config)
        await post(daemon, [make_event() for _ in range(count)])
        await wait_for(lambda d=daemon: settled(d))
        caplog.clear()
        await daemon.stop()
        [line] = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
        assert f"this run: accepted {count} events" in line
        total = 3 + 2 * run
        assert f"all-time (the journal's books): {total} received, {total} delivered" in line


async def test_a_target_removed_from_the_config_has_its_backlog_dead_lettered(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    siem = await receiver_factory([503])
    archive = tmp_path / "archive.ndjson"
    first = await start_daemon(
        {
            "targets": [patient(http_target("siem", siem.url)), file_target("archive", archive)],
            "routes": everything_to("siem", "archive"),
            "shutdown": {"drain_timeout_s": 0.2},
        }
    )
    await post(first, [make_event(id=f"e{i}") for i in range(3)])
    await wait_for(lambda: len(read_ndjson(archive)) == 3)
    await first.stop()

    second = await start_daemon(
        {"targets": [file_target("archive", archive)], "routes": everything_to("archive")}
    )
    letters = read_ndjson(tmp_path / "var" / "deadletter" / "siem.ndjson")
    assert [letter["event"]["id"] for letter in letters] == ["e0", "e1", "e2"]
    assert {letter["reason"] for letter in letters} == {"target_removed"}
    assert {letter["route"] for letter in letters} == {"all"}
    # The removed target's backlog no longer pins the journal: new events flow and are reclaimed.
    await post(second, make_event(id="after"))
    await wait_for(lambda: settled(second))
    assert [e["id"] for e in read_ndjson(archive)] == ["e0", "e1", "e2", "after"]
    with sqlite3.connect(tmp_path / "var" / "journal.db") as db:
        assert db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0


async def test_a_full_journal_answers_503_then_resumes_when_the_target_drains(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    siem = await receiver_factory([503])
    daemon = await start_daemon(
        {
            "storage": {"path": str(tmp_path / "var"), "max_bytes": 512 * 1024},
            "targets": [patient(http_target("siem", siem.url))],
            "routes": everything_to("siem"),
            "shutdown": {"drain_timeout_s": 0.2},
        }
    )
    accepted: list[str] = []
    refused = None
    for _ in range(200):
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{daemon.port}/v1/events",
                json=[make_event() for _ in range(10)],
            ) as resp,
        ):
            if resp.status == 503:
                refused = resp
                answer = await resp.json()
                break
            assert resp.status == 202
            accepted += [r["id"] for r in (await resp.json())["results"]]
    assert refused is not None, "the journal never filled"
    assert refused.headers["Retry-After"] == "5"
    assert answer["error"]["code"] == "journal_full"
    assert daemon.status()["ingest"]["journal_full"] == 1

    siem.statuses = [200]
    await wait_for(lambda: settled(daemon), what="the backlog to drain")
    assert [e["id"] for e in siem.delivered_events] == accepted
    status, _ = await post(daemon, make_event(id="after-drain"))
    assert status == 202
    await wait_for(lambda: settled(daemon))
    assert siem.delivered_events[-1]["id"] == "after-drain"
    assert_books_balance(daemon)


async def test_a_record_failing_its_checksum_is_dead_lettered_and_the_rest_delivered(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    siem = await receiver_factory([503])
    # One event per batch: every read takes the rows after it too, so the damaged record is
    # read (and must be counted) more than once.
    one_per_batch = {"batch": {"max_bytes": 1024}}
    config = {
        "targets": [patient(http_target("siem", siem.url)) | one_per_batch],
        "routes": everything_to("siem"),
        "shutdown": {"drain_timeout_s": 0.2},
    }
    first = await start_daemon(config)
    await post(first, [make_event(id=f"e{i}") for i in range(4)])
    await first.stop()
    tamper_record(tmp_path / "var" / "journal.db", 2, b'{"tampered": true}')

    siem.statuses = [200]
    second = await start_daemon(config)
    await wait_for(lambda: settled(second))
    assert [e["id"] for e in siem.delivered_events] == ["e0", "e2", "e3"]
    [letter] = read_ndjson(tmp_path / "var" / "deadletter" / "siem.ndjson")
    assert letter["reason"] == "journal_corrupt"
    assert letter["event"]["journal_seq"] == 2
    # Its header survived, but a record that fails its CRC is not vouched for by it (its seq
    # or id may be what was damaged): the letter says where the record lies, no byte of it.
    assert "id" not in letter["event"] and "raw_excerpt" not in letter["event"]
    assert letter["event"]["journal_frame"] == 1
    assert letter["event"]["raw_length"] == RECORD.size + len(b"e1") + len(b'{"tampered": true}')
    assert second.status()["journal"]["quarantined_records"] == 1
    row = second.status()["targets"]["siem"]
    assert (row["received"], row["delivered"], row["dead_lettered"]) == (4, 3, 1)


async def test_a_damaged_journal_file_is_quarantined_and_intact_records_delivered(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    siem = await receiver_factory([503])
    config = {
        "targets": [patient(http_target("siem", siem.url))],
        "routes": everything_to("siem"),
        "shutdown": {"drain_timeout_s": 0.2},
    }
    first = await start_daemon(config)
    # Several pages of events, so damage hits some and spares others (bytes deflate cannot
    # shrink: the journal packs these frames).
    for i in range(20):
        await post(
            first, [make_event(id=f"e{i}-{j}", message=incompressible(3000)) for j in range(10)]
        )
    await first.stop()
    damage(tmp_path / "var" / "journal.db")

    siem.statuses = [200]
    second = await start_daemon(config)
    assert second.ready
    quarantined = list((tmp_path / "var").glob("journal.db.corrupt-*"))
    assert quarantined, "the damaged file is kept aside for inspection"
    await wait_for(lambda: settled(second), what="the intact records to be delivered")
    delivered = {e["id"] for e in siem.delivered_events}
    letters = read_ndjson(tmp_path / "var" / "deadletter" / "siem.ndjson")
    assert 0 < len(delivered) < 200
    # Every event is accounted for exactly: delivered, dead-lettered as corrupt (counted once
    # each as quarantined), or in pages the salvage could not read at all (counted as lost).
    status = second.status()
    assert status["journal"]["quarantined_records"] == len(letters)
    assert status["journal"]["lost_records"] >= 1
    assert len(delivered) + len(letters) + status["journal"]["lost_records"] == 200
    assert {letter["reason"] for letter in letters} <= {"journal_corrupt"}
    # No letter holds a byte of a record that failed its CRC: where it lies, its length, its hash.
    assert all(letter["event"].keys() >= {"journal_seq", "raw_sha256"} for letter in letters)
    assert not any("raw_excerpt" in letter["event"] for letter in letters)
    assert_books_balance(second)


async def test_each_fsync_mode_sets_the_journals_sync_level_and_delivers(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """`storage.fsync` reaches the journal: always syncs every commit (FULL), interval syncs
    the WAL on a timer of its own (NORMAL, plus a checkpoint task), never leaves it to the OS
    (OFF); and every mode still delivers what it took."""
    sync_level = {"always": 2, "interval": 1, "never": 0}  # PRAGMA synchronous values
    for mode in ("always", "interval", "never"):
        path = tmp_path / f"{mode}.ndjson"
        daemon: Daemon = await start_daemon(
            {
                "storage": {"path": str(tmp_path / mode), "fsync": mode, "fsync_interval_ms": 50},
                "targets": [file_target("archive", path)],
                "routes": everything_to("archive"),
            }
        )
        journal = daemon.journal
        level = await journal._run(
            lambda j=journal: j._db.execute("PRAGMA synchronous").fetchone()[0]
        )
        assert level == sync_level[mode], mode
        assert (journal._interval_syncer is not None) == (mode == "interval"), mode
        await post(daemon, [make_event() for _ in range(3)])
        await wait_for(lambda p=path: len(read_ndjson(p)) == 3)
        await daemon.stop()


async def test_a_drained_backlog_gives_its_disk_space_back(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    siem = await receiver_factory([503])
    daemon = await start_daemon(
        {"targets": [patient(http_target("siem", siem.url))], "routes": everything_to("siem")}
    )
    for _ in range(50):  # bytes deflate hardly shrinks (random base64): frames are packed
        await post(daemon, [make_event(message=incompressible(5000)) for _ in range(125)])
    full = daemon.status()["journal"]["used_bytes"]
    assert full > 20_000_000
    siem.statuses = [200]
    await wait_for(lambda: settled(daemon), timeout_s=30)
    journal = tmp_path / "var" / "journal.db"
    with sqlite3.connect(journal) as db:
        free_pages = db.execute("PRAGMA freelist_count").fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    assert daemon.status()["journal"]["used_bytes"] < full // 10
    # Without giving space back the whole backlog (over 20 MB) would stay on the freelist.
    assert full > FREE_BYTES_BEFORE_SHRINK * 5 // 4
    assert free_pages * page_size <= FREE_BYTES_BEFORE_SHRINK, "freed pages were given back"


async def test_a_backlog_keeps_its_free_pages_for_the_next_commits_and_drained_gives_all_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages an ack frees while the journal still holds a backlog of about their size stay in
    the file for the next commits to reuse: giving them back a step at a time cost about 8 us
    of CPU per page, most of an ack, and the file grew back at once. Once the backlog has
    drained, the file is rebuilt to what it still holds. Every event is taken once, in order,
    and the books balance."""
    monkeypatch.setattr(sqlite_database, "PAGE_BYTES", 4096)
    monkeypatch.setattr(sqlite_space, "FREE_BYTES_BEFORE_SHRINK", 64 * 4096)
    monkeypatch.setattr(sqlite_space, "REBUILD_MAX_USED_BYTES", 48 * 4096)
    journal = SqliteJournal(StorageConfig(path=str(tmp_path / "var"), fsync="never"), ["t"])
    await journal.open()
    stopping = asyncio.Event()
    ids: list[str] = []
    taken: list[str] = []

    async def append(count: int) -> None:
        events = [Event.from_body(make_event(message=incompressible(6000))) for _ in range(count)]
        ids.extend(event.id for event in events)
        await journal.append([(event, {"t": "all"}) for event in events])

    async def settle(count: int) -> None:
        batch = await journal.next_batch(
            "t", max_events=count, max_bytes=1 << 24, max_wait_s=0, stopping=stopping
        )
        taken.extend(entry.event.id for entry in batch)
        await journal.ack("t", batch, dead_lettered=0)

    def pages() -> tuple[int, int]:
        assert journal._db is not None
        page_count, free = journal._db.execute(
            "SELECT * FROM pragma_page_count(), pragma_freelist_count()"
        ).fetchone()
        return int(page_count), int(free)

    try:
        for _ in range(4):
            await append(50)
        full, _ = await journal._run(pages)
        await settle(120)
        size, free = await journal._run(pages)
        assert free > 64 and size == full, "a backlog of about its size left: pages kept"
        await append(50)
        assert (await journal._run(pages))[0] <= full + 8, "the next commit took the free pages"
        while journal.books("t").pending:
            await settle(60)
        size, free = await journal._run(pages)
        assert free <= 64 and size - free <= 48, f"drained: given back ({size} pages, {free} free)"
        assert size < full // 4
        assert taken == ids
        books = journal.books("t")
        assert books.received == books.delivered + books.pending == len(ids)
    finally:
        await journal.close()


async def test_drop_oldest_per_target_dead_letters_the_oldest_when_full(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    down = await receiver_factory([503])
    archive = tmp_path / "archive.ndjson"
    max_bytes = 1024 * 1024
    daemon = await start_daemon(
        {
            "storage": {
                "path": str(tmp_path / "var"),
                "max_bytes": max_bytes,
                "when_full": "drop_oldest_per_target",
            },
            "targets": [
                # Batches in flight are never dropped; small ones leave the room to shed.
                patient(http_target("down", down.url)) | {"batch": {"max_events": 10}},
                file_target("archive", archive) | {"batch": {"max_events": 50}},
            ],
            "routes": everything_to("down", "archive"),
            "shutdown": {"drain_timeout_s": 0.2},
        }
    )
    posted: list[str] = []
    for n in range(100):
        ids = [f"e{n}-{i}" for i in range(20)]
        events = [make_event(id=i, message=incompressible(1500)) for i in ids]
        status, _ = await post(daemon, events)
        assert status == 202, "drop_oldest_per_target does not refuse ingest"
        posted += ids
    assert daemon.status()["ingest"]["dropped_buffer_full"] > 0
    assert daemon.status()["journal"]["used_bytes"] <= max_bytes + 65536
    await wait_for(lambda: daemon.journal.books("archive").pending == 0)

    def letters(target_id: str) -> list[str]:
        rows = read_ndjson(tmp_path / "var" / "deadletter" / f"{target_id}.ndjson")
        assert {row["reason"] for row in rows} <= {"dropped_buffer_full"}
        return [row["event"]["id"] for row in rows]

    # The stuck target lost its oldest events to dead letters, in order, but never the batch
    # its worker holds (it keeps retrying e0-0 .. e0-9 against the 503s).
    dropped = letters("down")
    assert dropped and dropped == posted[10 : 10 + len(dropped)]
    # Nothing vanished: every event is delivered, dead-lettered or still pending, per target.
    archived = [e["id"] for e in read_ndjson(archive)]
    assert sorted(archived + letters("archive")) == sorted(posted)
    assert daemon.status()["targets"]["down"]["pending"] == len(posted) - len(dropped)
    assert_books_balance(daemon)


def serve_config(tmp_path: Path, name: str, port: int, storage: Path) -> Path:
    """A config for a real `serve` process; configs that share `storage` differ only in port."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "storage": {"path": str(storage)},
                "startup": {"validate_targets": False},
                "targets": [file_target("archive", storage / "archive.ndjson")],
                "routes": everything_to("archive"),
            }
        )
    )
    return path


async def test_a_journal_carries_its_format_and_one_from_a_newer_router_is_not_opened(
    tmp_path: Path,
) -> None:
    """Journal frames may be stored packed (salvage.pack) since format 2: a router that does
    not know them would take every packed frame for damage and dead-letter its events as
    journal_corrupt, without their bodies. So the journal says its format (SQLite's
    user_version), an older one is brought up to date on open, and a daemon refuses, exit 2,
    to open one newer than it knows, naming both formats and touching nothing."""
    storage = tmp_path / "var"
    journal = SqliteJournal(StorageConfig(path=str(storage), fsync="never"), ["archive"])
    await journal.open()
    await journal.close()
    path = storage / sqlite_journal.DB_NAME

    def set_format(found: int, to: int) -> None:
        with contextlib.closing(sqlite3.connect(path)) as db:  # the last close checkpoints
            assert db.execute("PRAGMA user_version").fetchone()[0] == found
            db.execute(f"PRAGMA user_version = {to}")

    set_format(sqlite_journal.FORMAT, 0)  # as every journal before format 2
    journal = SqliteJournal(StorageConfig(path=str(storage), fsync="never"), ["archive"])
    await journal.open()
    await journal.close()
    set_format(sqlite_journal.FORMAT, sqlite_journal.FORMAT + 1)
    before = path.read_bytes()
    port = free_port()
    proc = await spawn(
        serve_config(tmp_path, "router", port, storage), stderr=asyncio.subprocess.PIPE
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await reap(proc)  # a daemon that opened the journal after all does not outlive the test
    message = stderr.decode()
    assert proc.returncode == 2, message
    assert str(path) in message, message
    assert f"format {sqlite_journal.FORMAT + 1}" in message, message
    assert f"up to format {sqlite_journal.FORMAT}" in message, message
    assert path.read_bytes() == before
    assert not list(storage.glob("*.corrupt-*")), "a newer journal is not damage"


async def test_a_second_daemon_on_the_same_storage_path_exits_2_naming_the_holder(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "var"
    first_port, second_port = free_port(), free_port()
    first_config = serve_config(tmp_path, "first", first_port, storage)
    second_config = serve_config(tmp_path, "second", second_port, storage)
    first: asyncio.subprocess.Process | None = None
    second: asyncio.subprocess.Process | None = None
    try:
        first = await serve(first_config, first_port)
        second = await spawn(second_config, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(second.communicate(), 30)
        message = stderr.decode()
        assert second.returncode == 2, message
        assert str(storage) in message
        assert f"pid {first.pid}" in message
        # `check` reads the config only: the running daemon does not stand in its way.
        check = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router", "check", "--config", str(second_config)
        )
        assert await check.wait() == 0
        # The first daemon still owns the journal and keeps its promise.
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{first_port}/v1/events", json=[make_event(id="solo")]
            ) as resp,
        ):
            assert resp.status == 202
        await wait_for(
            lambda: [e["id"] for e in read_ndjson(storage / "archive.ndjson")] == ["solo"]
        )
        assert await terminate(first) == 0
        # Once the holder is gone the lock goes with it: the other config can start.
        second = await serve(second_config, second_port)
        assert await terminate(second) == 0
    finally:
        await reap(first)
        await reap(second)


async def test_a_truncated_journal_recovers_every_surviving_record_and_counts_the_rest_lost(
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    siem = await receiver_factory([200])
    config = {
        "targets": [patient(http_target("siem", siem.url))],
        "routes": everything_to("siem"),
        "shutdown": {"drain_timeout_s": 0.2},
    }
    first = await start_daemon(config)
    # Delivered first: their rows are deleted and their pages reused, and must not come back.
    delivered_first = {f"d{i}" for i in range(300)}
    await post(first, [make_event(id=i) for i in sorted(delivered_first)])
    await wait_for(lambda: settled(first))
    siem.statuses = [503]
    posted: set[str] = set()
    for n in range(20):
        ids = [f"e{n}-{i}" for i in range(100)]
        await post(first, [make_event(id=i) for i in ids])
        posted.update(ids)
    await first.stop()
    journal = tmp_path / "var" / "journal.db"
    os.truncate(journal, journal.stat().st_size // 2)

    second = await start_daemon(config)
    row = second.status()["targets"]["siem"]
    recovered, lost = row["pending"], row["lost"]
    print(f"truncated to half: {recovered} of 2000 recovered, {lost} lost")
    assert recovered > 0 and lost > 0
    assert (row["received"], row["delivered"]) == (2300, 300)
    assert row["received"] == row["delivered"] + row["dead_lettered"] + recovered + lost
    assert second.status()["journal"]["lost_records"] == lost
    assert any(
        record.levelname == "ERROR" and f"{lost} lost" in record.getMessage()
        for record in caplog.records
    ), "the loss is reported in an ERROR line with its count"
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{second.port}/metrics") as resp,
    ):
        assert f"event_router_journal_lost_records_total {float(lost)}" in await resp.text()
    for suffix in ("", "-wal", "-shm"):
        mode = journal.with_name(journal.name + suffix).stat().st_mode & 0o777
        assert mode == 0o600, f"journal.db{suffix} is {mode:o} after the salvage"

    before = len(siem.requests)
    siem.statuses = [200]
    await wait_for(lambda: settled(second), what="the recovered events to be delivered")
    arrived = [e["id"] for r in siem.requests[before:] if r.status == 200 for e in r.body]
    assert len(set(arrived)) == recovered, "every recovered event reaches the target"
    assert set(arrived) <= posted, "no event delivered before the truncation came back"
    row = second.status()["targets"]["siem"]
    assert (row["delivered"], row["pending"], row["lost"]) == (300 + recovered, 0, lost)
    assert_books_balance(second)


async def test_a_journal_whose_books_page_is_gone_still_delivers_every_surviving_event(
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    siem = await receiver_factory([503])
    config = {
        "targets": [patient(http_target("siem", siem.url))],
        "routes": everything_to("siem"),
        "shutdown": {"drain_timeout_s": 0.2},
    }
    first = await start_daemon(config)
    await post(first, [make_event(id=f"e{i}") for i in range(50)])
    await first.stop()
    overwrite_root_page(tmp_path / "var" / "journal.db", "books")

    siem.statuses = [200]
    second = await start_daemon(config)
    assert any("books did not survive" in r.getMessage() for r in caplog.records)
    await wait_for(lambda: settled(second), what="the surviving events to be delivered")
    assert sorted(e["id"] for e in siem.delivered_events) == sorted(f"e{i}" for i in range(50))
    assert_books_balance(second)


async def test_a_salvage_gives_a_target_only_the_events_past_what_it_had_settled(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    """A commit's events stay in their batch row until every target has passed them, so a
    salvage that lost the rows saying what a target is owed must not hand that target the
    events it had already settled again (before: each of them was sent twice)."""
    fast = await receiver_factory([200])
    slow = await receiver_factory([503])
    config = {
        "targets": [patient(http_target("fast", fast.url)), patient(http_target("slow", slow.url))],
        "routes": everything_to("fast", "slow"),
        "shutdown": {"drain_timeout_s": 0.2},
    }
    first = await start_daemon(config)
    await post(first, [make_event(id=f"a{i}") for i in range(100)])
    await wait_for(lambda: first.status()["targets"]["fast"]["pending"] == 0)
    fast.statuses = [503]
    await post(first, [make_event(id=f"b{i}") for i in range(100)])
    await first.stop()
    overwrite_root_page(tmp_path / "var" / "journal.db", "owed")

    fast.statuses = [200]
    slow.statuses = [200]
    before = len(fast.delivered_events)
    second = await start_daemon(config)
    await wait_for(lambda: settled(second), what="the salvaged events to be delivered")
    again = [e["id"] for e in fast.delivered_events[before:]]
    assert sorted(again) == sorted(f"b{i}" for i in range(100)), "fast gets only what it owed"
    assert sorted(e["id"] for e in slow.delivered_events) == sorted(
        [f"a{i}" for i in range(100)] + [f"b{i}" for i in range(100)]
    )
    row = second.status()["targets"]["fast"]
    assert (row["received"], row["delivered"], row["lost"]) == (200, 200, 0)
    assert_books_balance(second)


async def readyz(daemon: Daemon) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}/readyz") as resp,
    ):
        return resp.status


async def test_readyz_turns_200_when_the_journal_recovers_without_another_post(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    archive = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {"targets": [file_target("archive", archive)], "routes": everything_to("archive")}
    )
    with journal_write_locked(tmp_path / "var"):
        status, body = await post(daemon, make_event(id="refused"))
        assert status == 503 and body["error"]["code"] == "journal_unavailable"
        assert await readyz(daemon) == 503
    # No producer posts again (a load balancer that obeys /readyz would not send one).

    async def ready_again() -> bool:
        return await readyz(daemon) == 200

    await wait_for(ready_again, what="/readyz to turn 200 once the journal can be written")
    status, _ = await post(daemon, make_event(id="after"))
    assert status == 202
    await wait_for(lambda: settled(daemon))
    assert [e["id"] for e in read_ndjson(archive)] == ["after"]
    assert_books_balance(daemon)


async def test_a_failed_checkpoint_is_logged_and_the_interval_sync_carries_on(
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = await receiver_factory([503])
    storage = {"path": str(tmp_path / "var"), "fsync": "interval", "fsync_interval_ms": 20}
    daemon = await start_daemon(
        {
            "storage": storage,
            "targets": [patient(http_target("down", down.url))],
            "routes": everything_to("down"),
            "shutdown": {"drain_timeout_s": 0.2},
        }
    )
    for _ in range(100):
        await post(daemon, [make_event(message="x" * 500) for _ in range(5)])
    db = tmp_path / "var" / "journal.db"
    reader = sqlite3.connect(db)
    try:
        reader.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the backlog is in the file now
    finally:
        reader.close()
    full = db.stat().st_size
    # A file-size limit at the database's size (what a quota or a full disk does): new events
    # still reach the WAL (written again from its start once all of it was checkpointed), but
    # the checkpoint that would grow the database file fails.
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (full, limits[1]))
    try:
        status, _ = await post(daemon, [make_event(message="y" * 500) for _ in range(20)])
        assert status == 202
        await wait_for(
            lambda: any("checkpoint failed" in r.getMessage() for r in caplog.records),
            what="the failed checkpoint to be logged",
        )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert daemon.status()["journal"]["checkpoint_errors"] >= 1
    # The next interval checkpoints again: the new events reach the database file.
    await wait_for(lambda: db.stat().st_size > full, what="a checkpoint after the failure")
    assert any(r.levelno == logging.ERROR for r in caplog.records if "checkpoint" in r.getMessage())
    assert daemon.status()["targets"]["down"]["pending"] == 520
    assert_books_balance(daemon)


async def test_a_target_that_keeps_up_takes_batches_from_memory_and_one_behind_reads_the_journal(
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The archive keeps up: every batch from memory. The SIEM refuses until it is more than
    the memory budget behind: it reads its backlog from the database, and once caught up it
    takes its batches from memory again. Both get every event once, in order."""
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BYTES", 8 * 1024)  # a few events
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BATCHES", 0)  # whatever the batches' size
    siem = await receiver_factory([503])
    archive = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {
            "targets": [patient(http_target("siem", siem.url)), file_target("archive", archive)],
            "routes": everything_to("siem", "archive"),
        }
    )
    journal = daemon.journal
    ids: list[str] = []
    for _ in range(4):
        _, body = await post(daemon, [make_event() for _ in range(5)])
        ids += [r["id"] for r in body["results"]]
        await wait_for(lambda: daemon.status()["targets"]["archive"]["pending"] == 0)
    assert journal.batch_sources("archive")[1] == 0, "the archive never read the database"
    assert journal.batch_sources("archive")[0] >= 4

    siem.statuses = [200]
    await wait_for(lambda: settled(daemon), what="the SIEM to catch up")
    from_memory, from_disk = journal.batch_sources("siem")
    assert from_disk >= 1, "20 events are past the SIEM's memory budget: read from the journal"
    _, body = await post(daemon, [make_event() for _ in range(2)])
    ids += [r["id"] for r in body["results"]]
    await wait_for(lambda: settled(daemon))
    assert journal.batch_sources("siem")[0] > from_memory, "caught up: from memory again"
    assert journal.batch_sources("siem")[1] == from_disk

    assert [e["id"] for e in siem.delivered_events] == ids
    assert [e["id"] for e in read_ndjson(archive)] == ids
    assert_books_balance(daemon)


async def test_a_target_far_behind_gets_no_entries_made_for_memory_and_still_takes_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target further behind than memory could hold even of empty events would drop every
    entry a commit made for it at once: the journal makes none (under load that was an Entry
    per event, thrown away). It still reads every event once, in order, from the journal,
    takes memory again once close, and the books balance."""
    event = Event.from_body(make_event(id="x" * 36))
    monkeypatch.setattr(
        sqlite_backlog, "MEMORY_BYTES", 8 * sqlite_journal.held_bytes(Entry(1, event, "all"))
    )
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BATCHES", 0)
    # Every Entry the journal makes has its seq set through ENTRY_SEQ (it makes them without
    # Entry's __init__: counting __init__ calls counted none, made or not).
    made: list[int] = []
    set_seq = sqlite_commit.ENTRY_SEQ

    def counted(entry: Entry, seq: int) -> None:
        made.append(seq)
        set_seq(entry, seq)

    monkeypatch.setattr(sqlite_commit, "ENTRY_SEQ", counted)
    journal = SqliteJournal(StorageConfig(path=str(tmp_path / "var"), fsync="never"), ["t"])
    await journal.open()
    stopping = asyncio.Event()
    ids: list[str] = []
    try:
        for _ in range(60):  # one commit each: remembered, then past the budget, then far past
            events = [Event.from_body(make_event())]
            ids += [e.id for e in events]
            await journal.append([(e, {"t": "all"}) for e in events])
        assert not journal._targets["t"].may_remember()
        assert made, "entries were made while the target could remember them"
        made.clear()
        events = [Event.from_body(make_event()) for _ in range(5)]
        ids += [e.id for e in events]
        await journal.append([(e, {"t": "all"}) for e in events])
        assert made == [], "no entries made for a target that could not remember them"
        taken: list[str] = []
        while journal.books("t").pending:
            batch = await journal.next_batch(
                "t", max_events=10, max_bytes=1 << 20, max_wait_s=0, stopping=stopping
            )
            taken += [entry.event.id for entry in batch]
            await journal.ack("t", batch, dead_lettered=0)
            events = [Event.from_body(make_event())] if len(ids) < 80 else []
            ids += [e.id for e in events]
            await journal.append([(e, {"t": "all"}) for e in events])
        assert taken == ids
        from_memory, from_disk = journal.batch_sources("t")
        assert from_disk >= 5 and from_memory >= 1, "read back while behind, memory once close"
        books = journal.books("t")
        assert books.received == books.delivered + books.pending == len(ids)
    finally:
        await journal.close()


async def test_a_target_that_fell_behind_takes_memory_again_once_close_while_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that fell more than MEMORY_BYTES behind reads the journal until its backlog
    would fit in memory again, then takes its batches from memory once it has settled what
    memory lacks, though new events keep it from ever being idle (a busy journal owner).
    Every event once, in order, and the books balance at every step."""
    event = Event.from_body(make_event(id="x" * 36))
    event_bytes = sqlite_journal.held_bytes(Entry(1, event, "all"))
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BYTES", 8 * event_bytes)  # 8 events
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BATCHES", 0)
    journal = SqliteJournal(StorageConfig(path=str(tmp_path / "var"), fsync="never"), ["t"])
    await journal.open()
    stopping = asyncio.Event()
    ids: list[str] = []
    taken: list[str] = []

    async def append(count: int) -> None:
        events = [Event.from_body(make_event()) for _ in range(count)]
        ids.extend(event.id for event in events)
        await journal.append([(event, {"t": "all"}) for event in events])

    async def take() -> list[Entry]:
        batch = await journal.next_batch(
            "t", max_events=15, max_bytes=1 << 20, max_wait_s=0, stopping=stopping
        )
        taken.extend(entry.event.id for entry in batch)
        return batch

    def balanced() -> bool:
        books = journal.books("t")
        return books.received == books.delivered + books.dead_lettered + books.pending

    try:
        for _ in range(20):  # 20 events, one commit each: past the budget
            await append(1)
        first = await take()
        assert journal.batch_sources("t") == (0, 1), "20 behind: read from the journal"
        await journal.ack("t", first, dead_lettered=0)
        await append(1)  # 6 pending: they would fit, so this one is remembered
        second = await take()
        assert len(second) == 5 and journal.batch_sources("t") == (0, 2), "what memory lacks"
        await append(2)  # busy: more arrive while the batch is out
        await journal.ack("t", second, dead_lettered=0)
        assert journal.books("t").pending == 3 and balanced()
        third = await take()
        assert journal.batch_sources("t") == (1, 2), "memory holds all 3 pending: from memory"
        assert len(third) == 3
        await journal.ack("t", third, dead_lettered=0)
        assert taken == ids
        assert journal.books("t").pending == 0 and balanced()
    finally:
        await journal.close()


async def test_a_target_past_its_memory_budget_takes_what_memory_holds_and_reads_only_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A moving worker (it settled a batch within MOVING_S) that fell past the memory budget
    (intake outran it for a moment) still takes the oldest events memory holds from memory;
    only those committed while memory was full are read from the journal, in one read that
    stops where memory starts again. Before, memory was dropped whole at the budget and
    every one of them read back (with one process, most batches under load). Every event
    once, in order; the books balance."""
    event = Event.from_body(make_event(id="x" * 36))
    event_bytes = sqlite_journal.held_bytes(Entry(1, event, "all"))
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BYTES", 8 * event_bytes)  # 8 events
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BATCHES", 0)
    monkeypatch.setattr(sqlite_backlog, "MOVING_S", 3600.0)  # however slow the machine
    journal = SqliteJournal(StorageConfig(path=str(tmp_path / "var"), fsync="never"), ["t"])
    await journal.open()
    stopping = asyncio.Event()
    ids: list[str] = []
    taken: list[str] = []
    sources: list[tuple[int, int]] = []

    async def append(count: int) -> None:
        events = [Event.from_body(make_event()) for _ in range(count)]
        ids.extend(event.id for event in events)
        await journal.append([(event, {"t": "all"}) for event in events])

    async def deliver(max_events: int) -> int:
        batch = await journal.next_batch(
            "t", max_events=max_events, max_bytes=1 << 20, max_wait_s=0, stopping=stopping
        )
        taken.extend(entry.event.id for entry in batch)
        await journal.ack("t", batch, dead_lettered=0)
        sources.append(journal.batch_sources("t"))
        books = journal.books("t")
        assert books.received == books.delivered + books.pending
        return len(batch)

    try:
        await append(1)
        assert await deliver(1) == 1 and sources[-1] == (1, 0), "the worker is moving"
        for _ in range(11):  # one commit each: 8 fit, 3 past the budget
            await append(1)
        assert await deliver(5) == 5 and sources[-1] == (2, 0), "the oldest 5, from memory"
        await append(1)  # busy: memory still holds 3, this one joins the 3 it lacks
        assert await deliver(5) == 3 and sources[-1] == (3, 0), "the rest memory held"
        assert await deliver(10) == 4 and sources[-1] == (3, 1), "what memory lacked"
        await append(2)  # caught up: remembered again
        assert await deliver(10) == 2 and sources[-1] == (4, 1)
        assert taken == ids and journal.books("t").pending == 0
    finally:
        await journal.close()


async def test_a_target_down_from_the_start_lets_memory_go_at_its_budget(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target whose worker has settled nothing (down, its first batch retried) keeps no
    memory past its budget: what it would hold is freed at the budget and nothing more is
    kept while it is that far behind (a million-event backlog holds no memory), as before
    memory kept its head for a moving worker. When it comes back it gets every event once."""
    event = Event.from_body(make_event(id="x" * 36))
    event_bytes = sqlite_journal.held_bytes(Entry(1, event, "all"))
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BYTES", 8 * event_bytes)  # 8 events
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BATCHES", 0)
    monkeypatch.setattr(sqlite_backlog, "MOVING_S", 3600.0)  # it never settled: not moving
    siem = await receiver_factory([503])  # refuses (retried) until told otherwise
    daemon = await start_daemon(
        {"targets": [patient(http_target("siem", siem.url))], "routes": everything_to("siem")}
    )
    ids: list[str] = []
    for _ in range(4):
        _, body = await post(daemon, [make_event() for _ in range(5)])
        ids += [r["id"] for r in body["results"]]
    target = daemon.journal._targets["siem"]
    assert target.books.pending == 20 and not target.memory and not target.remembering
    siem.statuses = [200]
    await wait_for(lambda: settled(daemon), what="the SIEM to come back and catch up")
    assert [e["id"] for e in siem.delivered_events] == ids
    assert_books_balance(daemon)


async def test_a_target_with_large_batches_keeps_that_many_of_them_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory holds MEMORY_BATCHES of a target's batches (by their max_bytes) where that is
    more than MEMORY_BYTES: the batch out, the next filling, and room for a slow cycle. A file
    target's 2,000-event batches overflowed 8 MiB whenever intake outran a cycle or two."""
    event = Event.from_body(make_event(id="x" * 36))
    event_bytes = sqlite_journal.held_bytes(Entry(1, event, "all"))
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BYTES", 8 * event_bytes)  # 8 events
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BATCHES", 4)  # of 4 events: 16
    journal = SqliteJournal(StorageConfig(path=str(tmp_path / "var"), fsync="never"), ["t"])
    await journal.open()
    stopping = asyncio.Event()
    ids: list[str] = []
    taken: list[str] = []

    async def append() -> None:
        event = Event.from_body(make_event())
        ids.append(event.id)
        await journal.append([(event, {"t": "all"})])

    try:
        await append()
        while journal.books("t").pending:
            batch = await journal.next_batch(
                "t", max_events=4, max_bytes=4 * event_bytes, max_wait_s=0, stopping=stopping
            )
            taken.extend(entry.event.id for entry in batch)
            await journal.ack("t", batch, dead_lettered=0)
            if len(ids) == 1:  # the worker's batches are known: 15 more, one commit each
                for _ in range(15):
                    await append()
        assert taken == ids
        assert journal.batch_sources("t") == (5, 0), "all 16 held: 1, then 4 + 4 + 4 + 3"
        books = journal.books("t")
        assert books.received == books.delivered == 16 and books.pending == 0
    finally:
        await journal.close()


async def test_a_journal_of_one_row_per_event_opens_and_delivers_what_it_owed(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """journal_v1.db was written by the journal before batches (main at 3f5e11e, one events
    row per event and one deliveries row per target): 30 events in 3 commits to `siem` and
    `archive`, the middle one routed to one or the other by two routes (e15 to both), the
    archive's first 10 settled, then e21's body changed under its CRC. It opens, moves into
    batches, and every event still owed reaches its target once, in order; e21 is
    dead-lettered as corrupt with the route it had; the books go on from where they were."""
    storage = tmp_path / "var"
    storage.mkdir()
    shutil.copy(Path(__file__).with_name("journal_v1.db"), storage / "journal.db")
    siem, archive = tmp_path / "siem.ndjson", tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {
            "targets": [file_target("siem", siem), file_target("archive", archive)],
            "routes": everything_to("siem", "archive"),
        }
    )
    await wait_for(lambda: settled(daemon), what="the old journal's backlog to drain")
    to_siem = [i for i in range(30) if i < 10 or i >= 20 or i % 2 == 0 or i == 15]
    to_archive = [i for i in range(10, 30) if i >= 20 or i % 2]
    assert [e["id"] for e in read_ndjson(siem)] == [f"e{i}" for i in to_siem if i != 21]
    assert [e["id"] for e in read_ndjson(archive)] == [f"e{i}" for i in to_archive if i != 21]
    for target_id in ("siem", "archive"):
        [letter] = read_ndjson(storage / "deadletter" / f"{target_id}.ndjson")
        assert (letter["reason"], letter["event"]["id"], letter["route"]) == (
            "journal_corrupt",
            "e21",
            "all",
        )
    rows = daemon.status()["targets"]
    assert (rows["siem"]["received"], rows["siem"]["delivered"]) == (26, 25)
    assert (rows["archive"]["received"], rows["archive"]["delivered"]) == (25, 24)
    assert_books_balance(daemon)
    with sqlite3.connect(storage / "journal.db") as db:
        for table in ("events", "deliveries", "batches", "owed"):
            assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table


@pytest.mark.parametrize("message", ["x" * 3000, "incompressible"])
async def test_a_batch_torn_by_a_truncation_gives_back_the_events_before_the_cut(
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    message: str,
) -> None:
    """One commit of 100 events framed as one batch row, whose frame (packed: deflated, by
    ~100x or hardly at all) runs through a chain of overflow pages. Cut the file in the middle
    of it: the events wholly before the cut are delivered, in order, and the rest are counted
    lost, none quarantined."""
    monkeypatch.setattr(sqlite_commit, "BATCH_BYTES", 1 << 20)
    siem = await receiver_factory([503])
    config = {
        "targets": [patient(http_target("siem", siem.url))],
        "routes": everything_to("siem"),
        "shutdown": {"drain_timeout_s": 0.2},
    }
    first = await start_daemon(config)
    ids = [f"e{i:02}" for i in range(100)]
    text = incompressible if message == "incompressible" else lambda _: message
    await post(first, [make_event(id=i, message=text(3000)) for i in ids])
    await first.stop()
    journal = tmp_path / "var" / "journal.db"
    with sqlite3.connect(journal) as db:
        [(blob,)] = db.execute("SELECT records FROM batches")
    assert blob.startswith(PACKED)
    os.truncate(journal, journal.stat().st_size // 2)

    siem.statuses = [200]
    second = await start_daemon(config)
    await wait_for(lambda: settled(second), what="the events before the cut to be delivered")
    delivered = [e["id"] for e in siem.delivered_events]
    row = second.status()["targets"]["siem"]
    assert 0 < len(delivered) < 100
    assert delivered == ids[: len(delivered)]
    assert (row["received"], row["delivered"], row["lost"]) == (
        100,
        len(delivered),
        100 - len(delivered),
    )
    assert second.status()["journal"]["lost_records"] == 100 - len(delivered)
    assert second.status()["journal"]["quarantined_records"] == 0
    assert_books_balance(second)


async def test_a_commit_framed_into_several_batches_reads_sheds_and_frees_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit larger than BATCH_BYTES is several batch rows, and a target's runs break at
    their edges. Read back from the journal (memory off), in batches that end inside a run,
    with a run of the oldest shed from the middle of one: each target gets each of its
    events once, in order, with its route; the books balance at every step; and once both
    targets are past them every batch row is gone."""
    monkeypatch.setattr(sqlite_commit, "BATCH_BYTES", 2048)
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BYTES", 0)
    monkeypatch.setattr(sqlite_backlog, "MEMORY_BATCHES", 0)
    journal = SqliteJournal(StorageConfig(path=str(tmp_path / "var"), fsync="never"), ["a", "b"])
    await journal.open()
    stopping = asyncio.Event()
    events = [Event.from_body(make_event(id=f"e{i:02}", message="x" * 300)) for i in range(40)]
    routes = [{"a": "all", "b": "all"} if i % 4 else {"a": "fourth"} for i in range(40)]
    taken: dict[str, list[tuple[str, str]]] = {"a": [], "b": []}

    async def take(target_id: str, count: int) -> list[Entry]:
        batch = await journal.next_batch(
            target_id, max_events=count, max_bytes=1 << 20, max_wait_s=0, stopping=stopping
        )
        taken[target_id] += [(e.event.id, e.route) for e in batch]
        return batch

    def balanced() -> bool:
        return all(
            (b := journal.books(t)).received == b.delivered + b.dead_lettered + b.pending
            for t in ("a", "b")
        )

    def rows(table: str) -> int:
        with sqlite3.connect(tmp_path / "var" / "journal.db") as db:
            return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    try:
        await journal.append(list(zip(events, routes, strict=True)))
        assert rows("batches") > 3, "one commit, framed into several batch rows"
        assert (journal.books("a").pending, journal.books("b").pending) == (40, 30)
        await journal.ack("a", await take("a", 7), dead_lettered=0)
        in_flight = await take("b", 5)
        async with journal.shed("b", 6) as shed:
            dropped = [e.event.id for e in shed]
        assert journal.books("b").dead_lettered == 6 and balanced()
        await journal.ack("b", in_flight, dead_lettered=0)
        while journal.books("a").pending:
            await journal.ack("a", await take("a", 9), dead_lettered=0)
        while journal.books("b").pending:
            await journal.ack("b", await take("b", 4), dead_lettered=0)
        assert balanced()
    finally:
        await journal.close()
    assert taken["a"] == [(e.id, r["a"]) for e, r in zip(events, routes, strict=True)]
    to_b = [e.id for e, r in zip(events, routes, strict=True) if "b" in r]
    assert [i for i, _ in taken["b"]] == [i for i in to_b if i not in dropped]
    assert dropped == to_b[5:11]
    assert rows("batches") == 0 and rows("owed") == 0


async def test_a_move_into_batches_cut_short_goes_on_at_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large journal of the layout before batches moves a chunk per transaction: a crash
    after the first chunk loses nothing, and the next open moves the rest."""
    storage = tmp_path / "var"
    storage.mkdir()
    shutil.copy(Path(__file__).with_name("journal_v1.db"), storage / "journal.db")
    with sqlite3.connect(storage / "journal.db") as db:  # 2,500 more events, owed to siem
        for seq in range(31, 2531):
            body = b'{"id": "e%d"}' % (seq - 1)
            db.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                (seq, f"e{seq - 1}", 1.0, body, zlib.crc32(body)),
            )
            db.execute("INSERT INTO deliveries VALUES ('siem', ?, 'all')", (seq,))
        db.execute("UPDATE books SET received = received + 2500 WHERE target = 'siem'")
    config = StorageConfig(path=str(storage), fsync="never")
    move_chunk = sqlite_migrate._move_chunk
    moves = 0

    def crash_after_one(db: sqlite3.Connection, vouched: bool) -> int | None:
        nonlocal moves
        moves += 1
        if moves == 2:
            raise KeyboardInterrupt("killed")
        return move_chunk(db, vouched)

    monkeypatch.setattr(sqlite_migrate, "_move_chunk", crash_after_one)
    crashed = SqliteJournal(config, ["siem", "archive"])
    with pytest.raises(KeyboardInterrupt):
        await crashed.open()
    assert crashed._db is not None
    crashed._db.close()  # what the kill would have done
    crashed._executor.shutdown()
    crashed._unlock()
    monkeypatch.setattr(sqlite_migrate, "_move_chunk", move_chunk)
    with sqlite3.connect(storage / "journal.db") as db:
        assert db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 1
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2530 - 1000

    journal = SqliteJournal(config, ["siem", "archive"])
    await journal.open()
    try:
        assert journal.books("siem").received == 26 + 2500
        batch = await journal.next_batch(
            "siem", max_events=3000, max_bytes=1 << 30, max_wait_s=0, stopping=asyncio.Event()
        )
        ids = [e.event.id for e in batch]
        assert ids[-2500:] == [f"e{i}" for i in range(30, 2530)]
        assert len(ids) == journal.books("siem").pending == 2526
    finally:
        await journal.close()


@pytest.mark.parametrize("bytes_only", [False, True])
async def test_a_targets_memory_counts_what_it_holds(tmp_path: Path, bytes_only: bool) -> None:
    """The memory budget bounds what memory really costs: the bytes each remembered entry
    keeps alive (its event's bytes and id, the Entry, the Event, its arrival time and seq),
    not only the event's bytes, which were three quarters of it. Every event is still taken
    from memory, once, and the books balance. An event that holds its bytes only (intake
    let its body go; a worker process's) is kept as it is, one that holds its body as a copy
    of its bytes: either way memory holds no parsed body."""
    journal = SqliteJournal(StorageConfig(path=str(tmp_path / "var"), fsync="never"), ["t"])
    await journal.open()
    stopping = asyncio.Event()
    try:
        await journal.append([(Event.from_body(make_event()), {"t": "all"})])  # warm up
        ids: list[str] = []
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            memory_before = journal._targets["t"].memory_bytes
            for _ in range(4):
                events = [Event.from_body(make_event()) for _ in range(500)]
                if bytes_only:
                    for event in events:
                        event.keep_bytes_only()
                ids += [event.id for event in events]
                await journal.append([(event, {"t": "all"}) for event in events])
                kept = [entry.event for entry in list(journal._targets["t"].memory)[-500:]]
                assert [event.id for event in kept] == ids[-500:]
                assert all(event._body is None for event in kept)
                assert all(a is b for a, b in zip(kept, events, strict=True)) is bytes_only
                del events, kept
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        counted = journal._targets["t"].memory_bytes - memory_before
        assert len(journal._targets["t"].memory) == 2001, "all under the budget: remembered"
        assert held <= counted * 1.05, f"memory holds {held} bytes but counts {counted}"
        taken: list[str] = []
        while journal.books("t").pending:
            batch = await journal.next_batch(
                "t", max_events=1000, max_bytes=1 << 24, max_wait_s=0, stopping=stopping
            )
            taken += [entry.event.id for entry in batch]
            await journal.ack("t", batch, dead_lettered=0)
        assert taken[1:] == ids and journal.batch_sources("t") == (3, 0)
        books = journal.books("t")
        assert books.received == books.delivered + books.dead_lettered + books.pending == 2001
    finally:
        await journal.close()


@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("memory", [True, False])
async def test_events_routed_in_changing_ways_reach_each_target_from_memory_as_from_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory: bool, same: bool
) -> None:
    """One commit whose events change targets and routes every few events, across several
    batch rows, some of them routed nowhere (not journaled: no seq, no books): each target gets
    exactly its events, once, in order, each with its route and seq, whether its worker takes
    them from memory or reads them from the journal, and whether events routed alike share
    one mapping (as a worker process's hand-off gives them) or have equal ones; memory counts
    what it holds as `held_bytes` does, entry by entry, and lets it all go once settled; and
    the books balance."""
    monkeypatch.setattr(sqlite_commit, "BATCH_BYTES", 2048)
    if not memory:
        monkeypatch.setattr(sqlite_backlog, "MEMORY_BYTES", 0)
        monkeypatch.setattr(sqlite_backlog, "MEMORY_BATCHES", 0)
    journal = SqliteJournal(StorageConfig(path=str(tmp_path / "var"), fsync="never"), ["a", "b"])
    await journal.open()
    stopping = asyncio.Event()
    events = [Event.from_body(make_event(id=f"e{i:02}", message="x" * 300)) for i in range(60)]
    shapes: list[dict[str, str]] = [
        {"a": "all", "b": "all"},
        {"a": "all"},
        {},
        {"b": "bees", "a": "all"},
        {"a": "ays"},
    ]
    routes = [shapes[(i // 3) % len(shapes)] for i in range(60)]
    if not same:
        routes = [dict(r) for r in routes]  # equal, not the same
    routed = [(e, r) for e, r in zip(events, routes, strict=True) if r]
    expected = {
        t: [(seq, e.id, r[t]) for seq, (e, r) in enumerate(routed, start=1) if t in r]
        for t in ("a", "b")
    }
    try:
        await journal.append(list(zip(events, routes, strict=True)))
        for target_id in ("a", "b"):
            target = journal._targets[target_id]
            held = list(target.memory)
            assert len(held) == (len(expected[target_id]) if memory else 0)
            assert target.memory_bytes == sum(sqlite_journal.held_bytes(e) for e in held)
            taken: list[tuple[int, str, str]] = []
            while journal.books(target_id).pending:
                batch = await journal.next_batch(
                    target_id, max_events=7, max_bytes=1 << 20, max_wait_s=0, stopping=stopping
                )
                assert all(type(e) is Entry for e in batch)
                taken += [(e.seq, e.event.id, e.route) for e in batch]
                await journal.ack(target_id, batch, dead_lettered=0)
            assert taken == expected[target_id]
            assert (target.memory_bytes, len(target.memory)) == (0, 0)
            assert journal.batch_sources(target_id)[0 if memory else 1] > 0
            assert journal.batch_sources(target_id)[1 if memory else 0] == 0
            books = journal.books(target_id)
            assert books.received == books.delivered + books.dead_lettered + books.pending
            assert books.delivered == len(expected[target_id])
    finally:
        await journal.close()


async def test_a_receipts_lookup_does_not_wait_for_or_hold_the_journals_writer(
    tmp_path: Path,
) -> None:
    """pending_for scans every packed frame (0.44 s for 100,000 events, seconds for a million)
    and ran on the journal's one thread, where every append and ack waits its turn: an admin's
    receipt lookups held up ingest. It reads on a read-only connection of its own, in a thread
    of its own (WAL lets it read beside the writer): here it answers while the writer's
    thread is held."""
    journal = SqliteJournal(StorageConfig(path=str(tmp_path / "var"), fsync="never"), ["t"])
    await journal.open()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(60)

    try:
        await journal.append([(Event.from_body(make_event(id="r1")), {"t": "all"})])
        writer = asyncio.get_running_loop().run_in_executor(journal._executor, hold)
        try:
            await asyncio.to_thread(held.wait, 10)
            assert await asyncio.wait_for(journal.pending_for("r1"), 30) == ["t"]
            assert await asyncio.wait_for(journal.pending_for("r2"), 30) == []
        finally:
            release.set()
            await writer
    finally:
        await journal.close()


async def test_a_receipts_lookup_reads_the_packed_frames_a_row_at_a_time(tmp_path: Path) -> None:
    """Every packed frame is a candidate for pending_for (its bytes do not show the id): they
    were fetched all at once, so a lookup with a backlog held the journal's frames in memory
    (67 MB for a 67 MB journal). A row at a time, it holds a frame or two."""
    journal = SqliteJournal(StorageConfig(path=str(tmp_path / "var"), fsync="never"), ["t"])
    await journal.open()
    try:
        for n in range(80):
            await journal.append(
                [
                    (
                        Event.from_body(make_event(id=f"e{n}-{i}", message=incompressible(900))),
                        {"t": "all"},
                    )
                    for i in range(100)
                ]
            )
        with sqlite3.connect(tmp_path / "var" / "journal.db") as db:
            stored = db.execute("SELECT SUM(length(records)) FROM batches").fetchone()[0]
        assert stored > 5_000_000
        tracemalloc.start()
        try:
            assert await journal.pending_for("e79-99") == ["t"]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # A frame is at most 64 KiB of records (BATCH_BYTES) and what unpacking one takes.
        assert peak < 1_000_000, f"a lookup held {peak} bytes of {stored} stored"
    finally:
        await journal.close()


async def test_an_event_in_a_packed_frame_is_found_pending_until_its_target_settles_it(
    tmp_path: Path,
) -> None:
    """A receipt's lookup (pending_for) finds an event by id in a frame stored packed, whose
    bytes do not hold the id as they are; once the target has settled it, no longer, though
    its frame stays for the events after it."""
    journal = SqliteJournal(StorageConfig(path=str(tmp_path / "var"), fsync="never"), ["t"])
    await journal.open()
    events = [Event.from_body(make_event(id=f"e{i:03}", message="x" * 1000)) for i in range(100)]
    try:
        await journal.append([(event, {"t": "all"}) for event in events])
        with sqlite3.connect(tmp_path / "var" / "journal.db") as db:
            blobs = [blob for (blob,) in db.execute("SELECT records FROM batches")]
        assert all(blob.startswith(PACKED) for blob in blobs)
        assert not any(b"e050" in blob for blob in blobs), "the ids are not in the packed bytes"
        assert await journal.pending_for("e050") == ["t"]
        assert await journal.pending_for("e999") == []
        batch = await journal.next_batch(
            "t", max_events=60, max_bytes=1 << 24, max_wait_s=0, stopping=asyncio.Event()
        )
        await journal.ack("t", batch, dead_lettered=0)
        assert await journal.pending_for("e010") == []
        assert await journal.pending_for("e080") == ["t"]
    finally:
        await journal.close()


def rewrite_frames(path: Path, change: Callable[[bytes, int, int], bytes]) -> None:
    """Put `change(plain frame, first seq, last seq)` in place of every batch's frame, stored
    as the journal stores it (packed when large, salvage.pack)."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for first, last, stored in db.execute(
            "SELECT first_seq, last_seq, records FROM batches"
        ).fetchall():
            plain = change(unpack(stored, DEFAULT_BOUND.of(first, last)), first, last)
            db.execute("UPDATE batches SET records = ? WHERE first_seq = ?", (pack(plain), first))


def as_format_2(plain: bytes, first: int, last: int) -> bytes:
    """The frame as a format-2 journal (session 11's e1a9b8f) wrote it: its records back to
    back, no marker, each CRC over its body only."""
    parts = []
    for at in frame_offsets(plain, first, last).values():
        seq, event_id, received_at, body, _ = record_at(plain, at)
        assert event_id is not None
        raw_id = event_id.encode()
        parts += (RECORD.pack(len(body), zlib.crc32(body), seq, received_at, len(raw_id)), raw_id)
        parts.append(body)
    return b"".join(parts)


async def take_all(journal: SqliteJournal, target_id: str) -> list[tuple[int, str, str, bool]]:
    """(seq, id, route, corrupt) of every entry a target's worker is given, each settled."""
    taken: list[tuple[int, str, str, bool]] = []
    while journal.books(target_id).pending:
        batch = await journal.next_batch(
            target_id, max_events=7, max_bytes=1 << 20, max_wait_s=0, stopping=asyncio.Event()
        )
        taken += [(e.seq, e.event.id, e.route, e.event.corrupt) for e in batch]
        await journal.ack(target_id, batch, dead_lettered=sum(e.event.corrupt for e in batch))
    return taken


def alternating(count: int, message: str) -> list[tuple[Event, dict[str, str]]]:
    """Events e00.. routed by turns: even ones to target a only, odd ones to b only."""
    return [
        (
            Event.from_body(make_event(id=f"e{i:02}", message=message)),
            {"a": "ays"} if i % 2 == 0 else {"b": "bees"},
        )
        for i in range(count)
    ]


@pytest.mark.parametrize("stored", ["plain", "packed"])
async def test_a_record_whose_seq_was_changed_is_dead_lettered_never_sent_to_that_seqs_targets(
    tmp_path: Path, stored: str
) -> None:
    """A record's CRC covers its header (seq, arrival time, id, body length) as well as its
    body, since format 3. Change the seq in the header of record 5 (e04, routed to a only) to
    6, the seq of e05 (routed to b only), keeping its CRC: under a CRC of the body alone the
    record still passed, and b was sent e04 as seq 6 (a leak: a target e04's routes did not
    name) while a's seq 5 was dead-lettered. Now the changed record fails its CRC: seq 5 and
    6 are dead-lettered as journal_corrupt, every other event reaches its own target, and
    neither target is sent an event its routes did not name, nor does a receipt's lookup
    place e04 at b."""
    message = "x" * 300 if stored == "packed" else "short"
    routed = alternating(40 if stored == "packed" else 12, message)
    storage = tmp_path / "var"
    journal = SqliteJournal(StorageConfig(path=str(storage), fsync="never"), ["a", "b"])
    await journal.open()
    await journal.append(routed)
    await journal.close()
    path = storage / sqlite_journal.DB_NAME
    with contextlib.closing(sqlite3.connect(path)) as db:
        [(blob,)] = db.execute("SELECT records FROM batches")
    assert blob.startswith(PACKED) == (stored == "packed")

    def change_seq(plain: bytes, first: int, last: int) -> bytes:
        changed = bytearray(plain)
        struct.pack_into("<q", changed, frame_offsets(plain, first, last)[5] + 8, 6)
        return bytes(changed)

    rewrite_frames(path, change_seq)
    journal = SqliteJournal(StorageConfig(path=str(storage), fsync="never"), ["a", "b"])
    await journal.open()
    try:
        assert "b" not in await journal.pending_for("e04")
        for target_id, route in (("a", "ays"), ("b", "bees")):
            taken = await take_all(journal, target_id)
            own = {
                i + 1: event.id for i, (event, routes) in enumerate(routed) if target_id in routes
            }
            leaked = [(s, i) for s, i, _, bad in taken if not bad and i not in own.values()]
            assert not leaked, f"{target_id} was sent events its routes did not name: {leaked}"
            assert [seq for seq, *_ in taken] == sorted(own)
            assert all(r == route for _, _, r, _ in taken)
            assert {seq for seq, _, _, corrupt in taken if corrupt} == {5, 6} & set(own)
            assert all(own[seq] == i for seq, i, _, corrupt in taken if not corrupt)
        assert journal.quarantined == 2
    finally:
        await journal.close()


async def test_a_format_2_journal_reads_as_before_and_its_new_frames_follow_the_new_rule(
    tmp_path: Path,
) -> None:
    """A journal of format 2 holds frames whose CRCs cover their bodies only, plain and
    packed. Opened by this router (format 3), it is brought up to format 3 and every one of
    its events reaches its own targets, none quarantined; the frames written after follow
    the new rule (a marker first, CRCs over header and body), and the old ones stay as
    they were."""
    storage = tmp_path / "var"
    path = storage / sqlite_journal.DB_NAME
    journal = SqliteJournal(StorageConfig(path=str(storage), fsync="never"), ["a", "b"])
    await journal.open()
    old = alternating(10, "short") + alternating(40, "x" * 300)
    await journal.append(old[:10])
    await journal.append(old[10:])
    await journal.close()
    rewrite_frames(path, as_format_2)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 2")
        old_frames = db.execute("SELECT first_seq, records FROM batches").fetchall()
    assert [blob.startswith(PACKED) for _, blob in old_frames] == [False, True]
    assert not any(
        unpack(blob, DEFAULT_BOUND.of(1, 1)).startswith(COVERED) for _, blob in old_frames
    )

    journal = SqliteJournal(StorageConfig(path=str(storage), fsync="never"), ["a", "b"])
    await journal.open()
    new = alternating(6, "short") + alternating(40, "x" * 300)
    try:
        await journal.append(new[:6])
        await journal.append(new[6:])
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == sqlite_journal.FORMAT == 3
            frames = db.execute("SELECT first_seq, records FROM batches").fetchall()
        assert frames[:2] == old_frames
        assert [blob.startswith(PACKED) for _, blob in frames[2:]] == [False, True]
        assert all(
            unpack(blob, DEFAULT_BOUND.of(1, 1)).startswith(COVERED) for _, blob in frames[2:]
        )
        assert await journal.pending_for("e05") == ["b"]
        for target_id in ("a", "b"):
            taken = await take_all(journal, target_id)
            own = [
                (seq, event.id, routes[target_id], False)
                for seq, (event, routes) in enumerate(old + new, start=1)
                if target_id in routes
            ]
            assert taken == own
        assert journal.quarantined == 0
    finally:
        await journal.close()


async def test_a_deflate_bomb_in_the_journal_inflates_no_further_than_a_frame_can_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch row of a real journal replaced on disk by a crafted packed frame: its three
    records, then 207 MB of spaces, deflated to about 200 KB. Reading the backlog inflated
    all of it (207 MB in memory for one frame; a few such rows, an out-of-memory). It now
    stops at what a frame of three records can hold with the default server limits (the
    largest event, ServerConfig.max_event_bytes, and BATCH_BYTES of others), reads the frame
    as cut there and says so: the three records come back whole."""
    storage = tmp_path / "var"
    journal = SqliteJournal(StorageConfig(path=str(storage), fsync="never"), ["t"])
    await journal.open()
    events = [Event.from_body(make_event(id=f"e{i}")) for i in range(3)]
    await journal.append([(event, {"t": "all"}) for event in events])
    await journal.close()
    path = storage / "journal.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        [(first, last, stored)] = db.execute("SELECT first_seq, last_seq, records FROM batches")
        assert not stored.startswith(PACKED)
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        parts = [PACKED, deflate.compress(stored)]
        spaces = b" " * (1 << 20)
        parts += [deflate.compress(spaces) for _ in range(207)]
        bomb = b"".join([*parts, deflate.flush()])
        assert len(bomb) < 1 << 20
        db.execute("UPDATE batches SET records = ? WHERE first_seq = ?", (bomb, first))
    del parts, spaces

    journal = SqliteJournal(StorageConfig(path=str(storage), fsync="never"), ["t"])
    await journal.open()
    try:
        tracemalloc.start()
        try:
            batch = await journal.next_batch(
                "t", max_events=10, max_bytes=1 << 20, max_wait_s=0, stopping=asyncio.Event()
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert [(e.seq, e.event.id, e.event.corrupt) for e in batch] == [
            (first + i, f"e{i}", False) for i in range(3)
        ]
        most = DEFAULT_BOUND.of(first, last)
        assert most < 64 << 20
        assert peak < most + (8 << 20), f"reading the frame held {peak} bytes"
        assert f"inflates past {most} bytes" in caplog.text
    finally:
        await journal.close()
