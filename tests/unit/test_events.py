"""The Event wrapper: ids, routing facts, and the lazy body of a stored event."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.events import (
    Event,
    encoded_with_new_id,
    new_event_id,
    new_event_id_member,
    parse_event_time,
    with_id,
)
from tests.fakes import make_event


def test_a_stored_event_is_parsed_only_when_its_body_is_needed() -> None:
    raw = orjson.dumps(make_event(id="x", location="eu-de-1"))
    event = Event.stored("x", raw, received_at=1.0)
    assert event.encoded() is raw, "the stored bytes are sent as they are"
    assert event._body is None
    assert (event.id, event.received_at, event.corrupt) == ("x", 1.0, False)
    assert event.event_time is not None
    assert (event.location, event.service, event.action) == (
        "eu-de-1",
        "secrets-manager",
        "secrets-manager.secret.create",
    )
    assert event.body["id"] == "x"


def test_the_journal_keeps_an_event_as_its_bytes_copying_only_one_that_holds_its_body() -> None:
    raw = orjson.dumps(make_event(id="x"))
    stored = Event.stored("x", raw, received_at=1.0)
    assert stored.as_stored() is stored, "bytes only already: no copy"
    parsed = Event.from_body(make_event(id="y"), received_at=2.0)
    kept = parsed.as_stored()
    assert kept is not parsed and kept._body is None and parsed._body is not None
    assert (kept.id, kept.encoded(), kept.received_at) == ("y", parsed.encoded(), 2.0)
    parsed.keep_bytes_only()
    assert parsed.as_stored() is parsed, "intake let the body go: no copy"
    corrupt = Event.corrupt_record(7, b"{", event_id="z")
    assert corrupt.as_stored() is not corrupt and not corrupt.as_stored().corrupt


def test_an_event_without_id_gets_one_and_encodes_once() -> None:
    body = make_event()
    body.pop("id", None)
    event = Event.from_body(body)
    assert event.id and body["id"] == event.id
    assert event.encoded() is event.encoded()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.dictionaries(st.sampled_from(["a", "b", "id", "é"]), json_values, max_size=4),
    spare=st.booleans(),
    time=st.none() | st.just(5.0),
)
def test_the_bytes_an_event_keeps_are_its_body_s_compact_json(
    body: dict[str, Any], spare: bool, time: float | None
) -> None:
    """Made once, at intake, from the body's bytes as orjson wrote them (`spare`: its own
    buffer, copied to its length), with the id the router assigned appended as orjson would
    write it, or made again from the body when it cannot be appended (an empty object, a
    falsy id replaced where it stood): always the bytes orjson writes for the final body."""
    raw = orjson.dumps(body)
    producer_id = body.get("id")
    event = Event.from_body(body, encoded=raw, spare=spare, received_at=time)
    assert event.encoded() == orjson.dumps(body)
    assert event.id == body["id"] and event.id
    if producer_id:
        assert event.id == producer_id
        assert (event.encoded() is raw) is not spare
    else:
        assert event.encoded() is not raw
    assert (event.corrupt, event._body) == (False, body)
    assert event.received_at == time if time is not None else event.received_at > 0


def test_an_event_needs_a_body_or_bytes() -> None:
    with pytest.raises(ValueError):
        Event(id="nothing")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-30T22:43:00.5+00:00", datetime(2026, 11, 30, 22, 43, 0, 500000, tzinfo=UTC)),
        ("2026-11-30T23:43:00+01:00", datetime(2026, 11, 30, 22, 43, tzinfo=UTC)),
        ("2026-11-30T22:43:00", None),  # no offset: not a point in time
        ("yesterday", None),
        (None, None),
        (1764542580, None),
    ],
)
def test_event_time_is_read_once_as_an_aware_time(value: Any, expected: datetime | None) -> None:
    assert parse_event_time(value) == expected
    event = Event.from_body({"id": "e-1", "eventTime": value})
    assert event.event_time == expected
    assert Event.stored("e-1", orjson.dumps({"eventTime": value}), 0.0).event_time == expected


def test_new_event_ids_are_distinct_version_4_uuids_in_canonical_form() -> None:
    ids = [new_event_id() for _ in range(3000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


def test_an_ids_member_appends_it_as_with_id_does() -> None:
    """The bytes intake appends to an event's compact JSON (new_event_id_member) are with_id's,
    for every id of more than one block, and the ids are as new_event_id's."""
    encoded = orjson.dumps({"action": "a.b.c", "n": [1, {"x": None}]})
    pairs = [new_event_id_member() for _ in range(600)]
    assert len({event_id for event_id, _ in pairs}) == 600
    for event_id, member in pairs:
        parsed = uuid.UUID(event_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == event_id
        assert encoded[:-1] + member == with_id(encoded, event_id)
        assert orjson.loads(encoded[:-1] + member)["id"] == event_id
    body = {"action": "a.b.c", "n": [1, {"x": None}]}
    fresh, made = encoded_with_new_id(body)
    assert made == with_id(orjson.dumps(body), fresh) and "id" not in body
    assert fresh not in {event_id for event_id, _ in pairs}


def test_a_forked_child_never_repeats_its_parents_next_ids() -> None:
    new_event_id()  # the parent holds a block of random bytes now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, " ".join(new_event_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    parent = {new_event_id() for _ in range(10)}
    assert len(child) == 10 and not child & parent
