"""What the journal knows of each target's backlog (TargetState): its books and cursor, the
batch its worker holds, and the committed entries kept in memory for its worker, so that a
target that keeps up takes its batches from memory (the committed events' bytes, kept per
target up to MEMORY_BYTES or MEMORY_BATCHES of its batches) and the database is read only for
what memory did not hold (events committed while the target was further behind than that) or
after a restart. Also what an entry kept costs (`held_bytes`).
"""

from __future__ import annotations

import asyncio
import collections
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from router.events import Event
from router.journal import Books, Entry

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


@dataclass(slots=True)
class TargetState:
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


def budget_for(max_bytes: int) -> int:
    """What a target whose worker asks for batches of `max_bytes` may keep in memory."""
    return max(MEMORY_BYTES, MEMORY_BATCHES * max_bytes)
