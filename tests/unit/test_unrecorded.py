"""delivery.Unrecorded: what stopped workers settled and left pending, by target and seq."""

from __future__ import annotations

from router.delivery import Unrecorded
from router.events import Event
from router.journal import Entry
from tests.fakes import make_event


def entries(*seqs: int) -> list[Entry]:
    return [Entry(seq, Event.from_body(make_event(id=f"e{seq}")), "all") for seq in seqs]


def test_notes_say_delivered_or_dead_lettered_per_seq_and_per_target() -> None:
    unrecorded = Unrecorded()
    unrecorded.note("a", [(entries(1, 2), False), (entries(3), True)])
    unrecorded.note("b", [(entries(4), False)])
    assert unrecorded.of("a") == {1: False, 2: False, 3: True}
    assert unrecorded.of("b") == {4: False}
    assert unrecorded.of("c") is None


def test_nothing_settled_notes_nothing() -> None:
    unrecorded = Unrecorded()
    unrecorded.note("a", [])
    unrecorded.note("a", [([], False)])
    assert unrecorded.of("a") is None


def test_an_ack_forgets_the_notes_it_covers_and_a_retire_all_of_them() -> None:
    unrecorded = Unrecorded()
    unrecorded.note("a", [(entries(1, 2, 5), False)])
    unrecorded.forget("a", through=2)
    assert unrecorded.of("a") == {5: False}
    unrecorded.forget("a", through=5)
    assert unrecorded.of("a") is None
    unrecorded.note("a", [(entries(7), True)])
    unrecorded.forget("a")
    assert unrecorded.of("a") is None
    unrecorded.forget("gone")  # nothing noted: nothing to do
