"""The durable hand-off between ingest and delivery: one backlog (cursor) per target, on disk.

Ingest calls `append` with every accepted event and the targets its routes chose; `append`
returns only once those events are durable under `storage.path` (per `storage.fsync`), and only
then does the producer get its 2xx. Each delivery worker reads its own target's backlog with
`next_batch` and settles a batch with `ack` once the target took it or it was dead-lettered, so
targets progress independently and a target that took an event never gets it again because
another target failed. After a crash at most the batch in flight per target is sent again.

Storage is SQLite in WAL mode (stdlib, crash-safe, checksummed WAL frames, so a torn tail is
discarded by SQLite itself) with our own CRC32 per record on top, over its seq, id, arrival
time and body (salvage.covered_crc), checked on every read:

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

An ack deletes the target's runs up to the batch's last seq (trimming the run it ends in) and
then every batch of those runs that no run points into any more: a few rows per commit, not
two per event. `events(seq, ...)` and `deliveries(target, seq, route)` are the layout before
batches, one row per event and per delivery: a journal written that way (or rebuilt by salvage)
is moved into batches when it opens, and they stay empty.

Concurrent `append` calls share one transaction and one fsync (group commit). All SQLite work
runs on one dedicated thread so the event loop never blocks on disk. While a target keeps up,
its worker takes its batches from memory (the committed events' bytes, kept per target up to
MEMORY_BYTES or MEMORY_BATCHES of its batches): the database stays the record, read only for
what memory did not hold (events committed while the target was further behind than that) or
after a restart. A record whose CRC does not match is quarantined with a log line and a
counter, and dead-lettered. A database file that
fails its integrity check at start-up is moved aside and every record whose bytes survive is
read back from its pages (router/journal/salvage.py); what did not survive is counted as lost in the
books, so received = delivered + dead_lettered + pending + lost still holds. The process holds
an exclusive lock on the directory for its life: one journal, one daemon.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import mmap
import os
import sqlite3
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from isal.isal_zlib import crc32

from router.config import JOURNAL_FILE, StorageConfig
from router.errors import JournalFormatError
from router.events import Event
from router.journal import Books, Entry, JournalFullError, JournalUnavailableError
from router.journal.lock import lock_storage
from router.journal.salvage import (
    BATCH_BYTES,
    COVERED,
    CRC_END,
    DEFAULT_BOUND,
    LEAD,
    MAGIC,
    PACKED,
    RECORD,
    TAIL,
    BooksRow,
    DeliveryRow,
    EventRow,
    FrameBound,
    OverlongFrameError,
    OwedRow,
    frame,
    frame_offsets,
    pack,
    record_at,
    record_bytes,
    scan,
    unpack,
    vouched_at,
)
from router.observe.logformat import counted

log = logging.getLogger(__name__)

T = TypeVar("T")

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
# The route of a delivery that salvage restored from a surviving event alone.
SALVAGED_ROUTE = "salvaged"
# Events of the layout before batches moved into one batch row (and one transaction) at a time
# (fewer when their bodies pass BATCH_BYTES: a frame holds what salvage.FrameBound allows).
MIGRATE_CHUNK = 1000
RETIRE_CHUNK = 1000
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
# Free pages are given back to the file system (see _give_back_space) past
# FREE_BYTES_BEFORE_SHRINK, once they are FREE_PER_USED times the pages in use: by rebuilding
# the file while at most REBUILD_MAX_USED_BYTES are in use, else SHRINK_STEP_BYTES at a time.
FREE_BYTES_BEFORE_SHRINK = 16 * 1024 * 1024
FREE_PER_USED = 16
REBUILD_MAX_USED_BYTES = 16 * 1024 * 1024
SHRINK_STEP_BYTES = 4 * 1024 * 1024
SYNCHRONOUS = {"always": "FULL", "interval": "NORMAL", "never": "OFF"}
# Per target, what the committed events kept in memory for its worker keep alive (`held_bytes`:
# their bytes and ids and the objects around them); what a target further behind than this did
# not keep is read from the database, once the worker has taken what memory held.
MEMORY_BYTES = 8 * 1024 * 1024
# ... or, for a target whose batches are larger, this many of its batches (`max_bytes`): the
# batch its worker holds, the next one filling meanwhile, and room for the cycles that take
# longer (a checkpoint, a busy event loop). A file target's 4 MiB batches of 2,000 events
# overflowed 8 MiB (about 5,600 events as `held_bytes` counts them) whenever one process's
# intake outran a cycle or two.
MEMORY_BATCHES = 4
# A target whose worker settled a batch within this long keeps what memory holds once it is
# full (its next batches); one that did not (its target down, a batch retried) lets it go, as
# a target that never settled one does: a target down for a million events holds no memory.
MOVING_S = 5.0
# While the journal is unhealthy (a write failed), a small write is tried this often, so that
# /readyz turns 200 again once the disk takes writes, without waiting for a producer.
HEALTH_PROBE_S = 1.0
# With fsync always, while batched appends overlap (the last commit held more than one append
# and at least LINGER_MIN_EVENTS events), a commit waits this long for more before it starts:
# each commit costs the journal's thread ~0.3 ms of CPU whatever its size (SqliteJournal alone,
# groups of 100 -> 2,000 events: 3.9-4.6 -> 1.27 us an event), and under load a commit took
# what arrived during the last one's fsync, ~250 events. bench.compare's batch100 with two
# workers (6 s, loaded host): 3.8-4.0 -> 2.4-2.5 commits per 1,000 events, p50/p99 within the
# run-to-run spread. Single events do not wait: a client holding N requests in flight sends at
# N per round trip, and 4 ms more on each cost bench.compare's `single` a third of its req/s.
GROUP_LINGER_S = 0.004
LINGER_MIN_EVENTS = 200


@contextmanager
def _unavailable_on_sqlite_errors() -> Iterator[None]:
    """SQLite's errors leave the journal as JournalUnavailableError: what is SQLite stays here."""
    try:
        yield
    except sqlite3.Error as exc:
        raise JournalUnavailableError(str(exc)) from exc


def _newer(path: Path, found: int) -> JournalFormatError:
    return JournalFormatError(
        f"journal {path} is format {found}, written by a newer event-router; this one "
        f"reads up to format {FORMAT}: run that version (or drain the journal with it)"
    )


def _format_of(path: Path) -> int | None:
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


@dataclass(slots=True)
class _Pending:
    routed: Sequence[tuple[Event, Mapping[str, str]]]
    done: asyncio.Future[None]


