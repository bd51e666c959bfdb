"""Salvage reads a journal's rows from its pages: free pages stay dead, the WAL's pages win,
a batch's frame gives each record it still holds."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import struct
import zlib
from pathlib import Path

import pytest

from router.config import StorageConfig
from router.events import Event
from router.journal import salvage
from router.journal import sqlite as sqlite_journal
from router.journal.salvage import (
    COVERED,
    DEFAULT_BOUND,
    PACKED,
    RECORD,
    BooksRow,
    DeliveryRow,
    EventRow,
    FrameBound,
    OverlongFrameError,
    OwedRow,
    frame,
    frame_offsets,
    frame_records,
    pack,
    scan,
    unpack,
)
from router.journal.sqlite import SCHEMA, SqliteJournal
from router.journal.sqlite import commit as sqlite_commit
from router.journal.sqlite import database as sqlite_database


def journal(
    path: Path, bodies: list[bytes], page_size: int = sqlite_journal.PAGE_BYTES
) -> sqlite3.Connection:
    """A journal file made the way SqliteJournal makes it, holding `bodies` for target t."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA page_size={page_size}")
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA secure_delete=FAST")
    db.executescript(SCHEMA)
    db.execute("BEGIN")
    for seq, body in enumerate(bodies, start=1):
        db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
            (seq, f"id-{seq}", 1700000000.5, body, zlib.crc32(body)),
        )
        db.execute("INSERT INTO deliveries VALUES ('t', ?, 'all')", (seq,))
    db.execute("INSERT INTO books(target, received) VALUES ('t', ?)", (len(bodies),))
    db.execute("COMMIT")
    return db


def rows(path: Path) -> tuple[dict[int, EventRow], set[int], list[BooksRow]]:
    wal = path.with_name(path.name + "-wal")
    found = list(scan(path.read_bytes(), wal.read_bytes() if wal.exists() else b""))
    events = {r.seq: r for r in found if isinstance(r, EventRow)}
    deliveries = {r.seq for r in found if isinstance(r, DeliveryRow)}
    return events, deliveries, [r for r in found if isinstance(r, BooksRow)]


@pytest.mark.parametrize("body_bytes", [900, 20_000])  # on the page; through overflow pages
def test_every_live_row_is_found_and_settled_ones_stay_settled(
    tmp_path: Path, body_bytes: int
) -> None:
    path = tmp_path / "journal.db"
    bodies = [b'{"id": "%d", "x": "%s"}' % (i, b"x" * body_bytes) for i in range(300)]
    db = journal(path, bodies)
    db.execute("DELETE FROM deliveries WHERE seq <= 200")
    db.execute("DELETE FROM events WHERE seq <= 200")  # their pages go to the freelist
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    events, deliveries, books = rows(path)
    assert sorted(events) == list(range(201, 301))
    assert all(e.intact and e.body == bodies[e.seq - 1] for e in events.values())
    assert deliveries == set(range(201, 301))
    assert books == [BooksRow("t", (300, 0, 0, 0))]


def test_committed_pages_in_the_wal_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    db = journal(path, [b'{"n": %d}' % i for i in range(50)])
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("DELETE FROM deliveries WHERE seq <= 10")  # only in the WAL
    db.execute("DELETE FROM events WHERE seq <= 10")
    events, deliveries, _ = rows(path)  # read while the WAL is there, as after kill -9
    db.close()
    assert sorted(events) == list(range(11, 51))
    assert deliveries == set(range(11, 51))


