"""`event-router verify cos://TARGET[/PREFIX]`: a target's chain over the objects of a bucket.

A bucket has no order the chain could follow line by line: object names sort by account, then
time, and one batch of several accounts is several objects. So each object is checked on its
own, as it is read in name order (its lines are consecutive places: each seq one more than the
line before, each prev the hash of the line before, every hash recomputed from the line), and
kept as a run of places: its first seq, that place's prev, and the hash of every place. Once
every object is read, the runs are put in seq order and joined: a run's first prev must be the
hash of the place before it; a missing place is a gap named by the lines on either side; a
place held twice must hold the same line both times (an object written again after a crash, or
a redrive's dead letter, counted once), else the bucket was changed. A dead letter standing at
an object's line (its PUT had no answer, its events were given up, and the store wrote it
after all) counts as a dead letter, as the daemon's books count it. Checkpoints are objects of
their own: each must name a place and its hash exactly, and be signed by the public key.
Dead letters (the target's dead-letter files) are runs of one place each.

A Kafka topic (`verify kafka://TARGET`, the event_streams target) is read the same way: each
message of every partition is a run of one place, its link in its headers and its value the
canonical bytes; checkpoints are messages of their own. A message sent again after a crash is
a place held twice by the same line (counted once); a forged one holds it with other contents.

Memory: a hash, a line number and an id's hash per place (48 bytes), so a million events take
about 50 MB.
"""

from __future__ import annotations

import bisect
import gzip
import zlib
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from router.deadletter import REDRIVEN_DIR
from router.evidence.canonical import (
    CHECKPOINT_TYPE,
    GENESIS,
    TYPE_HEADER,
    CanonicalError,
    Link,
    chained_line,
    header_link,
    link_hash,
    split_line,
)
from router.evidence.checkpoint import Checkpoint, is_checkpoint
from router.evidence.verify import (
    EN_DASH,
    Broken,
    ChainChecks,
    Report,
    VerifyOptions,
    check_head,
    letter_place,
    open_lines,
)

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(slots=True)
class _Run:
    """Consecutive places read from one object (or one dead letter)."""

    name: str
    first: int
    prev: bytes
    letter: bool = False
    redriven: bool = False
    hashes: bytearray = field(default_factory=bytearray)
    lines: array[int] = field(default_factory=lambda: array("l"))
    # Per place, the hash of its event's id (0: none), for re-sent and redriven events:
    # 8 bytes where the id itself would take some 60.
    ids: array[int] = field(default_factory=lambda: array("q"))

    @property
    def last(self) -> int:
        return self.first + len(self.lines) - 1

    def hash_at(self, seq: int) -> bytes:
        i = (seq - self.first) * 32
        return bytes(self.hashes[i : i + 32])

    def place(self, seq: int) -> str:
        number = self.lines[seq - self.first]
        return f"{self.name}:{number}" if number else self.name  # 0: a message, one place


@dataclass(slots=True)
class _Mark:
    """A checkpoint read from an object, checked against the chain once it is joined."""

    place: str
    checkpoint: Checkpoint


