"""verify over synthesized chains: dead letters interleaved with archive lines, canonical bytes."""

from __future__ import annotations

import hashlib
import io

import orjson
import pytest

from router.evidence.canonical import (
    GENESIS,
    CanonicalError,
    Link,
    chained_block,
    chained_line,
    next_link,
    split_line,
)
from router.evidence.chain import Chain
from router.evidence.verify import Broken, Report, Verifier


def event(n: int) -> bytes:
    return orjson.dumps({"id": f"e-{n}", "eventTime": f"2026-11-30T00:00:{n:02d}Z"})


def letter(n: int) -> bytes:
    return orjson.dumps({"event": {"id": f"d-{n}"}, "target_id": "us", "reason": "x"})


def run(archive: list[bytes], letters: list[bytes]) -> Report:
    verifier = Verifier()
    try:
        verifier.dead_letters("dl.ndjson", io.BytesIO(b"".join(line + b"\n" for line in letters)))
        verifier.archive("us.ndjson", io.BytesIO(b"".join(line + b"\n" for line in archive)))
        return verifier.finish()
    except Broken as exc:
        verifier.report.broken = str(exc)
        return verifier.report


def interleaved() -> tuple[list[bytes], list[bytes]]:
    """Places 1-3 delivered, 4-5 dead-lettered, 6-8 delivered, 9 dead-lettered."""
    chain = Chain("us")
    archive: list[bytes] = []
    letters: list[bytes] = []
    for kind, count in (("e", 3), ("d", 2), ("e", 3), ("d", 1)):
        canonicals = [(event if kind == "e" else letter)(chain.seq + i) for i in range(count)]
        lines, head = chain.link(canonicals)
        chain.advance(head)
        (archive if kind == "e" else letters).extend(lines)
    return archive, letters


def test_the_canonical_bytes_and_hash_are_as_documented() -> None:
    canonical = b'{"id":"a"}'
    link = Link(1, GENESIS, hashlib.sha256(GENESIS + canonical).digest())
    line = chained_line(canonical, link)
    assert line == (
        b'{"id":"a","_chain":{"seq":1,"prev":"'
        + b"0" * 64
        + b'","hash":"'
        + link.hash.hex().encode()
        + b'"}}'
    )
    assert split_line(line) == (canonical, link)
    assert split_line(b'{"id":"a"}') is None
    with pytest.raises(CanonicalError):
        split_line(line.replace(b'"seq":1', b'"seq": 1'))


def test_dead_letters_fill_their_places_between_archive_lines() -> None:
    archive, letters = interleaved()
    report = run(archive, letters)
    assert report.ok, report.broken
    assert (report.events, report.dead_letters, report.head_seq) == (6, 3, 9)


def test_a_dead_letter_missing_is_a_gap_naming_the_archive_lines_around_it() -> None:
    archive, letters = interleaved()
    report = run(archive, letters[1:])
    assert report.broken == "gap: seq 4 missing between us.ndjson:3 and dl.ndjson:1"


def test_a_place_in_both_files_is_reported() -> None:
    archive, letters = interleaved()
    report = run(archive, [*letters, archive[4]])
    assert report.broken == "us.ndjson:5: seq 7 is also in the dead letters (dl.ndjson:4)"


@pytest.mark.parametrize("start", [0, 1, 41])
def test_a_block_of_lines_is_byte_for_byte_the_lines_linked_one_by_one(start: int) -> None:
    """chained_block (a file target's batch, joined for its one write) gives the very bytes of
    chained_line over next_link's links, each ended by a newline, and the same head."""
    head = None
    for n in range(start):
        head = next_link(head, event(n))
    canonicals = [event(start + n) for n in range(5)] + [letter(7)]
    expected, link = [], head
    for canonical in canonicals:
        link = next_link(link, canonical)
        expected.append(chained_line(canonical, link) + b"\n")
    block, block_head = chained_block(canonicals, head)
    assert block == b"".join(expected)
    assert block_head == link and block_head is not None and block_head.seq == start + 6
    assert chained_block([], head) == (b"", head)
    chain = Chain("us", head)
    assert chain.link_block(canonicals) == (block, link)
    assert chain.head == head, "nothing moves until advance"
    report = run(block.splitlines(), []) if start == 0 else None
    assert report is None or (report.ok and report.events == 6), report


@pytest.mark.parametrize("bad", [b"", b"{}", b"[1]", b'{"id":"a"', b'"id"'])
def test_a_block_refuses_what_chained_line_refuses(bad: bytes) -> None:
    with pytest.raises(CanonicalError):
        chained_line(bad, Link(1, GENESIS, GENESIS))
    with pytest.raises(CanonicalError):
        chained_block([event(1), bad], None)
