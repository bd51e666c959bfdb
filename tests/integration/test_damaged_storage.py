"""Storage damaged under a running daemon (a journal page, an archive's gzipped rotation) or
a journal left damaged by a newer router: what the daemon answers and what it refuses to touch
(tests/integration/test_journal.py holds the salvage of a damaged journal of its own format)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import sqlite3
import struct
from pathlib import Path

import aiohttp
import yaml

from router.config import StorageConfig
from router.daemon import Daemon
from router.events import Event
from router.journal import sqlite as sqlite_journal
from router.journal.salvage import PACKED, RECORD, TAIL, frame_offsets, record_at
from router.journal.sqlite import SqliteJournal
from tests.conftest import StartDaemon
from tests.fakes import incompressible, make_event, read_ndjson, wait_for
from tests.helpers import (
    ReceiverFactory,
    assert_books_balance,
    everything_to,
    file_target,
    free_port,
    http_target,
    overwrite_root_page,
    patient,
    post,
    reap,
    settled,
    spawn,
)


async def test_a_receipt_lookup_in_a_journal_damaged_under_the_daemon_answers_503(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    """The lookup reads the journal on a connection of its own: SQLite's error on a damaged
    page (database disk image is malformed) was a 500 internal_error with a traceback. It
    is the journal that cannot answer: 503 journal_unavailable, saying why."""
    receiver = await receiver_factory([503] * 100_000)  # the events stay pending
    daemon = await start_daemon(
        {"targets": [patient(http_target("h", receiver.url))], "routes": everything_to("h")}
    )
    for n in range(10):
        status, _ = await post(
            daemon, [make_event(id=f"e{n}-{i}", message=incompressible(900)) for i in range(50)]
        )
        assert status == 202
    url = f"http://127.0.0.1:{daemon.port}/v1/receipts/e3-3"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 200
            assert (await resp.json())["targets"] == {"h": {"state": "pending"}}
        overwrite_root_page(tmp_path / "var" / sqlite_journal.DB_NAME, "batches")
        async with session.get(url) as resp:
            body = await resp.json()
            assert resp.status == 503, body
    assert body["error"]["code"] == "journal_unavailable"
    assert "malformed" in body["error"]["message"]


async def test_a_damaged_journal_from_a_newer_router_is_refused_not_salvaged(
    tmp_path: Path,
) -> None:
    """A journal of a newer format is refused, exit 2, untouched: its frames may be of a kind
    this router cannot read. Damaged as well, it was salvaged instead (the format was looked
    at only after the integrity check): moved aside and rebuilt by this router, from frames
    it may take for garbage, its books counting their events lost."""
    storage = tmp_path / "var"
    journal = SqliteJournal(StorageConfig(path=str(storage), fsync="never"), ["archive"])
    await journal.open()
    for n in range(20):
        await journal.append(
            [
                (Event.from_body(make_event(id=f"e{n}-{i}", message="x" * 900)), {"archive": "all"})
                for i in range(50)
            ]
        )
    await journal.close()
    path = storage / sqlite_journal.DB_NAME
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {sqlite_journal.FORMAT + 1}")
    overwrite_root_page(path, "owed")
    before = path.read_bytes()
    port = free_port()
    config = tmp_path / "router.yaml"
    config.write_text(
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
    proc = await spawn(config, stderr=asyncio.subprocess.PIPE)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await reap(proc)
    message = stderr.decode()
    assert proc.returncode == 2, message
    assert f"format {sqlite_journal.FORMAT + 1}" in message, message
    assert not list(storage.glob("*.corrupt-*")), message
    assert path.read_bytes() == before


async def beside_a_cut_rotation(
    start_daemon: StartDaemon, tmp_path: Path
) -> tuple[Daemon, Path, Path]:
    """A daemon whose file target's archive has, beside it, a rotation gzipped by hand and
    cut short (5,000 events of id `old`): the daemon, the live archive and the cut file."""
    live = tmp_path / "archive.ndjson"
    whole = gzip.compress(b'{"id":"old"}\n' * 5000)
    cut = tmp_path / "archive.ndjson.2.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    daemon = await start_daemon(
        {"targets": [file_target("archive", live)], "routes": everything_to("archive")}
    )
    return daemon, live, cut


async def test_a_receipt_lookup_beside_an_archive_rotation_cut_short_answers_what_it_can(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A rotation gzipped by hand (logrotate) and cut short, or being gzipped as the lookup
    reads it, beside a file target's archive: every receipt lookup was a 500 (EOFError from
    gzip), even for an event in the live file. The event found elsewhere is answered; one
    found nowhere is 503 archive_unreadable naming the file, since it may be in there."""
    daemon, live, cut = await beside_a_cut_rotation(start_daemon, tmp_path)
    status, _ = await post(daemon, [make_event(id="e1")])
    assert status == 202
    await wait_for(lambda: settled(daemon))
    base = f"http://127.0.0.1:{daemon.port}/v1/receipts"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/e1") as resp:
            found = await resp.json()
            assert resp.status == 200, found
        async with session.get(f"{base}/nowhere") as resp:
            missing = await resp.json()
            assert resp.status == 503, missing
    assert found["targets"]["archive"]["state"] == "delivered"
    assert found["targets"]["archive"]["file"] == str(live)
    assert missing["error"]["code"] == "archive_unreadable"
    assert str(cut) in missing["error"]["message"]