def test_a_record_whose_crc_fails_is_returned_as_not_intact(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    db = journal(path, [b'{"n": 1}', b'{"n": 2}'])
    db.execute("UPDATE events SET body = CAST('{\"n\": 9}' AS BLOB) WHERE seq = 2")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    events, _, _ = rows(path)
    assert events[1].intact and not events[2].intact


def test_garbage_yields_nothing() -> None:
    assert list(scan(bytes(range(256)) * 64)) == []
    assert list(scan(b"")) == []


def batched(path: Path, commits: list[list[dict[str, str]]], acks: dict[str, int]) -> None:
    """A journal as SqliteJournal writes it: one batch per commit (each event with the targets
    and routes given), then each target in `acks` settled through that seq."""

    async def write() -> None:
        journal = SqliteJournal(StorageConfig(path=str(path.parent), fsync="never"), ["a", "b"])
        await journal.open()
        try:
            n = 0
            for commit in commits:
                routed = []
                for targets in commit:
                    body = {"id": f"e{n}", "x": "x" * 3000}
                    routed.append((Event.from_body(body, received_at=1700000000.0 + n), targets))
                    n += 1
                await journal.append(routed)
            for target_id, last in acks.items():
                await journal._run(journal._ack_sync, target_id, last, last, 0)
        finally:
            await journal.close()

    asyncio.run(write())


@pytest.mark.parametrize("page_size", [4096, 16384])  # journals made before and since 16 KiB
def test_a_damaged_file_header_still_tells_the_page_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page_size: int
) -> None:
    """The page size is in the file's first 100 bytes; with those destroyed, every page would
    be read at the wrong offsets. It is found from the pointer map's place instead (and from
    the log's header while a log is there), so every record still comes back."""
    monkeypatch.setattr(sqlite_database, "PAGE_BYTES", page_size)
    path = tmp_path / "journal.db"
    batched(path, [[{"a": "all"}] * 40, [{"a": "all"}] * 40], {})
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[16:18], "big") == page_size
    data[:100] = bytes(100)
    events = {r.seq: r for r in scan(bytes(data)) if isinstance(r, EventRow)}
    assert sorted(events) == list(range(1, 81))
    assert all(e.intact and e.event_id == f"e{e.seq - 1}" for e in events.values())


