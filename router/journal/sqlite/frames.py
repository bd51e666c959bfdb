"""Reading a target's backlog back from the database: its owed runs, each read from its
batch's frame (a frame inflated no further than it can hold, the last one read kept for the
next read), every record's CRC checked. A record whose CRC does not match, that is missing
from its frame or is not a JSON object is quarantined with a log line and a counter, and
handed to the worker as a marker it dead-letters (Event.corrupt_record or
Event.unvouched_record) rather than sends.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from isal.isal_zlib import crc32

from router.events import Event
from router.journal import Entry
from router.journal.salvage import (
    COVERED,
    CRC_END,
    RECORD,
    FrameBound,
    OverlongFrameError,
    frame_offsets,
    record_at,
    record_bytes,
    unpack,
    vouched_at,
)
from router.journal.sqlite.commit import make_entry

log = logging.getLogger(__name__)


class FrameReader:
    """Reads entries back from the batches' frames on the journal's thread (`read`; the
    receipt lookup's thread inflates with `unpack` too), and counts what it quarantined."""

    def __init__(self, path: Path, bound: FrameBound) -> None:
        # Named in an unvouched record's letter: where its bytes lie.
        self.path = path
        # How far a packed frame is inflated: past it, the frame is damage (salvage.unpack).
        self.bound = bound
        # The journal thread's last batch read, and where each of its records starts: a
        # target reading its backlog takes a large commit in several batches.
        self._frame: tuple[int, bytes, dict[int, int]] = (0, b"", {})
        self.quarantined = 0
        self._quarantined_seqs: set[int] = set()

    def read(self, db: sqlite3.Connection, target_id: str, after: int, limit: int) -> list[Entry]:
        """The target's first `limit` entries past seq `after`: its runs, each read from its
        batch's frame (a seq its frame lacks is a quarantine marker, as a record that fails
        its checksum is)."""
        runs = db.execute(
            "SELECT first_seq, last_seq, batch, route FROM owed "
            "WHERE target = ? AND last_seq > ? ORDER BY last_seq LIMIT ?",
            (target_id, after, limit),
        ).fetchall()
        entries: list[Entry] = []
        unpack, size = RECORD.unpack_from, RECORD.size
        for first, last, batch, route in runs:
            blob, offsets = self._batch_frame(db, batch)
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
                entries.append(make_entry(seq, event, route))
                if len(entries) == limit:
                    return entries
        return entries

    def _batch_frame(self, db: sqlite3.Connection, batch: int) -> tuple[bytes, dict[int, int]]:
        """A batch's blob and where each of its records starts, kept for the next read (a
        target reads a large commit in several batches; a batch is never rewritten)."""
        if self._frame[0] != batch:
            row = db.execute(
                "SELECT last_seq, records FROM batches WHERE first_seq = ?", (batch,)
            ).fetchone()
            blob = self.unpack(bytes(row[1]), batch, row[0]) if row is not None else b""
            offsets = frame_offsets(blob, batch, row[0]) if row is not None else {}
            self._frame = (batch, blob, offsets)
        return self._frame[1], self._frame[2]

    def unpack(self, stored: bytes, first: int, last: int) -> bytes:
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

    def forget(self, batches: set[int]) -> None:
        """These batches were deleted: the last frame read is not kept if it was one of them."""
        if self._frame[0] in batches:
            self._frame = (0, b"", {})
