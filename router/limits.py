"""The shape limits of one decoded event: how deep it nests and how long its strings are.

Checked before the schema sees an event, because the validators recurse and because an event
that no target could take should be refused at the door with a clear answer rather than
dead-lettered later. The walk is iterative, so depth costs no stack, and it stops after
MAX_PROBLEMS findings so that the answer stays small whatever the input.
"""

from __future__ import annotations

from typing import Any, Final

from router.validation import Problem, json_pointer

MAX_PROBLEMS: Final = 10


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


def shape_problems(event: Any, *, max_depth: int, max_string_chars: int) -> list[Problem]:
    """Where `event` nests deeper than `max_depth` or holds a string (or key) longer than
    `max_string_chars`; an empty list when it does neither."""
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
