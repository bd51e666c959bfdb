"""The shape limits of one decoded event: how deep it nests, how long its strings are, and
whether its numbers survive decoding.

Checked before the schema sees an event, because the validators recurse and because an event
that no target could take should be refused at the door with a clear answer rather than
dead-lettered later. The walk is iterative, so depth costs no stack, and it stops after
MAX_PROBLEMS findings so that the answer stays small whatever the input.

Numbers: orjson keeps integers from -2**63 to 2**64-1 exactly and reads every other number as a
64-bit float, so 2**70 would be stored as 1.1805916207174113e+21, an audit field altered in
transit. An event holding a number the float cannot hold as written (by value: 1.50 is stored
as 1.5, the same number) is rejected with the number's path instead. Finding one needs the
literal text. The intake decodes with msgspec, which hands every literal with a fraction or an
exponent to `held_float` and keeps every integer exact (an integer outside the 64-bit range
then fails to encode, which the decoder checks), so a body without such a number is never
scanned. A body holding one (`NumberAltered`) takes the exact path: orjson, then
`may_alter_numbers`, whose scan sends a body with a long number literal (or a three-digit
exponent) to `exact_numbers`, a second parse by the standard library keeping every number
exact, and `number_problems` names each item's numbers that decoding would change.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from router.intake.validation import Problem, json_pointer

MAX_PROBLEMS: Final = 10
INT_RANGE: Final = range(-(2**63), 2**64)  # what orjson keeps exactly
# A number needs at least 16 digits (a point among them) or a three-digit exponent before a
# 64-bit integer or float can fail to hold it; anything else is decided by one scan of the bytes.
# The scan first maps every byte to its class (C speed): digits and points to 0, e/E to e,
# signs to -, whitespace to a space, and ':', ',' and '[' (where a number can start) to ':'.
# The pattern then starts with a literal, which keeps ids such as "...6a2e-1111..." out of it
# and lets the regex engine skip ahead; a rare false match only costs the second parse.
_CLASSES = bytearray(b"x" * 256)
for _chars, _class in ((b"0123456789.", b"0"), (b"eE", b"e"), (b"+-", b"-"), (b" \t\r\n", b" ")):
    for _char in _chars:
        _CLASSES[_char] = _class[0]
for _char in b":,[":
    _CLASSES[_char] = ord(":")
NUMBER_CLASSES: Final = bytes(_CLASSES)
SUSPECT_NUMBER: Final = re.compile(rb": *-?0(?:0{15}|0*e-?000)")
# A literal this short with neither e nor E has at most 15 significant digits and a magnitude
# far inside the float's range: a 64-bit float holds it as written (DBL_DIG is 15).
SHORT_FLOAT_CHARS: Final = 15


class NumberAltered(ValueError):
    """A number literal that a 64-bit float cannot hold as written (raised by `held_float`)."""


def _fits(node: Any, depth: int, max_depth: int, max_chars: int) -> bool:
    """The fast path for the common case: no paths built, stops at the first excess. Its
    recursion is bounded by max_depth, since it stops one level past it."""
    if isinstance(node, str):
        return len(node) <= max_chars
    if isinstance(node, dict):
        if depth > max_depth:
            return False
        for key, value in node.items():
            if len(key) > max_chars:
                return False
            if isinstance(value, str | dict | list) and not _fits(
                value, depth + 1, max_depth, max_chars
            ):
                return False
        return True
    if isinstance(node, list):
        if depth > max_depth:
            return False
        return all(
            _fits(item, depth + 1, max_depth, max_chars)
            for item in node
            if isinstance(item, str | dict | list)
        )
    return True


def encoded_fits(encoded: bytes, *, max_depth: int, max_string_chars: int) -> bool:
    """Does the event whose compact JSON is `encoded` keep within the shape limits, as its
    bytes alone can tell? True settles it without a walk; False only means "walk it".

    No string or key has more characters than the event has bytes, and no container nests
    deeper than there are `{` and `[` bytes (those inside strings only add to the count), so
    a small event settles both limits with a length and a byte count or two, at C speed: the
    `[` are counted only when there is one (a count reads every byte, one at a time, 0.35 us
    for a 1 KB event; looking for one byte is memchr's job, ~0.03 us)."""
    if len(encoded) > max_string_chars:
        return False
    opens = encoded.count(b"{")
    return opens <= max_depth and (b"[" not in encoded or opens + encoded.count(b"[") <= max_depth)


def shape_problems(
    event: Any, *, max_depth: int, max_string_chars: int, encoded: bytes | None = None
) -> list[Problem]:
    """Where `event` nests deeper than `max_depth` or holds a string (or key) longer than
    `max_string_chars`; an empty list when it does neither. `encoded`: the event's compact
    JSON, when the caller has it (see encoded_fits)."""
    if encoded is not None and encoded_fits(
        encoded, max_depth=max_depth, max_string_chars=max_string_chars
    ):
        return []
    if _fits(event, 1, max_depth, max_string_chars):
        return []  # nearly every event: the detailed walk below runs only to name the places
    problems: list[Problem] = []
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(event, 1, ())]
    while stack and len(problems) < MAX_PROBLEMS:
        node, depth, path = stack.pop()
        if isinstance(node, str):
            if len(node) > max_string_chars:
                problems.append(
                    Problem(
                        json_pointer(path),
                        f"a string of {len(node)} characters; the limit is "
                        f"server.max_string_chars ({max_string_chars})",
                    )
                )
        elif isinstance(node, dict | list):
            if depth > max_depth:
                problems.append(
                    Problem(
                        json_pointer(path), f"nested deeper than server.max_depth ({max_depth})"
                    )
                )
                continue
            if isinstance(node, list):
                stack.extend((item, depth + 1, (*path, i)) for i, item in enumerate(node))
                continue
            for key, value in node.items():
                if len(key) > max_string_chars:
                    problems.append(
                        Problem(
                            json_pointer(path),
                            f"a key of {len(key)} characters; the limit is "
                            f"server.max_string_chars ({max_string_chars})",
                        )
                    )
                    break
                stack.append((value, depth + 1, (*path, key)))
    return sorted(problems, key=lambda p: p.path)


