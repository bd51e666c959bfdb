"""`event-router verify`: check a target's chain from its files alone, and name the first break.

Pure: it reads lines it is given (archive files in order, and the target's dead-letter files)
and says where they stop agreeing with the chain. What it checks, for every line:

- it is a chained line in canonical form (canonical.py), or a checkpoint line;
- its seq is the one after the previous place (dead letters fill their places from the
  dead-letter file), so a deleted, inserted, swapped or missing (rotated file removed) line
  shows as a gap or an out-of-order seq;
- its hash is SHA-256(prev || canonical bytes) and its prev is the previous place's hash;
- a checkpoint names the chain head at that point (seq and hash) and, given the public key,
  carries a valid Ed25519 signature over its payload.

Events that appear twice (the at-most-once batch re-sent after kill -9, at new places) are
counted, not faulted: each of their places is a valid link. Two adjacent lines in each other's
places are named as swapped. Given the head the daemon reports (`--expect-head`, from
/v1/status), places cut off the end after the last checkpoint show too.

Letters a `dlq redrive` put back on the journal are moved, line for line, to
`<deadletter>/redriven/<target>.ndjson`: given that file too, their places are filled, and each
redriven event's new place in the archive is matched to its letter by id.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from router.deadletter import OBJECT_LINE_MEMBER, REDRIVEN_DIR, object_line_place
from router.evidence.canonical import GENESIS, CanonicalError, Link, link_hash, split_line
from router.evidence.checkpoint import (
    Checkpoint,
    CheckpointError,
    is_checkpoint,
    parse_checkpoint,
)
from router.evidence.keys import key_id
from router.observe.logformat import counted

if TYPE_CHECKING:  # cryptography is loaded where a key is (router/evidence/keys.py)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

RECENT_IDS = 100_000  # re-sent events are looked for among this many recent places
PROGRESS_EVERY = 10_000
EN_DASH = "\u2013"  # seq ranges read "4811 to 4815" with an en dash
LETTER_KEYS = frozenset({"event", "reason", "target_id"})


class Broken(Exception):
    """The first place where the files disagree with the chain."""

    def __init__(self, place: str, message: str) -> None:
        self.place = place
        self.message = message
        super().__init__(f"{place}: {message}" if place else message)


@dataclass(frozen=True, slots=True)
class ExpectedHead:
    """The head a running daemon reports for the target (/v1/status: chain_seq, chain_hash):
    the files must reach it, or places were cut off their end."""

    seq: int
    hash: bytes | None = None

    @classmethod
    def parse(cls, text: str) -> ExpectedHead:
        """`SEQ` or `SEQ:HASH` (the hash as 64 hex digits)."""
        seq, _, digest = text.partition(":")
        try:
            head = cls(int(seq), bytes.fromhex(digest) if digest else None)
        except ValueError as exc:
            raise ValueError(f"--expect-head: {text!r} is not SEQ or SEQ:HASH") from exc
        if head.seq < 1 or (head.hash is not None and len(head.hash) != 32):
            raise ValueError(f"--expect-head: {text!r} is not SEQ or SEQ:HASH")
        return head


@dataclass(slots=True)
class Report:
    """What was verified, and the first break if any."""

    broken: str | None = None
    warnings: list[str] = field(default_factory=list)
    events: int = 0
    dead_letters: int = 0
    resent: int = 0
    unchained: int = 0
    checkpoints: int = 0
    signed_checkpoints: int = 0
    head_seq: int = 0
    target: str | None = None
    last_checkpoint_seq: int = 0
    last_checkpoint_time: str | None = None
    first_time: str | None = None
    last_time: str | None = None
    files: int = 0
    redriven: int = 0  # letters a redrive put back on the journal (still in the chain)
    redelivered: int = 0  # of those, events found again at a later place in the archive
    receipts: int = 0  # signed receipts given (--receipts), their signatures checked
    receipts_found: int = 0  # of those, whose digest is an event line's in the chain

    @property
    def ok(self) -> bool:
        return self.broken is None

    def summary(self) -> str:
        times = f", first {self.first_time}, last {self.last_time}" if self.first_time else ""
        checkpoint = (
            f"; last checkpoint at seq {self.last_checkpoint_seq} ({self.last_checkpoint_time})"
            if self.last_checkpoint_time
            else ""
        )
        redriven = (
            f" ({self.redriven} redriven, {self.redelivered} of them delivered again)"
            if self.redriven
            else ""
        )
        receipts = (
            f"; {counted(self.receipts, 'signed receipt')}, {self.receipts_found} of them for "
            "events in the chain"
            if self.receipts
            else ""
        )
        return (
            f"{counted(self.events, 'event')} and {counted(self.dead_letters, 'dead letter')}"
            f"{redriven} verified (chain head seq {self.head_seq}, {self.resent} re-sent), "
            f"{counted(self.checkpoints, 'checkpoint')} ({self.signed_checkpoints} "
            f"signature-checked) in {counted(self.files, 'file')}{times}{checkpoint}{receipts}"
        )


class ReceiptDigests:
    """The digests of signed receipts an auditor holds, found as event lines go by."""

    def __init__(self, digests: Iterable[str] = ()) -> None:
        self.wanted = set(digests)
        self.found: set[str] = set()

    def see(self, canonical: bytes) -> None:
        if self.wanted:
            found = "sha256:" + hashlib.sha256(canonical).hexdigest()
            if found in self.wanted:
                self.found.add(found)

    def count(self, report: Report) -> None:
        report.receipts = len(self.wanted)
        report.receipts_found = len(self.found)


@dataclass(slots=True)
class _Letter:
    place: str
    canonical: bytes
    link: Link
    event_id: str | None
    redriven: bool = False


def letter_place(place: str, line: bytes) -> tuple[bytes, Link, str | None] | None:
    """A dead letter's place in the chain: (canonical bytes, link, its event's id). The place
    is the letter's own link, or the object line it carries when it stands at the place of a
    given-up object's line (router/deadletter); None for a letter without either."""
    found = _split(place, line)
    if found is None and OBJECT_LINE_MEMBER not in line:
        return None
    try:
        letter = orjson.loads(found[0] if found is not None else line)
        if found is None and isinstance(letter, dict):
            found = object_line_place(letter)
    except (orjson.JSONDecodeError, CanonicalError) as exc:
        raise Broken(place, f"a letter that stands at an object line's place: {exc}") from None
    if found is None or not isinstance(letter, dict):
        return None
    event = letter.get("event")
    event_id = event.get("id") if isinstance(event, dict) else None
    return found[0], found[1], event_id if isinstance(event_id, str) else None


