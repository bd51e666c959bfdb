"""What the router knows about one accepted event, beyond its JSON body.

The routing location is segment 5 of `logSourceCRN` (an empty segment means `global`), and the
producing service is segment 4. Both are derived once, at ingest, so routing and delivery never
parse the CRN again. `eventTime` is read here too (`parse_event_time`), once per event, for
whoever needs it as a time (a target's timestamp, a search bound).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import orjson

GLOBAL = "global"


def crn_parts(crn: str) -> list[str]:
    """Split a CRN into its ten segments; the resource (last) keeps any further colons."""
    parts = crn.split(":", 9)
    return parts + [""] * (10 - len(parts))


@lru_cache(maxsize=4096)
def crn_facts(crn: str) -> tuple[str, str]:
    """(location, service) of a CRN, for routing; remembered, since a producer's events repeat
    their logSourceCRN (the split cost a third of routing an event)."""
    parts = crn_parts(crn)
    return parts[5] or GLOBAL, parts[4]


def crn_location(crn: str) -> str:
    """The routing location of a CRN: its 6th segment, or `global` when that is empty."""
    return crn_parts(crn)[5] or GLOBAL


def crn_service(crn: str) -> str:
    """The service name segment of a CRN, e.g. `secrets-manager`."""
    return crn_parts(crn)[4]


def action_service(action: str) -> str:
    """The service an action belongs to; VPC (`is.`) services have two dotted parts."""
    head, _, rest = action.partition(".")
    if head == "is" and rest:
        return "is." + rest.partition(".")[0]
    return head


def parse_event_time(value: Any) -> datetime | None:
    """An eventTime as an aware datetime; None when it is not an ISO 8601 time with an offset
    (the schema asks for one, but a stored line read back may be anything)."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo else None


def dumps(value: Any) -> bytes:
    """orjson.dumps, trimmed to its length. orjson hands back the buffer it wrote into, which
    keeps its whole allocation (8 KiB for a 1 KB event): an event kept by the journal's memory
    or a request waiting for its durable answer held eight times its bytes. One copy of the
    bytes (~0.3 us a 1 KB event) frees the buffer at once."""
    return memoryview(orjson.dumps(value)).tobytes()


def with_id(encoded: bytes, event_id: str) -> bytes:
    """The compact JSON of an object (`encoded`: orjson's, ending in `}`, not `{}`) with an
    `id` added last, as orjson writes a key added last: one copy, of the event's size."""
    return b"".join((memoryview(encoded)[:-1], b',"id":"', event_id.encode(), b'"}'))


# Ids are made a block at a time: one getrandom call and a few slice copies per 256 ids
# (uuid.uuid4 made it 5 % of the CPU of a batched ingest; formatting each id alone, 0.8 us).
# Each id comes with the bytes that append it to an object's compact JSON as its last member
# (`,"id":"<id>"}`), cut from the same block: intake appends them to an event's bytes.
_ID_BLOCK = 256
_ids: list[tuple[str, bytes]] = []
_MEMBER_HEAD = b',"id":"'
_MEMBER_TAIL = b'"}'
_MEMBER = len(_MEMBER_HEAD) + 36 + len(_MEMBER_TAIL)
# Byte 6 of a version 4 UUID starts with the version (4), byte 8 with the variant (binary 10).
_VERSION = bytes((byte & 0x0F) | 0x40 for byte in range(256))
_VARIANT = bytes((byte & 0x3F) | 0x80 for byte in range(256))
# Where each of an id's 32 hex digits goes in its member's bytes (8-4-4-4-12, dashes between).
_DIGIT_AT = [
    len(_MEMBER_HEAD) + n + (n >= 8) + (n >= 12) + (n >= 16) + (n >= 20) for n in range(32)
]


def _forget_random() -> None:
    """A forked child draws its own bytes: it must never repeat its parent's ids."""
    _ids.clear()


os.register_at_fork(after_in_child=_forget_random)


def _id_block() -> list[tuple[str, bytes]]:
    """_ID_BLOCK fresh ids, each with its member's bytes: random bytes, the version and
    variant bits set in all of them at once (a slice of every 16th byte, translated), hex
    digits spread into the members one digit position at a time (32 slice copies), then cut
    into ids and members."""
    random = bytearray(os.urandom(16 * _ID_BLOCK))
    random[6::16] = random[6::16].translate(_VERSION)
    random[8::16] = random[8::16].translate(_VARIANT)
    digits = random.hex().encode()
    text = bytearray((_MEMBER_HEAD + b"-" * 36 + _MEMBER_TAIL) * _ID_BLOCK)
    for digit, at in enumerate(_DIGIT_AT):
        text[at::_MEMBER] = digits[digit::32]
    members = bytes(text)
    whole = members.decode()
    head = len(_MEMBER_HEAD)
    return [
        (whole[start + head : start + head + 36], members[start : start + _MEMBER])
        for start in range(0, len(members), _MEMBER)
    ]


