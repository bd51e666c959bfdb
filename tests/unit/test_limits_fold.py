"""The shape limits read from an event's bytes (limits.encoded_fits) agree with the walk, and
an event keeps the bytes made for the limits (Event.from_body(encoded=...)) exactly as a
fresh serialisation would write them."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from router.events import Event
from router.intake.accept import Decoded
from router.intake.http import decode
from router.intake.limits import encoded_fits, shape_problems

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=30,
)
objects = st.dictionaries(st.text(max_size=6), json_values, max_size=5)


@settings(max_examples=500, deadline=None)
@given(event=objects, max_depth=st.integers(1, 6), max_chars=st.integers(1, 200))
def test_bytes_that_fit_mean_the_walk_finds_nothing(
    event: dict[str, Any], max_depth: int, max_chars: int
) -> None:
    encoded = orjson.dumps(event)
    walked = shape_problems(event, max_depth=max_depth, max_string_chars=max_chars)
    if encoded_fits(encoded, max_depth=max_depth, max_string_chars=max_chars):
        assert walked == []
    # With the bytes or without, the same answer.
    assert (
        shape_problems(event, max_depth=max_depth, max_string_chars=max_chars, encoded=encoded)
        == walked
    )


@settings(max_examples=300, deadline=None)
@given(event=objects)
def test_an_event_keeps_its_bytes_with_the_new_id_as_a_fresh_encoding_writes_them(
    event: dict[str, Any],
) -> None:
    encoded = orjson.dumps(event)
    wrapped = Event.from_body(event, encoded=encoded)
    assert wrapped.encoded() == orjson.dumps(event)
    assert orjson.loads(wrapped.encoded())["id"] == wrapped.id


@settings(max_examples=300, deadline=None)
@given(event=objects, max_depth=st.integers(0, 8), max_chars=st.integers(1, 400))
def test_brackets_are_counted_only_when_there_is_one_with_the_same_answer(
    event: dict[str, Any], max_depth: int, max_chars: int
) -> None:
    """The `[` are counted only when one is there: the answer is the two counts' answer."""
    encoded = orjson.dumps(event)
    both = encoded.count(b"{") + encoded.count(b"[")
    assert encoded_fits(encoded, max_depth=max_depth, max_string_chars=max_chars) is (
        len(encoded) <= max_chars and both <= max_depth
    )


@settings(max_examples=300, deadline=None)
@given(event=objects)
def test_an_event_keeps_the_bytes_the_decoder_made_with_its_fresh_id(event: dict[str, Any]) -> None:
    """The decoder appends a fresh id to the bytes of an object without one: accepted, the
    event takes that id, and its bytes are still a fresh encoding of its body."""
    items = decode(orjson.dumps([event]), "application/json")
    assert isinstance(items, Decoded)
    [encoded], [fresh] = items.encoded, items.ids
    assert (fresh is None) is ("id" in event or not event)
    wrapped = Event.from_body(items[0], encoded=encoded, appended_id=fresh)
    assert wrapped.encoded() == orjson.dumps(items[0])
    assert orjson.loads(wrapped.encoded())["id"] == wrapped.id
    if fresh is not None:
        assert wrapped.id == fresh and wrapped.encoded() is encoded  # not made again
