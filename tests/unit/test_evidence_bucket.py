"""The bucket verifier over synthesized objects: any order, objects written twice, dead letters
and redriven letters among the objects' places, and each kind of break named at its place."""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence

import orjson

from router.evidence.bucket import BucketVerifier
from router.evidence.chain import Chain
from router.evidence.checkpoint import checkpoint_line
from router.evidence.verify import EN_DASH, Broken, Report


def event(n: int) -> bytes:
    return orjson.dumps({"id": f"e-{n}", "eventTime": f"2026-12-01T00:00:{n:02d}Z"})


def letter(event_id: str) -> bytes:
    return orjson.dumps({"event": {"id": event_id}, "target_id": "cos", "reason": "x"})


def gz(lines: list[bytes]) -> bytes:
    return gzip.compress(b"".join(line + b"\n" for line in lines))


def chain_of(*parts: tuple[str, list[bytes]]) -> tuple[dict[str, list[bytes]], Chain]:
    """Each part's canonicals linked in turn: (name, lines) per part, and the chain after."""
    chain = Chain("cos")
    out: dict[str, list[bytes]] = {}
    for name, canonicals in parts:
        lines, head = chain.link(canonicals)
        chain.advance(head)
        out[name] = lines
    return out, chain


def run(
    objects: list[tuple[str, bytes]],
    letters: Sequence[bytes] = (),
    redriven: Sequence[bytes] = (),
) -> Report:
    verifier = BucketVerifier()
    try:
        if letters:
            verifier.dead_letters("dl", io.BytesIO(b"".join(x + b"\n" for x in letters)))
        if redriven:
            verifier.dead_letters(
                "redriven/dl", io.BytesIO(b"".join(x + b"\n" for x in redriven)), redriven=True
            )
        for key, body in objects:
            verifier.object(key, body)
        return verifier.finish()
    except Broken as exc:
        verifier.report.broken = str(exc)
        return verifier.report


def three() -> dict[str, list[bytes]]:
    parts, _ = chain_of(
        ("a/1", [event(1), event(2)]), ("b/2", [event(3)]), ("a/3", [event(4), event(5)])
    )
    return parts


def test_objects_in_any_order_and_one_written_twice_verify() -> None:
    parts = three()
    objects = [(key, gz(lines)) for key, lines in parts.items()]
    again = ("a/9", gz(parts["b/2"]))  # the same lines at the same places, written again
    report = run([objects[2], again, objects[0], objects[1]])
    assert report.ok, report.broken
    assert (report.events, report.resent, report.head_seq) == (5, 1, 5)


def test_other_contents_at_the_same_places_are_named() -> None:
    parts = three()
    other, _ = chain_of(("x", [event(1), event(2), event(99)]))
    objects = [(key, gz(lines)) for key, lines in parts.items()] + [("z/9", gz(other["x"][2:]))]
    report = run(objects)
    assert (
        report.broken == "z/9:1: seq 3 is also at b/2:1, with other contents (an object or "
        "dead letter was replaced)"
    )


def test_dead_and_redriven_letters_fill_their_places() -> None:
    parts, _ = chain_of(
        ("a/1", [event(1)]),
        ("dl", [letter("e-2")]),
        ("redriven", [letter("e-3")]),
        ("a/2", [event(4), event(3)]),  # e-3 redriven, delivered again at place 5
    )
    objects = [("a/1", gz(parts["a/1"])), ("a/2", gz(parts["a/2"]))]
    report = run(objects, parts["dl"], parts["redriven"])
    assert report.ok, report.broken
    assert (report.events, report.dead_letters, report.redriven, report.redelivered) == (3, 2, 1, 1)
    alone = run(objects)
    assert alone.broken == (
        f"gap: seq 2{EN_DASH}3 missing between a/1:1 and a/2:1 (dead letters: give their file too)"
    )


def test_breaks_inside_an_object_are_named_at_their_line() -> None:
    lines = three()["a/1"]
    parts, _ = chain_of(("o", [event(n) for n in range(1, 5)]))
    swapped = [*parts["o"][:1], parts["o"][2], parts["o"][1], *parts["o"][3:]]
    assert run([("o", gz(swapped))]).broken == (
        "o:2: swapped with o:3 (seq 3 and seq 2 are in each other's places)"
    )
    assert run([("o", gz(parts["o"][:1] + parts["o"][2:]))]).broken.startswith(
        "o:2: seq 3 out of order: seq 2 was expected after o:1"
    )
    edited = [lines[0], lines[1].replace(b'"e-2"', b'"e-7"')]
    assert run([("o", gz(edited))]).broken == (
        "o:2: hash does not match the chain (the line was changed)"
    )
    assert run([("o", gz(parts["o"])[:-9])]).broken.startswith("o: cannot be gunzipped")


def test_a_checkpoint_beyond_the_objects_names_the_missing_places() -> None:
    parts, chain = chain_of(("a/1", [event(1), event(2)]), ("a/2", [event(3)]))
    assert chain.head is not None
    mark = checkpoint_line("cos", 3, chain.head.hash, "2026-12-01T00:00:00.000Z", None)
    whole = [("a/1", gz(parts["a/1"])), ("a/2", gz(parts["a/2"])), ("a/3", gz([mark]))]
    report = run(whole)
    assert report.ok and report.last_checkpoint_seq == 3, report.broken
    assert run([whole[0], whole[2]]).broken == (
        "a/3:1: checkpoint (seq 3) names places the bucket does not hold: the chain ends at "
        "seq 2 (a/1:2), so seq 3 are missing (objects deleted)"
    )


def standing_letter(line: bytes) -> bytes:
    """A letter standing at the place of an object's chained line (router/deadletter)."""
    body = orjson.loads(letter("e-2"))
    body["event"] = orjson.loads(line[: line.rfind(b',"_chain":')] + b"}")
    return orjson.dumps({**body, "object_line": line.decode()})


def test_a_letter_standing_at_a_given_up_objects_place_fills_it() -> None:
    """An object given up after a later place was taken: its events' letters carry its lines
    and fill its places; if the object landed after all, each place counts once, as a dead
    letter (as the daemon's books count it), with a warning; a letter whose event is not its
    object line's is named."""
    parts, _ = chain_of(("given-up", [event(1), event(2)]), ("a/2", [event(3)]))
    letters = [standing_letter(line) for line in parts["given-up"]]
    objects = [("a/2", gz(parts["a/2"]))]
    report = run(objects, letters)
    assert report.ok, report.broken
    assert (report.events, report.dead_letters, report.head_seq) == (1, 2, 3)
    landed = run([*objects, ("a/1", gz(parts["given-up"]))], letters)
    assert landed.ok, landed.broken
    assert (landed.events, landed.dead_letters) == (1, 2), "counted as the books count them"
    assert any("2 dead-lettered events are in the bucket too" in w for w in landed.warnings)
    forged = orjson.loads(letters[0])
    forged["event"]["id"] = "e-9"
    broken = run(objects, [orjson.dumps(forged), letters[1]])
    assert broken.broken == (
        "dl:1: a letter that stands at an object line's place: its object_line is not the "
        "chained line of its event"
    )