def conclude(
    report: Report,
    *,
    unsigned: int,
    unchecked: int,
    max_age_s: float | None,
    now: datetime,
    unchained: str = "lines before the chain have no _chain",
) -> None:
    """The warnings of a chain read to its end, and the --max-age-s check (raises Broken)."""
    if report.checkpoints == 0 and report.head_seq:
        report.warnings.append("no checkpoint: nothing vouches for the chain's head")
    elif report.head_seq > report.last_checkpoint_seq:
        report.warnings.append(
            f"seq {_span(report.last_checkpoint_seq + 1, report.head_seq)} come after the last "
            "checkpoint (written since, or cut off by a crash); the next checkpoint covers them "
            "(--expect-head with the daemon's head checks them now)"
        )
    if unsigned:
        report.warnings.append(f"{unsigned} checkpoints are unsigned (no signing key)")
    if unchecked:
        report.warnings.append(f"{unchecked} signed checkpoints not checked: give --public-key")
    if report.unchained:
        report.warnings.append(f"{report.unchained} {unchained}")
    if report.receipts_found < report.receipts:
        report.warnings.append(
            f"{report.receipts - report.receipts_found} receipts name events not in these files "
            "(pending, dead-lettered, or in files not given)"
        )
    if report.redelivered < report.redriven:
        report.warnings.append(
            f"{report.redriven - report.redelivered} redriven letters' events are not (yet) in "
            "the archive after their letters"
        )
    if max_age_s is not None and report.last_checkpoint_time is not None:
        at = datetime.fromisoformat(report.last_checkpoint_time.replace("Z", "+00:00"))
        age = (now - at).total_seconds()
        if age > max_age_s:
            raise Broken(
                "",
                f"the last checkpoint ({report.last_checkpoint_time}) is {age:.0f} s old, "
                f"more than --max-age-s {max_age_s:g}",
            )


