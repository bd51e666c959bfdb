"""The intake's decoder (msgspec first, router/intake/http.py `decode`) answers every body as
the exact path (`decode_exact`: orjson and the number scan, the decoder before msgspec) does
(hypothesis).

`decode` lets msgspec decode a body and vouch for its numbers, and hands whatever msgspec
refuses or cannot vouch for to `decode_exact`. That is sound only if msgspec never accepts a
body orjson refuses, never yields another value, and never lets through a number that
decoding would change; the bytes it makes for each object must be orjson's. Generated bodies
are hostile JSON: duplicate keys, lone surrogates (escaped and raw), NaN and Infinity, numbers
past the 64-bit range and past a float's digits, -0, nesting around server.max_depth and
around both decoders' own limits, a BOM, whitespace JSON does not allow, invalid UTF-8,
NDJSON with blank lines. Each body is decoded both ways, and both results are then accepted
by the same Acceptor: the same refusal (status, code, message), or the same items, bytes and
answer per event.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from router.config import parse_config
from router.deadletter import DeadLetters
from router.errors import RequestError
from router.events import Event
from router.intake.accept import Acceptor, Altered, Decoded, Malformed
from router.intake.http import JSON_TYPES, NDJSON_TYPES, decode, decode_exact
from router.journal import Journal
from router.observe.metrics import IngestStats
from router.reload import redactor_for, validator_for
from router.routing import RouteTable
from tests.fakes import make_event
from tests.helpers import everything_to, file_target

MAX_DEPTH = 32  # server.max_depth's default, which the acceptor below keeps
JSON, NDJSON = sorted(JSON_TYPES)[0], sorted(NDJSON_TYPES)[0]


class NullJournal:
    """Takes every offer at once."""

    MAKES_ROOM_ITSELF = False

    async def append(self, routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
        return None


@pytest.fixture(scope="module")
def acceptor(tmp_path_factory: pytest.TempPathFactory) -> Acceptor:
    root = tmp_path_factory.mktemp("decode")
    config = parse_config(
        {
            "storage": {"path": str(root / "var")},
            "targets": [file_target("archive", root / "archive.ndjson")],
            "routes": everything_to("archive"),
        }
    )
    assert config.server.max_depth == MAX_DEPTH
    return Acceptor(
        server=config.server,
        validator=validator_for(config),
        routes=RouteTable(config.routes, config.settings.default_targets),
        journal=cast(Journal, NullJournal()),
        stats=IngestStats(),
        storage=config.storage,
        dead_letters=DeadLetters(config.storage.dead_letter_dir()),
        redactor=redactor_for(config),
    )


# -- hostile JSON, as bytes ------------------------------------------------------------------

DIGITS = st.text("0123456789", min_size=1, max_size=24)
# Numbers as JSON writes them: signs, fractions, exponents of any length (most bodies should
# get past decoding, so that the answers per event are compared too).
json_numbers = st.builds(
    lambda sign, whole, fraction, exponent: sign + whole + fraction + exponent,
    st.sampled_from(["", "", "-"]),
    st.one_of(st.just("0"), DIGITS.map(lambda d: "1" + d), st.sampled_from("123456789")),
    st.one_of(st.just(""), DIGITS.map(lambda d: "." + d)),
    st.one_of(
        st.just(""),
        st.builds(
            lambda e, sign, digits: e + sign + digits,
            st.sampled_from("eE"),
            st.sampled_from(["", "-", "+"]),
            st.text("0123456789", min_size=1, max_size=5),
        ),
    ),
)
# Integers by how many digits they have (past 2**64 from 20, past a float from 309, past
# Python's str->int limit from 4301); edge values; and the forms JSON does not have.
hostile_numbers = st.one_of(
    st.builds(
        lambda digits, sign, first: sign + first + "0" * (digits - 1),
        st.sampled_from([19, 20, 21, 39, 308, 309, 310, 4300, 4301, 5000]),
        st.sampled_from(["", "-"]),
        st.sampled_from("19"),
    ),
    st.sampled_from(
        [
            "-0",
            "-0.0",
            "0e0",
            "-0e-0",
            "1.50",
            "1e400",
            "1E+400",
            "-1e400",
            "1e-400",
            "4.9e-324",
            "5e-324",
            "2.2250738585072011e-308",
            "1.7976931348623157e308",
            "1.7976931348623159e308",
            "0e99999999999999999999",
            "-0.0E-99999999999999999999",
            "1e-99999999999999999999",
            "1e99999999999999999999",
            "1e-00000000000000000001",
            "0.1000000000000000055511151231257827",
            "12345678.123456789",
            "0.30000000000000004",
            "9007199254740993",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "NaN",
            "Infinity",
            "-Infinity",
            "+1",
            "01",
            "1.",
            ".5",
            "1e",
            "- 1",
        ]
    ),
)
number_literals = st.one_of(
    json_numbers,
    json_numbers,
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    hostile_numbers,
).map(str.encode)

hostile_string_pieces = st.sampled_from(
    [
        b"\\ud800",  # a lone surrogate, escaped: high, low, high twice, high then not low
        b"\\udc00",
        b"\\ud800\\ud800",
        b"\\ud800\\u0041",
        b"\\ud83d\\ude00",  # a pair: one character
        b"\\u0000",
        b'\\n\\t\\/\\\\\\"',
        b"\\x41",
        b"\\u12",
        b"\xed\xa0\x80",  # a surrogate, raw (CESU-8)
        b"\xf4\x90\x80\x80",  # past U+10FFFF
        b"\xc0\x80",  # overlong NUL
        b"\xff",
        b"\xe2\x82",  # a character cut short
        b"\xe2\x82\xac",  # the euro sign, whole
        b"\x01",  # raw control characters
        b"\t",
        b"\x7f",
    ]
)
json_strings = st.text(max_size=8).map(orjson.dumps)
strings = st.one_of(
    json_strings,
    json_strings,
    st.lists(
        st.one_of(st.text(max_size=4).map(lambda t: orjson.dumps(t)[1:-1]), hostile_string_pieces),
        max_size=3,
    ).map(lambda pieces: b'"' + b"".join(pieces) + b'"'),
)
# JSON's whitespace, mostly; the form feed, vertical tab, NBSP and NUL it does not allow, rarely.
JSON_SPACE = [b"", b"", b"", b"", b"", b"", b" ", b"  ", b"\n", b"\t", b"\r\n", b" \n\t "]
whitespace = st.sampled_from([*JSON_SPACE, b"\x0c", b"\x0b", b"\xc2\xa0", b"\x00"])
scalars = st.one_of(
    number_literals,
    strings,
    st.sampled_from([b"true", b"false", b"null", b"true", b"false", b"null", b"tru", b"None"]),
)
KEYS = [b'"a"', b'"a"', b'"b"', b'"id"', b'"n"', b'"\\u0061"', b'""']  # duplicates are likely


def _array(items: list[tuple[bytes, bytes]]) -> bytes:
    return b"[" + b",".join(space + item for space, item in items) + b"]"


def _object(members: list[tuple[bytes, bytes, bytes]]) -> bytes:
    return b"{" + b",".join(key + space + b":" + value for key, space, value in members) + b"}"


values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(st.tuples(whitespace, inner), max_size=4).map(_array)
        | st.lists(st.tuples(st.sampled_from(KEYS), whitespace, inner), max_size=4).map(_object)
    ),
    max_leaves=10,
)
# Nesting around server.max_depth (counted from the event), orjson's encoder (254) and both
# decoders' own limits (msgspec's stack, orjson's 1024).
DEPTHS = [29, 30, 31, 32, 33, 253, 254, 255, 256, 990, 1000, 1010, 1022, 1023, 1024, 1025, 1100]
nested = st.builds(
    lambda depth, array, inner: (
        b"[" * depth + inner + b"]" * depth if array else b'{"a":' * depth + inner + b"}" * depth
    ),
    st.sampled_from(DEPTHS),
    st.booleans(),
    scalars,
)
HOLE = "generated value goes here"


def _event_with(value: bytes, key: str) -> bytes:
    """A valid event whose `key` is {"n": value}, value as written (orjson cannot write most)."""
    event = orjson.dumps(make_event(**{key: {"n": HOLE}}))
    assert event.count(HOLE.encode()) == 1
    return event.replace(b'"' + HOLE.encode() + b'"', value)


# An event with one value replaced (so that most bodies get past decoding to the schema, and
# many are accepted), or a generated value alone.
event_texts = st.one_of(
    st.builds(_event_with, st.one_of(values, nested), st.sampled_from(["requestData", "id"])),
    st.builds(lambda id_: orjson.dumps(make_event(id=id_)), st.text(max_size=8) | st.just("kept")),
    values,
)


def _ndjson(lines: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(line + end for line, end in lines)


bodies = st.one_of(
    st.builds(lambda a, v, b: a + v + b, whitespace, event_texts, whitespace),
    st.lists(st.tuples(whitespace, event_texts), max_size=4).map(_array),
    st.lists(
        st.tuples(
            st.one_of(event_texts, whitespace),  # a blank line or one of spaces now and then
            st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\n \n", b""]),
        ),
        max_size=5,
    ).map(_ndjson),
    st.builds(lambda body: b"\xef\xbb\xbf" + body, event_texts),  # a BOM
    nested,
    st.binary(max_size=40),
)


# -- comparing the two ways ------------------------------------------------------------------


def flat(value: Any) -> list[Any]:
    """`value` as a flat list of typed tokens (no recursion: values nest 1,000 deep), so that
    1 and 1.0 and True, 0.0 and -0.0, differ; the decoder's placeholders as their contents."""
    tokens: list[Any] = []
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            tokens.append(("{", len(node)))
            for key, item in reversed(node.items()):
                stack.append(item)
                stack.append(("key", key))
        elif isinstance(node, list):
            tokens.append(("[", len(node)))
            stack.extend(reversed(node))
        elif isinstance(node, Altered | Malformed):
            tokens.append(repr(node))
        elif isinstance(node, tuple):
            tokens.append(node)
        else:
            tokens.append((type(node).__name__, repr(node)))
    return tokens


