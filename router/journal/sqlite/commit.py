"""One commit of the group commit: the appends queued meanwhile framed into batch rows (each
event a record of salvage.frame: its seq, id, arrival time and a CRC over them and its body; a
frame cut past BATCH_BYTES, packed as SQLite takes it) and owed runs, the entries each target
that remembers may take from memory once it is durable, and the transaction that writes them.
The journal (journal.py) queues the appends and runs the commits on its thread, one at a time.
And how an Entry is made cheaply (make_entry, inlined in `rows`; frames.py makes the entries it
reads back with it): Entry is read from this module's globals at call time, here only.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from isal.isal_zlib import crc32

from router.events import Event
from router.journal import Entry

# BATCH_BYTES is read from here by migrate.py too (a frame is cut where a commit cuts it), so a
# test that patches it patches this module.
from router.journal.salvage import BATCH_BYTES as BATCH_BYTES
from router.journal.salvage import COVERED, LEAD, TAIL, pack
from router.journal.sqlite.backlog import ENTRY_OVERHEAD, TargetState
from router.journal.sqlite.database import transaction

# Entry's fields, set without its generated __init__: a frozen dataclass sets each field through
# object.__setattr__ (0.77 us an Entry, against 0.44 here), and the journal makes one per event
# it keeps in memory or reads back. The Entry is the same frozen object either way.
ENTRY_NEW = object.__new__
ENTRY_SEQ = Entry.__dict__["seq"].__set__
ENTRY_EVENT = Entry.__dict__["event"].__set__
ENTRY_ROUTE = Entry.__dict__["route"].__set__


def make_entry(seq: int, event: Event, route: str) -> Entry:
    """Entry(seq, event, route), made at less than half the cost (see ENTRY_NEW)."""
    entry: Entry = ENTRY_NEW(Entry)
    ENTRY_SEQ(entry, seq)
    ENTRY_EVENT(entry, event)
    ENTRY_ROUTE(entry, route)
    return entry


@dataclass(slots=True)
class Pending:
    routed: Sequence[tuple[Event, Mapping[str, str]]]
    done: asyncio.Future[None]


def rows(
    group: Sequence[Pending], next_seq: int, states: Mapping[str, TargetState]
) -> tuple[
    list[tuple[int, int, list[bytes]]],
    list[list[Any]],
    dict[str, list[Entry]],
    dict[str, int],
    int,
]:
    """One commit: its batches (first seq, last seq, the parts of the frame of their
    records, up to about BATCH_BYTES each), its owed runs ([target, last seq, first seq,
    batch, route]: consecutive seqs of one batch a target gets by one route), and per
    target the entries its worker may take from memory once it is durable and what they
    keep alive (their `held_bytes`, summed): each event as the journal stores it (its
    bytes, no parsed body), so memory holds what a read of the database would give and
    nothing more. None are made for a target that could not remember them
    (`may_remember`: too far behind; under load, every one of them). Last, the seq the next
    commit starts at.

    An event routed as the one before it (in the same batch row: nearly every event of a
    request) extends that one's runs and entry lists as they are: its targets are looked
    up in the runs only when they change, not per event."""
    batches: list[tuple[int, int, list[bytes]]] = []
    runs: list[list[Any]] = []
    current: dict[str, list[Any]] = {}
    entries: dict[str, list[Entry]] = {}
    first = seq = next_seq
    parts: list[bytes] = [COVERED]
    size = 0
    lead, tail, crc, frame_bytes, overhead = (
        LEAD.pack,
        TAIL.pack,
        crc32,
        BATCH_BYTES,
        ENTRY_OVERHEAD,
    )
    # make_entry, inlined (0.36 -> 0.29 us an entry): one per event and target remembering.
    new, set_seq, set_event, set_route = ENTRY_NEW, ENTRY_SEQ, ENTRY_EVENT, ENTRY_ROUTE
    keep = {target_id for target_id, target in states.items() if target.may_remember()}
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
    for target_id, (taken, _) in memory.items():
        entries[target_id] = taken
    return batches, runs, entries, {target_id: n for target_id, (_, n) in memory.items()}, seq


def write(
    db: sqlite3.Connection,
    batches: list[tuple[int, int, list[bytes]]],
    runs: list[list[Any]],
    received: dict[str, int],
) -> None:
    """Write one commit's batches and owed runs, and move the books by what it received."""
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