def check_head(
    expected: ExpectedHead | None, head_seq: int, head_place: str, hash_there: bytes | None
) -> None:
    """The chain read must reach the head the daemon reported, with the same hash there."""
    if expected is None:
        return
    if head_seq < expected.seq:
        raise Broken(
            "",
            f"seq {_span(head_seq + 1, expected.seq)} missing at the end: the chain ends at "
            f"seq {head_seq} ({head_place}) but the daemon's head is seq {expected.seq} "
            "(places cut off the end)",
        )
    if expected.hash is not None and hash_there != expected.hash:
        raise Broken(
            "",
            f"seq {expected.seq} does not hold the daemon's head (its hash differs): the chain "
            "was rewritten from there or before",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyOptions:
    """What every verifier (files, a bucket, a topic) is told: the public key checkpoints must
    be signed with, whether the oldest places may be missing (`partial`), how old the last
    checkpoint may be, the time to judge that by, a progress callback, the head the daemon
    reports, and the digests of receipts to find."""

    public_key: Ed25519PublicKey | None = None
    partial: bool = False
    max_age_s: float | None = None
    now: datetime | None = None
    progress: Callable[[int], None] | None = None
    expect_head: ExpectedHead | None = None
    receipts: ReceiptDigests | None = None


class ChainChecks:
    """What every verifier shares: its options, report and progress, and the checks of a
    checkpoint on its own (its target, its signature)."""

    def __init__(self, options: VerifyOptions | None = None) -> None:
        options = options or VerifyOptions()
        self.public_key = options.public_key
        self.key_id = key_id(options.public_key) if options.public_key is not None else None
        self.receipts = options.receipts or ReceiptDigests()
        self.partial = options.partial
        self.max_age_s = options.max_age_s
        self.now = options.now or datetime.now(UTC)
        self.progress = options.progress
        self.expect_head = options.expect_head
        self.report = Report()
        self._lines = 0
        self._unsigned = 0
        self._unchecked = 0

    def _tick(self) -> None:
        self._lines += 1
        if self.progress is not None and self._lines % PROGRESS_EVERY == 0:
            self.progress(self._lines)

    def _read_checkpoint(self, place: str, line: bytes) -> Checkpoint:
        """A checkpoint line, which must be of this chain's target."""
        try:
            checkpoint = parse_checkpoint(line)
        except CheckpointError as exc:
            raise Broken(place, str(exc)) from None
        report = self.report
        if report.target is None:
            report.target = checkpoint.target
        elif checkpoint.target != report.target:
            raise Broken(
                place, f"a checkpoint of target {checkpoint.target!r} in {report.target!r}'s chain"
            )
        return checkpoint

    def _check_signature(self, place: str, checkpoint: Checkpoint) -> None:
        """Signed by the public key when one was given (counted as signature-checked,
        unchecked or unsigned)."""
        if checkpoint.signature is None:
            if self.public_key is not None:
                raise Broken(place, "checkpoint is unsigned, but a public key was given")
            self._unsigned += 1
        elif self.public_key is None:
            self._unchecked += 1
        else:
            if checkpoint.key != self.key_id or not checkpoint.signed_by(self.public_key):
                raise Broken(place, "checkpoint signature does not verify with the public key")
            self.report.signed_checkpoints += 1

    def _conclude(self, unchained: str | None = None) -> None:
        """The receipts found, the warnings, and the --max-age-s check (raises Broken)."""
        self.receipts.count(self.report)
        conclude(
            self.report,
            unsigned=self._unsigned,
            unchecked=self._unchecked,
            max_age_s=self.max_age_s,
            now=self.now,
            **({"unchained": unchained} if unchained is not None else {}),
        )


class Verifier(ChainChecks):
    """Feed it the dead-letter files first, then the archive files oldest first; `finish`."""

    def __init__(self, options: VerifyOptions | None = None) -> None:
        super().__init__(options)
        self._head: Link | None = None
        self._head_place = "the start of the chain"
        self._letters: dict[int, _Letter] = {}
        self._letter_seqs: list[int] = []  # a heap of the letters' seqs
        self._letter_files = 0
        self._recent_ids: deque[str] = deque()
        self._recent_set: set[str] = set()
        self._hash_at_expected: bytes | None = None
        self._ahead: tuple[str, bytes, Link] | None = None  # a line one place early: swapped?
        self._redriven: dict[str, int] = {}  # event id -> the seq of its redriven letter

    # -- input -----------------------------------------------------------------------------

    def dead_letters(self, name: str, lines: Iterable[bytes], *, redriven: bool = False) -> None:
        """Every chained letter of a dead-letter file takes its place when the archive reaches
        it (or at the end). `redriven`: the letters a redrive moved out of the dead-letter file
        (a redrive cut short leaves a letter in both files: the same line, counted once)."""
        self.report.files += 1
        self._letter_files += 1
        for number, line in _numbered(name, lines):
            place = f"{name}:{number}"
            found = letter_place(place, line)
            if found is None:
                self.report.unchained += 1
                continue
            canonical, link, event_id = found
            known = self._letters.get(link.seq)
            if known is not None:
                if known.link == link and known.canonical == canonical:
                    known.redriven = known.redriven or redriven
                    continue
                raise Broken(place, f"seq {link.seq} appears twice in the dead letters")
            self._letters[link.seq] = _Letter(place, canonical, link, event_id, redriven)
            heapq.heappush(self._letter_seqs, link.seq)

    def archive(self, name: str, lines: Iterable[bytes]) -> None:
        self.report.files += 1
        for number, line in _numbered(name, lines):
            place = f"{name}:{number}"
            self._tick()
            if is_checkpoint(line):
                self._checkpoint(place, line)
                continue
            found = _split(place, line)
            if found is None:
                self._flush_ahead()
                if self._head is not None or (self._letters and min(self._letters) == 1):
                    raise Broken(place, "a line without a _chain member inside the chain")
                self.report.unchained += 1  # written before evidence was turned on
                continue
            canonical, link = found
            self._fill_letters(link.seq - 1)
            if link.seq in self._letters:
                raise Broken(
                    place,
                    f"seq {link.seq} is also in the dead letters ({self._letters[link.seq].place})",
                )
            if self._swapped(place, canonical, link):
                continue
            self._take(place, canonical, link, letter=False)

    def finish(self) -> Report:
        """The report once every file was read (`Broken` raised meanwhile goes in it too)."""
        self._flush_ahead()
        self._fill_letters(math.inf)
        report = self.report
        report.head_seq = self._head.seq if self._head is not None else 0
        check_head(self.expect_head, report.head_seq, self._head_place, self._hash_at_expected)
        self._conclude()
        return report

    def _swapped(self, place: str, canonical: bytes, link: Link) -> bool:
        """Hold a line one place early (the next place missing) until the next line says
        whether the two were swapped; True when the line was held or the pair taken."""
        ahead = self._ahead
        if ahead is None:
            if link.seq == self._next_seq() + 1 and self._head is not None:
                self._ahead = (place, canonical, link)
                return True
            return False
        self._ahead = None
        ahead_place, ahead_canonical, ahead_link = ahead
        head = self._head
        if (
            head is not None
            and link.seq == head.seq + 1
            and link.prev == head.hash
            and ahead_link.prev == link.hash
            and link_hash(link.prev, canonical) == link.hash
            and link_hash(ahead_link.prev, ahead_canonical) == ahead_link.hash
        ):
            raise Broken(
                ahead_place,
                f"swapped with {place} (seq {ahead_link.seq} and seq {link.seq} are in each "
                "other's places)",
            )
        self._take(ahead_place, ahead_canonical, ahead_link, letter=False)  # raises the gap
        return False

    def _flush_ahead(self) -> None:
        """A line held one place early that no swap explains: its gap."""
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            self._take(ahead[0], ahead[1], ahead[2], letter=False)

    # -- the chain -------------------------------------------------------------------------

    def _fill_letters(self, through: float) -> None:
        """Dead letters take their places up to seq `through`, lowest first (a missing place
        before one of them is a gap named at that letter)."""
        while self._letter_seqs and self._letter_seqs[0] <= through:
            letter = self._letters.pop(heapq.heappop(self._letter_seqs))
            self._take(letter.place, letter.canonical, letter.link, letter=letter)

    def _next_seq(self) -> int:
        return self._head.seq + 1 if self._head is not None else 1

    def _take(self, place: str, canonical: bytes, link: Link, *, letter: bool | _Letter) -> None:
        expected = self._next_seq()
        if link.seq != expected and not (self._head is None and self.partial):
            if link.seq > expected:
                hint = "" if self._letter_files else " (dead letters: give their file too)"
                raise Broken(
                    "",
                    f"gap: seq {_span(expected, link.seq - 1)} missing between "
                    f"{self._head_place} and {place}{hint}",
                )
            raise Broken(
                place,
                f"seq {link.seq} out of order: seq {expected} was expected after "
                f"{self._head_place} (a line inserted, moved or repeated)",
            )
        if link_hash(link.prev, canonical) != link.hash:
            raise Broken(place, "hash does not match the chain (the line was changed)")
        prev = self._head.hash if self._head is not None else GENESIS
        if link.prev != prev and not (self._head is None and self.partial):
            raise Broken(place, f"prev does not match the hash of {self._head_place}")
        self._head = link
        self._head_place = place
        if self.expect_head is not None and link.seq == self.expect_head.seq:
            self._hash_at_expected = link.hash
        self._note(canonical, link.seq, letter)

    def _note(self, canonical: bytes, seq: int, letter: bool | _Letter) -> None:
        report = self.report
        if letter:
            report.dead_letters += 1
            if isinstance(letter, _Letter) and letter.redriven:
                report.redriven += 1
                if letter.event_id is not None:
                    self._redriven[letter.event_id] = seq
            return
        report.events += 1
        self.receipts.see(canonical)
        try:
            body: Any = orjson.loads(canonical)
        except orjson.JSONDecodeError:
            return
        event_time = body.get("eventTime") if isinstance(body, dict) else None
        if isinstance(event_time, str):
            if report.first_time is None or event_time < report.first_time:
                report.first_time = event_time
            if report.last_time is None or event_time > report.last_time:
                report.last_time = event_time
        event_id = body.get("id") if isinstance(body, dict) else None
        if isinstance(event_id, str) and self._redriven.pop(event_id, seq) < seq:
            report.redelivered += 1  # its redriven letter was at an earlier place
        elif isinstance(event_id, str):
            if event_id in self._recent_set:
                report.resent += 1
            else:
                self._recent_set.add(event_id)
                self._recent_ids.append(event_id)
                if len(self._recent_ids) > RECENT_IDS:
                    self._recent_set.discard(self._recent_ids.popleft())

    def _checkpoint(self, place: str, line: bytes) -> None:
        self._flush_ahead()
        checkpoint = self._read_checkpoint(place, line)
        report = self.report
        self._fill_letters(checkpoint.seq)
        if self._head is None and self.partial:
            # The places before it are gone (rotated away): the chain goes on from its head.
            self._head = Link(checkpoint.seq, b"", checkpoint.hash)
            self._head_place = place
        head = self._head
        if head is None or head.seq != checkpoint.seq or head.hash != checkpoint.hash:
            at = f"seq {head.seq}" if head is not None else "no place yet"
            raise Broken(
                place,
                f"checkpoint (seq {checkpoint.seq}) does not match the chain ({at} at "
                f"{self._head_place})",
            )
        self._check_signature(place, checkpoint)
        report.checkpoints += 1
        report.last_checkpoint_seq = checkpoint.seq
        report.last_checkpoint_time = checkpoint.time


def _split(place: str, line: bytes) -> tuple[bytes, Link] | None:
    try:
        return split_line(line)
    except CanonicalError as exc:
        raise Broken(place, str(exc)) from None


def _numbered(name: str, lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline); a last line without one is a torn line."""
    for number, line in enumerate(lines, start=1):
        if not line.endswith(b"\n"):
            raise Broken(f"{name}:{number}", "torn last line (the file was cut)")
        if line.strip():
            yield number, line[:-1]


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}{EN_DASH}{last}"


# -- files -------------------------------------------------------------------------------------

ROTATED = re.compile(r"^(?P<base>.*?)(?:\.(?P<n>\d+))?(?:\.gz)?$")


def open_lines(path: Path) -> Iterator[bytes]:
    """A file's lines, gunzipped when its name ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        yield from f


def is_dead_letter_file(path: Path) -> bool:
    """A dead-letter file's lines are letters: objects with event, reason and target_id."""
    for line in open_lines(path):
        if line.strip():
            try:
                first = orjson.loads(line)
            except orjson.JSONDecodeError:
                return False
            return isinstance(first, dict) and first.keys() >= LETTER_KEYS
    return False


def archive_order(paths: Iterable[Path]) -> list[Path]:
    """Rotated archives oldest first: `x.ndjson.3(.gz)`, `.2`, `.1`, then `x.ndjson`."""

    def key(path: Path) -> tuple[str, int]:
        match = ROTATED.match(path.name)
        assert match is not None
        return (str(path.parent / match["base"]), -int(match["n"] or 0))

    return sorted(paths, key=key)


def verify_files(paths: Iterable[Path], verifier: Verifier) -> Report:
    """Verify archive files and dead-letter files of one target's chain."""
    letters: list[Path] = []
    archives: list[Path] = []
    for path in paths:
        (letters if is_dead_letter_file(path) else archives).append(path)
    try:
        for path in letters:
            redriven = path.parent.name == REDRIVEN_DIR
            verifier.dead_letters(str(path), open_lines(path), redriven=redriven)
        for path in archive_order(archives):
            verifier.archive(str(path), open_lines(path))
        return verifier.finish()
    except Broken as exc:
        verifier.report.broken = str(exc)
        verifier.report.head_seq = verifier._head.seq if verifier._head is not None else 0
        return verifier.report
