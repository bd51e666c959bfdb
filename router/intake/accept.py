"""Accept events, from any way in: validate, redact, route and journal; an answer per event.

`Acceptor.accept(items, caller)` takes decoded items (dicts, or the decoder's placeholders for
a line that was not JSON or a number decoding would change; `Decoded` when the decoder made
each object's bytes already) and returns an `Outcome`: each
item accepted or rejected with its problems, or the whole offer refused when the journal
cannot take it (then none was accepted). It knows nothing of HTTP, so every way in uses it:
POST /v1/events (router/intake/http.py), the router's own events (router/selfevent.py), and
whatever comes next (another process, a NATS subject). Outcome returns only once the journal
has made every accepted event durable.

A reload swaps the validator, the route table and the redactor with `swap`, which waits until
no offer is between routing and the journal: no offer routes with one table and journals with
the other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from router.config import ServerConfig, StorageConfig
from router.deadletter import DROPPED_BUFFER_FULL, DeadLetters
from router.errors import RouterError
from router.events import Event
from router.evidence.receipt import Receipts
from router.intake.limits import encoded_fits, shape_problems
from router.intake.redaction import REMEMBERED_MAX_CHARS, Redactor
from router.intake.validation import EventValidator, Problem
from router.journal import Journal, JournalFullError, JournalUnavailableError
from router.observe.logformat import counted
from router.observe.metrics import IngestStats
from router.routing import RouteTable
from router.selfevent import SERVICE

if TYPE_CHECKING:  # what an acceptor is handed, not what it imports: they speak HTTP
    from router.server.auth import Caller, Refusals
    from router.server.tail import TailHub

log = logging.getLogger(__name__)

# The router's own actions (router/selfevent.py); producers may not send them.
OWN_ACTION_PREFIX = f"{SERVICE}."
# storage.when_full: drop_oldest_per_target sheds this many events at a time, a few times at most.
SHED_EVENTS = 1000
MAX_SHEDS_PER_REQUEST = 10


@dataclass(frozen=True, slots=True)
class Malformed:
    """An NDJSON line that is not JSON: rejected on its own, the other lines still count."""

    message: str


@dataclass(frozen=True, slots=True)
class Altered:
    """An event holding a number decoding would change: rejected on its own, with the paths."""

    problems: list[Problem]
    id: str | None


class Decoded(list[Any]):
    """The items of one body as the decoder hands them, with each one's compact JSON where
    the decoder has made it already (it encodes every object once to know that it can: an
    integer outside the 64-bit range is kept exact by msgspec and refused by orjson's encoder),
    so that `accept` does not make it again; None where `accept` makes it. Exact-size bytes,
    not orjson's buffers (4 to 8 KiB each, whatever the event's size): a request's events are
    all held here at once, up to server.max_events_per_request of them. `ids`: for an object
    without an `id`, the fresh id its bytes end with (as orjson writes a key added last), which
    the event takes if it is accepted (Event.from_body's `appended_id`); else None."""

    __slots__ = ("encoded", "ids")

    def __init__(
        self, items: list[Any], encoded: list[bytes | None], ids: list[str | None] | None = None
    ) -> None:
        super().__init__(items)
        self.encoded = encoded
        self.ids: list[str | None] = ids if ids is not None else [None] * len(items)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The whole offer refused, none of it accepted: the journal is full or unavailable."""

    code: str  # journal_full, journal_unavailable
    message: str
    retry_after_s: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of an offer: a result per item (EventBridge-style), or a refusal."""

    results: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0
    refusal: Refusal | None = None

    @property
    def rejected(self) -> int:
        return len(self.results) - self.accepted

    def as_dict(self) -> dict[str, Any]:
        """The answer's body: per-item results, or the refusal as an error."""
        if self.refusal is not None:
            return {"error": {"code": self.refusal.code, "message": self.refusal.message}}
        return {"accepted": self.accepted, "rejected": self.rejected, "results": self.results}


class Observer(Protocol):
    """Looks at every batch of accepted events once the journal has them (the alerts)."""

    @property
    def reads_bodies(self) -> bool:
        """Whether `observe` reads the events' bodies (else a request lets them go while the
        journal works)."""

    async def observe(self, events: Sequence[Event]) -> None:
        """Take note of `events` (redacted, journaled) before the producer is answered."""


@dataclass(slots=True)
class Acceptor:
    """Everything accepting needs, built once by the daemon; `swap` changes what a reload
    changes."""

    server: ServerConfig
    validator: EventValidator
    routes: RouteTable
    journal: Journal
    stats: IngestStats
    storage: StorageConfig
    dead_letters: DeadLetters
    tail: TailHub | None = None
    refusals: Refusals | None = None
    redactor: Redactor | None = None
    receipts: Receipts | None = None  # evidence.receipts: one per accepted event in the answer
    observer: Observer | None = None  # the alerts (router/alerts), set once they are open
    _routing: int = field(init=False, default=0)  # offers between routing and the journal
    _open: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _idle: asyncio.Event = field(init=False, default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._open.set()
        self._idle.set()

    async def swap(
        self, *, validator: EventValidator, routes: RouteTable, redactor: Redactor | None
    ) -> None:
        """Use a reload's validator, routes and redactor from the next offer on: offers being
        routed and journaled finish first, new ones wait the moment it takes."""
        self._open.clear()
        try:
            await self._idle.wait()
            self.validator, self.routes, self.redactor = validator, routes, redactor
        finally:
            self._open.set()

    @asynccontextmanager
    async def _routing_turn(self) -> AsyncIterator[None]:
        await self._open.wait()
        self._routing += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._routing -= 1
            if not self._routing:
                self._idle.set()

    async def accept_own(
        self, body: dict[str, Any], targets: Mapping[str, str] | None = None
    ) -> None:
        """Journal an event of the router itself (built by router/selfevent.py), routed like
        any producer's, or to `targets` (target id -> route name: an alert's own targets);
        RouterError when it was not accepted."""
        outcome = await self.accept([body], own=True, route_to=targets)
        if not outcome.accepted:
            refused = orjson.dumps(outcome.as_dict()).decode()
            raise RouterError(f"the router's own event was refused: {refused}")

    async def accept(
        self,
        items: list[Any],
        caller: Caller | None = None,
        *,
        own: bool = False,
        route_to: Mapping[str, str] | None = None,
    ) -> Outcome:
        """Validate, route and journal; `caller` (when auth is on) may limit the services.
        Only the router's own events (`own`) may carry its actions, and be sent to
        `route_to` (target id -> route name) rather than where the routes send them. Where
        nothing after the journal reads the bodies (no alert query, nobody tailing), `items` is
        emptied while the journal works (`_keep_bytes_only`)."""
        results: list[dict[str, Any]] = []
        routed: list[tuple[Event, Mapping[str, str]]] = []
        forbidden = 0
        received = len(items)
        made: list[bytes | None] | None = None
        ids: list[str | None] = []
        if isinstance(items, Decoded):
            made, ids = items.encoded, items.ids
        async with self._routing_turn():
            # Bound once per offer, not looked up per event: what the loop below asks of
            # nearly every event (the settled shape, the fast validation, the reserved
            # actions) is answered without a call into `_problems`, which runs only for an
            # event one of them is unsure of, and decides and words its rejection.
            max_depth, max_chars = self.server.max_depth, self.server.max_string_chars
            clean = self.validator.clean
            principal = caller.principal if caller is not None else None
            redact = self.redactor.redact if self.redactor is not None else None
            match = self.routes.match
            receipts = self.receipts
            from_body, with_bytes = Event.from_body, Event.accepted
            own_action = _own_action
            received_at = time.time()
            # What the accepted events may take once journaled: a journal frame and a worker's
            # hand-off are sized for it (ServerConfig.max_event_bytes).
            room = limit = self.server.max_event_bytes()
            for index, item in enumerate(items):
                if made is None:
                    encoded = appended_id = None
                else:  # taken out of the list: the event keeps them, or they go
                    encoded, made[index] = made[index], None
                    appended_id = ids[index]
                spare = encoded is None  # made here: orjson's own buffer (see _encode)
                if spare:
                    encoded = _encode(item)
                if not (  # bytes are made only for a dict
                    encoded is not None
                    # encoded_fits(encoded, ...), written out: its call cost a third of it
                    and len(encoded) <= max_chars
                    and (opens := encoded.count(b"{")) <= max_depth
                    and (b"[" not in encoded or opens + encoded.count(b"[") <= max_depth)
                    and clean(item)
                    # not reserved_action(item), written out; a long action asks _problems
                    and (
                        own
                        or not isinstance(action := item.get("action"), str)
                        or (len(action) <= REMEMBERED_MAX_CHARS and not own_action(action))
                    )
                    and (principal is None or not principal.problems(item))
                ):
                    reason, problems = self._problems(item, caller, own, encoded)
                    forbidden += reason == "forbidden"
                    if problems:
                        self._reject(results, index, item, reason, problems)
                        continue
                # Redaction comes before the journal: nothing after it sees a secret. Its
                # changes (rare) mean the body is serialised again; otherwise the bytes made for
                # the limits are the event's bytes, for the journal, the targets and the tail.
                if redact is not None and redact(item):
                    encoded = None
                # The decoder's bytes as they stand (nearly every event): with the id it
                # appended to them, or with the producer's own; else from_body decides.
                event = None
                if encoded is not None and not spare:
                    if appended_id is not None:
                        if "id" not in item:
                            item["id"] = appended_id  # added last: where the bytes hold it
                            event = with_bytes(item, appended_id, encoded, received_at)
                    elif event_id := item.get("id"):
                        event = with_bytes(item, event_id, encoded, received_at)
                if event is None:
                    event = from_body(
                        item,
                        encoded=encoded,
                        spare=spare,
                        received_at=received_at,
                        appended_id=appended_id,
                    )
                size = len(event.encoded())
                if size > room:
                    problem = _too_large(size, room, limit)
                    self._reject(results, index, item, "limits", [problem])
                    continue
                room -= size
                routed.append((event, match(event).targets))
                if receipts is None:
                    results.append({"index": index, "id": event.id, "status": "accepted"})
                else:
                    results.append(
                        {
                            "index": index,
                            "id": event.id,
                            "status": "accepted",
                            "receipt": receipts.issue(event),
                        }
                    )
            if own and route_to:
                routed = [(event, route_to) for event, _ in routed]
            if (self.observer is None or not self.observer.reads_bodies) and (
                self.tail is None or not self.tail.subscribers
            ):
                _keep_bytes_only(items, routed)
            try:
                await self._append(routed)
            except JournalFullError as exc:
                self.stats.journal_full += 1
                return Outcome(
                    refusal=Refusal(
                        "journal_full", f"{exc}; retry later", self.storage.full_retry_after_s
                    )
                )
            except (OSError, JournalUnavailableError) as exc:
                log.error("journal append failed: %s", exc)
                self.stats.refuse("journal_unavailable")
                return Outcome(
                    refusal=Refusal(
                        "journal_unavailable",
                        "the journal cannot take events now; retry later",
                        self.storage.full_retry_after_s,
                    )
                )
            if self.tail is not None:
                self.tail.publish(event for event, _ in routed)
        if self.observer is not None and routed:
            await self.observer.observe([event for event, _ in routed])
        self.stats.unrouted += sum(1 for _, targets in routed if not targets)
        accepted = len(routed)
        self.stats.accepted += accepted
        self.stats.rejected += received - accepted
        if forbidden and caller is not None and self.refusals is not None:
            await self.refusals.record(
                caller,
                403,
                f"{counted(forbidden, 'event')} of a service the token may not send for",
            )
        return Outcome(results, accepted)

    async def commit(self, routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
        """The journal owner's part of an offer a worker process accepted (server.workers,
        router/intake/handoff.py): journal what the worker routed, shedding as `accept` would,
        then show it to the tail and the alerts. JournalFullError or JournalUnavailableError
        when it was not journaled: the worker refuses the offer with them."""
        try:
            await self._append(list(routed))
        except OSError as exc:
            log.error("journal append failed: %s", exc)
            raise JournalUnavailableError(f"the journal cannot take events now: {exc}") from exc
        if self.tail is not None:
            self.tail.publish(event for event, _ in routed)
        if self.observer is not None and routed:
            await self.observer.observe([event for event, _ in routed])

    def _reject(
        self,
        results: list[dict[str, Any]],
        index: int,
        item: Any,
        reason: str,
        problems: list[Problem],
    ) -> None:
        """Count a rejected item under its reason and give it its result."""
        self.stats.rejected_by_reason[reason] = self.stats.rejected_by_reason.get(reason, 0) + 1
        result: dict[str, Any] = {"index": index, "status": "rejected"}
        item_id = item.id if isinstance(item, Altered) else None
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            item_id = item["id"]
        if item_id is not None:
            result["id"] = item_id
        result["errors"] = [p.as_dict() for p in problems]
        results.append(result)

    def _problems(
        self, item: Any, caller: Caller | None, own: bool = False, encoded: bytes | None = None
    ) -> tuple[str, list[Problem]]:
        """What is wrong with one item, and the reason it is counted under (for metrics):
        malformed, limits, schema, catalogue (only its action is unknown), forbidden, or
        reserved (a producer sending one of the router's own actions)."""
        if isinstance(item, Malformed):
            return "malformed", [Problem("", item.message)]
        if isinstance(item, Altered):
            return "limits", item.problems
        if problems := self._shape_problems(item, encoded):
            return "limits", problems
        if problems := self.validator.validate(item):
            catalogue = all(p.path == "/action" and "catalogue" in p.message for p in problems)
            return ("catalogue" if catalogue else "schema"), problems
        if not own and (problems := reserved_action(item)):
            return "reserved", problems
        principal = caller.principal if caller is not None else None
        if principal is not None and (problems := principal.problems(item)):
            return "forbidden", problems
        return "", []

    def _shape_problems(self, item: Any, encoded: bytes | None) -> list[Problem]:
        server = self.server
        if encoded is not None and encoded_fits(
            encoded, max_depth=server.max_depth, max_string_chars=server.max_string_chars
        ):
            return []  # nearly every event: settled by its bytes, without shape_problems' call
        return shape_problems(
            item, max_depth=server.max_depth, max_string_chars=server.max_string_chars
        )

    async def _append(self, routed: list[tuple[Event, Mapping[str, str]]]) -> None:
        """Append; when the journal is full and the operator chose drop_oldest_per_target, make
        room by dead-lettering the oldest events of the stuck target, then try again. A journal
        that does so itself before it answers full (a worker process's HandoffJournal: the
        owner's Acceptor sheds) is asked once: it took the events' bytes with it."""
        if self.journal.MAKES_ROOM_ITSELF:
            await self.journal.append(routed)
            return
        for _ in range(MAX_SHEDS_PER_REQUEST):
            try:
                await self.journal.append(routed)
                return
            except JournalFullError:
                if self.storage.when_full != "drop_oldest_per_target" or not await self._shed():
                    break  # nothing shed, but a retire it waited for may have made room
        await self.journal.append(routed)

    async def _shed(self) -> int:
        """Dead-letter up to SHED_EVENTS of the stuck target's oldest events (never the batch
        its worker holds); how many went."""
        for target_id in self.journal.shed_order():
            async with self.journal.shed(target_id, SHED_EVENTS) as entries:
                if entries:
                    await self.dead_letters.write(target_id, entries, DROPPED_BUFFER_FULL)
            if entries:
                self.stats.dropped_buffer_full += len(entries)
                log.warning(
                    "journal full: the oldest %s of target %s dead-lettered (dropped_buffer_full)",
                    counted(len(entries), "event"),
                    target_id,
                )
                return len(entries)
        return 0


def _too_large(size: int, room: int, limit: int) -> Problem:
    """Why an event that grew once journaled (compact JSON: 1E9 is 1000000000.0; a hash in
    place of a short redacted value) was refused: it does not fit in what is left of what one
    request's events may take once journaled."""
    where = "" if room == limit else f" (the events before it in this request left {room})"
    return Problem(
        "",
        f"the event takes {size} bytes once journaled (compact JSON, with its id and "
        f"redactions); one request's events may take {limit} bytes once journaled{where}, "
        "twice the larger of server.max_body_bytes and server.max_inflated_bytes: "
        + ("send it in another request" if size <= limit else "send it smaller"),
    )


def _keep_bytes_only(items: list[Any], routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
    """Nothing after the journal reads these events' bodies (no alert query, nobody tailing; a
    worker process has neither: the owner runs them on the bytes), so while the request waits
    for its durable answer it keeps only their bytes: the parsed items, most of a large
    request's memory (3.7 MB of a 1,000-event request), are let go, from the caller's `items`
    too. A client that starts tailing meanwhile gets bodies parsed again from the bytes."""
    for event, _ in routed:
        event.keep_bytes_only()
    items.clear()


def _encode(item: Any) -> bytes | None:
    """An item's compact JSON, made once: the shape limits read it, and an accepted event
    keeps a copy of its length (orjson's buffer has room to spare: Event.from_body's `spare`).
    None for what is not an object, or what orjson will not write (nested past its own depth
    limit): the limits walk the item instead."""
    if not isinstance(item, dict):
        return None
    try:
        return orjson.dumps(item)
    except orjson.JSONEncodeError:
        return None


def reserved_action(item: dict[str, Any]) -> list[Problem]:
    """A producer's event that claims to be the router's: its login refusals, reloads and
    API changes must not be forgeable by anyone holding an ingest token."""
    action = item.get("action")
    if isinstance(action, str) and (
        _own_action(action)
        if len(action) <= REMEMBERED_MAX_CHARS
        else action.lower().startswith(OWN_ACTION_PREFIX)
    ):
        return [
            Problem(
                "/action",
                f"{action!r} is an action of the router itself ({OWN_ACTION_PREFIX}*); "
                "a producer may not send it",
            )
        ]
    return []


@lru_cache(maxsize=4096)
def _own_action(action: str) -> bool:
    """Remembered for short actions (an operator's schema may allow long ones, which would pin
    4,096 of them): a producer's events repeat their action (lower() copies it, 0.2 us)."""
    return action.lower().startswith(OWN_ACTION_PREFIX)