def _entry_overhead() -> int:
    """What remembering an entry costs beyond its event's bytes and id characters: the Entry,
    the Event, the bytes' and the id's object headers, its arrival time, its seq and the
    deque's slot (290 bytes on CPython 3.11 x86-64: a third more than a 1 KB event's bytes)."""
    event = Event.stored("", b"", 0.0)
    entry = Entry(1 << 40, event, "")
    parts = (entry, event, event.encoded(), event.id, event.received_at, entry.seq)
    return sum(sys.getsizeof(part) for part in parts) + struct.calcsize("P")


ENTRY_OVERHEAD = _entry_overhead()


def held_bytes(entry: Entry) -> int:
    """What a remembered entry keeps alive, as the memory budget counts it (the route's name
    is shared by every entry of its route)."""
    return len(entry.event.encoded()) + len(entry.event.id) + ENTRY_OVERHEAD


# Entry's fields, set without its generated __init__: a frozen dataclass sets each field through
# object.__setattr__ (0.77 us an Entry, against 0.44 here), and the journal makes one per event
# it keeps in memory or reads back. The Entry is the same frozen object either way.
_ENTRY_NEW = object.__new__
_ENTRY_SEQ = Entry.__dict__["seq"].__set__
_ENTRY_EVENT = Entry.__dict__["event"].__set__
_ENTRY_ROUTE = Entry.__dict__["route"].__set__


def _entry(seq: int, event: Event, route: str) -> Entry:
    """Entry(seq, event, route), made at less than half the cost (see _ENTRY_NEW)."""
    entry: Entry = _ENTRY_NEW(Entry)
    _ENTRY_SEQ(entry, seq)
    _ENTRY_EVENT(entry, event)
    _ENTRY_ROUTE(entry, route)
    return entry


@dataclass(slots=True)
class _Target:
    books: Books = field(default_factory=Books)
    cursor: int = 0  # every delivery row of this target with seq <= cursor is settled
    in_flight_through: int = 0  # the last seq of the batch its worker holds (0: none)
    in_flight_since: float = float("inf")  # when the worker took that batch (monotonic)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # Held while the worker reads a batch and while shedding, so they never take the same rows.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # `memory` holds committed entries of this target past its cursor, in seq order
    # (`memory_bytes`: what they keep alive, `held_bytes`, at most `budget`), with no
    # pending entry of the target between two of them. While it starts at the target's oldest
    # pending entry (`in_memory`), batches come from there, not SQLite. Once full, memory keeps
    # what it holds (the worker's next batches) and counts what it did not take
    # (`overflow`: the newest pending entries); once the worker has taken all it held, it
    # reads those from the database. A target further behind than its budget then stops
    # `remembering` until its backlog would fit again.
    memory: collections.deque[Entry] = field(default_factory=collections.deque)
    memory_bytes: int = 0
    budget: int = field(default_factory=lambda: MEMORY_BYTES)  # then `next_batch`'s
    remembering: bool = True
    overflow: int = 0
    settled_at: float = float("-inf")  # when its worker last settled a batch (monotonic)
    batches_from_memory: int = 0
    batches_from_disk: int = 0
    # Acks under way: a worker (a new one, after a reload stopped the last during its ack)
    # takes its next batch from memory only once they are done, as a read of the database
    # would queue behind their writes on the journal's thread.
    acks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def unheld_before(self) -> int:
        """Pending entries older than everything memory holds (all of them when it holds
        none): what the worker reads from the database before memory serves again. Memory only
        ever holds committed, unsettled entries of this target, in seq order, and those it
        lacks past its newest are counted in `overflow`, so the rest of `pending` is these."""
        return self.books.pending - len(self.memory) - self.overflow

    @property
    def in_memory(self) -> bool:
        """Memory starts at the oldest entry still pending, so the next batch can come from
        there: a worker that fell behind reads the database until it has settled what memory
        lacks, then takes memory again, whether or not new events keep coming (a busy journal
        owner never has 0 pending)."""
        return bool(self.memory) and self.unheld_before == 0

    def committed(self, count: int, entries: Sequence[Entry], held: int) -> None:
        """`count` entries of this target are durable; `entries` are they, made for memory,
        or none (`may_remember` said they could not be kept). `held` is what they keep alive
        (the sum of their `held_bytes`): when all of them fit, they are remembered at once, as
        `remember` would one by one."""
        self.books.received += count
        self.books.pending += count
        if len(entries) == count:
            if self.remembering and not self.overflow and self.memory_bytes + held <= self.budget:
                self.memory.extend(entries)
                self.memory_bytes += held
                return
            for entry in entries:
                self.remember(entry)
        elif self.memory:
            self.overflow += count  # newer than all memory holds, and not in it

    def remember(self, entry: Entry) -> None:
        """Keep a committed entry for the worker. Once its budget is full, memory keeps what
        it holds (the oldest pending, the next batches) if the worker is moving (it settled a
        batch within MOVING_S), else lets it go; this entry is counted in `overflow`, as is
        every later one until the worker has taken all memory held; then
        remembering starts again once all the target has pending would fit in the budget
        (a backlog of a million events holds no memory meanwhile)."""
        if self.overflow:
            self.overflow += 1
            return
        size = held_bytes(entry)
        if not self.memory and not self.remembering:
            if self.books.pending * size > self.budget:
                return
            self.remembering = True
        if self.memory_bytes + size > self.budget:
            if self.memory and time.monotonic() - self.settled_at < MOVING_S:
                self.overflow = 1
            else:
                self.forget()
            return
        self.memory.append(entry)
        self.memory_bytes += size

    def may_remember(self) -> bool:
        """Could an entry committed now be remembered? Not while memory is full (`overflow`),
        nor once remembering stopped while the target is further behind than memory would hold
        even of empty events: `remember` would drop each entry at once, so the journal does
        not make them."""
        return not self.overflow and (
            self.remembering or self.books.pending * ENTRY_OVERHEAD <= self.budget
        )

    def forget(self) -> None:
        """Drop what memory holds and stop remembering (rows shed leave the database): the
        worker reads the database until it is close enough again."""
        self.remembering = False
        self.overflow = 0
        self.memory.clear()
        self.memory_bytes = 0

    def settled_through(self, last: int) -> None:
        """Entries up to `last` are settled: out of memory. Once the worker has taken all that
        a full memory held, what it did not take (`overflow`) is read from the database, and
        remembering waits until the backlog would fit."""
        self.settled_at = time.monotonic()
        memory = self.memory
        # held_bytes, summed inline: a call per entry was a fifth of the ack's CPU.
        freed = popped = 0
        while memory and memory[0].seq <= last:
            event = memory.popleft().event
            freed += len(event.encoded()) + len(event.id)
            popped += 1
        self.memory_bytes -= freed + popped * ENTRY_OVERHEAD
        if not self.memory and self.overflow:
            self.overflow = 0
            self.remembering = False


