"""How counts read in log lines, command output and the router's own events."""

from __future__ import annotations

from collections import Counter

import pytest

from router.observe.logformat import counted
from router.selfevent import summary_event


@pytest.mark.parametrize(
    ("n", "noun", "plural", "text"),
    [
        (0, "target", None, "0 targets"),
        (1, "target", None, "1 target"),
        (2, "target", None, "2 targets"),
        (1, "default target", None, "1 default target"),
        (1, "entry", "entries", "1 entry"),
        (3, "entry", "entries", "3 entries"),
    ],
)
def test_a_count_takes_its_noun_in_the_right_number(
    n: int, noun: str, plural: str | None, text: str
) -> None:
    assert counted(n, noun, plural) == text


@pytest.mark.parametrize(
    ("addresses", "message"),
    [
        (["192.0.2.1"], "1 more refused attempt from 1 address,"),
        (["192.0.2.1", "192.0.2.1", "192.0.2.2"], "3 more refused attempts from 2 addresses,"),
    ],
)
def test_the_refusal_summary_event_counts_in_english(addresses: list[str], message: str) -> None:
    event = summary_event(len(addresses), Counter(addresses))
    assert event["message"].startswith(f"event-router: {message} not recorded one by one")