class BucketVerifier(ChainChecks):
    """Feed it dead-letter files and objects in any order, then `finish`."""

    def __init__(self, options: VerifyOptions | None = None) -> None:
        super().__init__(options)
        self._runs: list[_Run] = []
        self._marks: list[_Mark] = []
        self._letter_files = 0
        self._head_place = "the start of the chain"
        self._first_unchained: str | None = None

    # -- input -----------------------------------------------------------------------------

    def dead_letters(self, name: str, lines: Iterable[bytes], *, redriven: bool = False) -> None:
        self.report.files += 1
        self._letter_files += 1
        for number, line in enumerate(lines, start=1):
            place = f"{name}:{number}"
            if not line.endswith(b"\n"):
                raise Broken(place, "torn last line (the file was cut)")
            if not line.strip():
                continue
            found = letter_place(place, line[:-1])
            if found is None:
                self.report.unchained += 1
                continue
            canonical, link, event_id = found
            if link_hash(link.prev, canonical) != link.hash:
                raise Broken(place, "hash does not match the chain (the line was changed)")
            run = _Run(name, link.seq, link.prev, letter=True, redriven=redriven)
            run.hashes += link.hash
            run.lines.append(number)
            run.ids.append(_id_hash(event_id))
            self._runs.append(run)

    def message(self, name: str, headers: dict[str, bytes], value: bytes) -> None:
        """One Kafka message of a chained topic: a place (its link in its headers, its value
        the canonical bytes), a checkpoint (header `type`=`checkpoint`), or a message without
        a chain (counted, not vouched for)."""
        self._tick()
        if headers.get(TYPE_HEADER) == CHECKPOINT_TYPE:
            self._checkpoint(name, value)
            return
        try:
            link = header_link(headers)
        except CanonicalError as exc:
            raise Broken(name, str(exc)) from None
        if link is None:
            self.report.unchained += 1
            self._first_unchained = self._first_unchained or name
            return
        if link_hash(link.prev, value) != link.hash:
            raise Broken(name, "hash does not match the chain (the message was changed)")
        try:
            chained_line(value, link)
        except CanonicalError as exc:
            raise Broken(name, str(exc)) from None
        run = _Run(name, link.seq, link.prev)
        run.hashes += link.hash
        run.lines.append(0)
        run.ids.append(_id_hash(self._note(value)))
        self.receipts.see(value)
        self._runs.append(run)

    def object(self, key: str, body: bytes) -> None:
        """One object as stored (gzip or plain NDJSON): its lines must be consecutive places."""
        self.report.files += 1
        try:
            data = gzip.decompress(body) if body[:2] == GZIP_MAGIC else body
        except (OSError, EOFError, zlib.error) as exc:
            raise Broken(key, f"cannot be gunzipped ({exc}): the object was changed") from None
        lines = data.split(b"\n")
        if lines[-1]:
            raise Broken(f"{key}:{len(lines)}", "torn last line (the object was cut)")
        run: _Run | None = None
        lines.pop()
        for number, line in enumerate(lines, start=1):
            place = f"{key}:{number}"
            self._tick()
            if not line.strip():
                continue
            if is_checkpoint(line):
                self._checkpoint(place, line)
                continue
            found = _split(place, line)
            if found is None:
                self.report.unchained += 1
                self._first_unchained = self._first_unchained or place
                continue
            canonical, link = found
            if link_hash(link.prev, canonical) != link.hash:
                raise Broken(place, "hash does not match the chain (the line was changed)")
            if run is None:
                run = _Run(key, link.seq, link.prev)
                self._runs.append(run)
            elif link.seq != run.last + 1:
                if link.seq == run.last + 2 and _next_is(lines, number, run.last + 1):
                    raise Broken(
                        place,
                        f"swapped with {key}:{number + 1} (seq {link.seq} and seq "
                        f"{run.last + 1} are in each other's places)",
                    )
                raise Broken(
                    place,
                    f"seq {link.seq} out of order: seq {run.last + 1} was expected after "
                    f"{run.place(run.last)} (a line inserted, moved or deleted in the object)",
                )
            elif link.prev != run.hash_at(run.last):
                raise Broken(place, f"prev does not match the hash of {run.place(run.last)}")
            run.hashes += link.hash
            run.lines.append(number)
            run.ids.append(_id_hash(self._note(canonical)))
            self.receipts.see(canonical)

    def _note(self, canonical: bytes) -> str | None:
        """The event's id, and its time in the report's span."""
        try:
            body: Any = orjson.loads(canonical)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict):
            return None
        report = self.report
        event_time = body.get("eventTime")
        if isinstance(event_time, str):
            if report.first_time is None or event_time < report.first_time:
                report.first_time = event_time
            if report.last_time is None or event_time > report.last_time:
                report.last_time = event_time
        event_id = body.get("id")
        return event_id if isinstance(event_id, str) else None

    def _checkpoint(self, place: str, line: bytes) -> None:
        checkpoint = self._read_checkpoint(place, line)
        self._check_signature(place, checkpoint)
        self._marks.append(_Mark(place, checkpoint))

    # -- the chain -------------------------------------------------------------------------

    def finish(self) -> Report:
        """Join the runs in seq order, check every checkpoint against them, and conclude."""
        report = self.report
        # Of two runs from the same place, the longer, then the older object (the name's last
        # segment starts with its time) holds it; the other repeats it.
        runs = sorted(
            self._runs,
            key=lambda run: (
                run.first,
                -len(run.lines),
                # A Kafka message and a letter standing at its place (it was given up, then
                # landed): the letter holds it, as the books count the event.
                not run.letter,
                run.name.rsplit("/", 1)[-1],
            ),
        )
        marks = sorted(self._marks, key=lambda mark: mark.checkpoint.seq)
        joined: list[_Run] = []  # the runs that hold the places, in seq order
        firsts: list[int] = []
        head_seq = 0
        head_hash = GENESIS
        if runs and self.partial:
            head_seq, head_hash = runs[0].first - 1, runs[0].prev
        repeats: list[tuple[_Run, _Run]] = []  # (a run repeating places, the run holding them)
        seen: set[int] = set()  # event ids (hashed) already placed: re-sent events
        redriven: dict[int, int] = {}  # event id (hashed) -> the seq of its redriven letter
        landed = 0  # letters at the places of an object stored after all
        next_mark = 0

        def hash_at(seq: int) -> tuple[bytes, _Run]:
            holder = joined[bisect.bisect_right(firsts, seq) - 1]
            return holder.hash_at(seq), holder

        for run in runs:
            start = run.first
            if run.first <= head_seq:
                end = min(run.last, head_seq)
                for seq in range(run.first, end + 1):
                    theirs, holder = hash_at(seq)
                    if run.hash_at(seq) != theirs:
                        raise Broken(
                            run.place(seq),
                            f"seq {seq} is also at {holder.place(seq)}, with other contents "
                            "(an object or dead letter was replaced)",
                        )
                if not run.letter:  # an object written again: its lines count once
                    report.resent += end - run.first + 1
                    repeats.append((run, hash_at(run.first)[1]))
                else:
                    for seq in range(run.first, end + 1):
                        if not hash_at(seq)[1].letter:
                            # An object stored after its events were given up (its PUT got
                            # no answer in time): the letter carries its line, and counts as
                            # the books count the event, a dead letter.
                            report.events -= 1
                            landed += 1
                            self._count(run, seq, seen, redriven)
                if run.last <= head_seq:
                    continue
                start = head_seq + 1
            elif run.first > head_seq + 1:
                raise Broken("", self._gap(head_seq + 1, run, repeats))
            elif run.prev != head_hash:
                raise Broken(
                    run.place(run.first), f"prev does not match the hash of {self._head_place}"
                )
            joined.append(run)
            firsts.append(run.first)
            for seq in range(start, run.last + 1):
                self._count(run, seq, seen, redriven)
            head_seq, head_hash = run.last, run.hash_at(run.last)
            self._head_place = run.place(run.last)
            while next_mark < len(marks) and marks[next_mark].checkpoint.seq <= head_seq:
                self._check_mark(marks[next_mark], hash_at)
                next_mark += 1
        for mark in marks[next_mark:]:
            checkpoint = mark.checkpoint
            raise Broken(
                mark.place,
                f"checkpoint (seq {checkpoint.seq}) names places the bucket does not hold: the "
                f"chain ends at seq {head_seq} ({self._head_place}), so seq "
                f"{_span(head_seq + 1, checkpoint.seq)} are missing (objects deleted)",
            )
        report.head_seq = head_seq
        hash_there = None
        if self.expect_head is not None and 0 < self.expect_head.seq <= head_seq and joined:
            hash_there = hash_at(self.expect_head.seq)[0]
        check_head(self.expect_head, head_seq, self._head_place, hash_there)
        if landed:
            report.warnings.append(
                f"{landed} dead-lettered events are in the bucket too: their object was stored "
                "after they were given up (its PUT had no answer in time); counted as dead "
                "letters, as the daemon's books count them"
            )
        self._conclude(
            f"lines have no _chain (the first at {self._first_unchained}): the test writes "
            "of `event-router validate-target`, or written before evidence was on; the "
            "chain does not vouch for them"
        )
        return report

    def _count(self, run: _Run, seq: int, seen: set[int], redriven: dict[int, int]) -> None:
        report = self.report
        event_id = run.ids[seq - run.first]
        if run.letter:
            report.dead_letters += 1
            if run.redriven:
                report.redriven += 1
                if event_id:
                    redriven[event_id] = seq
            return
        report.events += 1
        if not event_id:
            return
        if redriven.pop(event_id, seq) < seq:
            report.redelivered += 1
        elif event_id in seen:
            report.resent += 1
        else:
            seen.add(event_id)

    def _check_mark(self, mark: _Mark, hash_at: Callable[[int], tuple[bytes, _Run]]) -> None:
        checkpoint = mark.checkpoint
        there, holder = hash_at(checkpoint.seq)
        if there != checkpoint.hash:
            raise Broken(
                mark.place,
                f"checkpoint (seq {checkpoint.seq}) does not match the chain (seq "
                f"{checkpoint.seq} at {holder.place(checkpoint.seq)})",
            )
        report = self.report
        report.checkpoints += 1
        if checkpoint.seq >= report.last_checkpoint_seq:
            report.last_checkpoint_seq = checkpoint.seq
            report.last_checkpoint_time = checkpoint.time

    def _gap(self, first: int, run: _Run, repeats: list[tuple[_Run, _Run]]) -> str:
        """A gap, and the objects that repeat another's places (one may have been replaced by
        a copy of an older one, which is where the missing places were)."""
        hint = "" if self._letter_files else " (dead letters: give their file too)"
        copies = "".join(
            f"; {copy.name} repeats seq {_span(copy.first, copy.last)} of {holder.name}: "
            "replaced by a copy of it?"
            for copy, holder in repeats
            if copy.first == holder.first and copy.last == holder.last
        )
        return (
            f"gap: seq {_span(first, run.first - 1)} missing between {self._head_place} and "
            f"{run.place(run.first)}{hint}{copies}"
        )