def new_event_id() -> str:
    """A fresh id for an event that arrived without one: a random (version 4) UUID, in its
    canonical text form, as str(uuid.uuid4()) writes it."""
    return new_event_id_member()[0]


def encoded_with_new_id(body: dict[str, Any]) -> tuple[str, bytes]:
    """A fresh id for a body without one, and the body's compact JSON with that id appended
    as orjson writes a key added last (what with_id(dumps(body), id) makes, in half its
    time): intake's bytes of an event without an id. Exact-size bytes (see dumps); an empty
    body (`{}`) gets `{,...}`, so it is never asked for one."""
    if not _ids:
        _ids.extend(_id_block())
    fresh, member = _ids.pop()
    return fresh, orjson.dumps(body)[:-1] + member


def new_event_id_member() -> tuple[str, bytes]:
    """A fresh id (as new_event_id) and the bytes that add it to an object's compact JSON as
    its last member, as orjson writes a key added last: `encoded[:-1] + member` is what
    `with_id(encoded, id)` makes, without encoding the id again (0.28 us, not 0.55)."""
    if not _ids:
        _ids.extend(_id_block())
    return _ids.pop()


class Event:
    """An accepted event: its id, when it arrived, its body and its JSON bytes.

    An event read back from the journal keeps only its stored bytes until something needs
    the body: the file and http targets send the bytes as they are, so draining a backlog
    does not parse every event again. The routing facts (location, service, action) are
    derived from the body once, when first asked for.
    """

    __slots__ = ("_body", "_encoded", "_facts", "_time", "corrupt", "id", "received_at")

    def __init__(
        self,
        *,
        id: str,
        body: dict[str, Any] | None = None,
        encoded: bytes | None = None,
        received_at: float | None = None,
        corrupt: bool = False,
    ) -> None:
        if body is None and encoded is None:
            raise ValueError("an event needs its body or its encoded bytes")
        self.id = id
        self._body = body
        self._encoded = encoded
        self.received_at = time.time() if received_at is None else received_at
        # True for a journal record that failed its checksum: it is dead-lettered, never sent.
        self.corrupt = corrupt
        self._facts: tuple[str, str, str] | None = ("", "", "") if corrupt else None
        self._time: tuple[datetime | None] | None = None  # eventTime, once read

    @classmethod
    def from_body(
        cls,
        body: dict[str, Any],
        *,
        received_at: float | None = None,
        encoded: bytes | None = None,
        spare: bool = False,
        appended_id: str | None = None,
    ) -> Event:
        """Wrap a body that passed validation; assigns an id when the producer sent none.

        `encoded`, when given, is the body's compact JSON as the body is now: the event keeps
        it as its bytes, with the new id appended to it as orjson would write it (a new key
        goes last), so the body is serialised once on the whole way in. `spare`: `encoded` is
        orjson's own buffer, with room to spare (see `dumps`), so the event keeps a copy of
        its length instead; appending the id makes that copy anyway. `appended_id`: `encoded`
        is the body's bytes with this fresh id appended already (the decoder made them so,
        router/intake/http.py), for a body without an `id`."""
        if not body.get("id"):
            fresh = "id" not in body
            if fresh and appended_id is not None and encoded is not None:
                body["id"] = appended_id  # added last: where the bytes hold it
            else:
                body["id"] = new_event_id()
                if encoded is not None:
                    encoded = (
                        with_id(encoded, body["id"])
                        if fresh
                        and appended_id is None
                        and len(encoded) > 2
                        and encoded.endswith(b"}")
                        else None  # an empty object, or a falsy id replaced where it stood
                    )
        elif appended_id is not None:
            encoded = None  # bytes holding an id the body does not: made again when asked
        elif spare and encoded is not None:
            encoded = memoryview(encoded).tobytes()
        event = object.__new__(cls)  # as `stored`: __init__'s keywords and checks cost 0.3 us
        event.id = body["id"]
        event._body = body
        event._encoded = encoded
        event.received_at = time.time() if received_at is None else received_at
        event.corrupt = False
        event._facts = None
        event._time = None
        return event

    @classmethod
    def accepted(
        cls, body: dict[str, Any], event_id: str, encoded: bytes, received_at: float
    ) -> Event:
        """What from_body makes of a body that holds its id (`event_id`, as body["id"] is)
        and whose compact JSON, as the body is now, is `encoded` (exact-size bytes, not
        orjson's buffer): intake's common case, made without from_body's keywords and checks
        (0.2 us a call of an event's 0.5)."""
        event = object.__new__(cls)
        event.id = event_id
        event._body = body
        event._encoded = encoded
        event.received_at = received_at
        event.corrupt = False
        event._facts = None
        event._time = None
        return event

    @classmethod
    def stored(cls, event_id: str, encoded: bytes, received_at: float) -> Event:
        """An event as the journal kept it: parsed only if a target needs its fields. Every
        event read back from the journal or handed over by a worker process is made here, so
        without __init__'s keyword arguments and checks (it has its bytes): 0.25 us, not 0.6."""
        event = object.__new__(cls)
        event.id = event_id
        event._body = None
        event._encoded = encoded
        event.received_at = received_at
        event.corrupt = False
        event._facts = None
        event._time = None
        return event

    def as_stored(self) -> Event:
        """This event as the journal keeps it (its id, bytes and arrival time, no parsed body):
        itself when that is all it holds already (intake let its body go, a worker process
        handed over its bytes), so the journal's owner makes no copy of it (~0.6 us)."""
        if self._body is None and not self.corrupt:
            return self
        return Event.stored(self.id, self.encoded(), self.received_at)

    @classmethod
    def corrupt_record(
        cls,
        seq: int,
        raw: bytes | None,
        *,
        event_id: str | None = None,
        received_at: float | None = None,
    ) -> Event:
        """Stands in for an unreadable journal record whose identity the journal vouches for
        (its seq is the key it is stored under: a JetStream message's stream sequence; a
        record whose CRC over its header passed but whose body is no event), so that its
        fate is still written down, under the event's own id and arrival time when those
        survived, with an excerpt of its bytes. A record the journal cannot vouch for is
        `unvouched_record`: its bytes may be another event's."""
        excerpt = (raw or b"")[:512].decode("utf-8", "replace")
        body: dict[str, Any] = {"journal_seq": seq, "raw_excerpt": excerpt}
        if event_id is not None:
            body["id"] = event_id
        return cls(
            id=event_id or f"journal-seq-{seq}", body=body, received_at=received_at, corrupt=True
        )

    @classmethod
    def unvouched_record(cls, seq: int, raw: bytes | None, *, where: Mapping[str, Any]) -> Event:
        """Stands in for a journal record owed under `seq` that is missing, or that failed a
        check its header is part of (a frame's record whose CRC failed: its seq, id, length
        may be damaged, so its bytes may be another event's, owed to other targets). Not a
        byte of it is written down, nor the id or arrival time its header claims: only what
        lets an operator find and check it, `where` it lies (journal file, frame, offset) and
        the length and sha256 of its `raw` bytes (None: there was no record to point at)."""
        body: dict[str, Any] = {"journal_seq": seq, **where}
        body["raw_length"] = len(raw or b"")
        body["raw_sha256"] = None if raw is None else hashlib.sha256(raw).hexdigest()
        return cls(id=f"journal-seq-{seq}", body=body, corrupt=True)

    @property
    def body(self) -> dict[str, Any]:
        if self._body is None:
            if self._encoded is None:
                raise RuntimeError(f"event {self.id} was handed over: its body is gone")
            self._body = orjson.loads(self._encoded)
        return self._body

    @property
    def facts(self) -> tuple[str, str, str]:
        """(location, service, action): what routing decides on, derived once."""
        facts = self._facts
        if facts is None:
            body = self._body if self._body is not None else self.body
            location, service = crn_facts(body["logSourceCRN"])
            facts = self._facts = (location, service, body["action"])
        return facts

    @property
    def event_time(self) -> datetime | None:
        """The eventTime, parsed on first use (None when it is missing or not a time)."""
        if self._time is None:
            self._time = (parse_event_time(self.body.get("eventTime")),)
        return self._time[0]

    @property
    def location(self) -> str:
        return self.facts[0]

    @property
    def service(self) -> str:
        return self.facts[1]

    @property
    def action(self) -> str:
        return self.facts[2]

    def encoded(self) -> bytes:
        """The body as compact JSON, computed once and shared by every target."""
        if self._encoded is None:
            self._encoded = dumps(self.body)
        return self._encoded

    def keep_bytes_only(self) -> None:
        """Let the parsed body go and keep the bytes (made first if need be): the body is
        parsed again only if something asks for it."""
        if not self.corrupt:
            if self._encoded is None:
                self._encoded = dumps(self.body)
            self._body = None

    def hand_over(self) -> bytes:
        """The event's bytes, let go here: a worker process hands them to the journal owner
        and, while it waits for the owner's durable answer, keeps only the id and arrival
        time (about 1 MB less per waiting 1,000-event request). Its body and bytes are gone
        for good: asking for them afterwards is a bug, and raises."""
        encoded = self._encoded
        if encoded is None:
            encoded = self.encoded()
        self._body = self._encoded = None
        self._facts = self._time = None
        return encoded

    def __repr__(self) -> str:
        return f"Event(id={self.id!r})"
