"""The journal's database file: its name, tables and format (SQLite's user_version), opening a
connection (the pragmas, the tables, a journal of an older format brought up to this one, a
newer one refused), the integrity check at open, and transactions. SQLite's errors become
JournalUnavailableError here: what is SQLite stays in this package.

Tables (the design is told in router/journal/sqlite/__init__.py):

    batches(first_seq, last_seq, records)              one row per commit: its events as a
                                                       frame of records (salvage.frame), each
                                                       with its seq, id, arrival time and CRC,
                                                       deflated when large (salvage.pack)
    owed(target, last_seq, first_seq, batch, route)    one row per run of consecutive seqs of
                                                       one batch owed to a target by one route
                                                       (one per commit and target when routing
                                                       sends the whole commit there)
    books(target, received, delivered, dead_lettered, lost)  moved in the same transactions
    chains(target, seq, hash, checkpoint, checkpoint_at)     router/evidence: each target's
                                                       chain head and its last checkpoint
    planned(target, batch_key, name, base_seq, ..., body)    router/evidence: the object a
                                                       bucket target is about to PUT

`events(seq, ...)` and `deliveries(target, seq, route)` are the layout before batches, one row
per event and per delivery: a journal written that way (or rebuilt by salvage) is moved into
batches when it opens (migrate.py), and they stay empty.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from router.config import JOURNAL_FILE
from router.errors import JournalFormatError
from router.journal import JournalUnavailableError
from router.journal.salvage import MAGIC

log = logging.getLogger(__name__)

DB_NAME = JOURNAL_FILE
SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, records BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS owed (
    target TEXT NOT NULL, last_seq INTEGER NOT NULL, first_seq INTEGER NOT NULL,
    batch INTEGER NOT NULL, route TEXT NOT NULL, PRIMARY KEY (target, last_seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS owed_batch ON owed(batch);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL, received_at REAL NOT NULL,
    body BLOB NOT NULL, crc INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
    target TEXT NOT NULL, seq INTEGER NOT NULL, route TEXT NOT NULL,
    PRIMARY KEY (target, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS books (
    target TEXT PRIMARY KEY, received INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0, dead_lettered INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0, settled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS chains (
    target TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash BLOB NOT NULL,
    checkpoint BLOB, checkpoint_at REAL);
CREATE TABLE IF NOT EXISTS planned (
    target TEXT PRIMARY KEY, batch_key TEXT NOT NULL, name TEXT NOT NULL,
    base_seq INTEGER NOT NULL, base_hash BLOB NOT NULL, head_seq INTEGER NOT NULL,
    head_prev BLOB NOT NULL, head_hash BLOB NOT NULL, body BLOB NOT NULL, md5 TEXT NOT NULL);
"""
# A journal made before books had its `lost` (then `settled`) column gets it on open, in order.
ADD_COLUMNS = {
    "lost": "ALTER TABLE books ADD COLUMN lost INTEGER NOT NULL DEFAULT 0",
    "settled": "ALTER TABLE books ADD COLUMN settled INTEGER NOT NULL DEFAULT 0",
}
# The journal's format, kept in SQLite's user_version. 0: every journal before format 2;
# 2: a batch frame may be stored packed (salvage.pack), which a router that does not know it
# would take for damage, dead-lettering the frame's events as journal_corrupt without their
# bodies. A journal of an older format is brought up to this one on open; one newer than this
# is refused, untouched (JournalFormatError). 3: a frame's records' CRCs cover their headers
# (seq, arrival time, id, body length) as well as their bodies, and such a frame starts with
# salvage.COVERED; frames written before keep their CRCs of the body alone and are read by
# that rule. A router of format 2 would find no record in a format-3 frame.
FORMAT = 3
# The page size of a new journal: SQLite's default. Larger pages pay for batches and cost
# single events: a batch row's bodies (BATCH_BYTES)
# overflow into a chain of pages, each its own WAL frame, so 16 KiB pages cut the journal
# thread's CPU per batched event by ~2-3 us (bench.journal_owner 11.0-11.3 -> 7.7-8.7); but
# every small commit writes whole pages, ~3x the WAL bytes (55 -> 157 KB per insert and ack
# of one event) at +20-35 % CPU, single events fell to 0.72x in bench.compare, and the owner's
# peak RSS rose ~5 MB (two workers' 1M backlog past 200 MB). An existing journal keeps the
# size it was made with (WAL mode cannot change it), so every figure below is in bytes, and
# salvage reads the size from the file.
PAGE_BYTES = 4096
SYNCHRONOUS = {"always": "FULL", "interval": "NORMAL", "never": "OFF"}


@contextmanager
def unavailable_on_sqlite_errors() -> Iterator[None]:
    """SQLite's errors leave the journal as JournalUnavailableError: what is SQLite stays here."""
    try:
        yield
    except sqlite3.Error as exc:
        raise JournalUnavailableError(str(exc)) from exc


def newer(path: Path, found: int) -> JournalFormatError:
    return JournalFormatError(
        f"journal {path} is format {found}, written by a newer event-router; this one "
        f"reads up to format {FORMAT}: run that version (or drain the journal with it)"
    )


def format_of(path: Path) -> int | None:
    """The format (user_version) a journal file says it is, read before anything else opens
    it; None where there is no file or its header does not say (then salvage reads it)."""
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error:
        with open(path, "rb") as f:
            header = f.read(100)
        if len(header) < 100 or not header.startswith(MAGIC):
            return None
        return int.from_bytes(header[60:64], "big", signed=True)


def connect(path: Path, fsync: str) -> sqlite3.Connection:
    """The journal's connection (autocommit: `transaction` makes each one), with its pragmas
    and tables, brought up to FORMAT; a journal of a newer format is refused, untouched."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > FORMAT:
        db.close()
        raise newer(path, found)
    # Both only take effect on a new file: pages freed by reclaimed events can then be
    # returned to the file system after a large backlog drains (see space.give_back).
    db.execute(f"PRAGMA page_size={PAGE_BYTES}")
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    db.execute("PRAGMA journal_mode=WAL")
    # This SQLite build zeroes every deleted record by default, which writes each delivered
    # event's page a second time; FAST still overwrites in place where that costs no I/O.
    db.execute("PRAGMA secure_delete=FAST")
    db.execute(f"PRAGMA synchronous={SYNCHRONOUS[fsync]}")
    db.executescript(SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(books)")}
    for column, add in ADD_COLUMNS.items():
        if column not in columns:
            db.execute(add)
    if found < FORMAT:
        db.execute(f"PRAGMA user_version = {FORMAT}")
    return db


def intact(path: Path) -> bool:
    """Whether the file passes SQLite's quick_check (a damaged one is salvaged: migrate.py)."""
    try:
        db = sqlite3.connect(path)
        try:
            return bool(db.execute("PRAGMA quick_check").fetchone()[0] == "ok")
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return False


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        # A COMMIT that failed (busy, I/O error) leaves the transaction open: end it, or every
        # later BEGIN on this connection would fail.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def close_checkpointed(db: sqlite3.Connection, what: str) -> None:
    """Close `db` after folding its write-ahead log into the file. A checkpoint that fails
    (a full disk, say) leaves the log, which the next open replays: logged, naming `what`,
    and the close (and the stop around it) goes on."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as exc:
        log.warning("%s checkpoint at close failed (%s); the WAL keeps it", what, exc)
    finally:
        db.close()
