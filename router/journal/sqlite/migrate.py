"""A journal brought up to the layout of batches when it opens: the rows of the layout before
batches (one per event and per delivery: a journal written by an older version) moved into
batches and owed runs; and a database file that failed its integrity check moved aside and
rebuilt from every record its pages still hold (router/journal/salvage.py), what did not
survive booked as lost, so received = delivered + dead_lettered + pending + lost still holds.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import sqlite3
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import router.journal.sqlite.commit as commit
from router.journal.salvage import (
    BooksRow,
    DeliveryRow,
    EventRow,
    FrameBound,
    OwedRow,
    frame,
    pack,
    scan,
)
from router.journal.sqlite.database import DB_NAME, connect, transaction
from router.observe.logformat import counted

log = logging.getLogger(__name__)

# The route of a delivery that salvage restored from a surviving event alone.
SALVAGED_ROUTE = "salvaged"
# Events of the layout before batches moved into one batch row (and one transaction) at a time
# (fewer when their bodies pass BATCH_BYTES: a frame holds what salvage.FrameBound allows).
MIGRATE_CHUNK = 1000


def move_into_batches(db: sqlite3.Connection, *, commit_each: bool, vouched: bool) -> None:
    """Move what the layout before batches holds (a journal written by an older version, or
    the rows salvage recovered) into batches of MIGRATE_CHUNK events and their owed runs. Each
    chunk leaves the old tables as it enters the new ones, in one transaction of its own when
    `commit_each` (a kill during a large move loses nothing; the next open moves the rest).
    A record keeps its CRC as stored, so one that failed its checksum still fails it, and a
    delivery whose event is gone is still owed (and quarantined when read), as before.
    `vouched`: the rows are an intact file's, each keyed by its seq, so a record that failed
    its checksum is framed with the mark that its header is its own (salvage.frame); rows
    salvage read from damaged pages are not."""
    moved = 0
    while True:
        with transaction(db) if commit_each else contextlib.nullcontext(db):
            chunk = _move_chunk(db, vouched)
        if chunk is None:
            break
        moved += chunk
    if moved:
        log.info("journal: %s moved into batches", counted(moved, "event", "events"))


def _move_chunk(db: sqlite3.Connection, vouched: bool) -> int | None:
    """Move the first MIGRATE_CHUNK events of the old tables (fewer once their bodies pass
    BATCH_BYTES, as a commit's frames are cut: commit.BATCH_BYTES) and the deliveries up to
    the last of them into one batch; returns how many events it moved (None: nothing was
    left)."""
    first, top = db.execute(
        "SELECT MIN(lo), MAX(hi) FROM (SELECT MIN(seq) AS lo, MAX(seq) AS hi FROM events "
        "UNION ALL SELECT MIN(seq), MAX(seq) FROM deliveries)"
    ).fetchone()
    if first is None:
        return None
    rows = db.execute(
        "SELECT seq, event_id, received_at, body, crc FROM events WHERE seq >= ? "
        "ORDER BY seq LIMIT ?",
        (first, MIGRATE_CHUNK),
    ).fetchall()
    size, cut = 0, False
    for kept, row in enumerate(rows, 1):
        size += len(row[3])
        if size > commit.BATCH_BYTES and kept < len(rows):
            rows, cut = rows[:kept], True
            break
    last = rows[-1][0] if cut or len(rows) == MIGRATE_CHUNK else top
    runs: list[list[Any]] = []
    for (target_id,) in db.execute("SELECT DISTINCT target FROM deliveries").fetchall():
        run: list[Any] | None = None
        for seq, route in db.execute(
            "SELECT seq, route FROM deliveries WHERE target = ? AND seq BETWEEN ? AND ? "
            "ORDER BY seq",
            (target_id, first, last),
        ):
            if run is not None and run[1] == seq - 1 and run[4] == route:
                run[1] = seq
            else:
                run = [target_id, seq, seq, first, route]
                runs.append(run)
        db.execute(
            "DELETE FROM deliveries WHERE target = ? AND seq BETWEEN ? AND ?",
            (target_id, first, last),
        )
    if runs:  # events no target is owed any more (there should be none) are dropped
        records = [
            (seq, event_id, at, body if isinstance(body, bytes) else str(body).encode(), crc)
            for seq, event_id, at, body, crc in rows
        ]
        db.execute(
            "INSERT INTO batches VALUES (?, ?, ?)",
            (first, last, pack(frame(records, vouched=vouched))),
        )
        db.executemany("INSERT INTO owed VALUES (?, ?, ?, ?, ?)", runs)
    db.execute("DELETE FROM events WHERE seq BETWEEN ? AND ?", (first, last))
    return len(rows)


def quarantine_file(path: Path, fsync: str, bound: FrameBound, target_ids: Collection[str]) -> None:
    """Move a damaged database aside (kept for inspection) and build a fresh journal from
    every record its pages still hold; report, and book as lost, what they do not."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{DB_NAME}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(DB_NAME + suffix)
        if src.exists():
            src.rename(aside.with_name(aside.name + suffix))
    log.error("journal %s failed its integrity check; moved to %s, salvaging", path, aside)
    # Created 0600 before SQLite opens it: SQLite gives -wal and -shm the file's own mode.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    fresh = connect(path, fsync)
    try:
        with transaction(fresh):
            books, settled = _copy_salvaged(aside, fresh, bound)
            recovered, lost = _settle_salvaged(fresh, books, settled, target_ids)
            move_into_batches(fresh, commit_each=False, vouched=False)
    finally:
        fresh.close()
    log.error(
        "journal salvage: %s recovered from %s, %d lost (their records did not "
        "survive; counted in the books as lost)",
        counted(recovered, "delivery", "deliveries"),
        aside,
        lost,
    )


def _copy_salvaged(
    aside: Path, fresh: sqlite3.Connection, bound: FrameBound
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Copy every row the damaged file's pages (and its log) still hold into `fresh`, in the
    layout of one row per event and per delivery (moved into batches once settled); an intact
    copy of an event wins over one that fails its checksum. Returns the books rows' counts and
    each target's settled seq."""
    books: dict[str, tuple[int, ...]] = {}
    settled: dict[str, int] = {}
    wal_path = aside.with_name(aside.name + "-wal")
    wal = wal_path.read_bytes() if wal_path.exists() else b""
    with open(aside, "rb") as f:
        empty = os.fstat(f.fileno()).st_size == 0
        data = b"" if empty else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            for row in scan(data, wal, bound):
                if isinstance(row, EventRow):
                    fresh.execute(
                        f"INSERT OR {'REPLACE' if row.intact else 'IGNORE'} INTO events "
                        "VALUES (?, ?, ?, ?, ?)",
                        (row.seq, row.event_id, row.received_at, row.body, row.crc),
                    )
                elif isinstance(row, DeliveryRow):
                    fresh.execute(
                        "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?)",
                        (row.target, row.seq, row.route),
                    )
                elif isinstance(row, OwedRow):
                    fresh.executemany(
                        "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?)",
                        [(row.target, seq, row.route) for seq in range(row.first, row.last + 1)],
                    )
                elif isinstance(row, BooksRow):
                    books[row.target] = row.counts
                    settled[row.target] = row.settled
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
    return books, settled


def _settle_salvaged(
    fresh: sqlite3.Connection,
    books: dict[str, tuple[int, ...]],
    settled: Mapping[str, int],
    target_ids: Collection[str],
) -> tuple[int, int]:
    """Make the salvaged rows a journal again: drop deliveries whose event is gone, give
    each surviving event whose delivery rows are gone to the targets the books say are
    owed events (at least once: better sent twice than lost), and write books that still
    balance, with what is missing as lost. Returns (deliveries recovered, deliveries lost).

    A batch row keeps events a target has settled until every target has passed them, so
    an heir is only given events past its `settled` seq (every seq up to it was delivered
    or dead-lettered): what it had settled is not sent again."""
    gone = dict(
        fresh.execute(
            "SELECT target, COUNT(*) FROM deliveries WHERE seq NOT IN (SELECT seq FROM events) "
            "GROUP BY target"
        )
    )
    fresh.execute("DELETE FROM deliveries WHERE seq NOT IN (SELECT seq FROM events)")
    pending = dict(fresh.execute("SELECT target, COUNT(*) FROM deliveries GROUP BY target"))

    def owed(target_id: str) -> int:
        received, delivered, dead, *lost = books[target_id]
        return received - delivered - dead - sum(lost)

    if books:
        heirs = [t for t in sorted(books) if owed(t) > pending.get(t, 0)]
    else:  # the books' page is gone too: every target may be owed them
        heirs = sorted(set(pending) | set(target_ids))
        log.error(
            "journal salvage: the books did not survive; the counts start again from what "
            "was recovered, and the lost count below is a lower bound"
        )
    unowned = [
        seq
        for (seq,) in fresh.execute(
            "SELECT seq FROM events WHERE seq NOT IN (SELECT seq FROM deliveries)"
        )
    ]
    fresh.executemany(
        "INSERT INTO deliveries VALUES (?, ?, ?)",
        [(t, seq, SALVAGED_ROUTE) for t in heirs for seq in unowned if seq > settled.get(t, 0)],
    )
    fresh.execute("DELETE FROM events WHERE seq NOT IN (SELECT seq FROM deliveries)")
    pending = dict(fresh.execute("SELECT target, COUNT(*) FROM deliveries GROUP BY target"))
    lost_now = 0
    for target_id in sorted(set(books) | set(pending) | set(gone)):
        delivered, dead, lost = 0, 0, 0
        if target_id in books:
            _, delivered, dead, *previous = books[target_id]
            lost = sum(previous)
            missing = max(0, owed(target_id) - pending.get(target_id, 0))
        else:  # only the delivery rows whose events are gone tell what was lost
            missing = gone.get(target_id, 0)
        lost += missing
        lost_now += missing
        received = delivered + dead + pending.get(target_id, 0) + lost
        fresh.execute(
            "INSERT INTO books(target, received, delivered, dead_lettered, lost, settled) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (target_id, received, delivered, dead, lost, settled.get(target_id, 0)),
        )
    return sum(pending.values()), lost_now