Decoder = Callable[[bytes, str], list[Any]]


def decoded(decoder: Decoder, body: bytes, content_type: str) -> tuple[Any, ...]:
    try:
        items = decoder(body, content_type)
    except RequestError as exc:
        return ("refused", exc.status, exc.code, exc.message)
    return ("items", flat(items))


def answered(acceptor: Acceptor, decoder: Decoder, body: bytes, content_type: str) -> Any:
    """What the producer is told: the refusal, or each event's result (the ids the router
    gives an event that came without one left out: they are new each time)."""
    try:
        items = decoder(body, content_type)
    except RequestError as exc:
        return ("refused", exc.status, exc.code, exc.message)
    sent_ids = [item.get("id") if isinstance(item, dict) else None for item in items]
    outcome = asyncio.run(acceptor.accept(items))
    results = [
        {k: v for k, v in result.items() if k != "id" or sent_ids[result["index"]]}
        for result in outcome.results
    ]
    return ("answer", outcome.accepted, results)


def made_bytes(items: list[Any]) -> Iterator[tuple[Any, bytes]]:
    """Each item the decoder made bytes for, as those bytes hold it: with the fresh id the
    decoder appended to an object without one (the event's id if it is accepted)."""
    if isinstance(items, Decoded):
        for item, encoded, fresh in zip(items, items.encoded, items.ids, strict=True):
            if fresh is not None:
                assert isinstance(item, dict) and "id" not in item
                assert str(uuid.UUID(fresh)) == fresh
                item = {**item, "id": fresh}
            if encoded is not None:
                yield item, encoded


