"""Salvage reads a journal's rows from its pages: free pages stay dead, the WAL's pages win."""

from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path

import pytest

from router.journal.salvage import BooksRow, DeliveryRow, EventRow, scan
from router.journal.sqlite import SCHEMA


def journal(path: Path, bodies: list[bytes]) -> sqlite3.Connection:
    """A journal file made the way SqliteJournal makes it, holding `bodies` for target t."""
    db = sqlite3.connect(path, isolation_level=None)
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
