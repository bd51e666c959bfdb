"""GET /v1/receipts/{id} (admin): where an accepted event is, per target.

Pending comes from the journal; delivered from the file targets' archives (with the chain
place, file and line); dead-lettered from the dead-letter files, with the reason (with
storage.backend jetstream: from the dead-letter streams, whichever router wrote them). A target of
another type that took the event keeps no record here, so it is not listed; an event found
nowhere is 404 not_found. The lookup reads archives in a thread: an auditor's question, not
the hot path (router/evidence/receipt.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from router.deadletter import DeadLetters
from router.errors import RequestError, StorageUnavailableError
from router.evidence.receipt import locate
from router.intake.http import error_response, json_response
from router.journal import JournalUnavailableError
from router.server.reads import in_read_thread


@dataclass(slots=True)
class ReceiptEndpoint:
    """The handler, over the journal's pending lookup and the running config's files."""

    pending_for: Callable[[str], Awaitable[list[str]]]
    archives: Callable[[], Mapping[str, Path]]  # file target id -> its live archive
    letters_dir: Path
    # Dead letters kept elsewhere than in letters_dir answer find (the JetStream journal's
    # streams); None from it: they are files in letters_dir.
    dead_letters: DeadLetters | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/receipts/{id}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        event_id = request.match_info["id"]
        try:
            pending = await self.pending_for(event_id)
        except JournalUnavailableError as exc:  # a damaged journal file, say
            return error_response(RequestError(503, "journal_unavailable", str(exc)))
        where: dict[str, Any] = {target_id: {"state": "pending"} for target_id in pending}
        try:
            letters = await self.dead_letters.find(event_id) if self.dead_letters else None
        except StorageUnavailableError as exc:
            return error_response(RequestError(503, "journal_unavailable", str(exc)))
        if letters is not None:
            where.update({k: v for k, v in letters.items() if k not in where})
        archives = {k: v for k, v in self.archives().items() if k not in where}
        try:
            found = await in_read_thread(locate, event_id, archives, self.letters_dir, skip=where)
        except StorageUnavailableError as exc:  # an archive file cut short, say
            return error_response(RequestError(503, "archive_unreadable", str(exc)))
        where.update(found)
        if not where:
            return error_response(
                RequestError(
                    404,
                    "not_found",
                    f"no event {event_id!r} in the journal, the file archives or the dead letters",
                )
            )
        return json_response({"id": event_id, "targets": where})