def test_a_damaged_file_header_takes_the_page_size_from_the_log(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    db = journal(path, [b'{"n": %d}' % i for i in range(50)], page_size=8192)
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("DELETE FROM events WHERE seq <= 10")  # only in the WAL
    data = bytearray(path.read_bytes())
    assert len(data) < 3 * 8192, "the pages are in the log only: no pointer map to look at"
    data[:100] = bytes(100)
    wal = path.with_name(path.name + "-wal").read_bytes()
    db.close()
    events = {r.seq for r in scan(bytes(data), wal) if isinstance(r, EventRow)}
    assert 11 in events and 50 in events


def test_a_batch_gives_each_record_and_the_runs_owed(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    both = {"a": "all", "b": "all"}
    mixed = [both if i % 3 else {"a": "odd"} for i in range(10)]
    batched(path, [[both] * 10, mixed, [both] * 10], {"a": 10, "b": 5})
    events, _, _ = rows(path)
    found = list(scan(path.read_bytes()))
    owed = sorted((r.target, r.first, r.last, r.route) for r in found if isinstance(r, OwedRow))
    # The first batch stays while b is owed part of it; every record comes back whole.
    assert sorted(events) == list(range(1, 31))
    assert all(e.intact and e.event_id == f"e{e.seq - 1}" for e in events.values())
    assert owed == [
        ("a", 11, 11, "odd"),
        ("a", 12, 13, "all"),
        ("a", 14, 14, "odd"),
        ("a", 15, 16, "all"),
        ("a", 17, 17, "odd"),
        ("a", 18, 19, "all"),
        ("a", 20, 20, "odd"),
        ("a", 21, 30, "all"),
        ("b", 6, 10, "all"),
        ("b", 12, 13, "all"),
        ("b", 15, 16, "all"),
        ("b", 18, 19, "all"),
        ("b", 21, 30, "all"),
    ]


def test_a_torn_batch_gives_every_record_before_the_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One commit of 100 events of 3 KB framed as one batch: its blob runs through a chain of
    overflow pages. Cut the file in the middle of that chain: the records wholly before the
    cut come back, whole and in order; the one cut and all after it do not (the journal
    counts them lost)."""
    monkeypatch.setattr(sqlite_commit, "BATCH_BYTES", 1 << 20)
    path = tmp_path / "journal.db"
    batched(path, [[{"a": "all"}] * 100], {})
    data = path.read_bytes()
    events = {r.seq: r for r in scan(data[: len(data) // 2]) if isinstance(r, EventRow)}
    assert 0 < len(events) < 100
    assert sorted(events) == list(range(1, len(events) + 1))
    assert all(e.intact for e in events.values())


def test_damage_inside_a_frame_costs_the_records_it_touches_only() -> None:
    records = [
        (seq, f"e{seq}", 1.5, b'{"n": %d}' % seq, zlib.crc32(b'{"n": %d}' % seq))
        for seq in range(1, 11)
    ]
    blob = bytearray(frame(records))
    offsets = frame_offsets(bytes(blob), 1, 10)
    assert sorted(offsets) == list(range(1, 11))
    # A body byte of record 3 flipped: its CRC fails, the others are whole.
    blob[offsets[3] + RECORD.size + 2 + 3] ^= 0xFF
    # The length field of record 6 garbled: the frame is found again at record 7.
    blob[offsets[6] : offsets[6] + 4] = b"\xff\xff\x00\x00"
    found = {r.seq: r for r in frame_records(bytes(blob), 1, 10)}
    assert sorted(found) == [1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert [seq for seq, r in found.items() if not r.intact] == [3]


def records_of(count: int, body_bytes: int) -> list[tuple[int, str, float, bytes, int]]:
    """`count` records whose bodies (JSON, as alike as audit events are) are `body_bytes` long."""
    out = []
    for seq in range(1, count + 1):
        body = b'{"n": %d, "message": "%s"}' % (seq, b"secret %d " % seq * body_bytes)
        body = body[: body_bytes - 2] + b'"}'
        out.append((seq, f"e{seq}", 1.5, body, zlib.crc32(body)))
    return out


def test_a_large_frame_is_packed_and_a_small_one_stays_plain() -> None:
    small = frame(records_of(3, 1000))
    assert pack(small) == small and unpack(small, DEFAULT_BOUND.of(1, 3)) == small
    large = frame(records_of(100, 1000))
    packed = pack(large)
    assert packed.startswith(PACKED) and len(packed) < len(large) // 4
    assert unpack(packed, DEFAULT_BOUND.of(1, 100)) == large
    assert [r.seq for r in frame_records(packed, 1, 100)] == list(range(1, 101))


def test_a_packed_frame_cut_short_gives_the_records_before_the_cut() -> None:
    records = records_of(100, 1000)
    packed = pack(frame(records))
    found = list(frame_records(packed[: len(packed) // 2], 1, 100))
    assert 0 < len(found) < 100
    assert [r.seq for r in found] == list(range(1, len(found) + 1))
    assert all(r.intact and r.body == records[r.seq - 1][3] for r in found)


def test_garbage_inside_a_packed_frame_costs_what_inflates_after_it_only() -> None:
    """Records before the damage come back whole; what inflates after it is garbage or no
    record at all, never a record taken as intact with other bytes."""
    records = records_of(100, 1000)
    blob = bytearray(pack(frame(records)))
    middle = len(blob) // 2
    blob[middle : middle + 64] = b"\x00" * 64
    found = list(frame_records(bytes(blob), 1, 100))
    assert found and found[0].seq == 1
    assert all(r.body == records[r.seq - 1][3] for r in found if r.intact)
    intact = [r.seq for r in found if r.intact]
    assert intact[: len(intact) // 2] == list(range(1, len(intact) // 2 + 1))


def old_rule(records: list[tuple[int, str, float, bytes, int]]) -> bytes:
    """A frame as format 2 wrote it: no marker, each record's CRC over its body alone."""
    parts = []
    for seq, event_id, received_at, body, crc in records:
        raw_id = event_id.encode()
        parts += (RECORD.pack(len(body), crc, seq, received_at, len(raw_id)), raw_id, body)
    return b"".join(parts)


def test_a_record_whose_header_was_changed_fails_its_crc_as_one_whose_body_was() -> None:
    """Since format 3 a frame starts with COVERED and each record's CRC covers its seq,
    arrival time, id and body length as well as its body. Change record 3's seq to 4 (the
    next record's), record 6's arrival time and a byte of record 8's id, each keeping its
    CRC: none comes back intact, so none is taken for an event it is not. The same frame as
    format 2 wrote it (CRCs over bodies alone, no marker) still reads, every record intact."""
    records = records_of(10, 200)
    blob = bytearray(frame(records))
    assert blob.startswith(COVERED)
    offsets = frame_offsets(bytes(blob), 1, 10)
    struct.pack_into("<q", blob, offsets[3] + 8, 4)
    struct.pack_into("<d", blob, offsets[6] + 16, 2.5)
    blob[offsets[8] + RECORD.size] ^= 0x01  # "e8" is now "d8"
    found = list(frame_records(bytes(blob), 1, 10))
    assert {r.seq for r in found if not r.intact} == {4, 6, 8}
    assert all(r.event_id == f"e{r.seq}" and r.received_at == 1.5 for r in found if r.intact)
    packed = bytearray(pack(frame(records_of(100, 1000))))
    plain = bytearray(unpack(bytes(packed), DEFAULT_BOUND.of(1, 100)))
    struct.pack_into("<q", plain, frame_offsets(bytes(plain), 1, 100)[50] + 8, 51)
    assert [r.seq for r in frame_records(pack(bytes(plain)), 1, 100) if not r.intact] == [51]

    old = old_rule(records)
    assert not old.startswith(COVERED) and frame_offsets(old, 1, 10)[1] == 0
    assert [(r.seq, r.intact) for r in frame_records(old, 1, 10)] == [
        (s, True) for s in range(1, 11)
    ]
    assert [r.seq for r in frame_records(pack(old_rule(records_of(100, 1000))), 1, 100)] == list(
        range(1, 101)
    )


def test_a_record_that_failed_its_crc_still_fails_it_once_framed_again() -> None:
    """Salvage moves what it found into new frames (salvage.frame) with each record's CRC of
    its body as found: one that was not intact is not made intact by the move."""
    records = records_of(4, 100)
    records[1] = (*records[1][:4], records[1][4] ^ 1)
    assert [r.intact for r in frame_records(frame(records), 1, 4)] == [True, False, True, True]


def test_random_damage_in_a_packed_frame_never_gives_a_record_intact_under_another_seq() -> None:
    """The attack review's experiment, seeded: 1-5 random bytes changed in a packed frame of
    60 records, 500 times. With CRCs over bodies alone (format 2), 2 of these 500 gave back a
    record that passed its CRC under a seq, id or arrival time not its own (33 of 25,000 in
    the review); with CRCs over the whole record, none does."""
    records = records_of(60, 1000)
    blob = pack(frame(records))
    rng = random.Random(7)
    for _ in range(500):
        damaged = bytearray(blob)
        for _ in range(rng.randint(1, 5)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        for r in frame_records(bytes(damaged), 1, 60):
            if r.intact:
                assert (r.event_id, r.received_at, r.body) == records[r.seq - 1][1:4]


def deflate_bomb(plain: bytes, padding: int) -> bytes:
    """A packed frame: `plain`, then `padding` spaces, deflated a MiB at a time (never held)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [PACKED, deflate.compress(plain)]
    chunk = b" " * (1 << 20)
    for _ in range(padding >> 20):
        parts.append(deflate.compress(chunk))
    parts.append(deflate.flush())
    return b"".join(parts)


def test_a_packed_frame_inflating_past_its_bound_is_read_as_cut_there() -> None:
    """A frame's inflation stops at what a frame of its records can hold (FrameBound): a
    crafted frame whose third record claims a 64 MiB body, 64 KiB of it stored, inflated in
    full; now the first two records come back, the third (cut) is missing, and no more than
    the bound was made."""
    records = records_of(3, 1000)
    seq, event_id, at, body, _ = records[2]
    huge = body[:-2] + b" " * (64 << 20) + b'"}'
    head = frame(records[:2])
    third = RECORD.pack(len(huge), 0, seq, at, len(event_id)) + event_id.encode()
    bomb = deflate_bomb(head + third + huge[:-2], 64 << 20)
    assert len(bomb) < 128 * 1024
    bound = FrameBound(max_event_bytes=1 << 20)
    most = bound.of(1, 3)
    with pytest.raises(OverlongFrameError) as raised:
        unpack(bomb, most)
    assert len(raised.value.prefix) == most < 2 << 20
    found = list(frame_records(bomb, 1, 3, bound))
    assert [(r.seq, r.intact) for r in found] == [(1, True), (2, True)]
    # A frame that ends within its bound is inflated whole, damaged or not.
    whole = frame(records_of(30, 1000))
    assert unpack(pack(whole), bound.of(1, 30)) == whole


def resync_every_offset(blob: bytes, at: int, previous: int, last: int, covered: bool) -> int:
    """The search as it was, an offset at a time: the oracle for the one that jumps."""
    while at + RECORD.size <= len(blob):
        length, crc, seq, _, id_length = RECORD.unpack_from(blob, at)
        start = at + RECORD.size + id_length
        if previous < seq <= last and start + length <= len(blob):
            body = blob[start : start + length]
            want = zlib.crc32(body, zlib.crc32(blob[at + 8 : start], length))
            if (want if covered else zlib.crc32(body)) == crc:
                return at
        at += 1
    return len(blob)


@pytest.mark.parametrize("first", [1, 250, 65_530, 5_000_000_000])
def test_the_search_for_the_next_record_finds_what_trying_every_offset_finds(
    first: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Damage of every kind (random bytes, zeroed runs, a garbled length, bytes cut out) in
    frames whose seqs cross a byte boundary (255/256, 65,535/65,536) or not: the records found
    after it are those the offset-by-offset search finds."""
    rng = random.Random(first)
    for _ in range(150):
        count = rng.randint(2, 40)
        records = [
            (seq, f"e{seq}", 1.5, body, zlib.crc32(body))
            for seq in range(first, first + count)
            for body in [b'{"n": %d, "pad": "%s"}' % (seq, b"x" * rng.randint(0, 300))]
        ]
        damaged = bytearray(frame(records))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(damaged))
            kind = rng.randrange(4)
            if kind == 0:
                damaged[at] = rng.randrange(256)
            elif kind == 1:
                damaged[at : at + rng.randint(1, 200)] = bytes(rng.randint(1, 200))
            elif kind == 2:
                damaged[at : at + 4] = rng.randbytes(4)
            else:
                del damaged[at : at + rng.randint(1, 50)]
        last = first + count - 1
        got = frame_offsets(bytes(damaged), first, last)
        monkeypatch.setattr(salvage, "_resync", resync_every_offset)
        want = frame_offsets(bytes(damaged), first, last)
        monkeypatch.undo()
        assert got == want


def test_megabytes_of_damage_between_two_records_cost_those_bytes_only() -> None:
    """8 MiB of garbage (no zero byte, as JSON has none) after record 2: records 3-5 are found
    after it, whole."""
    records = [
        (seq, f"e{seq}", 1.5, b'{"n": %d}' % seq, zlib.crc32(b'{"n": %d}' % seq))
        for seq in range(1, 6)
    ]
    plain = frame(records)
    cut = frame_offsets(plain, 1, 5)[3]
    blob = plain[:cut] + b"\x7f" * (8 << 20) + plain[cut:]
    found = {r.seq: r for r in frame_records(blob, 1, 5)}
    assert sorted(found) == [1, 2, 3, 4, 5] and all(r.intact for r in found.values())
