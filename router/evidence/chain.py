"""One target's chain: its head (seq, hash), advanced only by lines that were written.

Every line a chained target writes (its events, the start-up test write, the router's own
events) and every dead letter written for it takes the next link. The head moves only after
the write succeeded, under the chain's lock, so a write that failed (and is retried) takes the
same places again, and a dead letter written meanwhile (a full journal shedding, a target
retired) never takes a place twice.

Where the head is kept: in memory while running; in the journal at every checkpoint; and in
the files themselves. At start the head is the furthest of the journal's and the last chained
line of the live archive (or of its `.1`, just after a rotation) and of the dead-letter file.
So after kill -9 the chain goes on right after the last line that reached the file, and the
at-most-once re-sent batch takes NEW places: its events appear twice, at two seqs, each link
valid, which `verify` reports as re-sent events (same id, written again after a restart).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from router.evidence.canonical import CanonicalError, Link, chained_line, next_link, split_line

log = logging.getLogger(__name__)

TAIL_BYTES = 1 << 20  # the last line of a file is looked for in its last MiB


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

    @property
    def seq(self) -> int:
        return self.head.seq if self.head is not None else 0

    def observe(self, link: Link | None) -> None:
        """A link found in a file at start: the head moves forward to it, never back."""
        if link is not None and link.seq > self.seq:
            self.head = link

    def link(self, canonicals: list[bytes]) -> tuple[list[bytes], Link | None]:
        """The chained lines for these canonical bytes from the current head, and the head
        they lead to. Nothing moves until `advance` (after the write succeeded)."""
        head = self.head
        lines = []
        for canonical in canonicals:
            head = next_link(head, canonical)
            lines.append(chained_line(canonical, head))
        return lines, head

    def advance(self, head: Link | None) -> None:
        self.head = head


def last_link(path: Path) -> Link | None:
    """The link of the last complete chained line of a file (gzipped if it ends .gz)."""
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
    for line in reversed(data.split(b"\n")[:-1]):
        try:
            found = split_line(line)
        except CanonicalError:
            continue
        if found is not None:
            return found[1]
    return None


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
