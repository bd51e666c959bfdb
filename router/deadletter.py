"""Dead letters: one JSON line per event that a target will not get, with the reason.

Files live at `<storage.path>/deadletter/<target id>.ndjson` (0600, fsynced), so an operator can
prove what happened to every accepted event that never reached a target, and redrive it:
`take` removes the matching letters from the file, but only after the caller has put their
events back on the journal; a crash in between leaves them in both places (sent again, never
lost).

Every reason a letter is written for is named here: what delivery gives up on before any
attempt (`unsendable`), what ingest sheds when the journal is full (`DROPPED_BUFFER_FULL`),
and the backlog of a target the config no longer has (`target_removed`); delivery builds
the one failure only it can see (a send's status, attempts and times) from `Failure` itself.

With evidence on, each letter takes its place in the target's chain (router/evidence): the line
carries a `_chain` link, so the archive and this file together account for every event the
target was given. A redrive therefore does not drop a chained letter: it moves the line, byte
for byte, to `<deadletter>/redriven/<target>.ndjson` (appended and fsynced before the
dead-letter file is rewritten without it), where it keeps its place; the redriven event takes a
new place when it is delivered again. Letters are rewritten from their lines as read, never
re-encoded, so no chained byte changes.

A bucket target's object whose PUT failed after later places were taken (a dead letter chained
after it) keeps its places, and holds them in the chain (`Chain.held`). If its events are then
given up, each letter stands at the place its event held: instead of a `_chain` link of its own
it carries that object line, byte for byte, as `object_line` (a JSON string), so the chain
still has every place; `verify` checks that line as the place and the letter's `event` against
it.
"""

from __future__ import annotations

import asyncio
import os
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from router.appendfile import AppendOnlyFile
from router.evidence.canonical import CHAIN_MEMBER, CanonicalError, Link, split_line
from router.evidence.chain import Chain
from router.journal import Entry
from router.observe.metrics import utc_iso

Letter = dict[str, Any]