def replaced_by_a_key(body: bytes) -> bool:
    """Whether the body is one the exact path refuses only for a value a later duplicate key
    replaces. The exact path's orjson parses every value as it goes, and refuses an integer
    past a float's range ("number is infinity when parsed as double") even where the object
    keeps the later key's value instead; msgspec holds any integer, and the event is what the
    later key says, as with any duplicate key. So: JSON (Python's parser, which holds any
    integer) finds a key twice in one object, and with every such key's earlier value
    dropped, the exact path accepts the body."""
    duplicated = False

    def last_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicated
        duplicated |= len({key for key, _ in pairs}) != len(pairs)
        return dict(pairs)

    lines = body.splitlines() or [body]
    try:
        kept = [json.loads(line, object_pairs_hook=last_wins) for line in lines if line.strip()]
    except (ValueError, RecursionError):
        return False
    if not duplicated:
        return False
    try:
        return all(decode_exact(json.dumps(item).encode(), JSON) is not None for item in kept)
    except (RequestError, ValueError, RecursionError):
        return False


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, content_type=st.sampled_from([JSON, NDJSON]))
@example(body=_event_with(b"100000000000000000000000", "requestData"), content_type=JSON)
@example(body=_event_with(b"1" + b"0" * 400, "requestData"), content_type=JSON)
@example(body=_event_with(b"1" + b"0" * 400, "requestData"), content_type=NDJSON)
@example(body=_event_with(b"1e400", "requestData"), content_type=NDJSON)
@example(body=_event_with(b"0.1000000000000000055511151231257827", "id"), content_type=JSON)
@example(body=b'{"a":' * 1010 + b"1" + b"}" * 1010, content_type=JSON)
@example(body=b"[" * 300 + b"]" * 300, content_type=NDJSON)
@example(body=b'"\\ud800"', content_type=JSON)
@example(body=b"[90000000000000000000]", content_type=JSON)  # an item that is a number
@example(body=b"90000000000000000000", content_type=NDJSON)
@example(body=b"\xef\xbb\xbf{}", content_type=JSON)
@example(body=b"\n \n\r\n", content_type=NDJSON)
@example(body=b'{"a":' + b"9" * 400 + b',"a":0}', content_type=JSON)  # see replaced_by_a_key
def test_decode_answers_every_body_as_the_exact_path_does(
    acceptor: Acceptor, body: bytes, content_type: str
) -> None:
    fast, exact = decoded(decode, body, content_type), decoded(decode_exact, body, content_type)
    replaced = fast[0] == "items" and exact[0] == "refused" and replaced_by_a_key(body)
    if not replaced:
        assert fast == exact
    try:
        items = decode(body, content_type)
    except RequestError:
        pass
    else:
        for item, encoded in made_bytes(items):
            assert encoded == orjson.dumps(item)
    if not replaced:
        assert answered(acceptor, decode, body, content_type) == answered(
            acceptor, decode_exact, body, content_type
        )


