"""POST /v1/deadletters/{target}/redrive: put a target's dead letters back on the journal.

Only for that target, optionally only letters of one reason or since a time; letters whose
event the validator would now refuse stay in the file, counted by why. The answer streams
NDJSON progress lines, {"done": n, "total": m}, so `event-router dlq redrive` can draw it. A
journal that refuses the letters (full at storage.max_bytes, or failing) ends the stream with a
line that also holds `error` ({"code", "message"}); what was not put back stays in the file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from router.deadletter import DeadLetters, Letter, LetterFilter, parse_since
from router.errors import RequestError
from router.events import Event
from router.intake.http import error_response
from router.journal import Journal, JournalFullError, JournalUnavailableError
from router.observe.logformat import counted

log = logging.getLogger(__name__)

REDRIVE_CHUNK = 500


@dataclass(slots=True)
class Redrive:
    """The handler, over the dead letters, the journal and two questions for the daemon (its
    targets and its validator change on reload, so they are asked at each request)."""

    dead_letters: DeadLetters
    journal: Journal
    is_target: Callable[[str], bool]
    is_invalid: Callable[[dict[str, Any]], bool]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Put a target's dead letters (optionally by reason, since a time) back on the
        journal for that target only. Streams NDJSON progress lines: {"done": n, "total": m}."""
        target_id = request.match_info["target"]
        if not self.is_target(target_id):
            return error_response(RequestError(404, "unknown_target", f"no target {target_id!r}"))
        try:
            since = request.query.get("since")
            wanted = LetterFilter(
                reason=request.query.get("reason"),
                since=parse_since(since) if since else None,
            )
        except ValueError as exc:
            return error_response(RequestError(400, "bad_filter", str(exc)))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)

        def refuse(letter: Letter) -> str | None:
            return "invalid_event" if self.is_invalid(letter["event"]) else None

        async with self.dead_letters.take(target_id, wanted, refuse) as taken:
            total = taken.total
            # What matched but stays in the file, by why, so the client can say so.
            first = {"done": 0, "total": total, "skipped": taken.skipped}
            await response.write(orjson.dumps(first) + b"\n")
            while taken.done < total:
                chunk = await taken.chunk(REDRIVE_CHUNK)
                try:
                    await self.journal.append(
                        [
                            (Event.from_body(letter["event"]), {target_id: letter.get("route", "")})
                            for letter in chunk
                        ]
                    )
                except (JournalFullError, JournalUnavailableError) as exc:
                    # The answer is under way: its last line says why it stopped; the letters
                    # not put back stay in the file (take keeps all but `done`).
                    await response.write(_stopped(taken.done, total, exc))
                    log.warning(
                        "target %s: redrive stopped after %d of %s: %s",
                        target_id,
                        taken.done,
                        counted(total, "dead letter"),
                        exc,
                    )
                    break
                taken.done += len(chunk)
                await response.write(orjson.dumps({"done": taken.done, "total": total}) + b"\n")
            else:
                log.info("target %s: %s redriven", target_id, counted(total, "dead letter"))
        await response.write_eof()
        return response


def _stopped(done: int, total: int, exc: JournalFullError | JournalUnavailableError) -> bytes:
    """The progress line that ends a redrive the journal refused, with its reason."""
    code = "journal_full" if isinstance(exc, JournalFullError) else "journal_unavailable"
    error = {"code": code, "message": f"{exc}; retry later"}
    return orjson.dumps({"done": done, "total": total, "error": error}) + b"\n"