def _id_hash(event_id: object) -> int:
    """An event id as a nonzero 64-bit number (0 for none); equal ids, equal numbers."""
    return (hash(event_id) or 1) if isinstance(event_id, str) else 0


def _next_is(lines: list[bytes], number: int, seq: int) -> bool:
    """Whether the line after line `number` (1-based) is the chained line of place `seq`."""
    if number >= len(lines):
        return False
    try:
        found = split_line(lines[number])
    except CanonicalError:
        return False
    return found is not None and found[1].seq == seq


def _split(place: str, line: bytes) -> tuple[bytes, Link] | None:
    try:
        return split_line(line)
    except CanonicalError as exc:
        raise Broken(place, str(exc)) from None


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}{EN_DASH}{last}"


async def verify_bucket(
    objects: AsyncIterator[tuple[str, bytes]],
    letter_files: Iterable[Path],
    verifier: BucketVerifier,
) -> Report:
    """Verify a target's objects (key, body, any order) with its dead-letter files."""

    async def feed() -> None:
        async for key, body in objects:
            verifier.object(key, body)

    return await _verify(feed, letter_files, verifier)


async def verify_topic(
    messages: AsyncIterator[tuple[str, dict[str, bytes], bytes]],
    letter_files: Iterable[Path],
    verifier: BucketVerifier,
) -> Report:
    """Verify a topic's messages (name, headers, value; any order) with the target's
    dead-letter files."""

    async def feed() -> None:
        verifier.report.files += 1  # the topic
        async for name, headers, value in messages:
            verifier.message(name, headers, value)

    return await _verify(feed, letter_files, verifier)


async def _verify(
    feed: Callable[[], Awaitable[None]], letter_files: Iterable[Path], verifier: BucketVerifier
) -> Report:
    try:
        for path in letter_files:
            redriven = path.parent.name == REDRIVEN_DIR
            verifier.dead_letters(str(path), open_lines(path), redriven=redriven)
        await feed()
        return verifier.finish()
    except Broken as exc:
        verifier.report.broken = str(exc)
        return verifier.report
