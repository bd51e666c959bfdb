"""The Event wrapper: ids, routing facts, and the lazy body of a stored event."""

from __future__ import annotations

import orjson
import pytest

from router.events import Event
from tests.fakes import make_event


def test_a_stored_event_is_parsed_only_when_its_body_is_needed() -> None:
    raw = orjson.dumps(make_event(id="x", location="eu-de-1"))
    event = Event.stored("x", raw, received_at=1.0)
    assert event.encoded() is raw, "the stored bytes are sent as they are"
    assert event._body is None
    assert (event.location, event.service, event.action) == (
        "eu-de-1",
        "secrets-manager",
        "secrets-manager.secret.create",
    )
    assert event.body["id"] == "x"


def test_an_event_without_id_gets_one_and_encodes_once() -> None:
    body = make_event()
    body.pop("id", None)
    event = Event.from_body(body)
    assert event.id and body["id"] == event.id
    assert event.encoded() is event.encoded()


def test_an_event_needs_a_body_or_bytes() -> None:
    with pytest.raises(ValueError):
        Event(id="nothing")
