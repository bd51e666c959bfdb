"""A receipt's lookup: the targets an event (by id) is still owed to. A scan of the batches for
the id's bytes (every packed one inflated): for an admin's question, not the hot path, so on a
read-only connection in a thread of its own (WAL: it reads a snapshot beside the writer, which
it never waits for or holds).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

from isal.isal_zlib import crc32

from router.journal.salvage import PACKED, frame_offsets, record_at
from router.journal.sqlite.database import unavailable_on_sqlite_errors


def pending_for(path: Path, unpack: Callable[[bytes, int, int], bytes], event_id: str) -> list[str]:
    """The targets the event is owed to in the journal at `path`, sorted; `unpack` inflates a
    stored frame (frames.FrameReader.unpack, bounded)."""
    # A damaged page is the journal's failure, not the caller's: 503, not 500.
    with (
        unavailable_on_sqlite_errors(),
        contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db,
    ):
        return _lookup(db, unpack, event_id)


def _lookup(
    db: sqlite3.Connection, unpack: Callable[[bytes, int, int], bytes], event_id: str
) -> list[str]:
    targets: set[str] = set()
    raw_id = event_id.encode()
    # A row at a time: every packed frame is a candidate, and with a large backlog
    # fetching them all at once held the whole journal's frames in memory.
    for first, last, stored in db.execute(
        "SELECT first_seq, last_seq, records FROM batches "
        "WHERE instr(records, ?1) > 0 OR substr(records, 1, ?3) = ?2",
        (raw_id, PACKED, len(PACKED)),
    ):
        blob = unpack(stored, first, last)
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
