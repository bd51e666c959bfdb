"""One target's chain: its head (seq, hash), advanced only by lines that were written.

Every line a chained target writes (its events, the start-up test write, the router's own
events) and every dead letter written for it takes the next link. The head moves only after
the write succeeded, under the chain's lock, so a write that failed (and is retried) takes the
same places again, and a dead letter written meanwhile (a full journal shedding, a target
retired) never takes a place twice.

Where the head is kept: in memory while running; in the journal with every batch's ack (in
the ack's own transaction) and at every checkpoint; and in the files themselves. At start the
head is the furthest of the journal's and the last chained line of the live archive (or of its
`.1`, just after a rotation) and of the dead-letter file. So after kill -9 the chain goes on
right after the last line that reached the file, and the at-most-once re-sent batch takes NEW
places: its events appear twice, at two seqs, each link valid, which `verify` reports as
re-sent events (same id, written again after a restart).

Since the journal's head covers every acknowledged batch, files that end short of it at start
lost lines while the daemon was down (cut off the end, past the last checkpoint): the chain
reports it (`missing_at_start`, in /v1/status, and an error in the log), and goes on from the
journal's head, so the head the daemon reports names the cut to `verify --expect-head`.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from router.evidence.canonical import (
    CanonicalError,
    Link,
    chained_block,
    chained_line,
    next_link,
    split_line,
)

log = logging.getLogger(__name__)

TAIL_BYTES = 1 << 20  # the last line of a file is looked for in its last MiB


@dataclass(frozen=True, slots=True)
class Planned:
    """An object a bucket target is about to PUT, kept in the journal before the PUT (by
    `Chain.keep_plan`): the places `base` + 1 ... `head` and the very bytes that fill them.

    A kill -9 after the store took the object and before the journal kept the new head leaves
    the journal's head at `base`; the next start then sends this object again first, under
    its name and byte for byte (an overwrite of the same object if it had landed), so no other
    lines ever take those places. `key` names the batch (its events' ids): the same batch sent
    again after the restart is this object itself."""

    key: str
    name: str
    base: Link | None
    head: Link
    body: bytes
    md5: str


def same_head(a: Link | None, b: Link | None) -> bool:
    """Do two links name the same place (seq and hash; a head read back from the journal has
    no `prev`)?"""
    if a is None or b is None:
        return a is b
    return (a.seq, a.hash) == (b.seq, b.hash)


class Chain:
    """A target's chain head and the lock every write that takes a place holds."""

    def __init__(self, target_id: str, head: Link | None = None) -> None:
        self.target_id = target_id
        self.head = head
        self.lock = asyncio.Lock()
        self.checkpointed_seq = 0  # the seq the last checkpoint covered
        self.checkpointed_at: float | None = None  # when (epoch seconds)
        self.checkpoint: bytes | None = None  # the last checkpoint line
        # The journal keeps the head after every write (a bucket cannot be read back for it).
        self.head_in_journal = False
        self.opened_at = time.time()  # the first checkpoint_every_s counts from here
        # Set by Evidence: writes a checkpoint when due (count or time) after a write.
        self.after_write: Callable[[Chain], Awaitable[None]] | None = None
        # The head the journal kept, and the furthest link found in the files, at start.
        self.journal_head: Link | None = None
        self.files_head: Link | None = None
        self.files_checked = False
        # What the files lacked at start that the journal's head covers (None: nothing).
        self.missing_at_start: dict[str, object] | None = None
        self.missing_announced = False  # the router's own event about it was recorded
        # A bucket target's: the object planned before a PUT, as the journal kept it at start
        # (None once sent again or found stale), and how a new plan is kept.
        self.planned: Planned | None = None
        self.keep_plan: Callable[[Planned], Awaitable[None]] | None = None
        self.drop_plan: Callable[[], Awaitable[None]] | None = None
        # Objects whose places are taken and whose PUT is under way: no checkpoint may name
        # a head past places the bucket may not hold yet.
        self.in_flight = 0
        # Event id -> its chained line in a bucket object whose PUT failed after later places
        # were taken: the object keeps its places, and a letter giving the event up stands at
        # its place (router/deadletter), so no place is left empty.
        self.held: dict[str, bytes] = {}

    @property
    def seq(self) -> int:
        return self.head.seq if self.head is not None else 0

    def observe(self, link: Link | None) -> None:
        """A link found in a file at start: the head moves forward to it, never back."""
        if link is not None and link.seq > self.seq:
            self.head = link

    def found_in_files(self, link: Link | None) -> None:
        """A link found at the end of one of the target's files at start."""
        if link is not None and (self.files_head is None or link.seq > self.files_head.seq):
            self.files_head = link
        self.observe(link)

    def check_files(self, where: str) -> dict[str, object] | None:
        """Once, at the first start: do the files reach the head the journal kept? Places it
        covers that no file holds were written and acknowledged, then cut off the end while
        the daemon was down (kill -9, then the file truncated). Reported, never repaired."""
        if self.files_checked:
            return self.missing_at_start
        self.files_checked = True
        kept, found = self.journal_head, self.files_head
        found_seq = found.seq if found is not None else 0
        if kept is None or kept.seq < found_seq:
            return None
        if kept.seq == found_seq:
            if found is None or found.hash == kept.hash:
                return None
            message = (
                f"seq {kept.seq} at the end of {where} is not the line the journal's head "
                "names (its hash differs): the last line was rewritten while the daemon was down"
            )
            first = kept.seq
        else:
            first = found_seq + 1
            places = f"seq {first}" if first == kept.seq else f"seq {first}\u2013{kept.seq}"
            message = (
                f"{places} missing at the end of {where} (and its dead letters) at start: the "
                f"journal's head is seq {kept.seq}, the files end at seq {found_seq} (places "
                "cut off the end while the daemon was down)"
            )
        self.missing_at_start = {
            "first_seq": first,
            "last_seq": kept.seq,
            "found_seq": found_seq,
            "message": message,
        }
        log.error("target %s: %s", self.target_id, message)
        return self.missing_at_start

    def link(self, canonicals: list[bytes]) -> tuple[list[bytes], Link | None]:
        """The chained lines for these canonical bytes from the current head, and the head
        they lead to. Nothing moves until `advance` (after the write succeeded)."""
        head = self.head
        lines = []
        for canonical in canonicals:
            head = next_link(head, canonical)
            lines.append(chained_line(canonical, head))
        return lines, head

    def link_block(self, canonicals: Sequence[bytes]) -> tuple[bytes, Link | None]:
        """`link`'s lines, each ended by a newline, as the one buffer a file write takes
        (canonical.chained_block), and the head they lead to. Nothing moves until `advance`."""
        return chained_block(canonicals, self.head)

    def advance(self, head: Link | None) -> None:
        self.head = head


def last_link(path: Path, *, furthest: bool = False) -> Link | None:
    """The link of the last complete chained line of a file (gzipped if it ends .gz); with
    `furthest`, the one of highest seq in its last MiB (a redriven file's letters are in the
    order they were redriven, not by place)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()[-TAIL_BYTES:]
        else:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - TAIL_BYTES))
                data = f.read()
    except FileNotFoundError:
        return None
    # The last piece is empty (the file ends in a newline) or a torn line: never a link.
    best: Link | None = None
    for line in reversed(data.split(b"\n")[:-1]):
        try:
            found = split_line(line)
        except CanonicalError:
            continue
        if found is not None:
            if not furthest:
                return found[1]
            if best is None or found[1].seq > best.seq:
                best = found[1]
    return best


def cut_torn_tail(path: Path) -> int:
    """Drop a last line without its newline (a write torn by kill -9 or a crash: it was never
    reported written, and its batch is sent again). Returns the bytes dropped."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return 0
        start = max(0, size - TAIL_BYTES)
        data = os.pread(fd, size - start, start)
        keep = start + data.rfind(b"\n") + 1 if b"\n" in data else start
        os.ftruncate(fd, keep)
        os.fsync(fd)
        log.warning(
            "%s ended in a torn line (%d bytes); cut back to its last whole line", path, size - keep
        )
        return size - keep
    finally:
        os.close(fd)