def may_alter_numbers(text: bytes) -> bool:
    """Could decoding `text` change one of its numbers? False for nearly every body, from one
    scan of its bytes; True sends it to `exact_numbers`."""
    return SUSPECT_NUMBER.search(text.translate(NUMBER_CLASSES)) is not None


def exact_numbers(text: bytes) -> Any | None:
    """`text` parsed again with every number kept exact (int, Decimal); None if it does not
    parse that way (the caller's decoder has the last word on what is JSON)."""
    try:
        return json.loads(text, parse_float=exact_decimal)
    except ValueError:  # not JSON after all, or an integer with too many digits to convert
        return None
    except RecursionError:
        # The standard library recurses per level: an item nested about 900 deep (orjson
        # takes 1,024) ran out of stack here, a 500. Such an item is far past server.max_depth
        # (at most 256: schemas/config.schema.json), so the shape limits refuse it.
        return None


def number_problems(exact: Any) -> list[Problem]:
    """The numbers of one event (parsed by `exact_numbers`) that decoding would change."""
    problems: list[Problem] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(exact, ())]
    while stack and len(problems) < MAX_PROBLEMS:
        node, path = stack.pop()
        if isinstance(node, dict):
            stack.extend((value, (*path, key)) for key, value in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((value, (*path, i)) for i, value in reversed(list(enumerate(node))))
        elif isinstance(node, bool):
            continue
        elif isinstance(node, int) and node not in INT_RANGE:
            problems.append(Problem(json_pointer(path), "integer outside the 64-bit range"))
        elif isinstance(node, Decimal):
            stored = float(node)
            if not holds(stored, node):
                problems.append(
                    Problem(
                        json_pointer(path),
                        f"a 64-bit float cannot hold this number as written; it would be "
                        f"stored as {stored!r}",
                    )
                )
    return problems


def holds(stored: float, exact: Decimal) -> bool:
    """Is `stored` (a float) the number `exact` was written as, by value?"""
    return math.isfinite(stored) and Decimal(repr(stored)) == exact


def held_float(text: str) -> float:
    """The float of a number literal with a fraction or an exponent (msgspec's float_hook), or
    NumberAltered when a 64-bit float cannot hold it as written: its body then takes the exact
    path, which names the number's path. A short literal is settled by its length alone."""
    stored = float(text)
    if len(text) <= SHORT_FLOAT_CHARS and "e" not in text and "E" not in text:
        return stored
    if not holds(stored, exact_decimal(text)):
        raise NumberAltered(text)
    return stored


def exact_decimal(text: str) -> Decimal:
    """The number a JSON literal with a fraction or an exponent is, exactly; past the exponents
    a Decimal has (+-999,999,999,999,999,999, where Decimal() raises InvalidOperation), a
    stand-in that a float holds exactly when the literal's is held: a zero of its sign for a
    zero, else the smallest or largest Decimal of its sign (which a float stores as 0.0 or inf,
    as it stores the literal)."""
    try:
        return Decimal(text)
    except InvalidOperation:
        mantissa, _, exponent = text.lower().partition("e")
        sign = "-" if mantissa.startswith("-") else ""
        if not mantissa.strip("-0."):
            return Decimal(f"{sign}0")
        return Decimal(f"{sign}1e{'-' if exponent.startswith('-') else ''}999999999999999999")