@pytest.mark.parametrize(
    "literal",
    [b"1.5", b"-0.0", b"1e300", b"0.30000000000000004", b"18446744073709551615", b"1E5"],
)
def test_a_body_whose_numbers_hold_is_decoded_once_with_its_bytes(literal: bytes) -> None:
    """The point of msgspec: such a body never reaches the scan and the second parse (the
    exact path returns a plain list, without the bytes)."""
    items = decode(b"[" + _event_with(literal, "requestData") + b"]", JSON)
    assert isinstance(items, Decoded)
    [(item, encoded)] = made_bytes(items)  # with the fresh id appended (make_event has none)
    assert encoded == orjson.dumps(item) and item["id"] == items.ids[0]
    number = items[0]["requestData"]["n"]
    assert (type(number), number) == (type(orjson.loads(literal)), orjson.loads(literal))


@pytest.mark.parametrize(
    ("literal", "message"),
    [
        (b"18446744073709551616", "integer outside the 64-bit range"),
        (b"-9223372036854775809", "integer outside the 64-bit range"),
        (b"12345678.123456789", "a 64-bit float cannot hold this number as written"),
        (b"1e-400", "a 64-bit float cannot hold this number as written"),
    ],
)
def test_a_number_decoding_would_change_takes_the_exact_path(literal: bytes, message: str) -> None:
    for content_type in (JSON, NDJSON):
        [item] = decode(_event_with(literal, "requestData"), content_type)
        assert isinstance(item, Altered)
        [problem] = item.problems
        assert (problem.path, message in problem.message) == ("/requestData/n", True)


