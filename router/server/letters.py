"""GET /v1/deadletters and /v1/deadletters/{target} (admin): the dead letters as JSON, for the
console (what `event-router dlq list` and `dlq show` print from the files).

The summary gives, per target that has a dead-letter file, how many letters, by reason, and
the time span they cover; a target's page gives its letters that match `reason` (and
`since`), `offset` and `limit` at a time (at most MAX_PAGE), with the total that matched.
Files are read in a thread, when someone asks: an operator's question, never the hot path.
Only files in the dead-letter directory are read, found by listing it, so a target id from a
URL never becomes a path. Letters are shown as written: their events are the journaled ones,
after redaction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from router.deadletter import Letter, LetterFilter, letter_files, parse_since, read_letters
from router.errors import RequestError
from router.intake.http import error_response, json_response
from router.server.reads import in_read_thread

DEFAULT_PAGE: Final = 50
MAX_PAGE: Final = 200
# The largest offset taken: an integer JSON (and the console's JavaScript) holds exactly.
MAX_OFFSET: Final = 2**53 - 1


def summary(directory: Path) -> dict[str, Any]:
    """Per target with letters: how many, by reason, first and last attempt (or receipt)
    time. A file a redrive emptied is no target with dead letters."""
    targets: dict[str, Any] = {}
    for target_id, path in letter_files(directory).items():
        reasons: Counter[str] = Counter()
        first = last = None
        for letter in read_letters(path):
            reasons[str(letter.get("reason"))] += 1
            at = letter.get("last_attempt_at") or letter.get("received_at")
            if isinstance(at, str):
                first = at if first is None else min(first, at)
                last = at if last is None else max(last, at)
        if not reasons:
            continue
        targets[target_id] = {
            "letters": sum(reasons.values()),
            "reasons": dict(reasons.most_common()),
            "first": first,
            "last": last,
        }
    return {"targets": targets}


def page(path: Path, wanted: LetterFilter, offset: int, limit: int) -> dict[str, Any]:
    """The letters of one file that `wanted` keeps, `limit` from `offset`, and how many
    matched in all."""
    letters: list[Letter] = []
    matched = 0
    for letter in read_letters(path):
        if not wanted(letter):
            continue
        if offset <= matched < offset + limit:
            letters.append(letter)
        matched += 1
    following = offset + limit
    return {
        "letters": letters,
        "offset": offset,
        "total": matched,
        "next_offset": following if following < matched else None,
    }


@dataclass(slots=True)
class LetterEndpoints:
    """The handlers, over the dead-letter directory."""

    directory: Path

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/deadletters", self.list_targets)
        app.router.add_get("/v1/deadletters/{target}", self.show)

    async def list_targets(self, request: web.Request) -> web.Response:
        return json_response(await in_read_thread(summary, self.directory))

    async def show(self, request: web.Request) -> web.Response:
        target_id = request.match_info["target"]
        try:
            wanted, offset, limit = _page_request(request)
        except ValueError as exc:
            return error_response(RequestError(400, "bad_filter", str(exc)))
        path = (await in_read_thread(letter_files, self.directory)).get(target_id)
        if path is None:
            empty = {"letters": [], "offset": offset, "total": 0, "next_offset": None}
            return json_response({"target": target_id, **empty})
        found = await in_read_thread(page, path, wanted, offset, limit)
        return json_response({"target": target_id, **found})


def _page_request(request: web.Request) -> tuple[LetterFilter, int, int]:
    since = request.query.get("since")
    wanted = LetterFilter(
        reason=request.query.get("reason") or None,
        since=parse_since(since) if since else None,
    )
    offset = _number(request, "offset", 0, 0, MAX_OFFSET)
    limit = _number(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    return wanted, offset, limit


def _number(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a whole number") from None
    if not low <= value <= high:
        raise ValueError(f"{name}: {text!r} must be a number from {low} to {high}")
    return value
