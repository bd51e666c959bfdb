"""The shape limits of one decoded event: how deep it nests and how long its strings are.

Checked before the schema sees an event, because the validators recurse and because an event
that no target could take should be refused at the door with a clear answer rather than
dead-lettered later. The walk is iterative, so depth costs no stack, and it stops after
MAX_PROBLEMS findings so that the answer stays small whatever the input.
"""

from __future__ import annotations

from typing import Any, Final

from router.validation import Problem

MAX_PROBLEMS: Final = 10


def _pointer(parts: tuple[str | int, ...]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def shape_problems(event: Any, *, max_depth: int, max_string_chars: int) -> list[Problem]:
    """Where `event` nests deeper than `max_depth` or holds a string (or key) longer than
    `max_string_chars`; an empty list when it does neither."""
    problems: list[Problem] = []
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(event, 1, ())]
    while stack and len(problems) < MAX_PROBLEMS:
        node, depth, path = stack.pop()
        if isinstance(node, str):
            if len(node) > max_string_chars:
                problems.append(
                    Problem(
                        _pointer(path),
                        f"a string of {len(node)} characters; the limit is "
                        f"server.max_string_chars ({max_string_chars})",
                    )
                )
        elif isinstance(node, dict | list):
            if depth > max_depth:
                problems.append(
                    Problem(_pointer(path), f"nested deeper than server.max_depth ({max_depth})")
                )
                continue
            if isinstance(node, list):
                stack.extend((item, depth + 1, (*path, i)) for i, item in enumerate(node))
                continue
            for key, value in node.items():
                if len(key) > max_string_chars:
                    problems.append(
                        Problem(
                            _pointer(path),
                            f"a key of {len(key)} characters; the limit is "
                            f"server.max_string_chars ({max_string_chars})",
                        )
                    )
                    break
                stack.append((value, depth + 1, (*path, key)))
    return sorted(problems, key=lambda p: p.path)