class SqliteJournal:
    """The durable journal. `open()` recovers state; `close()` checkpoints and closes."""

    MAKES_ROOM_ITSELF: ClassVar[bool] = False  # the Acceptor sheds when this one is full

    def __init__(
        self,
        storage: StorageConfig,
        target_ids: Sequence[str],
        *,
        bound: FrameBound = DEFAULT_BOUND,
    ) -> None:
        self.config = storage
        # How far a packed frame is inflated: past it, the frame is damage (salvage.unpack).
        self.bound = bound
        self.directory = Path(storage.path)
        self.path = self.directory / DB_NAME
        self._targets = {target_id: _Target() for target_id in target_ids}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        # An operator's lookups (pending_for) read on a connection and thread of their own, so
        # a scan of a large backlog never holds up the writer's appends and acks.
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-read")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._next_seq = 1
        self._page_size = 4096
        # The journal thread's last batch read, and where each of its records starts: a
        # target reading its backlog takes a large commit in several batches.
        self._frame: tuple[int, bytes, dict[int, int]] = (0, b"", {})
        self._queue: list[_Pending] = []
        self._lingers = False  # the next commit waits for more (see GROUP_LINGER_S)
        self._flusher: asyncio.Task[None] | None = None
        self._interval_syncer: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        # Acks under way: shielded from a cancelled worker, awaited by close().
        self._settling: set[asyncio.Task[None]] = set()
        self._retire_locks: dict[str, asyncio.Lock] = {}
        self.used_bytes = 0
        self.quarantined = 0
        self._quarantined_seqs: set[int] = set()
        # Deliveries whose events did not survive a damaged file, summed over the books.
        self.lost_records = 0
        self.checkpoint_errors = 0
        # False from a failed write until the next successful one (/readyz answers 503).
        self.healthy = True
        # router/evidence: a target's chain head (seq, hash) to keep with each ack, in the same
        # transaction, so the head known after a restart covers every line written; None for
        # a target whose chain keeps its head itself (or has none).
        self.chain_head: Callable[[str], tuple[int, bytes] | None] | None = None
        # Targets the config no longer has but the journal still owes events: the caller
        # retires them (dead letters with reason target_removed) before anything else.
        self.orphans: set[str] = set()
        # Orphans found while running (rows routed just before a reload retired the target),
        # for the owner to take and retire: the journal never calls up into its owner.
        self.orphaned: asyncio.Queue[str] = asyncio.Queue()

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open_sync)
        if self.config.fsync == "interval":
            self._interval_syncer = asyncio.create_task(
                self._sync_every_interval(), name="journal-fsync"
            )

    async def close(self) -> None:
        for task in (self._interval_syncer, self._prober):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*self._settling, return_exceptions=True)
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._db is not None:
            await self._run(self._close_sync)
        self._executor.shutdown(wait=True)
        self._reads.shutdown(wait=True)
        self._unlock()

    def _lock(self) -> None:
        self._lock_fd = lock_storage(self.directory)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _write_failed(self) -> None:
        """A write failed: unhealthy until a write succeeds, and one is tried every
        HEALTH_PROBE_S meanwhile, since nothing else may write (no producer, no backlog)."""
        self.healthy = False
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(self._probe_until_healthy(), name="journal-probe")

    async def _probe_until_healthy(self) -> None:
        while not self.healthy:
            await asyncio.sleep(HEALTH_PROBE_S)
            try:
                await self._run(self._probe_sync)
            except (sqlite3.Error, OSError) as exc:
                log.debug("journal still not writable: %s", exc)
                continue
            self.healthy = True
            log.info("journal %s is writable again", self.path)

    def _probe_sync(self) -> None:
        """A real write (a page of the books table rewritten to the WAL), changing nothing."""
        if self._db is not None:
            with transaction(self._db) as db:
                db.execute("UPDATE books SET received = received")

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found > FORMAT:
            db.close()
            raise _newer(path, found)
        # Both only take effect on a new file: pages freed by reclaimed events can then be
        # returned to the file system after a large backlog drains (see _give_back_space).
        db.execute(f"PRAGMA page_size={PAGE_BYTES}")
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        # This SQLite build zeroes every deleted record by default, which writes each delivered
        # event's page a second time; FAST still overwrites in place where that costs no I/O.
        db.execute("PRAGMA secure_delete=FAST")
        db.execute(f"PRAGMA synchronous={SYNCHRONOUS[self.config.fsync]}")
        db.executescript(SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(books)")}
        for column, add in ADD_COLUMNS.items():
            if column not in columns:
                db.execute(add)
        if found < FORMAT:
            db.execute(f"PRAGMA user_version = {FORMAT}")
        return db

    def _open_sync(self) -> None:
        self._lock()
        # The format first: a newer journal that is damaged too is not this router's to
        # salvage (its frames may be of a kind this one would take for garbage).
        found = _format_of(self.path)
        if found is not None and found > FORMAT:
            raise _newer(self.path, found)
        if self.path.exists() and not self._intact(self.path):
            self._quarantine_file()
        self.path.touch(mode=0o600, exist_ok=True)
        self._db = self._connect(self.path)
        db = self._db
        _move_into_batches(db, commit_each=True, vouched=True)
        self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        self._next_seq = (db.execute("SELECT MAX(last_seq) FROM batches").fetchone()[0] or 0) + 1
        for target_id, target in self._targets.items():
            target.books = self._books_sync(target_id)
        self.lost_records = db.execute("SELECT COALESCE(SUM(lost), 0) FROM books").fetchone()[0]
        for (target_id,) in db.execute("SELECT DISTINCT target FROM owed").fetchall():
            if target_id not in self._targets:
                self.orphans.add(target_id)
        self._update_size()
        pending = sum(t.books.pending for t in self._targets.values())
        log.info(
            "journal %s opened: %s, %d bytes",
            self.path,
            counted(pending, "pending delivery", "pending deliveries"),
            self.used_bytes,
        )

    def _close_sync(self) -> None:
        assert self._db is not None
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            # A full disk, say: the log keeps every commit, and the next open replays it.
            log.warning("journal checkpoint at close failed (%s); the WAL keeps it", exc)
        finally:
            self._db.close()
            self._db = None

    @staticmethod
    def _intact(path: Path) -> bool:
        try:
            db = sqlite3.connect(path)
            try:
                return bool(db.execute("PRAGMA quick_check").fetchone()[0] == "ok")
            finally:
                db.close()
        except sqlite3.DatabaseError:
            return False

    def _quarantine_file(self) -> None:
        """Move a damaged database aside (kept for inspection) and build a fresh journal from
        every record its pages still hold; report, and book as lost, what they do not."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{DB_NAME}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = self.path.with_name(DB_NAME + suffix)
            if src.exists():
                src.rename(aside.with_name(aside.name + suffix))
        log.error("journal %s failed its integrity check; moved to %s, salvaging", self.path, aside)
        # Created 0600 before SQLite opens it: SQLite gives -wal and -shm the file's own mode.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        fresh = self._connect(self.path)
        try:
            with transaction(fresh):
                books, settled = _copy_salvaged(aside, fresh, self.bound)
                recovered, lost = self._settle_salvaged(fresh, books, settled)
                _move_into_batches(fresh, commit_each=False, vouched=False)
        finally:
            fresh.close()
        log.error(
            "journal salvage: %s recovered from %s, %d lost (their records did not "
            "survive; counted in the books as lost)",
            counted(recovered, "delivery", "deliveries"),
            aside,
            lost,
        )

    def _settle_salvaged(
        self,
        fresh: sqlite3.Connection,
        books: dict[str, tuple[int, ...]],
        settled: Mapping[str, int],
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
            heirs = sorted(set(pending) | set(self._targets))
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

    # -- append (group commit) -----------------------------------------------------------------

    async def append(self, routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
        # Events no route chose are skipped where the commit is made (_rows), not filtered
        # into a list of pairs of their own here: a copy of the caller's list will do.
        if not any(targets for _, targets in routed):
            return
        routed = list(routed)
        if self.config.max_bytes and self.used_bytes >= self.config.max_bytes:
            raise JournalFullError(
                f"the journal holds {self.used_bytes} bytes, storage.max_bytes is "
                f"{self.config.max_bytes}"
            )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(routed, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="journal-flush")
        with _unavailable_on_sqlite_errors():
            await asyncio.shield(done)

    async def _flush(self) -> None:
        """Write everything queued in one transaction; requests queued meanwhile go next."""
        while self._queue:
            if self._lingers:
                await asyncio.sleep(GROUP_LINGER_S)
            group, self._queue = self._queue, []
            batches, runs, entries, held = self._rows(group)
            self._lingers = (
                len(group) > 1
                and batches[-1][1] - batches[0][0] + 1 >= LINGER_MIN_EVENTS
                and self.config.fsync == "always"
            )
            received: dict[str, int] = {}
            for target_id, last, first, *_ in runs:
                received[target_id] = received.get(target_id, 0) + last - first + 1
            try:
                await self._run(self._write_sync, batches, runs, received)
            except Exception as exc:
                self._write_failed()
                log.exception("journal write failed")
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_exception(exc)
                continue
            self.healthy = True
            for target_id, count in received.items():
                target = self._targets.get(target_id)
                if target is None:
                    # Routed just before a reload retired this target: the rows are owed to
                    # no running worker, so they are retired (dead-lettered) as an orphan.
                    self.orphans.add(target_id)
                    self.orphaned.put_nowait(target_id)
                    continue
                target.committed(count, entries.get(target_id, ()), held.get(target_id, 0))
                target.wakeup.set()
            for pending in group:
                if not pending.done.done():
                    pending.done.set_result(None)

    def _rows(
        self, group: Sequence[_Pending]
    ) -> tuple[
        list[tuple[int, int, list[bytes]]], list[list[Any]], dict[str, list[Entry]], dict[str, int]
    ]:
        """One commit: its batches (first seq, last seq, the parts of the frame of their
        records, up to about BATCH_BYTES each), its owed runs ([target, last seq, first seq,
        batch, route]: consecutive seqs of one batch a target gets by one route), and per
        target the entries its worker may take from memory once it is durable and what they
        keep alive (their `held_bytes`, summed): each event as the journal stores it (its
        bytes, no parsed body), so memory holds what a read of the database would give and
        nothing more. None are made for a target that could not remember them
        (`may_remember`: too far behind; under load, every one of them).

        An event routed as the one before it (in the same batch row: nearly every event of a
        request) extends that one's runs and entry lists as they are: its targets are looked
        up in the runs only when they change, not per event."""
        batches: list[tuple[int, int, list[bytes]]] = []
        runs: list[list[Any]] = []
        current: dict[str, list[Any]] = {}
        entries: dict[str, list[Entry]] = {}
        first = seq = self._next_seq
        parts: list[bytes] = [COVERED]
        size = 0
        lead, tail, crc, frame_bytes, overhead = (
            LEAD.pack,
            TAIL.pack,
            crc32,
            BATCH_BYTES,
            ENTRY_OVERHEAD,
        )
        # _entry, inlined (0.36 -> 0.29 us an entry): one per event and target remembering.
        new, set_seq, set_event, set_route = _ENTRY_NEW, _ENTRY_SEQ, _ENTRY_EVENT, _ENTRY_ROUTE
        keep = {target_id for target_id, target in self._targets.items() if target.may_remember()}
        # What the previous event's targets extended: per target its run, and when the target
        # remembers, [its entry list, their held bytes] (the same list for every event after).
        routed_as: Mapping[str, str] | None = None
        extended: list[tuple[list[Any], list[Any] | None]] = []
        memory: dict[str, list[Any]] = {}
        for pending in group:
            for event, targets in pending.routed:
                if not targets:
                    continue  # no route chose it: not journaled (append)
                body = event.encoded()
                event_id = event.id
                raw_id = event_id.encode()
                length = len(body)
                if size > frame_bytes:
                    batches.append((first, seq - 1, parts))
                    first, parts, size, current, routed_as = seq, [COVERED], 0, {}, None
                # A RECORD as LEAD and TAIL, its CRC salvage.covered_crc's, inlined: this is
                # every event's append (3 calls where one RECORD.pack took 2; callgrind: ~1,800
                # instructions more per event, where chaining crc32 over the parts took ~2,500).
                covered = tail(seq, event.received_at, len(raw_id)) + raw_id
                parts += (lead(length, crc(body, crc(covered, length))), covered, body)
                size += length
                kept = event.as_stored()
                held = length + len(event_id) + overhead  # each entry's held_bytes
                if targets is not routed_as and targets != routed_as:
                    extended = []
                    for target_id, route in targets.items():
                        run = current.get(target_id)
                        if run is None or run[1] != seq - 1 or run[4] != route:
                            current[target_id] = run = [target_id, seq - 1, seq, first, route]
                            runs.append(run)
                        kept_for = None
                        if target_id in keep:
                            kept_for = memory.get(target_id)
                            if kept_for is None:
                                memory[target_id] = kept_for = [[], 0]
                        extended.append((run, kept_for))
                    routed_as = targets
                for run, kept_for in extended:
                    run[1] = seq
                    if kept_for is not None:
                        entry = new(Entry)
                        set_seq(entry, seq)
                        set_event(entry, kept)
                        set_route(entry, run[4])
                        kept_for[0].append(entry)
                        kept_for[1] += held
                seq += 1
        batches.append((first, seq - 1, parts))
        self._next_seq = seq
        for target_id, (taken, _) in memory.items():
            entries[target_id] = taken
        return batches, runs, entries, {target_id: n for target_id, (_, n) in memory.items()}

    def _write_sync(
        self,
        batches: list[tuple[int, int, list[bytes]]],
        runs: list[list[Any]],
        received: dict[str, int],
    ) -> None:
        db = self._db
        assert db is not None
        with transaction(db):
            # Each frame is joined and packed as SQLite takes it: a large commit is never
            # copied whole.
            db.executemany(
                "INSERT INTO batches VALUES (?, ?, ?)",
                ((first, last, pack(b"".join(parts))) for first, last, parts in batches),
            )
            db.executemany("INSERT INTO owed VALUES (?, ?, ?, ?, ?)", runs)
            db.executemany(
                "UPDATE books SET received = received + ? WHERE target = ?",
                [(count, target_id) for target_id, count in received.items()],
            )
        self._update_size()

    def _update_size(self) -> int:
        """The pages in use, in bytes (one statement: the page size is read once, at open).
        Returns the free pages."""
        assert self._db is not None
        pages, free = self._db.execute(
            "SELECT * FROM pragma_page_count(), pragma_freelist_count()"
        ).fetchone()
        self.used_bytes = (pages - free) * self._page_size
        return int(free)

    async def _sync_every_interval(self) -> None:
        """fsync: interval — commits reach the OS at once and the disk every interval. A
        checkpoint that fails (disk full, I/O error) is logged and counted, and the next
        interval tries again: the commits are safe in the WAL meanwhile."""
        while True:
            await asyncio.sleep(self.config.fsync_interval_ms / 1000)
            try:
                copied = await self._run(self._checkpoint_sync)
            except (sqlite3.Error, OSError) as exc:
                self.checkpoint_errors += 1
                self._write_failed()
                log.error("journal checkpoint failed (%s); trying again next interval", exc)
                continue
            if copied:  # pages reached the database file: it takes writes
                self.healthy = True

    def _checkpoint_sync(self) -> int:
        """How many WAL frames the checkpoint copied into the database file."""
        if self._db is None:
            return 0
        _, _, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return max(int(copied), 0)

    # -- read and settle -----------------------------------------------------------------------

    async def next_batch(
        self,
        target_id: str,
        *,
        max_events: int,
        max_bytes: int,
        max_wait_s: float,
        stopping: asyncio.Event,
    ) -> list[Entry]:
        target = self._targets[target_id]
        target.budget = max(MEMORY_BYTES, MEMORY_BATCHES * max_bytes)
        while True:
            while not target.books.pending:
                if stopping.is_set():
                    return []
                target.wakeup.clear()
                await _first_of(target.wakeup, stopping)
            # Linger for more events, up to max_wait_s after the first one, unless stopping.
            deadline = time.monotonic() + max_wait_s
            while target.books.pending < max_events and not stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                target.wakeup.clear()
                await _first_of(target.wakeup, stopping, timeout_s=remaining)
            async with target.lock:
                while target.acks:
                    await asyncio.gather(*target.acks, return_exceptions=True)
                from_memory = target.in_memory
                if from_memory:
                    entries = list(itertools.islice(target.memory, max_events))
                else:
                    # What memory lacks, and no more: what it holds goes out from there.
                    limit = min(max_events, max(target.unheld_before, 1))
                    entries = await self._run(self._read_sync, target_id, target.cursor, limit)
                # Whatever memory holds fits when all of it does (held_bytes counts more than
                # a line's bytes): no look at each entry then.
                fits = from_memory and target.memory_bytes <= max_bytes
                batch = entries if fits else _fit(entries, max_bytes)
                if batch:
                    if from_memory:
                        target.batches_from_memory += 1
                    else:
                        target.batches_from_disk += 1
                    # Marked in flight under the lock, so shedding can never take these rows.
                    target.books.oldest_received_at = batch[0].event.received_at
                    target.in_flight_through = batch[-1].seq
                    target.in_flight_since = time.monotonic()
                    return batch
            # What was counted was shed before it could be read: wait for more.
            target.wakeup.clear()
            await _first_of(target.wakeup, stopping, timeout_s=1.0)

    def _read_sync(self, target_id: str, after: int, limit: int) -> list[Entry]:
        """The target's first `limit` entries past seq `after`: its runs, each read from its
        batch's frame (a seq its frame lacks is a quarantine marker, as a record that fails
        its checksum is)."""
        assert self._db is not None
        runs = self._db.execute(
            "SELECT first_seq, last_seq, batch, route FROM owed "
            "WHERE target = ? AND last_seq > ? ORDER BY last_seq LIMIT ?",
            (target_id, after, limit),
        ).fetchall()
        entries: list[Entry] = []
        unpack, size = RECORD.unpack_from, RECORD.size
        for first, last, batch, route in runs:
            blob, offsets = self._batch_frame(batch)
            covered = blob.startswith(COVERED)  # format 3: the CRC covers the header too
            for seq in range(max(first, after + 1), last + 1):
                at = offsets.get(seq)
                event = None
                if at is not None:
                    # record_at and _decode, inlined: this is the read of every backlog.
                    length, crc, _, received_at, id_length = unpack(blob, at)
                    start = at + size + id_length
                    body = blob[start : start + length]
                    if (
                        crc32(body, crc32(blob[at + CRC_END : start], length))
                        if covered
                        else crc32(body)
                    ) == crc and body[:1] == b"{":
                        try:
                            event_id = blob[at + size : start].decode()
                        except UnicodeDecodeError:
                            pass
                        else:
                            event = Event.stored(event_id, body, received_at)
                if event is None:
                    event = self._quarantined(seq, batch, blob, at)
                entries.append(_entry(seq, event, route))
                if len(entries) == limit:
                    return entries
        return entries

    def _batch_frame(self, batch: int) -> tuple[bytes, dict[int, int]]:
        """A batch's blob and where each of its records starts, kept for the next read (a
        target reads a large commit in several batches; a batch is never rewritten)."""
        if self._frame[0] != batch:
            assert self._db is not None
            row = self._db.execute(
                "SELECT last_seq, records FROM batches WHERE first_seq = ?", (batch,)
            ).fetchone()
            blob = self._unpack(bytes(row[1]), batch, row[0]) if row is not None else b""
            offsets = frame_offsets(blob, batch, row[0]) if row is not None else {}
            self._frame = (batch, blob, offsets)
        return self._frame[1], self._frame[2]

    def _unpack(self, stored: bytes, first: int, last: int) -> bytes:
        """The frame of batch first..last, inflated no further than it can legitimately hold
        (self.bound): one that goes on past that is damaged, read as cut there, and the
        records past the cut are quarantined as missing (a deflate bomb never fills memory)."""
        try:
            return unpack(stored, self.bound.of(first, last))
        except OverlongFrameError as exc:
            log.error(
                "journal frame %d (seqs %d-%d, %d bytes stored) inflates past %d bytes, the "
                "most it can hold; read as cut there, the records past it quarantined",
                first,
                first,
                last,
                len(stored),
                exc.most,
            )
            return exc.prefix

    def _quarantined(self, seq: int, batch: int, blob: bytes, at: int | None) -> Event:
        """The quarantine marker, dead-lettered and not sent, for a record owed under `seq`
        that is missing from its batch's frame, fails its checksum, or is not a JSON object.

        Its letter holds an excerpt of its bytes, its id and arrival time only when the record
        is vouched for (salvage.vouched_at): its CRC covers its header and matched (format 3),
        so it is the record written under this seq and only its body is no event; or it was
        moved into its frame from an events row of an intact file (keyed by its seq) whose body
        had failed its CRC already, and is marked so. Any other record that failed its CRC
        is not: its seq, id or length may be what was damaged, so it may be another event's,
        owed to targets this one's routes never named, standing at this seq (a body slice by
        a damaged length may run into the records after it, too). Its letter says where it
        lies and the length and sha256 of its bytes (Event.unvouched_record), none of them."""
        # A batch that did not fit is read again: count and log each record once.
        if seq not in self._quarantined_seqs:
            self._quarantined_seqs.add(seq)
            self.quarantined += 1
            log.error("journal record %d is missing or fails its checksum; quarantined", seq)
        if at is not None and vouched_at(blob, at):
            _, event_id, received_at, body, _ = record_at(blob, at)
            return Event.corrupt_record(seq, body, event_id=event_id, received_at=received_at)
        where = {"journal_file": str(self.path), "journal_frame": batch, "frame_offset": at}
        return Event.unvouched_record(
            seq, None if at is None else record_bytes(blob, at), where=where
        )

    async def ack(self, target_id: str, batch: Sequence[Entry], *, dead_lettered: int) -> None:
        """Settle the batch. A caller cancelled meanwhile (a worker stopped at the drain
        timeout) does not cancel the settling: once the commit may happen, the cursor and the
        books in memory must follow it, or they would show the batch pending forever. Safe to
        call again, after it raised or after it settled: a batch already settled is counted
        once, in the database and in the books shown."""
        if not batch:
            return
        settling = asyncio.create_task(
            self._settle(target_id, batch, dead_lettered), name=f"journal-ack:{target_id}"
        )
        self._settling.add(settling)
        settling.add_done_callback(self._settled)
        target = self._targets.get(target_id)
        if target is not None:
            target.acks.add(settling)
            settling.add_done_callback(target.acks.discard)
        with _unavailable_on_sqlite_errors():
            await asyncio.shield(settling)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller (if still waiting) handles it

    async def _settle(self, target_id: str, batch: Sequence[Entry], dead_lettered: int) -> None:
        target = self._targets[target_id]
        last = batch[-1].seq
        delivered = len(batch) - dead_lettered
        # Read on the loop, after the write: the head only covers lines already written.
        head = self.chain_head(target_id) if self.chain_head is not None else None
        try:
            await self._run(self._ack_sync, target_id, last, delivered, dead_lettered, head)
        except (sqlite3.Error, OSError):
            self._write_failed()
            raise
        self.healthy = True
        if last <= target.cursor:
            # Settled before (the same seqs acked again): the commit changed nothing, and
            # neither do the books shown, nor the batch its worker may hold now.
            return
        target.cursor = last
        target.in_flight_through = 0
        target.in_flight_since = float("inf")
        target.books.pending -= len(batch)
        target.books.delivered += delivered
        target.books.dead_lettered += dead_lettered
        if not target.books.pending:
            target.books.oldest_received_at = None
        target.settled_through(last)

    def _ack_sync(
        self,
        target_id: str,
        last: int,
        delivered: int,
        dead_lettered: int,
        head: tuple[int, bytes] | None = None,
    ) -> None:
        db = self._db
        assert db is not None
        with transaction(db):
            if head is not None:
                _keep_chain_head(db, target_id, *head)
            touched = db.execute(
                "DELETE FROM owed WHERE target = ? AND last_seq <= ? RETURNING batch",
                (target_id, last),
            ).fetchall()
            # The run the batch ends in, if it goes on past it, now starts after it.
            trimmed = db.execute(
                "UPDATE owed SET first_seq = ?1 + 1 WHERE target = ?2 AND first_seq <= ?1 AND "
                "last_seq = (SELECT MIN(last_seq) FROM owed WHERE target = ?2 AND last_seq > ?1)",
                (last, target_id),
            ).rowcount
            if touched or trimmed > 0:  # none: an earlier attempt committed, then failed after
                db.execute(
                    "UPDATE books SET delivered = delivered + ?, "
                    "dead_lettered = dead_lettered + ?, settled = MAX(settled, ?) WHERE target = ?",
                    (delivered, dead_lettered, last, target_id),
                )
            self._drop_unowned(db, {batch for (batch,) in touched})
        self._give_back_space(self._update_size())

    def _drop_unowned(self, db: sqlite3.Connection, batches: set[int]) -> None:
        """Delete those of these batches that no target is owed anything of any more."""
        db.executemany(
            "DELETE FROM batches WHERE first_seq = ?1 AND NOT EXISTS "
            "(SELECT 1 FROM owed WHERE batch = ?1)",
            [(batch,) for batch in batches],
        )
        if self._frame[0] in batches:
            self._frame = (0, b"", {})

    def _give_back_space(self, free_pages: int) -> None:
        """Once many pages are free and a backlog has (nearly) drained, give them back to the
        file system, so that a drained backlog does not keep its disk space forever, at what
        it costs per page freed.

        While the journal still holds a backlog of more than a sixteenth of what is free,
        nothing is done: the next commits reuse those pages. `incremental_vacuum` costs 8-50 us
        of CPU per page it frees (it takes each one off the freelist, the more the longer the
        list, and moves its pointer map): ~2.5 us per 1 KB event a drain freed, the most of an
        ack's cost in bench.journal_owner. Rebuilding the file (VACUUM) costs about its pages
        in use instead (20-40 us each: a few ms for a drained journal, ~150 ms at most), so a
        drained journal is rebuilt, and only one that keeps a larger backlog in a file mostly
        free shrinks a step at a time, so that no single ack pays for all of it. A failure
        here (a full disk for the rebuild) leaves the space for later: the ack has committed."""
        assert self._db is not None
        free_bytes = free_pages * self._page_size
        if free_bytes <= FREE_BYTES_BEFORE_SHRINK or free_bytes < FREE_PER_USED * self.used_bytes:
            return
        if self.used_bytes <= REBUILD_MAX_USED_BYTES:
            statement = "VACUUM;"
        else:
            # executescript steps the pragma to completion; execute() frees one page only.
            statement = f"PRAGMA incremental_vacuum({SHRINK_STEP_BYTES // self._page_size});"
        try:
            self._db.executescript(statement)
        except sqlite3.Error as exc:
            log.warning("journal: could not give free pages back (%s); trying again later", exc)
        self._update_size()

    def shed_order(self) -> list[str]:
        """Targets with a backlog, the stuck one first: the one whose worker has held its
        batch the longest (retrying against a target that is down), then by oldest event."""
        backlogged = [
            (
                t.in_flight_since,
                t.books.oldest_received_at or float("inf"),
                -t.books.pending,
                target_id,
            )
            for target_id, t in self._targets.items()
            if t.books.pending
        ]
        return [target_id for *_, target_id in sorted(backlogged)]

    @asynccontextmanager
    async def shed(self, target_id: str, count: int) -> AsyncIterator[list[Entry]]:
        """storage.when_full: drop_oldest_per_target. Yields the target's oldest `count`
        pending entries past the batch in flight; when the block ends without error (the caller
        has written them as dead letters) they leave the journal, counted as dead-lettered.
        Under the target's lock, which a retire holds too, so no row is dead-lettered twice."""
        target = self._targets.get(target_id)
        if target is None:  # retired meanwhile: nothing left to shed
            yield []
            return
        async with target.lock:
            if self._targets.get(target_id) is not target:
                # Retired while we waited; rows routed to it since belong to that retire.
                yield []
                return
            after = max(target.cursor, target.in_flight_through)
            target.forget()  # the rows shed leave the database; memory is read again from it
            entries = await self._run(self._read_sync, target_id, after, count)
            yield entries
            if entries:
                seqs = [entry.seq for entry in entries]
                removed = await self._run(self._shed_sync, target_id, seqs)
                # A commit that landed before the read may have been remembered and shed both:
                # memory must only ever hold unsettled entries (see _Target.in_memory).
                target.forget()
                target.books.pending -= removed
                target.books.dead_lettered += removed

    def _shed_sync(self, target_id: str, seqs: list[int], delivered: int = 0) -> int:
        """Take these seqs out of the target's runs (splitting a run around them), and delete
        the batches no one is owed anything of any more; the books move by the seqs actually
        removed: `delivered` of them (a retire's, which the target had taken) as delivered,
        the rest as dead-lettered."""
        assert self._db is not None
        if not seqs:
            return 0
        gone = set(seqs)
        with transaction(self._db) as db:
            runs = db.execute(
                "SELECT last_seq, first_seq, batch, route FROM owed WHERE target = ?1 AND "
                "last_seq BETWEEN ?2 AND "
                "(SELECT MIN(last_seq) FROM owed WHERE target = ?1 AND last_seq >= ?3)",
                (target_id, min(gone), max(gone)),
            ).fetchall()
            removed = 0
            kept: list[tuple[str, int, int, int, str]] = []
            for last, first, batch, route in runs:
                piece: list[int] = []
                for seq in [*range(first, last + 1), None]:
                    if seq is not None and seq not in gone:
                        piece.append(seq)
                        continue
                    if piece:
                        kept.append((target_id, piece[-1], piece[0], batch, route))
                        piece = []
                    removed += seq is not None
            db.executemany(
                "DELETE FROM owed WHERE target = ? AND last_seq = ?",
                [(target_id, last) for last, *_ in runs],
            )
            db.executemany("INSERT INTO owed VALUES (?, ?, ?, ?, ?)", kept)
            delivered = min(delivered, removed)
            db.execute(
                "UPDATE books SET dead_lettered = dead_lettered + ?, delivered = delivered + ? "
                "WHERE target = ?",
                (removed - delivered, delivered, target_id),
            )
            self._drop_unowned(db, {batch for _, _, batch, _ in runs})
        self._update_size()
        return removed

    async def add_target(self, target_id: str) -> None:
        """A target joins at run time (a config reload): it gets its books and a cursor. A
        target added back under an id whose orphaned rows are being retired waits for that
        retire (those rows were the removed target's); rows still owed to the id once it is
        back are its backlog, counted in its books, and no longer orphans."""
        async with self._retire_lock(target_id):
            if target_id in self._targets:
                return
            self._targets[target_id] = target = _Target()
            self.orphans.discard(target_id)
            target.books = await self._run(self._books_sync, target_id)

    def _books_sync(self, target_id: str) -> Books:
        assert self._db is not None
        self._db.execute("INSERT OR IGNORE INTO books(target) VALUES (?)", (target_id,))
        received, delivered, dead, lost = self._db.execute(
            "SELECT received, delivered, dead_lettered, lost FROM books WHERE target = ?",
            (target_id,),
        ).fetchone()
        pending = self._db.execute(
            "SELECT COALESCE(SUM(last_seq - first_seq + 1), 0) FROM owed WHERE target = ?",
            (target_id,),
        ).fetchone()[0]
        return Books(received, delivered, dead, pending, lost=lost)

    async def retire(
        self,
        target_id: str,
        dead_letter: Callable[[list[Entry]], Awaitable[int]],
        *,
        orphan: bool = False,
    ) -> int:
        """A target leaves (an orphan at start-up, or removed by a reload; its worker has
        stopped): hand everything still owed to it to `dead_letter`, a chunk at a time so a
        large backlog never sits in memory, drop it from the journal, and forget the target.
        `dead_letter` returns how many of a chunk the target had taken already (a stopped
        worker's batch whose ack the journal could not take: router/delivery.Unrecorded),
        which are counted delivered, not dead-lettered. Returns how many events were
        dead-lettered.

        Each chunk is read, dead-lettered and removed under the target's lock, as a shed is,
        so a full journal shedding this target meanwhile never takes the same rows; and one
        retire at a time per target (a reload's and one for late rows routed just before it).
        An ack still under way (its worker stopped at the drain timeout while it waited for
        the journal) lands or fails first, so what it records is never read as owed.
        An `orphan`'s retire (rows found owed to a target the config no longer had) does
        nothing once a reload has added the target back: the rows are its running worker's
        backlog then, and retiring them would dead-letter what it delivers and forget it."""
        async with self._retire_lock(target_id):
            if orphan and target_id in self._targets:
                return 0
            target = self._targets.get(target_id)
            lock = target.lock if target is not None else asyncio.Lock()
            total = 0
            while True:
                async with lock:
                    if target is not None:
                        while target.acks:
                            await asyncio.gather(*target.acks, return_exceptions=True)
                    entries = await self._run(self._read_sync, target_id, 0, RETIRE_CHUNK)
                    if not entries:
                        break
                    taken = await dead_letter(entries)
                    seqs = [e.seq for e in entries]
                    removed = await self._run(self._shed_sync, target_id, seqs, taken)
                delivered = min(taken, removed)
                total += removed - delivered
                if target is not None:
                    target.books.pending -= removed
                    target.books.delivered += delivered
                    target.books.dead_lettered += removed - delivered
            self._targets.pop(target_id, None)
            self.orphans.discard(target_id)
            return total

    def _retire_lock(self, target_id: str) -> asyncio.Lock:
        return self._retire_locks.setdefault(target_id, asyncio.Lock())

    def books(self, target_id: str) -> Books:
        return self._targets[target_id].books

    def batch_sources(self, target_id: str) -> tuple[int, int]:
        """How many of the target's batches came from memory, and how many from the database."""
        target = self._targets[target_id]
        return target.batches_from_memory, target.batches_from_disk

    # -- evidence (router/evidence): chain heads and their last checkpoints ------------------

    async def chain_heads(self) -> dict[str, tuple[int, bytes, bytes | None, float | None]]:
        """Per target: the chain head at its last checkpoint (a bucket target's: after its last
        write), that checkpoint (b"" before the first), and when."""

        def read() -> dict[str, tuple[int, bytes, bytes | None, float | None]]:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT target, seq, hash, checkpoint, checkpoint_at FROM chains"
            ).fetchall()
            return {target: (seq, bytes(h), cp, at) for target, seq, h, cp, at in rows}

        return await self._run(read)

    async def planned_objects(
        self,
    ) -> dict[str, tuple[str, str, int, bytes, int, bytes, bytes, bytes, str]]:
        """Per bucket target: the object planned before its last PUT (router/evidence)."""

        def read() -> dict[str, tuple[str, str, int, bytes, int, bytes, bytes, bytes, str]]:
            assert self._db is not None
            rows = self._db.execute("SELECT * FROM planned").fetchall()
            return {
                target: (key, name, bs, bytes(bh), hs, bytes(hp), bytes(hh), bytes(body), md5)
                for target, key, name, bs, bh, hs, hp, hh, body, md5 in rows
            }

        return await self._run(read)

    async def save_planned(
        self, target_id: str, plan: tuple[str, str, int, bytes, int, bytes, bytes, bytes, str]
    ) -> None:
        """Keep the object a bucket target is about to PUT (one per target), durably (per
        storage.fsync) before the PUT goes out."""

        def write() -> None:
            assert self._db is not None
            with transaction(self._db) as db:
                db.execute(
                    "INSERT OR REPLACE INTO planned VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (target_id, *plan),
                )

        await self._run(write)

    async def drop_planned(self, target_id: str) -> None:
        """Forget a target's planned object: its PUT failed and its places went back."""

        def write() -> None:
            assert self._db is not None
            with transaction(self._db) as db:
                db.execute("DELETE FROM planned WHERE target = ?", (target_id,))

        await self._run(write)

    async def pending_for(self, event_id: str) -> list[str]:
        """The targets an event (by id) is still owed to: what a receipt's lookup shows as
        pending. A scan of the batches for the id's bytes (every packed one inflated): for an
        admin's question, not the hot path, so on a read-only connection in a thread of its
        own (WAL: it reads a snapshot beside the writer, which it never waits for or holds)."""

        def read() -> list[str]:
            # A damaged page is the journal's failure, not the caller's: 503, not 500.
            with (
                _unavailable_on_sqlite_errors(),
                contextlib.closing(
                    sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
                ) as db,
            ):
                return lookup(db)

        def lookup(db: sqlite3.Connection) -> list[str]:
            targets: set[str] = set()
            raw_id = event_id.encode()
            # A row at a time: every packed frame is a candidate, and with a large backlog
            # fetching them all at once held the whole journal's frames in memory.
            for first, last, stored in db.execute(
                "SELECT first_seq, last_seq, records FROM batches "
                "WHERE instr(records, ?1) > 0 OR substr(records, 1, ?3) = ?2",
                (raw_id, PACKED, len(PACKED)),
            ):
                blob = self._unpack(stored, first, last)
                if raw_id not in blob:
                    continue
                for seq, at in frame_offsets(blob, first, last).items():
                    # A record that fails its CRC may be another seq's: it is not this one.
                    _, found, _, body, crc = record_at(blob, at)
                    if found == event_id and crc32(body) == crc:
                        targets.update(
                            target
                            for (target,) in db.execute(
                                "SELECT target FROM owed WHERE batch = ?1 AND first_seq <= ?2 "
                                "AND last_seq >= ?2",
                                (first, seq),
                            )
                        )
            return sorted(targets)

        return await asyncio.get_running_loop().run_in_executor(self._reads, read)

    async def save_chain(
        self, target_id: str, seq: int, head_hash: bytes, checkpoint: bytes, at: float
    ) -> None:
        """Keep a target's chain head and the checkpoint just written for it."""

        def write() -> None:
            assert self._db is not None
            with transaction(self._db) as db:
                db.execute(
                    "INSERT OR REPLACE INTO chains VALUES (?, ?, ?, ?, ?)",
                    (target_id, seq, head_hash, checkpoint, at),
                )

        await self._run(write)


