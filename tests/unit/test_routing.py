"""routing.RouteTable: atracker's route semantics, as tables of (routes, event) -> targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from router.config import RouteConfig, RuleConfig
from router.events import Event
from router.query import parse
from router.routing import RouteTable, location_matches

SM_CREATE = "secrets-manager.secret.create"
DEFAULT = "(default_targets)"


def rule(
    locations: list[str],
    target_ids: list[str],
    actions: Sequence[str] = (),
    filter: str | None = None,
) -> RuleConfig:
    return RuleConfig(
        locations=tuple(locations),
        target_ids=tuple(target_ids),
        actions=tuple(actions),
        filter=parse(filter) if filter is not None else None,
    )


def event(location: str, action: str = SM_CREATE, **body: Any) -> Event:
    """An accepted event as ingest hands it to routing; its location comes from its CRN."""
    service = action.partition(".")[0]
    crn = f"crn:v1:bluemix:public:{service}:{location}:a/acct:instance::"
    event = Event(id="e-1", body={"action": action, "logSourceCRN": crn, **body})
    assert event.location == location
    return event


def route(name: str, *rules: RuleConfig) -> RouteConfig:
    # A different id from the name, so a test can tell which one a Decision reports.
    return RouteConfig(id=f"id-{name}", name=name, rules=rules)


def targets(
    routes: list[RouteConfig],
    location: str,
    action: str = SM_CREATE,
    default_targets: Sequence[str] = (),
) -> dict[str, str]:
    return dict(RouteTable(routes, default_targets).match(event(location, action)).targets)


# -- routes and rules ------------------------------------------------------------------------

INDEPENDENT_ROUTES = [
    route("all", rule(["*"], ["archive"])),
    route("dallas", rule(["us-south"], ["siem"])),
    route("frankfurt", rule(["eu-de"], ["eu-logs", "archive"])),
]


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("us-south", {"archive": "all", "siem": "dallas"}),
        ("eu-de", {"archive": "all", "eu-logs": "frankfurt"}),
        ("jp-tok", {"archive": "all"}),
        ("global", {"archive": "all"}),
    ],
)
def test_routes_are_independent_and_targets_are_the_union(
    location: str, expected: dict[str, str]
) -> None:
    assert targets(INDEPENDENT_ROUTES, location) == expected


FIRST_MATCH_ROUTES = [
    route(
        "ordered",
        rule(["us-south"], ["siem"]),
        rule(["us-south", "eu-de"], ["archive"]),
        rule(["*"], ["catch-all"]),
    )
]


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("us-south", {"siem": "ordered"}),
        ("eu-de", {"archive": "ordered"}),
        ("jp-tok", {"catch-all": "ordered"}),
    ],
)
def test_first_matching_rule_of_a_route_wins_and_later_rules_are_skipped(
    location: str, expected: dict[str, str]
) -> None:
    assert targets(FIRST_MATCH_ROUTES, location) == expected


@pytest.mark.parametrize("location", ["us-south", "eu-de-1", "jp-tok", "global", "eu-gb"])
def test_wildcard_matches_every_location_including_global(location: str) -> None:
    assert targets([route("all", rule(["*"], ["archive"]))], location) == {"archive": "all"}


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("global", {"platform": "global-only"}),
        ("us-south", {"fallback": DEFAULT}),
        ("eu-de-1", {"fallback": DEFAULT}),
    ],
)
def test_global_rule_matches_only_global_events(location: str, expected: dict[str, str]) -> None:
    routes = [route("global-only", rule(["global"], ["platform"]))]
    assert targets(routes, location, default_targets=["fallback"]) == expected


@pytest.mark.parametrize(
    ("rule_location", "event_location", "matches"),
    [
        ("eu-de", "eu-de", True),
        ("eu-de", "eu-de-1", True),
        ("eu-de", "eu-de-3", True),
        ("eu-de", "eu-des", False),
        ("eu-de", "eu", False),
        ("eu-de", "eu-gb", False),
        ("jp", "jp-tok", True),
        ("jp", "jp-osa", True),
        ("jp-tok", "jp", False),
        ("us-south", "us-east", False),
        ("us-south-1", "us-south", False),
        ("us-south", "global", False),
        ("global", "us-south", False),
        ("global", "global", True),
        ("*", "global", True),
        ("*", "us-south-2", True),
    ],
)
def test_region_rule_matches_its_zones_only(
    rule_location: str, event_location: str, matches: bool
) -> None:
    assert location_matches(rule_location, event_location) is matches
    routes = [route("r", rule([rule_location], ["t"]))]
    assert targets(routes, event_location) == ({"t": "r"} if matches else {})


DROP_ROUTES = [
    route("audit", rule(["eu-de"], []), rule(["*"], ["archive"])),
    route("siem", rule(["*"], ["siem"])),
]


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("eu-de", {"siem": "siem"}),
        ("eu-de-2", {"siem": "siem"}),
        ("us-south", {"archive": "audit", "siem": "siem"}),
    ],
)
def test_rule_with_empty_target_ids_matches_sends_nowhere_and_stops_its_route(
    location: str, expected: dict[str, str]
) -> None:
    assert targets(DROP_ROUTES, location) == expected


# -- default targets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("routes", "location"),
    [
        pytest.param([], "us-south", id="no-routes"),
        pytest.param([route("dallas", rule(["us-south"], ["siem"]))], "eu-de", id="no-match"),
        pytest.param(
            [route("kms-only", rule(["*"], ["siem"], actions=["kms.*"]))],
            "us-south",
            id="action-does-not-match",
        ),
    ],
)
def test_event_without_route_goes_to_default_targets(
    routes: list[RouteConfig], location: str
) -> None:
    decision = RouteTable(routes, ["archive", "backup"]).match(event(location))
    assert dict(decision.targets) == {"archive": DEFAULT, "backup": DEFAULT}
    assert decision.routed is True


def test_dropped_event_goes_to_default_targets_per_atracker_sdk_wording() -> None:
    # atracker's SDK: default targets take events when "no routing rule causes the event to be
    # sent to a target"; a drop rule matched but sent the event nowhere, so defaults apply.
    routes = [route("drop-frankfurt", rule(["eu-de"], []))]
    assert targets(routes, "eu-de", default_targets=["archive"]) == {"archive": DEFAULT}


def test_default_targets_are_not_used_when_a_route_sent_the_event() -> None:
    routes = [route("dallas", rule(["us-south"], ["siem"]))]
    assert targets(routes, "us-south", default_targets=["archive"]) == {"siem": "dallas"}


@pytest.mark.parametrize(
    ("routes", "location"),
    [
        pytest.param([], "us-south", id="no-routes"),
        pytest.param([route("dallas", rule(["us-south"], ["siem"]))], "eu-de", id="no-match"),
        pytest.param([route("drop", rule(["*"], []))], "eu-de", id="dropped"),
    ],
)
def test_event_without_route_or_default_targets_is_not_routed(
    routes: list[RouteConfig], location: str
) -> None:
    decision = RouteTable(routes, []).match(event(location))
    assert dict(decision.targets) == {}
    assert decision.routed is False


# -- actions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "matches"),
    [
        ("secrets-manager.secret.create", True),
        ("secrets-manager.secret.delete", True),
        ("secrets-manager.secret-group.create", False),
        ("secrets-manager.secrets.list", False),
        ("secrets-manager.secret-version.create", False),
        ("kms.key.create", False),
        ("Secrets-manager.secret.create", False),
    ],
)
def test_actions_glob_matches_only_its_object(action: str, matches: bool) -> None:
    routes = [route("secrets", rule(["*"], ["siem"], actions=["secrets-manager.secret.*"]))]
    assert targets(routes, "us-south", action) == ({"siem": "secrets"} if matches else {})


@pytest.mark.parametrize(
    ("action", "matches"),
    [
        ("secrets-manager.secret.delete", True),
        ("kms.key.create", True),
        ("kms.key.delete", True),
        ("secrets-manager.secret.create", False),
        ("is.instance.instance.create", False),
    ],
)
def test_several_action_globs_are_ored(action: str, matches: bool) -> None:
    routes = [
        route("mixed", rule(["*"], ["siem"], actions=["secrets-manager.secret.delete", "kms.*"]))
    ]
    assert targets(routes, "us-south", action) == ({"siem": "mixed"} if matches else {})


@pytest.mark.parametrize(
    ("location", "action", "matches"),
    [
        ("eu-de", "kms.key.create", True),
        ("eu-de-1", "kms.key.create", True),
        ("us-south", "kms.key.create", False),
        ("eu-de", SM_CREATE, False),
        ("us-south", SM_CREATE, False),
    ],
)
def test_rule_with_actions_needs_location_and_action_to_match(
    location: str, action: str, matches: bool
) -> None:
    routes = [route("kms-eu", rule(["eu-de"], ["siem"], actions=["kms.*"]))]
    assert targets(routes, location, action) == ({"siem": "kms-eu"} if matches else {})


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("kms.key.create", {"siem": "r"}),
        (SM_CREATE, {"archive": "r"}),
    ],
)
def test_rule_whose_actions_do_not_match_falls_through_to_the_next_rule(
    action: str, expected: dict[str, str]
) -> None:
    routes = [route("r", rule(["*"], ["siem"], actions=["kms.*"]), rule(["*"], ["archive"]))]
    assert targets(routes, "us-south", action) == expected


# -- the Decision ----------------------------------------------------------------------------


def test_decision_names_the_first_route_that_sent_each_target() -> None:
    routes = [
        route("first", rule(["*"], ["archive"])),
        route("second", rule(["*"], ["archive", "siem"])),
        route("third", rule(["us-south"], ["siem", "backup"])),
    ]
    assert targets(routes, "us-south") == {
        "archive": "first",
        "siem": "second",
        "backup": "third",
    }


def test_decision_names_default_targets_with_default_targets_marker() -> None:
    decision = RouteTable([], ["archive"]).match(event("us-south"))
    assert decision.targets == {"archive": "(default_targets)"}


def test_match_gives_the_same_decision_on_repeated_calls() -> None:
    table = RouteTable(INDEPENDENT_ROUTES, ["fallback"])
    first = table.match(event("us-south"))
    assert table.match(event("us-south")) == first
    assert dict(table.match(event("eu-de")).targets) == {
        "archive": "all",
        "eu-logs": "frankfurt",
    }


# -- filters ---------------------------------------------------------------------------------

UNAUTHORIZED = {"reason": {"reasonCode": 401, "reasonType": "Unauthorized"}}
CREATED = {"reason": {"reasonCode": 201, "reasonType": "Created"}}
ALERTING = [
    route("alerts", rule(["*"], ["webhook"], filter="reason.reasonType:Unauthorized")),
    route("archive", rule(["*"], ["archive"])),
]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (UNAUTHORIZED, {"webhook": "alerts", "archive": "archive"}),
        (CREATED, {"archive": "archive"}),
        ({}, {"archive": "archive"}),
    ],
)
def test_rule_with_filter_matches_only_events_that_pass_it(
    body: dict[str, Any], expected: dict[str, str]
) -> None:
    table = RouteTable(ALERTING, [])
    assert dict(table.match(event("us-south", **body)).targets) == expected


@pytest.mark.parametrize(
    ("location", "body", "expected"),
    [
        ("us-south", UNAUTHORIZED, {"siem": "r"}),
        ("us-south", CREATED, {"archive": "r"}),
        ("eu-de", UNAUTHORIZED, {"archive": "r"}),
    ],
)
def test_rule_whose_filter_fails_falls_through_to_the_next_rule(
    location: str, body: dict[str, Any], expected: dict[str, str]
) -> None:
    routes = [
        route(
            "r",
            rule(["us-south"], ["siem"], filter="reason.reasonCode:>=400"),
            rule(["*"], ["archive"]),
        )
    ]
    assert dict(RouteTable(routes, []).match(event(location, **body)).targets) == expected


@pytest.mark.parametrize(
    ("action", "body", "expected"),
    [
        ("kms.key.create", UNAUTHORIZED, {"siem": "r"}),
        ("kms.key.create", CREATED, {"fallback": DEFAULT}),
        (SM_CREATE, UNAUTHORIZED, {"fallback": DEFAULT}),
    ],
)
def test_rule_needs_location_actions_and_filter_to_match(
    action: str, body: dict[str, Any], expected: dict[str, str]
) -> None:
    routes = [route("r", rule(["*"], ["siem"], actions=["kms.*"], filter="reason.reasonCode:401"))]
    decision = RouteTable(routes, ["fallback"]).match(event("us-south", action, **body))
    assert dict(decision.targets) == expected


def test_filtered_rule_sending_nowhere_still_stops_its_route() -> None:
    routes = [route("r", rule(["*"], [], filter="outcome:failure"), rule(["*"], ["archive"]))]
    table = RouteTable(routes, ["fallback"])
    assert dict(table.match(event("us-south", outcome="failure")).targets) == {"fallback": DEFAULT}
    assert dict(table.match(event("us-south", outcome="success")).targets) == {"archive": "r"}


def test_decisions_with_filters_are_not_reused_across_events_of_the_same_location() -> None:
    # The (location, action) cache must not keep the first event's filtered outcome.
    table = RouteTable(ALERTING, [])
    assert "webhook" in table.match(event("us-south", **UNAUTHORIZED)).targets
    assert "webhook" not in table.match(event("us-south", **CREATED)).targets
    assert "webhook" in table.match(event("us-south", **UNAUTHORIZED)).targets