# A journal record that failed its checksum holds no event, so it can be shown, not redriven.
UNREDRIVABLE_REASONS = frozenset({"journal_corrupt"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """Why a batch was given up, and the evidence for it."""

    reason: str  # permanent_status, permanent_error, retries_exhausted, target_removed, ...
    message: str
    status: int | None = None
    response_excerpt: str = ""
    attempts: int = 0
    first_attempt_at: float | None = None
    last_attempt_at: float | None = None


UNSENDABLE_MESSAGES = {
    "journal_corrupt": (
        "the journal record failed its checksum; the event holds an excerpt of its bytes, or "
        "where they lie and their sha256 when the record may not be the one owed here"
    ),
    "too_large": "the event is larger than the target takes, so retrying cannot help",
    "too_old": "the event is older than the target accepts, so it would be dropped silently",
    "too_far_in_future": "the event time is further ahead than the target accepts",
}

DROPPED_BUFFER_FULL = Failure(
    reason="dropped_buffer_full",
    message="the journal was full and storage.when_full is drop_oldest_per_target",
)


def unsendable_failure(reason: str) -> Failure:
    """The dead-letter record for events refused before any attempt."""
    return Failure(reason=reason, message=UNSENDABLE_MESSAGES.get(reason, reason))


def target_removed(target_id: str) -> Failure:
    """The dead-letter record for the backlog of a target gone from the config."""
    return Failure(
        reason="target_removed",
        message=f"target {target_id!r} is no longer in the configuration",
    )


def letter_bytes(target_id: str, entry: Entry, failure: Failure) -> bytes:
    """One dead letter as JSON (without its line end), wherever letters are kept."""
    return orjson.dumps(
        {
            "event": entry.event.body,
            "target_id": target_id,
            "route": entry.route,
            "reason": failure.reason,
            "message": failure.message,
            "status": failure.status,
            "response_excerpt": failure.response_excerpt,
            "attempts": failure.attempts,
            "first_attempt_at": _iso(failure.first_attempt_at),
            "last_attempt_at": _iso(failure.last_attempt_at),
            "received_at": utc_iso(entry.event.received_at),
        }
    )


# The member of a letter standing at the place of a given-up object's line: that line.
OBJECT_LINE: Final = "object_line"
OBJECT_LINE_MEMBER: Final = b',"object_line":'


def placed_letter_bytes(target_id: str, entry: Entry, failure: Failure, line: bytes) -> bytes:
    """A letter standing at the place of the chained object line `line` of its event."""
    return letter_bytes(target_id, entry, failure)[:-1] + b"%s%s}" % (
        OBJECT_LINE_MEMBER,
        orjson.dumps(line.decode()),
    )


def holds_a_place(line: bytes) -> bool:
    """Does a letter line take a place in its target's chain (its own link, or an object
    line's)? Such letters a redrive moves to the redriven file, where they keep it."""
    return CHAIN_MEMBER in line or OBJECT_LINE_MEMBER in line


def object_line_place(letter: Letter) -> tuple[bytes, Link] | None:
    """The place (canonical bytes and link of the object line) a letter stands at, or None
    for a letter without an object line; raises CanonicalError when that line is not a
    chained line in canonical form, or not the chained line of the letter's own event."""
    held = letter.get(OBJECT_LINE)
    if held is None:
        return None
    if not isinstance(held, str):
        raise CanonicalError(f"its {OBJECT_LINE} is not a string")
    found = split_line(held.encode())
    if found is None or orjson.loads(found[0]) != letter.get("event"):
        raise CanonicalError(f"its {OBJECT_LINE} is not the chained line of its event")
    return found


def letters_path(directory: Path, target_id: str) -> Path:
    """A target's dead-letter file in the dead-letter directory: one per target."""
    return directory / f"{target_id}.ndjson"


REDRIVEN_DIR = "redriven"


def redriven_path(directory: Path, target_id: str) -> Path:
    """Where a redrive moves a target's chained letters: they keep their places there."""
    return directory / REDRIVEN_DIR / f"{target_id}.ndjson"


def letter_files(directory: Path) -> dict[str, Path]:
    """Every target's dead-letter file in the directory, by target id, in id order."""
    return {path.name.removesuffix(".ndjson"): path for path in sorted(directory.glob("*.ndjson"))}


@dataclass(frozen=True, slots=True)
class LetterFilter:
    """Which letters a `dlq` command applies to."""

    reason: str | None = None
    since: datetime | None = None

    def __call__(self, letter: Letter) -> bool:
        if self.reason is not None and letter.get("reason") != self.reason:
            return False
        if self.since is not None:
            at = letter.get("last_attempt_at") or letter.get("received_at") or ""
            try:
                return datetime.fromisoformat(at.replace("Z", "+00:00")) >= self.since
            except (AttributeError, ValueError):
                return False
        return True


def parse_since(text: str) -> datetime:
    """`--since` / `?since=`: an ISO 8601 time (a bare date is midnight UTC); naive means UTC."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"since: {text!r} is not an ISO 8601 time") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(slots=True)
class LetterTally:
    """One target's letters summed up for GET /v1/deadletters: how many, by reason, and the
    first and last attempt (or receipt) time among them."""

    reasons: Counter[str] = field(default_factory=Counter)
    first: str | None = None
    last: str | None = None

    def add(self, letter: Letter) -> None:
        self.reasons[str(letter.get("reason"))] += 1
        at = letter.get("last_attempt_at") or letter.get("received_at")
        if isinstance(at, str):
            self.first = at if self.first is None else min(self.first, at)
            self.last = at if self.last is None else max(self.last, at)

    @property
    def letters(self) -> int:
        return sum(self.reasons.values())

    def row(self, letters: int | None = None) -> dict[str, Any]:
        """The summary's row (`letters`: the count where it is known without the reasons)."""
        return {
            "letters": self.letters if letters is None else letters,
            "reasons": dict(self.reasons.most_common()),
            "first": self.first,
            "last": self.last,
        }


@dataclass(slots=True)
class LetterPage:
    """One page of the letters a filter keeps, gathered a letter at a time (from a file or a
    stream): the `limit` matches from the `offset`th, and how many matched in all."""

    wanted: LetterFilter
    offset: int
    limit: int
    kept: list[Letter] = field(default_factory=list)
    matched: int = 0

    def add(self, letter: Letter) -> None:
        if not self.wanted(letter):
            return
        if self.offset <= self.matched < self.offset + self.limit:
            self.kept.append(letter)
        self.matched += 1

    def answer(self) -> dict[str, Any]:
        return page_answer(self.kept, self.offset, self.limit, self.matched)


def page_answer(kept: list[Letter], offset: int, limit: int, matched: int) -> dict[str, Any]:
    """A page of a target's letters as GET /v1/deadletters/{target} answers it: the letters,
    where they start, how many matched in all, and where the next page starts (or None)."""
    following = offset + limit
    return {
        "letters": kept,
        "offset": offset,
        "total": matched,
        "next_offset": following if following < matched else None,
    }


def unredrivable(letter: Letter) -> str | None:
    """Why a letter can never be redriven (its reason, or `unreadable_line`); None if it can."""
    if "event" not in letter:
        return str(letter.get("reason", "unreadable_line"))
    reason = letter.get("reason")
    return str(reason) if reason in UNREDRIVABLE_REASONS else None


def read_letters(path: Path) -> Iterator[Letter]:
    """Every letter of a dead-letter file; a line that is not JSON is reported, not skipped."""
    for _, letter in read_letter_lines(path):
        yield letter


def read_letter_lines(path: Path) -> Iterator[tuple[bytes, Letter]]:
    """Every letter of a dead-letter file with its line as written (newline included)."""
    for _, line, letter in read_letter_lines_at(path):
        yield line, letter


def read_letter_lines_at(path: Path) -> Iterator[tuple[int, bytes, Letter]]:
    """`read_letter_lines`, with each line's byte offset in the file."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, generator
    except FileNotFoundError:
        return
    with f:
        offset = 0
        for number, line in enumerate(f, start=1):
            at, offset = offset, offset + len(line)
            if line.strip():
                yield at, line, _parse_letter(line, number)


def _parse_letter(line: bytes, number: int) -> Letter:
    try:
        letter: Letter = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {
            "reason": "unreadable_line",
            "line": number,
            "raw_excerpt": line[:200].decode("utf-8", "replace"),
        }
    return letter


@dataclass(slots=True)
class Taken:
    """Letters taken out for a redrive, and how many of them are back on the journal; and,
    by why, the letters that matched but cannot be redriven (they stay in the file). The
    caller reads them `chunk` by chunk and counts in `done` those it journaled."""

    letters: list[Letter]
    done: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.letters)

    async def chunk(self, size: int) -> list[Letter]:
        """The next `size` letters (at most) after the `done` ones."""
        return self.letters[self.done : self.done + size]


@dataclass(slots=True)
class FileTaken(Taken):
    """Letters taken from a dead-letter file, held as their byte offsets only (a file of a
    million letters is gigabytes once parsed) and read back a chunk at a time, in a thread.
    The file does not change meanwhile: appends wait for the take's lock."""

    path: Path = field(default_factory=Path)
    offsets: array[int] = field(default_factory=lambda: array("q"))

    @property
    def total(self) -> int:
        return len(self.offsets)

    async def chunk(self, size: int) -> list[Letter]:
        wanted = self.offsets[self.done : self.done + size]
        return await asyncio.to_thread(_letters_at, self.path, wanted)


def _letters_at(path: Path, offsets: Sequence[int]) -> list[Letter]:
    letters = []
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            letters.append(_parse_letter(f.readline(), 0))
    return letters


class DeadLetters:
    """Appends dead letters to one file per target; takes them back out for a redrive."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, AppendOnlyFile] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Letters this process wrote, by (target id, reason): /metrics reads it.
        self.written: dict[tuple[str, str], int] = {}
        # Set by the daemon when evidence is on: the target's chain, or None.
        self.chain_for: Callable[[str], Chain | None] = lambda _: None

    async def summary(self) -> dict[str, Any] | None:
        """GET /v1/deadletters, where letters are not files in `directory` (None: they are)."""
        return None

    async def page(
        self, target_id: str, wanted: LetterFilter, offset: int, limit: int
    ) -> dict[str, Any] | None:
        """A page of one target's letters (page_answer), where they are not a file in
        `directory` (None: they are)."""
        return None

    async def find(self, event_id: str) -> dict[str, dict[str, Any]] | None:
        """Per target, where the event's dead letter is, where letters are not files in
        `directory` (None: they are, and receipts' lookup reads them there)."""
        return None

    def path(self, target_id: str) -> Path:
        return letters_path(self.directory, target_id)

    def _lock(self, target_id: str) -> asyncio.Lock:
        return self._locks.setdefault(target_id, asyncio.Lock())

    async def write(self, target_id: str, entries: Sequence[Entry], failure: Failure) -> None:
        chain = self.chain_for(target_id)
        if chain is None:
            letters = [letter_bytes(target_id, entry, failure) for entry in entries]
            await self._append(target_id, b"".join(letter + b"\n" for letter in letters))
        else:
            # Shielded as a file target's chained write is: a cancelled caller leaves the
            # append, the head and the lock to end together.
            await asyncio.shield(
                asyncio.ensure_future(self._append_chained(target_id, chain, entries, failure))
            )
        key = (target_id, failure.reason)
        self.written[key] = self.written.get(key, 0) + len(entries)

    async def _append_chained(
        self, target_id: str, chain: Chain, entries: Sequence[Entry], failure: Failure
    ) -> None:
        """Each letter takes the next place, or stands at the place its event's object line
        holds (Chain.held); the held places are let go only once the letters are written."""
        async with chain.lock:
            placed: list[bytes] = []
            linked: list[bytes] = []
            for entry in entries:
                held = chain.held.get(entry.event.id)
                if held is None:
                    linked.append(letter_bytes(target_id, entry, failure))
                else:
                    placed.append(placed_letter_bytes(target_id, entry, failure, held))
            lines, head = chain.link(linked)
            await self._append(target_id, b"".join(line + b"\n" for line in placed + lines))
            for entry in entries:
                chain.held.pop(entry.event.id, None)
            chain.advance(head)

    async def _append(self, target_id: str, lines: bytes) -> None:
        async with self._lock(target_id):
            file = self._files.get(target_id)
            if file is None:
                file = self._files[target_id] = AppendOnlyFile(self.path(target_id))
            await asyncio.to_thread(file.append, lines)

    @asynccontextmanager
    async def take(
        self,
        target_id: str,
        wanted: Callable[[Letter], bool],
        refuse: Callable[[Letter], str | None] = lambda _: None,
    ) -> AsyncIterator[Taken]:
        """Yield the wanted, redrivable letters (`refuse` may name why one is not; its count
        goes to `skipped`, as do letters without an event). The caller counts in `done` those
        it has put back on the journal, in order; at the end of the block, even on error, the
        file is rewritten without them. New letters wait meanwhile, so none is lost in the
        rewrite. The file is read in a thread (a pass to choose, a chunk at a time to
        redrive, a pass to rewrite), holding offsets, never the whole file."""
        async with self._lock(target_id):
            path = self.path(target_id)
            taken = FileTaken([], path=path)

            def choose() -> None:
                for offset, _, letter in read_letter_lines_at(path):
                    if not wanted(letter):
                        continue
                    why = unredrivable(letter) or refuse(letter)
                    if why is None:
                        taken.offsets.append(offset)
                    else:
                        taken.skipped[why] = taken.skipped.get(why, 0) + 1

            await asyncio.to_thread(choose)
            try:
                yield taken
            finally:
                if taken.done:
                    gone = taken.offsets[: taken.done]
                    await asyncio.to_thread(self._rewrite, target_id, gone)

    def _rewrite(self, target_id: str, gone: Sequence[int]) -> None:
        """Move the letters that hold a place among the lines at `gone` (sorted offsets) to the
        target's redriven file (appended, fsynced), then atomically replace the dead-letter
        file with the other lines (temp file, fsync, rename); the appender reopens. A crash
        in between leaves a letter in both files: the same line, which verify counts once.
        Both files are written as the old one is read, a buffer at a time."""
        path = self.path(target_id)
        temp = path.with_name(path.name + ".tmp")
        temp.unlink(missing_ok=True)
        kept = AppendOnlyFile(temp, fsync=False)
        redriven = AppendOnlyFile(redriven_path(self.directory, target_id), fsync=False)
        moved = False
        try:
            keep, move = _Buffer(kept), _Buffer(redriven)
            kept.open()  # an empty file is still the new dead-letter file
            next_gone = iter(gone)
            upcoming = next(next_gone, None)
            with open(path, "rb") as f:
                offset = 0
                for line in f:
                    at, offset = offset, offset + len(line)
                    if at != upcoming:
                        keep.add(line)
                        continue
                    upcoming = next(next_gone, None)
                    if holds_a_place(line):
                        move.add(line)
                        moved = True
            keep.flush()
            move.flush()
            if moved:
                redriven.fsync_now()
            kept.fsync_now()
        finally:
            kept.close()
            redriven.close()
        appender = self._files.pop(target_id, None)
        if appender is not None:
            appender.close()
        os.replace(temp, path)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


class _Buffer:
    """Lines gathered into appends of about REWRITE_BUFFER_BYTES."""

    def __init__(self, file: AppendOnlyFile) -> None:
        self.file = file
        self.lines: list[bytes] = []
        self.size = 0

    def add(self, line: bytes) -> None:
        self.lines.append(line)
        self.size += len(line)
        if self.size >= REWRITE_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            self.file.append(b"".join(self.lines))
            self.lines, self.size = [], 0


REWRITE_BUFFER_BYTES = 1 << 20


def _iso(ts: float | None) -> str | None:
    return None if ts is None else utc_iso(ts)
