"""SqliteJournal: the Journal protocol on local disk (the design: the package's docstring).

It holds what the other modules do not: the lifecycle (open: the directory's lock, the format,
a damaged file salvaged, the older layout moved; close: the checkpoint), the group commit
(appends queued and committed on the journal's one thread, the next commit lingering while
batched appends overlap), the batches handed to each worker (from memory while it keeps up,
else read back from the frames), the acks (shielded from a cancelled worker), shedding when
storage.max_bytes is reached, retiring a removed target, and health (a failed write makes it
unhealthy until a probe or a write succeeds). What each of those does in the database is a
function of the connection in its own module, run here on the journal's thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import router.journal.sqlite.chains as chains
import router.journal.sqlite.commit as commit
import router.journal.sqlite.lookup as lookup
import router.journal.sqlite.settle as settle
from router.config import StorageConfig
from router.events import Event
from router.journal import Books, Entry, JournalFullError
from router.journal.lock import lock_storage
from router.journal.salvage import DEFAULT_BOUND, FrameBound
from router.journal.sqlite.backlog import TargetState, budget_for
from router.journal.sqlite.chains import Plan
from router.journal.sqlite.commit import Pending
from router.journal.sqlite.database import (
    DB_NAME,
    FORMAT,
    close_checkpointed,
    connect,
    format_of,
    intact,
    newer,
    transaction,
    unavailable_on_sqlite_errors,
)
from router.journal.sqlite.frames import FrameReader
from router.journal.sqlite.migrate import move_into_batches, quarantine_file
from router.journal.sqlite.space import give_back
from router.observe.logformat import counted

log = logging.getLogger(__name__)

T = TypeVar("T")

# A retire reads, dead-letters and removes what a target is owed this many entries at a time.
RETIRE_CHUNK = 1000
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
        self._targets = {target_id: TargetState() for target_id in target_ids}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        # An operator's lookups (pending_for) read on a connection and thread of their own, so
        # a scan of a large backlog never holds up the writer's appends and acks.
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-read")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._next_seq = 1
        self._page_size = 4096
        # Reads backlogs back from the batches' frames, and counts what it quarantined.
        self._reader = FrameReader(self.path, bound)
        self._queue: list[Pending] = []
        self._lingers = False  # the next commit waits for more (see GROUP_LINGER_S)
        self._flusher: asyncio.Task[None] | None = None
        self._interval_syncer: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        # Acks under way: shielded from a cancelled worker, awaited by close().
        self._settling: set[asyncio.Task[None]] = set()
        self._retire_locks: dict[str, asyncio.Lock] = {}
        self.used_bytes = 0
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

    def _open_sync(self) -> None:
        self._lock()
        # The format first: a newer journal that is damaged too is not this router's to
        # salvage (its frames may be of a kind this one would take for garbage).
        found = format_of(self.path)
        if found is not None and found > FORMAT:
            raise newer(self.path, found)
        if self.path.exists() and not intact(self.path):
            quarantine_file(self.path, self.config.fsync, self.bound, self._targets)
        self.path.touch(mode=0o600, exist_ok=True)
        self._db = connect(self.path, self.config.fsync)
        db = self._db
        move_into_batches(db, commit_each=True, vouched=True)
        self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        self._next_seq = (db.execute("SELECT MAX(last_seq) FROM batches").fetchone()[0] or 0) + 1
        for target_id, target in self._targets.items():
            target.books = settle.read_books(db, target_id)
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
        db, self._db = self._db, None
        close_checkpointed(db, "journal")

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
        self._queue.append(Pending(routed, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="journal-flush")
        with unavailable_on_sqlite_errors():
            await asyncio.shield(done)

    async def _flush(self) -> None:
        """Write everything queued in one transaction; requests queued meanwhile go next."""
        while self._queue:
            if self._lingers:
                await asyncio.sleep(GROUP_LINGER_S)
            group, self._queue = self._queue, []
            batches, runs, entries, held, self._next_seq = commit.rows(
                group, self._next_seq, self._targets
            )
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

    def _write_sync(
        self,
        batches: list[tuple[int, int, list[bytes]]],
        runs: list[list[Any]],
        received: dict[str, int],
    ) -> None:
        db = self._db
        assert db is not None
        commit.write(db, batches, runs, received)
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
        target.budget = budget_for(max_bytes)
        while True:
            while not target.books.pending:
                if stopping.is_set():
                    return []
                target.wakeup.clear()
                await first_of(target.wakeup, stopping)
            # Linger for more events, up to max_wait_s after the first one, unless stopping.
            deadline = time.monotonic() + max_wait_s
            while target.books.pending < max_events and not stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                target.wakeup.clear()
                await first_of(target.wakeup, stopping, timeout_s=remaining)
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
                batch = entries if fits else fit(entries, max_bytes)
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
            await first_of(target.wakeup, stopping, timeout_s=1.0)

    def _read_sync(self, target_id: str, after: int, limit: int) -> list[Entry]:
        """The target's first `limit` entries past seq `after` (frames.FrameReader.read)."""
        assert self._db is not None
        return self._reader.read(self._db, target_id, after, limit)

    @property
    def quarantined(self) -> int:
        """Records quarantined since open (each counted once, however often it is read)."""
        return self._reader.quarantined

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
        with unavailable_on_sqlite_errors():
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
            self._drop_unowned(db, settle.ack(db, target_id, last, delivered, dead_lettered, head))
        self._give_back_space(self._update_size())

    def _drop_unowned(self, db: sqlite3.Connection, batches: set[int]) -> None:
        """Delete those of these batches that no target is owed anything of any more."""
        settle.drop_unowned(db, batches)
        self._reader.forget(batches)

    def _give_back_space(self, free_pages: int) -> None:
        """Free pages given back to the file system once a backlog has (nearly) drained
        (space.give_back), and the pages in use counted again if it tried."""
        assert self._db is not None
        if give_back(self._db, free_pages, self._page_size, self.used_bytes):
            self._update_size()

    # -- shedding (storage.when_full) and targets joining and leaving ------------------------

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
        with transaction(self._db) as db:
            removed, batches = settle.shed(db, target_id, seqs, delivered)
            self._drop_unowned(db, batches)
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
            self._targets[target_id] = target = TargetState()
            self.orphans.discard(target_id)
            target.books = await self._run(self._books_sync, target_id)

    def _books_sync(self, target_id: str) -> Books:
        assert self._db is not None
        return settle.read_books(self._db, target_id)

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
        return await self._on_db(chains.read_heads)

    async def planned_objects(self) -> dict[str, Plan]:
        """Per bucket target: the object planned before its last PUT (router/evidence)."""
        return await self._on_db(chains.read_planned)

    async def save_planned(self, target_id: str, plan: Plan) -> None:
        """Keep the object a bucket target is about to PUT (one per target), durably (per
        storage.fsync) before the PUT goes out."""
        await self._on_db(chains.write_planned, target_id, plan)

    async def drop_planned(self, target_id: str) -> None:
        """Forget a target's planned object: its PUT failed and its places went back."""
        await self._on_db(chains.delete_planned, target_id)

    async def save_chain(
        self, target_id: str, seq: int, head_hash: bytes, checkpoint: bytes, at: float
    ) -> None:
        """Keep a target's chain head and the checkpoint just written for it."""
        await self._on_db(chains.write_chain, target_id, seq, head_hash, checkpoint, at)

    async def _on_db(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(the connection, *args), on the journal's thread."""

        def call() -> T:
            assert self._db is not None
            return fn(self._db, *args)

        return await self._run(call)

    # -- a receipt's lookup ----------------------------------------------------------------

    async def pending_for(self, event_id: str) -> list[str]:
        """The targets an event (by id) is still owed to: what a receipt's lookup shows as
        pending (lookup.py), on a read-only connection and a thread of its own."""
        return await asyncio.get_running_loop().run_in_executor(
            self._reads, lookup.pending_for, self.path, self._reader.unpack, event_id
        )


def fit(entries: list[Entry], max_bytes: int) -> list[Entry]:
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


async def first_of(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Wait until any of `events` is set, or the timeout passes."""
    waiters = [asyncio.create_task(e.wait(), name="journal-wait") for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
