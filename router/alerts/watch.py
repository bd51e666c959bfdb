"""The alerts at work: matched against accepted events, timed, stored, announced.

The acceptor hands `observe` every batch it journaled (after redaction); each alert's query
runs once per event, its state moves (router/alerts/state.py), and the change is made
durable (router/journal/alertstate.py) before the producer is answered, so a restart
forgets no match it acknowledged. Concurrent batches share one write. A timer task wakes
when the next state may change with no event (a presence window emptying, an absence window
running out) or when the config changes.

A transition becomes an event of the router itself (`event-router.alert.trigger` or
`.resolve`, router/selfevent.py), written to the store's outbox with the state that decided
it, then journaled for the alert's `target_ids` by `emit`, in a task of its own (the
producer does not wait for it), so retries, dead letters and evidence apply as to any event.
The router's own alert events are never matched (an alert on `host:event-router` would
otherwise feed itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from router.alerts.state import (
    AlertState,
    Transition,
    due,
    fingerprint,
    in_window,
    observe,
    tick,
)
from router.config import AlertConfig
from router.errors import RouterError
from router.events import Event, new_event_id
from router.journal import JournalUnavailableError
from router.journal.alertstate import AlertStore, Outgoing
from router.observe.metrics import utc_iso
from router.selfevent import ALERT_ACTIONS, alert_event

log = logging.getLogger(__name__)

# An alert event the journal refused (full, unavailable), or a save that failed, is tried
# again this often.
RETRY_S: Final = 1.0
# How long `stop` lets alert events still being journaled finish.
STOP_SENDING_S: Final = 5.0
# The route name an alert's events are journaled under, for its targets' books.
ROUTE_PREFIX: Final = "alert:"

Emit = Callable[[dict[str, Any], Mapping[str, str]], Awaitable[None]]


class AlertWatch:
    """Every alert of the running config, with its state; `open`, `start`, `configure` on
    reload, `observe` per accepted batch, `snapshot` for the API and metrics, `stop`."""

    def __init__(
        self, store: AlertStore, emit: Emit, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.emit = emit  # journals an event of the router for these targets; raises if refused
        self.clock = clock
        self.alerts: dict[str, AlertConfig] = {}
        self.states: dict[str, AlertState] = {}
        self.save_errors = 0
        self.timer_errors = 0
        self._dirty: dict[str, None] = {}  # alerts whose state changed (or went) since saved
        self._decided: list[Outgoing] = []  # events decided, not yet saved
        self._unsent: dict[str, Outgoing] = {}  # saved to the outbox, not yet journaled
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._asked = 0  # saves asked for
        self._saved = 0  # saves done (every change asked for up to this one is durable)
        self._saving: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._new: set[str] = set()  # alerts first watched before `start`

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, alerts: Sequence[AlertConfig]) -> None:
        """Read the stored states (kept where an alert still asks the same question) and
        the outbox a previous run left."""
        stored, outbox = await self.store.open()
        for name, data in stored.items():
            try:
                self.states[name] = AlertState.from_dict(data)
            except (KeyError, TypeError, ValueError) as exc:
                log.error(
                    "alerts: the stored state of %s is unreadable (%r); it starts again", name, exc
                )
        self.configure(alerts)
        self._unsent = {o.event_id: o for o in outbox}
        if outbox:
            log.warning(
                "alerts: %d event(s) decided by the last run are journaled now", len(outbox)
            )

    def start(self) -> None:
        """The daemon takes events from now on (it listens: its worker processes too). An
        alert first watched in this run counts its absence window from here, not from `open`:
        start-up between the two (the journal, the targets, worker processes importing and
        binding) took seconds on a busy machine, and a short window fired before any producer
        could have sent an event."""
        now = self.clock()
        for name in self._new:
            state = self.states.get(name)
            if state is not None and state.last_match is None and state.since < now:
                state.since = now
                self._dirty[name] = None
        self._new.clear()
        self._timer = asyncio.create_task(self._run(), name="alerts-timer")
        for outgoing in list(self._unsent.values()):
            self._send_soon(outgoing)

    async def stop(self) -> None:
        """Stop the timer, journal what was decided, save every state."""
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        if self._dirty or self._decided:
            await self._save()
        sending = list(self._sending.values())
        if sending:
            # What the journal still refuses stays in the outbox for the next start.
            _, late = await asyncio.wait(sending, timeout=STOP_SENDING_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
        if self._saving is not None:
            await asyncio.gather(self._saving, return_exceptions=True)
        await self.store.close()

    def configure(self, alerts: Sequence[AlertConfig]) -> None:
        """Watch these alerts from now on: an alert asking the same question (query, kind,
        window) keeps its state; a new or changed one starts ok, watched from now."""
        now = self.clock()
        wanted = {alert.name: alert for alert in alerts}
        for name in [name for name in self.states if name not in wanted]:
            del self.states[name]
            self._dirty[name] = None
        for name, alert in wanted.items():
            state = self.states.get(name)
            if state is None or state.fingerprint != fingerprint(alert):
                self.states[name] = AlertState(fingerprint(alert), since=now)
                self._dirty[name] = None
                if self._timer is None:  # before start: watched from when events come in
                    self._new.add(name)
        self.alerts = wanted
        self._wake.set()

    @property
    def reads_bodies(self) -> bool:
        """Whether `observe` reads the events' bodies: only an alert with a query does."""
        return any(alert.query is not None for alert in self.alerts.values())

    # -- events and time -------------------------------------------------------------------

    async def observe(self, events: Sequence[Event]) -> None:
        """Accepted, journaled events: count their matches; durable before this returns."""
        now = self.clock()
        changed = False
        for name, alert in self.alerts.items():
            query = alert.query
            if query is None:
                continue
            ids = [
                event.id
                for event in events
                if event.action not in ALERT_ACTIONS and query.matches(event.body)
            ]
            if ids:
                changed = True
                self._dirty[name] = None
                self._decide(alert, observe(self.states[name], alert, now, ids))
        if changed:
            await self._save()

    def _decide(self, alert: AlertConfig, transition: Transition | None) -> None:
        if transition is None:
            return
        state = self.states[alert.name]
        body = alert_event(
            kind=transition.kind,
            name=alert.name,
            query=str(alert.query),
            view=alert.view,
            presence=alert.threshold is not None,
            count=transition.count,
            threshold=alert.threshold.count if alert.threshold is not None else None,
            window_s=alert.window_s,
            sample=transition.sample,
            firings=state.firings,
        )
        body["id"] = new_event_id()  # fixed now: a replay from the outbox keeps it
        targets = dict.fromkeys(alert.target_ids, ROUTE_PREFIX + alert.name)
        self._decided.append(Outgoing(body["id"], body, targets))
        log.warning("alert %s %s: %d in window", alert.name, transition.kind, transition.count)
        self._wake.set()

    def _tick(self) -> None:
        now = self.clock()
        for name, alert in self.alerts.items():
            transition = tick(self.states[name], alert, now)
            if transition is not None:
                self._dirty[name] = None
                self._decide(alert, transition)

    def _next_due(self) -> float | None:
        times = [due(self.states[name], alert) for name, alert in self.alerts.items()]
        if self._dirty or self._decided:  # a save failed: try again soon
            times.append(self.clock() + RETRY_S)
        return min((t for t in times if t is not None), default=None)

    async def _run(self) -> None:
        """Wake at the next due time (or a change), tick, save."""
        while True:
            next_due = self._next_due()
            self._wake.clear()
            timeout = None if next_due is None else max(next_due - self.clock(), 0.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            try:
                self._tick()
                if self._dirty or self._decided:
                    await self._save()
            except Exception:  # the task boundary: the timer must outlive one bad turn
                self.timer_errors += 1
                log.exception("alerts: the timer's turn failed; it goes on")
                await asyncio.sleep(RETRY_S)

    # -- durability ------------------------------------------------------------------------

    async def _save(self) -> bool:
        """Make every change so far durable; callers meanwhile share one write. A failure
        (a full disk) is logged and counted, and the changes wait for the next save."""
        self._asked += 1
        wanted = self._asked
        while self._saved < wanted:
            if self._saving is None or self._saving.done():
                self._saving = asyncio.create_task(self._write(), name="alerts-save")
            try:
                await asyncio.shield(self._saving)
            except (JournalUnavailableError, OSError) as exc:
                self.save_errors += 1
                log.error("alerts: the state could not be saved (%s); tried again soon", exc)
                self._wake.set()  # the timer tries again every RETRY_S
                return False
        return True

    async def _write(self) -> None:
        upto = self._asked
        names, self._dirty = self._dirty, {}
        decided, self._decided = self._decided, []
        states = {
            name: self.states[name].as_dict() if name in self.states else None for name in names
        }
        try:
            await self.store.save(states, decided)
        except BaseException:
            self._dirty = {**dict.fromkeys(names), **self._dirty}
            self._decided[:0] = decided
            raise
        self._saved = max(self._saved, upto)
        for outgoing in decided:
            self._unsent[outgoing.event_id] = outgoing
            self._send_soon(outgoing)

    def _send_soon(self, outgoing: Outgoing) -> None:
        if outgoing.event_id in self._sending:
            return
        task = asyncio.create_task(self._send(outgoing), name=f"alert-event:{outgoing.event_id}")
        self._sending[outgoing.event_id] = task
        task.add_done_callback(lambda _: self._sending.pop(outgoing.event_id, None))

    async def _send(self, outgoing: Outgoing) -> None:
        """Journal one alert event for its targets (tried again every RETRY_S while the
        journal refuses it), then take it out of the outbox."""
        while True:
            try:
                await self.emit(dict(outgoing.body), outgoing.targets)
                break
            except (RouterError, OSError) as exc:
                log.error("alerts: event %s not journaled (%s); retrying", outgoing.event_id, exc)
            await asyncio.sleep(RETRY_S)
        self._unsent.pop(outgoing.event_id, None)
        try:
            await self.store.sent([outgoing.event_id])
        except (JournalUnavailableError, OSError) as exc:
            # Journaled already: at worst it is journaled again, under its id, at the next start.
            log.error("alerts: event %s stays in the outbox (%s)", outgoing.event_id, exc)

    # -- reading ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per alert: state, matches in the current window, last firing, counters."""
        now = self.clock()
        out = {}
        for name, alert in self.alerts.items():
            state = self.states[name]
            out[name] = {
                "state": state.state,
                "matches_in_window": in_window(state, alert, now),
                "last_fired_at": _iso(state.last_trigger),
                "last_match_at": _iso(state.last_match),
                "changed_at": _iso(state.changed_at),
                "watched_since": _iso(state.since),
                "matches": state.matches,
                "firings": state.firings,
            }
        return out


def _iso(at: float | None) -> str | None:
    return utc_iso(at) if at is not None else None
