"""One alert's window and state, and how they move: pure, no I/O, no asyncio, no clock.

An alert is `ok` or `firing`. Time is the router's (when events were accepted), passed in.

- Matches are counted in time slots of a hundredth of the window (so a window of any length
  is at most ~100 numbers, stored after every change, and its edge is exact to 1%).
- Presence (`threshold: {count, window_s}`): a match that brings the count within the
  window to `count` triggers, unless the alert triggered less than `cooldown_s` ago (then
  the next match after the cooldown does, if the count still holds). It resolves when the
  count falls below `count` again: a time `due` tells the caller.
- Absence (`absence: {window_s}`): it triggers once no match came for `window_s` (since the
  last match, or since the alert was first watched), not sooner than `cooldown_s` after
  its previous trigger; the next match resolves it.

`observe` takes matches, `tick` takes the passing of time; either may return a Transition
(trigger or resolve), which the caller turns into an event of the router itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from router.config import AlertConfig

OK: Final = "ok"
FIRING: Final = "firing"
# Slots per window: the resolution of a presence window's edge.
SLOTS_PER_WINDOW: Final = 100
# Matching event ids kept per alert, the most recent last: a trigger's sample.
SAMPLE_IDS: Final = 10


def fingerprint(alert: AlertConfig) -> str:
    """What a window means: a state kept under another fingerprint (the query, the kind or
    the window changed) starts again rather than count matches of another question."""
    if alert.threshold is not None:
        kind = f"presence:{alert.threshold.count}/{alert.threshold.window_s}"
    else:
        kind = f"absence:{alert.window_s}"
    return f"{kind}|{alert.query}"


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change to announce: `trigger` (ok -> firing) or `resolve` (firing -> ok)."""

    kind: Literal["trigger", "resolve"]
    at: float
    count: int  # matches in the window when it happened
    sample: tuple[str, ...]  # ids of the latest matching events


@dataclass(slots=True)
class AlertState:
    """What an alert remembers across restarts (stored as `as_dict`)."""

    fingerprint: str
    since: float  # watched since: absence counts from here before the first match
    state: str = OK
    slots: dict[int, int] = field(default_factory=dict)  # presence: slot -> matches
    last_match: float | None = None
    last_trigger: float | None = None
    changed_at: float | None = None  # the last transition
    matches: int = 0  # all matches since it was first watched
    firings: int = 0  # all triggers
    sample: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "since": self.since,
            "state": self.state,
            "slots": [[slot, count] for slot, count in sorted(self.slots.items())],
            "last_match": self.last_match,
            "last_trigger": self.last_trigger,
            "changed_at": self.changed_at,
            "matches": self.matches,
            "firings": self.firings,
            "sample": self.sample,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlertState:
        return cls(
            fingerprint=data["fingerprint"],
            since=data["since"],
            state=data["state"],
            slots={int(slot): int(count) for slot, count in data["slots"]},
            last_match=data["last_match"],
            last_trigger=data["last_trigger"],
            changed_at=data["changed_at"],
            matches=data["matches"],
            firings=data["firings"],
            sample=list(data["sample"]),
        )


def _slot_s(alert: AlertConfig) -> float:
    return alert.window_s / SLOTS_PER_WINDOW


def in_window(state: AlertState, alert: AlertConfig, now: float) -> int:
    """Matches within the window ending now, to 1% of the window at its far edge (for an
    absence alert none once its last match is a window old: it knows that exactly)."""
    last = state.last_match
    if alert.threshold is None and (last is None or now - last >= alert.window_s):
        return 0
    width, start = _slot_s(alert), now - alert.window_s
    return sum(count for slot, count in state.slots.items() if (slot + 1) * width > start)


def _prune(state: AlertState, alert: AlertConfig, now: float) -> None:
    width, start = _slot_s(alert), now - alert.window_s
    for slot in [slot for slot in state.slots if (slot + 1) * width <= start]:
        del state.slots[slot]


def _cooling(state: AlertState, alert: AlertConfig, now: float) -> bool:
    last = state.last_trigger
    return last is not None and now - last < alert.cooldown_s


def _move(state: AlertState, alert: AlertConfig, to: str, now: float) -> Transition:
    state.state, state.changed_at = to, now
    if to == FIRING:
        state.last_trigger = now
        state.firings += 1
    kind: Literal["trigger", "resolve"] = "trigger" if to == FIRING else "resolve"
    return Transition(kind, now, in_window(state, alert, now), tuple(state.sample))


def observe(
    state: AlertState, alert: AlertConfig, now: float, event_ids: Sequence[str]
) -> Transition | None:
    """Events matching the alert were accepted at `now`."""
    if not event_ids:
        return None
    state.matches += len(event_ids)
    state.last_match = now
    state.sample = [*state.sample, *event_ids[-SAMPLE_IDS:]][-SAMPLE_IDS:]
    slot = math.floor(now / _slot_s(alert))
    state.slots[slot] = state.slots.get(slot, 0) + len(event_ids)
    _prune(state, alert, now)
    if alert.threshold is None:
        return _move(state, alert, OK, now) if state.state == FIRING else None
    if (
        state.state == OK
        and in_window(state, alert, now) >= alert.threshold.count
        and not _cooling(state, alert, now)
    ):
        return _move(state, alert, FIRING, now)
    return None


def tick(state: AlertState, alert: AlertConfig, now: float) -> Transition | None:
    """Time passed: a presence window may have emptied, an absence window run out."""
    _prune(state, alert, now)
    if alert.threshold is not None:
        if state.state == FIRING and in_window(state, alert, now) < alert.threshold.count:
            return _move(state, alert, OK, now)
        return None
    if state.state == OK and now >= _absence_due(state, alert):
        return _move(state, alert, FIRING, now)
    return None


def _absence_due(state: AlertState, alert: AlertConfig) -> float:
    quiet_since = state.last_match if state.last_match is not None else state.since
    due = quiet_since + alert.window_s
    if state.last_trigger is not None:
        due = max(due, state.last_trigger + alert.cooldown_s)
    return due


def due(state: AlertState, alert: AlertConfig) -> float | None:
    """When `tick` may next change the state without another match (None: only a match can)."""
    if alert.threshold is None:
        return _absence_due(state, alert) if state.state == OK else None
    if state.state != FIRING:
        return None
    # The count falls below the threshold once the slot that completes it, counted from the
    # newest, leaves the window.
    needed, width = alert.threshold.count, _slot_s(alert)
    for slot in sorted(state.slots, reverse=True):
        needed -= state.slots[slot]
        if needed <= 0:
            return (slot + 1) * width + alert.window_s
    return 0.0  # already below: resolve at once
