"""The planned router against the naive one: generated routes (locations, action globs, query
filters on host, location, action and body fields) and generated events, the same targets.

RouteTable plans per (location, host, action) and decides filter terms on those facts ahead of
time (query.assume); the naive router below tries every rule of every route on every event, as
the routing rules are written. Any difference is a planning bug.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from router.config import RouteConfig, RuleConfig
from router.events import Event, crn_location
from router.query import Query, assume, parse
from router.routing import DEFAULT_ROUTE, RouteTable, location_matches

RULE_LOCATIONS = ["*", "global", "us-south", "us", "eu-de", "eu-de-1", "eu", "jp-tok", "jp"]
EVENT_LOCATIONS = ["", "us-south", "us-south-1", "eu-de", "eu-de-2", "jp-tok", "eu-gb"]
SERVICES = ["secrets-manager", "svc1", "svc2", "SVC2", "iam-identity"]
ACTIONS = [
    "secrets-manager.secret.create",
    "secrets-manager.secret.read",
    "svc1.thing.delete",
    "svc2.thing.update",
    "iam-identity.apikey.create",
]
GLOBS = ["secrets-manager.*", "*.delete", "svc1.*", "*", "*.secret.*", "iam-identity.apikey.create"]
TERMS = [
    "host:svc1",
    "host:secrets-manager",
    "host:==SVC2",
    "host:===svc2",
    "host:[svc1,iam]",
    "host:*",
    "host:>3",
    "location:us-south",
    "location:global",
    "location:==eu-de",
    "action:secrets-manager.secret",
    "action:===svc1.thing.delete",
    "action:*",
    "app:crn",
    "reason.reasonType:Unauthorized",
    "reason.reasonCode:>=400",
    "severity:critical",
    "outcome:failure",
    "tags:*",
    "Unauthorized",
    '"svc1"',
]
TARGETS = ["a", "b", "c"]


def queries() -> st.SearchStrategy[str]:
    return st.recursive(
        st.sampled_from(TERMS),
        lambda inner: st.one_of(
            st.builds(lambda q: f"NOT ({q})", inner),
            st.builds(lambda a, b: f"({a}) OR ({b})", inner, inner),
            st.builds(lambda a, b: f"({a}) AND ({b})", inner, inner),
            st.builds(lambda a, b: f"({a}) ({b})", inner, inner),
        ),
        max_leaves=6,
    )


rules = st.builds(
    lambda locations, target_ids, actions, query: RuleConfig(
        locations=tuple(locations),
        target_ids=tuple(target_ids),
        actions=tuple(actions),
        filter=parse(query) if query is not None else None,
    ),
    st.lists(st.sampled_from(RULE_LOCATIONS), min_size=1, max_size=3),
    st.lists(st.sampled_from(TARGETS), max_size=2, unique=True),
    st.lists(st.sampled_from(GLOBS), max_size=2),
    st.one_of(st.none(), queries()),
)
route_lists = st.lists(
    st.builds(
        lambda n, rs: RouteConfig(id=f"r{n}", name=f"route-{n}", rules=tuple(rs)),
        st.integers(0, 99),
        st.lists(rules, min_size=1, max_size=3),
    ),
    max_size=6,
)
bodies = st.builds(
    lambda service, location, action, reason, severity, outcome, tags: {
        "logSourceCRN": f"crn:v1:bluemix:public:{service}:{location}:a/acct:inst::",
        "action": action,
        "reason": reason,
        "severity": severity,
        "outcome": outcome,
        **({"tags": tags} if tags is not None else {}),
    },
    st.sampled_from(SERVICES),
    st.sampled_from(EVENT_LOCATIONS),
    st.sampled_from(ACTIONS),
    st.fixed_dictionaries(
        {
            "reasonType": st.sampled_from(["Unauthorized", "unauthorized", "Created", "OK"]),
            "reasonCode": st.sampled_from([200, 201, 401, 403, 500]),
        }
    ),
    st.sampled_from(["normal", "warning", "critical"]),
    st.sampled_from(["success", "failure"]),
    st.one_of(st.none(), st.lists(st.sampled_from(["x", "svc1", None]), max_size=2)),
)


def naive(
    routes: list[RouteConfig], default_targets: list[str], body: dict[str, Any]
) -> dict[str, str]:
    """Every rule of every route, in order, on the event itself: the routing rules as written."""
    location, action = crn_location(body["logSourceCRN"]), body["action"]
    targets: dict[str, str] = {}
    for route in routes:
        for rule in route.rules:
            if (
                any(location_matches(loc, location) for loc in rule.locations)
                and (not rule.actions or any(fnmatch.fnmatchcase(action, g) for g in rule.actions))
                and (rule.filter is None or rule.filter.matches(body))
            ):
                for target_id in rule.target_ids:
                    targets.setdefault(target_id, route.name)
                break
    return targets or dict.fromkeys(default_targets, DEFAULT_ROUTE)


@settings(max_examples=400, deadline=None)
@given(
    routes=route_lists,
    default_targets=st.lists(st.sampled_from(TARGETS), max_size=1),
    events=st.lists(bodies, min_size=1, max_size=8),
)
def test_planned_router_picks_the_targets_the_naive_router_picks(
    routes: list[RouteConfig], default_targets: list[str], events: list[dict[str, Any]]
) -> None:
    table = RouteTable(routes, default_targets)
    for i, body in enumerate(events):
        expected = naive(routes, default_targets, body)
        # Twice: the second decision comes from the cached plan.
        for _ in range(2):
            assert dict(table.match(Event(id=f"e{i}", body=body)).targets) == expected


@settings(max_examples=400, deadline=None)
@given(query=queries(), body=bodies)
def test_assuming_an_events_own_facts_never_changes_a_querys_answer(
    query: str, body: dict[str, Any]
) -> None:
    parsed = parse(query)
    event = Event(id="e", body=body)
    known = {"host": event.service, "location": event.location, "action": event.action}
    left = assume(parsed.root, known)
    answer = left if isinstance(left, bool) else Query(left).matches(body)
    assert answer == parsed.matches(body)


def test_a_team_filter_on_another_host_is_ruled_out_by_the_plan() -> None:
    """30 teams' routes whose filters name their own host: for a secrets-manager event none of
    the 30 filters is left to run, so its decision is cached whole."""
    routes = [
        RouteConfig(
            id=f"r{n}",
            name=f"team-{n}",
            rules=(
                RuleConfig(
                    locations=("*",),
                    target_ids=("a",),
                    actions=("secrets-manager.*",),
                    filter=parse(f"reason.reasonType:Unauthorized host:svc{n}"),
                ),
            ),
        )
        for n in range(30)
    ]
    table = RouteTable(routes, ["archive"])
    body = {
        "logSourceCRN": "crn:v1:bluemix:public:secrets-manager:us-south:a/acct:inst::",
        "action": "secrets-manager.secret.create",
        "reason": {"reasonType": "Unauthorized"},
    }
    first = table.match(Event(id="e1", body=body))
    assert dict(first.targets) == {"archive": DEFAULT_ROUTE}
    assert table.match(Event(id="e2", body=dict(body))) is first  # the cached Decision
