"""The router's own events (audit of API changes and reloads, refused logins, chain notices) on
their way to the journal: kept while the journal cannot take them (a full disk), journaled in
order once it can, so an audit record is late rather than lost while the daemon runs. Alert
events do not come here: they have a durable outbox of their own (router/alerts/watch.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import orjson

from router.observe.logformat import counted
from router.selfevent import clipped

if TYPE_CHECKING:
    from router.intake.accept import Outcome

log = logging.getLogger(__name__)

# The router's own events kept while the journal cannot take them, at most (about 10 KB each
# at worst, their strings clipped to selfevent.MAX_QUOTED_CHARS: a hostile admin's refused
# changes pin 10 MB); and how often the oldest is tried again meanwhile (each try is a real
# write: the journal's own probe's pace).
MAX_KEPT_OWN_EVENTS: Final = 1_000
OWN_EVENT_RETRY_S: Final = 1.0
# A rejected own event is tried again with its strings cut to server.max_string_chars less
# this (the cut string says how much was cut), and never below MIN_CLIPPED_CHARS.
CLIP_MARGIN_CHARS: Final = 40
MIN_CLIPPED_CHARS: Final = 16


class OwnEvents:
    """The router's own events (audit of API changes and reloads, refused logins, chain
    notices) on their way to the journal. One the journal cannot take (storage.path full or
    failing) is not dropped with an error line: it is logged whole at once, kept, and
    journaled, in order and with its own eventTime, as soon as the journal takes writes
    again, so an audit record is late, never lost while the daemon runs. Past
    MAX_KEPT_OWN_EVENTS an event is counted as lost, its log line its only record; so are
    those still kept when the daemon stops. One the acceptor rejects (its strings past the
    operator's server.max_string_chars, a bug) is tried once more with its strings cut to
    fit, else lost the same way: waiting cannot help it, and kept it would hold every later
    one back."""

    def __init__(
        self,
        journal: Callable[[dict[str, Any]], Awaitable[Outcome]],
        max_string_chars: Callable[[], int],
    ) -> None:
        self._journal = journal  # raises OSError when the journal fails outright
        self._max_string_chars = max_string_chars
        self.kept: deque[dict[str, Any]] = deque()
        self.lost = 0
        self._retry: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    async def record(self, body: dict[str, Any]) -> None:
        """Journal `body`, or keep it; never raises into the operation it reports on."""
        if self.kept:  # behind the ones that wait, so the record keeps its order
            self._keep(body, "earlier events of the router wait for the journal")
            return
        why = await self._try(body)
        if why is not None:
            self._keep(body, why)

    async def _try(self, body: dict[str, Any]) -> str | None:
        """None once `body` is journaled (or rejected for good, and logged); else why the
        journal did not take it."""
        try:
            outcome = await self._journal(body)
            if outcome.refusal is None and not outcome.accepted:
                limit = max(MIN_CLIPPED_CHARS, self._max_string_chars() - CLIP_MARGIN_CHARS)
                outcome = await self._journal(clipped(body, limit))
                if outcome.refusal is None and not outcome.accepted:
                    self._lose(body, f"it was rejected: {orjson.dumps(outcome.results).decode()}")
                    return None
        except OSError as exc:
            return str(exc)
        return outcome.refusal.message if outcome.refusal is not None else None

    def _lose(self, body: dict[str, Any], why: str) -> None:
        self.lost += 1
        log.error(
            "the router's own %s event cannot be journaled (%s); this line is its only record: %s",
            body.get("action"),
            why,
            orjson.dumps(body).decode(),
        )

    def _keep(self, body: dict[str, Any], why: str) -> None:
        if len(self.kept) >= MAX_KEPT_OWN_EVENTS:
            self._lose(body, f"{why}, and {len(self.kept)} wait already")
            return
        self.kept.append(body)
        log.error(
            "the router's own %s event could not be journaled (%s); kept to be journaled when "
            "the journal takes writes again: %s",
            body.get("action"),
            why,
            orjson.dumps(body).decode(),
        )
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._retry_kept(), name="own-events-retry")

    async def _retry_kept(self) -> None:
        while self.kept:
            await asyncio.sleep(OWN_EVENT_RETRY_S)
            await self.flush()

    async def flush(self) -> None:
        """Journal the kept events, oldest first, until the journal refuses one."""
        if not self.kept:
            return
        journaled = 0
        async with self._flushing:  # one at a time: each journals the oldest, then drops it
            while self.kept:
                if await self._try(self.kept[0]) is not None:
                    return
                self.kept.popleft()
                journaled += 1
        if journaled:
            log.info(
                "%s of the router itself, kept while the journal could not write, journaled",
                counted(journaled, "event"),
            )

    async def close(self) -> None:
        """A last try before the journal closes; what is still kept is lost but logged."""
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
            self._retry = None
        await self.flush()
        if self.kept:
            self.lost += len(self.kept)
            log.error(
                "%s of the router itself never reached the journal; each is in this log "
                '("kept to be journaled")',
                counted(len(self.kept), "event"),
            )
            self.kept.clear()

    def status(self) -> dict[str, int]:
        return {"unrecorded": len(self.kept), "lost": self.lost}
