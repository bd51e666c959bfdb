"""`views:` and `alerts:` in the config: defaults from the dataclasses, the view an alert
names resolved to its query, and every problem named with its field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from router.config import (
    AbsenceConfig,
    AlertConfig,
    ThresholdConfig,
    parse_config,
)
from router.errors import ConfigError

ARCHIVE = {"id": "archive", "target_type": "file", "file_endpoint": {"path": "/tmp/a.ndjson"}}
UNAUTHORIZED = "host:secrets-manager reason.reasonType:Unauthorized"
CREATES = "host:secrets-manager action:secrets-manager.secret.create"


def config(**sections: Any) -> dict[str, Any]:
    return {"targets": [copy.deepcopy(ARCHIVE)], **sections}


def alert(**fields: Any) -> dict[str, Any]:
    return {
        "name": "a",
        "query": UNAUTHORIZED,
        "threshold": {},
        "target_ids": ["archive"],
        **fields,
    }


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    return info.value.problems


def test_the_issues_example_loads_with_its_views_query_and_defaults() -> None:
    loaded = parse_config(
        config(
            views=[{"name": "secret-creates", "query": CREATES}],
            alerts=[
                {
                    "name": "unauthorized-burst",
                    "query": UNAUTHORIZED,
                    "threshold": {"count": 5, "window_s": 60},
                    "target_ids": ["archive"],
                    "cooldown_s": 300,
                },
                {
                    "name": "creates-silent",
                    "view": "secret-creates",
                    "absence": {},
                    "target_ids": ["archive"],
                },
            ],
        )
    )
    burst, silent = loaded.alerts
    assert burst.threshold == ThresholdConfig(count=5, window_s=60)
    assert burst.absence is None and burst.window_s == 60
    assert str(burst.query) == UNAUTHORIZED
    # The view's query runs; the defaults are the dataclasses' own.
    assert silent.view == "secret-creates"
    assert silent.query == loaded.views[0].query
    assert silent.absence == AbsenceConfig()
    assert silent.window_s == AbsenceConfig().window_s
    assert silent.cooldown_s == AlertConfig(name="x", query=None).cooldown_s
    assert loaded.view("secret-creates") is loaded.views[0]
    assert loaded.view("nope") is None


def test_a_threshold_without_count_or_window_takes_the_defaults() -> None:
    (only,) = parse_config(config(alerts=[alert()])).alerts
    assert only.threshold == ThresholdConfig()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            config(alerts=[alert(query="reason.reasonType:Unauthorized AND")]),
            "alerts[0].query: column 35: expected a term after AND, found the end of the query "
            "in 'reason.reasonType:Unauthorized AND'",
            id="bad-alert-query",
        ),
        pytest.param(
            config(views=[{"name": "v", "query": "(host:x"}]),
            "views[0].query: column 1: this '(' is never closed in '(host:x'",
            id="bad-view-query",
        ),
        pytest.param(
            config(alerts=[{k: v for k, v in alert(view="nope").items() if k != "query"}]),
            "alerts[0].view: unknown view 'nope'",
            id="unknown-view",
        ),
        pytest.param(
            config(alerts=[alert(target_ids=["archive", "pager"])]),
            "alerts[0].target_ids[1]: unknown target 'pager'",
            id="unknown-target",
        ),
        pytest.param(
            config(alerts=[alert(absence={"window_s": 5})]),
            "alerts[0]: give either threshold (presence: count in window_s) or absence (no "
            "match for window_s), one of them, not both",
            id="threshold-and-absence",
        ),
        pytest.param(
            config(alerts=[{k: v for k, v in alert().items() if k != "threshold"}]),
            "alerts[0]: give either threshold (presence: count in window_s) or absence (no "
            "match for window_s), one of them, not both",
            id="neither-threshold-nor-absence",
        ),
        pytest.param(
            config(views=[{"name": "v", "query": "x"}], alerts=[alert(view="v")]),
            "alerts[0]: give either query or view (one of them, not both)",
            id="query-and-view",
        ),
        pytest.param(
            config(alerts=[{k: v for k, v in alert().items() if k != "query"}]),
            "alerts[0]: give either query or view (one of them, not both)",
            id="neither-query-nor-view",
        ),
        pytest.param(
            config(alerts=[alert(), alert()]),
            "alerts[1].name: duplicate alert name 'a' (also alerts[0])",
            id="duplicate-alert",
        ),
        pytest.param(
            config(views=[{"name": "v", "query": "x"}, {"name": "v", "query": "y"}]),
            "views[1].name: duplicate view name 'v' (also views[0])",
            id="duplicate-view",
        ),
        pytest.param(
            config(alerts=[alert(threshold={"count": 0, "window_s": 1})]),
            "alerts[0].threshold.count: 0 is less than the minimum of 1",
            id="zero-count",
        ),
        pytest.param(
            config(alerts=[alert(threshold={"window_s": 0})]),
            "alerts[0].threshold.window_s: 0 is less than the minimum of 1",
            id="zero-window",
        ),
        pytest.param(
            config(alerts=[alert(target_ids=[])]),
            "alerts[0].target_ids: [] should be non-empty",
            id="no-targets",
        ),
        pytest.param(
            config(alerts=[alert(severity="high")]),
            "alerts[0]: unknown key 'severity'",
            id="unknown-key",
        ),
    ],
)
def test_every_alert_and_view_problem_names_its_field(data: dict[str, Any], expected: str) -> None:
    assert expected in problems_of(data)


def test_no_file_target_may_write_the_alerts_state(tmp_path: Any) -> None:
    target = {
        "id": "archive",
        "target_type": "file",
        "file_endpoint": {"path": str(tmp_path / "var" / "alerts.db")},
    }
    problems = problems_of({"storage": {"path": str(tmp_path / "var")}, "targets": [target]})
    assert any(
        p.startswith("targets[0].file_endpoint.path:") and "one of the journal's own files" in p
        for p in problems
    )