def _keep_chain_head(db: sqlite3.Connection, target_id: str, seq: int, head_hash: bytes) -> None:
    """Move a target's kept chain head forward (never back), keeping its last checkpoint
    (a row made here holds an empty one, b"", as a bucket target's row before its first)."""
    db.execute(
        "INSERT INTO chains VALUES (?, ?, ?, x'', 0) ON CONFLICT (target) DO UPDATE SET "
        "seq = excluded.seq, hash = excluded.hash WHERE excluded.seq > chains.seq",
        (target_id, seq, head_hash),
    )


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


def _move_into_batches(db: sqlite3.Connection, *, commit_each: bool, vouched: bool) -> None:
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
    BATCH_BYTES, as a commit's frames are cut) and the deliveries up to the last of them into
    one batch; returns how many events it moved (None: nothing was left)."""
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
        if size > BATCH_BYTES and kept < len(rows):
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


def _fit(entries: list[Entry], max_bytes: int) -> list[Entry]:
    """The leading entries that fit in max_bytes (always at least one)."""
    batch: list[Entry] = []
    size = 0
    for entry in entries:
        entry_bytes = len(entry.event.encoded()) + 1
        if batch and size + entry_bytes > max_bytes:
            break
        batch.append(entry)
        size += entry_bytes
    return batch


async def _first_of(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Wait until any of `events` is set, or the timeout passes."""
    waiters = [asyncio.create_task(e.wait(), name="journal-wait") for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
