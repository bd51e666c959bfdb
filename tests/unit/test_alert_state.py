"""router/alerts/state.py: one alert's window and state, driven by matches and time (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from router.alerts.state import (
    FIRING,
    OK,
    SAMPLE_IDS,
    AlertState,
    due,
    fingerprint,
    in_window,
    observe,
    tick,
)
from router.config import AbsenceConfig, AlertConfig, ThresholdConfig
from router.query import parse

QUERY = parse("reason.reasonType:Unauthorized")


def presence(count: int = 3, window_s: float = 10.0, cooldown_s: float = 0.0) -> AlertConfig:
    return AlertConfig(
        name="burst",
        query=QUERY,
        threshold=ThresholdConfig(count=count, window_s=window_s),
        target_ids=("hook",),
        cooldown_s=cooldown_s,
    )


def absence(window_s: float = 5.0, cooldown_s: float = 0.0) -> AlertConfig:
    return AlertConfig(
        name="silent",
        query=QUERY,
        absence=AbsenceConfig(window_s=window_s),
        target_ids=("hook",),
        cooldown_s=cooldown_s,
    )


def fresh(alert: AlertConfig, since: float = 0.0) -> AlertState:
    return AlertState(fingerprint(alert), since=since)


@pytest.mark.parametrize(
    ("times", "fires_at"),
    [
        pytest.param([0, 1, 2], 2, id="three-in-window"),
        pytest.param([0, 5, 10.5], None, id="the-first-left-the-window"),
        pytest.param([0, 5, 9.5], 9.5, id="just-inside"),
        pytest.param([0, 0.01, 20, 21, 22], 22, id="old-matches-do-not-count"),
    ],
)
def test_presence_triggers_at_the_match_that_reaches_the_count(
    times: list[float], fires_at: float | None
) -> None:
    alert, state = presence(), fresh(presence())
    fired = [t for i, t in enumerate(times) if observe(state, alert, t, [f"e{i}"]) is not None]
    assert fired == ([] if fires_at is None else [fires_at])


def test_presence_resolves_when_its_due_time_empties_the_window() -> None:
    alert, state = presence(count=2, window_s=10), fresh(presence())
    observe(state, alert, 0.0, ["a"])
    transition = observe(state, alert, 4.0, ["b", "c"])
    assert transition is not None and transition.kind == "trigger" and transition.count == 3
    assert transition.sample == ("a", "b", "c")
    # Two matches at 4 keep it at the count until they leave the window (the slot of 4 ends
    # at 4.1): the match at 0 leaving changes nothing.
    resolve_at = due(state, alert)
    assert resolve_at == pytest.approx(14.1)
    assert tick(state, alert, 10.5) is None and state.state == FIRING
    assert tick(state, alert, resolve_at - 0.01) is None
    resolved = tick(state, alert, resolve_at)
    assert resolved is not None and resolved.kind == "resolve" and resolved.count == 0
    assert state.state == OK and due(state, alert) is None


def test_the_cooldown_holds_back_a_new_trigger_until_a_match_after_it() -> None:
    alert = presence(count=1, window_s=1, cooldown_s=30)
    state = fresh(alert)
    assert observe(state, alert, 0.0, ["a"]) is not None
    assert tick(state, alert, 2.0) is not None  # resolved
    assert observe(state, alert, 5.0, ["b"]) is None  # cooling down: stays ok
    assert state.state == OK
    again = observe(state, alert, 31.0, ["c"])
    assert again is not None and again.kind == "trigger" and state.firings == 2


def test_absence_triggers_after_the_window_and_resolves_on_the_next_match() -> None:
    alert = absence(window_s=5, cooldown_s=8)
    state = fresh(alert, since=100.0)
    assert due(state, alert) == 105.0
    assert tick(state, alert, 104.9) is None
    fired = tick(state, alert, 105.0)
    assert fired is not None and fired.kind == "trigger" and fired.count == 0
    assert due(state, alert) is None  # firing: only a match changes it
    assert tick(state, alert, 200.0) is None and state.firings == 1
    resolved = observe(state, alert, 106.0, ["m"])
    assert resolved is not None and resolved.kind == "resolve" and resolved.sample == ("m",)
    # The next silence counts from that match (106 + 5), but no trigger comes before the
    # cooldown since the last one ends (105 + 8).
    assert due(state, alert) == 113.0
    observe(state, alert, 110.0, ["n"])
    assert due(state, alert) == 115.0


def test_the_sample_keeps_the_latest_ids() -> None:
    alert, state = presence(count=1000), fresh(presence(count=1000))
    observe(state, alert, 0.0, [f"e{i}" for i in range(25)])
    observe(state, alert, 1.0, ["last"])
    assert state.sample == [f"e{i}" for i in range(16, 25)] + ["last"]
    assert len(state.sample) == SAMPLE_IDS and state.matches == 26
    assert in_window(state, alert, 1.0) == 26


def test_a_window_is_at_most_a_hundred_slots_however_long() -> None:
    alert = presence(count=10**9, window_s=3600)
    state = fresh(alert)
    for second in range(0, 7200, 3):
        observe(state, alert, float(second), ["x"])
    assert len(state.slots) <= 101


def test_the_state_survives_a_round_trip_through_its_stored_form() -> None:
    alert, state = presence(count=2), fresh(presence(count=2))
    observe(state, alert, 1.0, ["a", "b"])
    assert AlertState.from_dict(state.as_dict()) == state


def test_the_fingerprint_changes_with_the_question_not_with_where_it_goes() -> None:
    alert = presence()
    assert fingerprint(dataclasses.replace(alert, cooldown_s=99, target_ids=("x",))) == (
        fingerprint(alert)
    )
    for changed in (
        dataclasses.replace(alert, query=parse("outcome:failure")),
        dataclasses.replace(alert, threshold=ThresholdConfig(count=4, window_s=10)),
        dataclasses.replace(alert, threshold=ThresholdConfig(count=3, window_s=11)),
        dataclasses.replace(alert, threshold=None, absence=AbsenceConfig(window_s=10)),
    ):
        assert fingerprint(changed) != fingerprint(alert)


def test_an_absence_alert_counts_its_window_and_triggers_with_none_in_it() -> None:
    alert = absence(window_s=1)
    state = fresh(alert)
    observe(state, alert, 0.055, ["a"])
    observe(state, alert, 0.305, ["b"])
    assert in_window(state, alert, 0.5) == 2
    assert due(state, alert) == pytest.approx(1.305)
    # The slot of the last match ends after it: the count must not include it any more.
    fired = tick(state, alert, 1.305)
    assert fired is not None and fired.kind == "trigger" and fired.count == 0
    resolved = observe(state, alert, 2.0, ["c"])
    assert resolved is not None and resolved.count == 1
