"""How counts read in log lines and command output."""

from __future__ import annotations

import pytest

from router.logformat import counted


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