async def test_a_search_through_an_archive_rotation_cut_short_answers_503_naming_it(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """GET /v1/search reading into a gzipped rotation cut short was a 500 (EOFError): it
    is 503 archive_unreadable naming the file; a page that ends before it is answered."""
    daemon, _, cut = await beside_a_cut_rotation(start_daemon, tmp_path)
    base = f"http://127.0.0.1:{daemon.port}/v1/search?target=archive"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}&limit=10") as resp:
            first = await resp.json()
            assert resp.status == 200, first
        async with session.get(f"{base}&query=id:new") as resp:
            through = await resp.json()
            assert resp.status == 503, through
    assert [event["id"] for event in first["events"]] == ["old"] * 10
    assert through["error"]["code"] == "archive_unreadable"
    assert str(cut) in through["error"]["message"]


async def test_a_record_whose_header_was_damaged_on_disk_leaks_no_body_to_another_target(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    """Two targets, different routes, their events side by side in one frame. The seq in the
    header of one of west's records is changed on disk to the next seq, east's: the record
    then stands at east's seq and fails its CRC there. Its letter in east's file carried
    its body (west's event) as an excerpt, and its id. A record that fails its CRC is not
    vouched for by its own header: neither target's letters hold a byte of any event's body
    or id, and each letter says where the record lies (file, frame, offset) and the length
    and sha256 of its bytes, so an operator can find it."""
    east, west = await receiver_factory([503]), await receiver_factory([503])
    routes = [
        {"name": "east", "rules": [{"locations": ["us-south"], "target_ids": ["east"]}]},
        {"name": "west", "rules": [{"locations": ["eu-de"], "target_ids": ["west"]}]},
    ]
    config = {
        "targets": [patient(http_target("east", east.url)), patient(http_target("west", west.url))],
        "routes": routes,
        "shutdown": {"drain_timeout_s": 0.2},
    }
    events = [
        make_event(
            id=f"evt-{side}-{i}",
            location="us-south" if side == "east" else "eu-de",
            message=f"secret-{side}-{i}-" + incompressible(200),
        )
        for i in range(3)
        for side in ("west", "east")
    ]
    first = await start_daemon(config)
    status, _ = await post(first, events)  # one commit, one plain frame (below 16 KiB)
    assert status == 202
    await first.stop()

    path = tmp_path / "var" / sqlite_journal.DB_NAME
    with contextlib.closing(sqlite3.connect(path)) as db:
        frames = db.execute("SELECT first_seq, last_seq, records FROM batches").fetchall()
    [(batch, last, stored)] = [row for row in frames if b"evt-west-1" in row[2]]
    assert not stored.startswith(PACKED)
    records = {
        record_at(stored, at)[1]: (seq, at)
        for seq, at in frame_offsets(stored, batch, last).items()
    }
    west_seq, west_at = records["evt-west-1"]
    east_seq, _ = records["evt-east-1"]
    assert east_seq == west_seq + 1
    # The damage, on disk: west's record's seq field becomes east's seq.
    length, _, _, received_at, id_length = RECORD.unpack_from(stored, west_at)
    header = TAIL.pack(west_seq, received_at, id_length) + b"evt-west-1"
    data = bytearray(path.read_bytes())
    assert data.count(header) == 1
    at = data.index(header)
    data[at : at + 8] = struct.pack("<q", east_seq)
    path.write_bytes(data)
    damaged = stored.replace(header, TAIL.pack(east_seq, received_at, id_length) + b"evt-west-1")
    raw = damaged[west_at : west_at + RECORD.size + id_length + length]

    east.statuses, west.statuses = [200], [200]
    second = await start_daemon(config)
    await wait_for(lambda: settled(second), what="both backlogs to settle")
    letters = tmp_path / "var" / "deadletter"
    for target, other in (("east", "west"), ("west", "east")):
        text = (letters / f"{target}.ndjson").read_text()
        for event in events:
            assert event["message"] not in text and event["id"] not in text, (target, event["id"])
        assert f"secret-{other}" not in text
    [east_letter] = read_ndjson(letters / "east.ndjson")
    [west_letter] = read_ndjson(letters / "west.ndjson")
    assert east_letter["reason"] == west_letter["reason"] == "journal_corrupt"
    assert east_letter["route"] == "east" and west_letter["route"] == "west"
    assert east_letter["event"] == {
        "journal_seq": east_seq,
        "journal_file": str(path),
        "journal_frame": batch,
        "frame_offset": west_at,
        "raw_length": len(raw),
        "raw_sha256": hashlib.sha256(raw).hexdigest(),
    }
    # West's own seq lost its record (it now stands at east's): nothing to point at but the frame.
    assert west_letter["event"] == {
        "journal_seq": west_seq,
        "journal_file": str(path),
        "journal_frame": batch,
        "frame_offset": None,
        "raw_length": 0,
        "raw_sha256": None,
    }
    delivered = {e["id"] for r in (east, west) for e in r.delivered_events}
    assert delivered == {e["id"] for e in events} - {"evt-west-1", "evt-east-1"}
    status = second.status()
    assert status["journal"]["quarantined_records"] == 2
    for target in ("east", "west"):
        row = status["targets"][target]
        assert (row["received"], row["delivered"], row["dead_lettered"]) == (3, 2, 1)
    assert_books_balance(second)