def test_the_bytes_made_while_decoding_are_held_at_their_size() -> None:
    """A request's events' bytes are all held between decoding and accepting: as orjson's own
    buffers (4 KiB at least each) a request of 10,000 small events would hold 40 MB more."""
    body = b"[" + b",".join(b'{"a":%d}' % n for n in range(2000)) + b"]"
    decode(body, JSON)  # msgspec's and orjson's caches warm
    tracemalloc.start()
    try:
        items = decode(body, JSON)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(items, Decoded) and len(items.encoded) == 2000
    assert held < 1024 * 1024, f"{held} bytes held for 2,000 events of 8 bytes"


class RecordingJournal(NullJournal):
    """Takes every offer at once, and keeps what it was offered."""

    def __init__(self) -> None:
        self.offered: list[tuple[Event, Mapping[str, str]]] = []

    async def append(self, routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
        self.offered.extend(routed)


class BodyReader:
    """An observer that reads the events' bodies (as an alert query does): the acceptor keeps
    them, as the decoder and the acceptor made them, rather than parse them again from the
    bytes."""

    reads_bodies = True

    async def observe(self, events: Sequence[Event]) -> None:
        return None


def journaled(acceptor: Acceptor, items: list[Any]) -> list[tuple[Any, list[tuple[str, Any]]]]:
    """What the acceptor hands the journal for `items`: each event's id (None for an id the
    router made: new each time) and body, checked to be what its bytes hold."""
    journal = RecordingJournal()
    sent = [item.get("id") if isinstance(item, dict) else None for item in items]
    with_journal = Acceptor(
        server=acceptor.server,
        validator=acceptor.validator,
        routes=acceptor.routes,
        journal=cast(Journal, journal),
        stats=IngestStats(),
        storage=acceptor.storage,
        dead_letters=acceptor.dead_letters,
        redactor=acceptor.redactor,
        observer=BodyReader(),
    )
    outcome = asyncio.run(with_journal.accept(items))
    assert [event.id for event, _ in journal.offered] == [
        result["id"] for result in outcome.results if result["status"] == "accepted"
    ]
    found = []
    for event, _ in journal.offered:
        body = event.body
        assert event.encoded() == orjson.dumps(body) and body["id"] == event.id
        assert list(body.items()) == list(orjson.loads(event.encoded()).items())
        kept = event.id if event.id in sent else None
        # in the order of its members: with the bytes equal to orjson's, the same bytes
        found.append((kept, list({**body, "id": kept}.items())))
    return found


ids = st.one_of(st.none(), st.just(""), st.text(min_size=1, max_size=8), st.integers(0, 9))
request_data = st.one_of(
    st.just({}),
    st.none(),
    st.dictionaries(
        st.sampled_from(["secret_type", "apiKey", "API_KEY", "payload", "note", "nested"]),
        st.one_of(
            st.text(max_size=5),
            st.dictionaries(st.sampled_from(["password", "x"]), st.integers(-(2**63), 2**63)),
        ),
        max_size=3,
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    events=st.lists(st.tuples(ids, request_data, st.booleans()), min_size=1, max_size=5),
    content_type=st.sampled_from([JSON, NDJSON]),
)
def test_the_events_journaled_are_the_same_whichever_way_decoded(
    acceptor: Acceptor, events: list[tuple[Any, Any, bool]], content_type: str
) -> None:
    """Events with and without an id of their own (a falsy one too), with values redaction
    takes: `decode`'s bytes and fresh ids (Event.accepted) reach the journal as the exact
    path's events (Event.from_body, bytes made by the acceptor), byte for byte but the ids the
    router made, which are new each time."""
    made = []
    for event_id, data, with_id in events:
        event = make_event(requestData=data)
        if with_id and event_id is not None:
            event["id"] = event_id
        made.append(event)
    if content_type == JSON:
        body = orjson.dumps(made)
    else:
        body = b"\n".join(orjson.dumps(event) for event in made)
    fast = decode(body, content_type)
    assert isinstance(fast, Decoded)
    assert journaled(acceptor, fast) == journaled(acceptor, decode_exact(body, content_type))
