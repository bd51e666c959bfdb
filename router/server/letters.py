"""GET /v1/deadletters and /v1/deadletters/{target} (admin): the dead letters as JSON, for the
console (what `event-router dlq list` and `dlq show` print from the files).

The summary gives, per target that has a dead-letter file, how many letters, by reason, and
the time span they cover; a target's page gives its letters that match `reason` (and
`since`), `offset` and `limit` at a time (at most MAX_PAGE), with the total that matched.
Files are read in a thread, when someone asks: an operator's question, never the hot path.
Only files in the dead-letter directory are read, found by listing it, so a target id from a
URL never becomes a path. Letters are shown as written: their events are the journaled ones,
after redaction. On JetStream (storage.backend jetstream) the dead letters' own summary and
page (StreamDeadLetters) answer instead, with the same parameters and fields, from the
dead-letter streams; NATS not answering is a 503.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from router.deadletter import (
    DeadLetters,
    Letter,
    LetterFilter,
    LetterPage,
    LetterTally,
    letter_files,
    page_answer,
    parse_since,
    read_letters,
)
from router.errors import RequestError, StorageUnavailableError
from router.intake.http import error_response, json_response
from router.server.reads import in_read_thread

DEFAULT_PAGE: Final = 50
MAX_PAGE: Final = 200
# The largest offset taken: an integer JSON (and the console's JavaScript) holds exactly.
MAX_OFFSET: Final = 2**53 - 1


def summary(directory: Path) -> dict[str, Any]:
    """Per target with letters in `directory`'s files: see summarize."""
    return summarize((t, read_letters(path)) for t, path in letter_files(directory).items())


def summarize(by_target: Iterable[tuple[str, Iterable[Letter]]]) -> dict[str, Any]:
    """Per target with letters: how many, by reason, first and last attempt (or receipt)
    time. A target whose letters a redrive took is no target with dead letters."""
    targets: dict[str, Any] = {}
    for target_id, letters in by_target:
        tally = LetterTally()
        for letter in letters:
            tally.add(letter)
        if tally.letters:
            targets[target_id] = tally.row()
    return {"targets": targets}


def page(
    letters: Iterable[Letter], wanted: LetterFilter, offset: int, limit: int
) -> dict[str, Any]:
    """The letters that `wanted` keeps, `limit` from `offset`, and how many matched in all."""
    found = LetterPage(wanted, offset, limit)
    for letter in letters:
        found.add(letter)
    return found.answer()


def file_page(path: Path, wanted: LetterFilter, offset: int, limit: int) -> dict[str, Any]:
    return page(read_letters(path), wanted, offset, limit)


@dataclass(slots=True)
class LetterEndpoints:
    """The handlers, over the dead-letter directory, or over what `dead_letters` keeps
    elsewhere (its summary and page: JetStream's dead-letter streams)."""

    directory: Path
    dead_letters: DeadLetters | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/deadletters", self.list_targets)
        app.router.add_get("/v1/deadletters/{target}", self.show)

    async def list_targets(self, request: web.Request) -> web.Response:
        try:
            elsewhere = await self.dead_letters.summary() if self.dead_letters else None
        except StorageUnavailableError as exc:
            return error_response(RequestError(503, "journal_unavailable", str(exc)))
        if elsewhere is not None:
            return json_response(elsewhere)
        return json_response(await in_read_thread(summary, self.directory))

    async def show(self, request: web.Request) -> web.Response:
        target_id = request.match_info["target"]
        try:
            wanted, offset, limit = _page_request(request)
        except ValueError as exc:
            return error_response(RequestError(400, "bad_filter", str(exc)))
        try:
            own = (
                await self.dead_letters.page(target_id, wanted, offset, limit)
                if self.dead_letters
                else None
            )
        except StorageUnavailableError as exc:
            return error_response(RequestError(503, "journal_unavailable", str(exc)))
        if own is not None:
            return json_response({"target": target_id, **own})
        path = (await in_read_thread(letter_files, self.directory)).get(target_id)
        if path is None:
            return json_response({"target": target_id, **page_answer([], offset, limit, 0)})
        found = await in_read_thread(file_page, path, wanted, offset, limit)
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
