"""Pure routing: which targets an event goes to, by atracker's rules. No I/O, no asyncio.

- Routes are independent: an event reaches the targets of every route that has a matching rule.
- Inside a route the rules are tried in order and the first match wins; a rule with empty
  `target_ids` matches and sends nowhere (the atracker way to drop a location).
- A rule location matches the event's location, `*` matches every location (global included),
  `global` matches only global events, and a region matches its zones (`eu-de` ~ `eu-de-1`,
  `jp` ~ `jp-tok`), as atracker does since its hierarchical matching.
- `actions` (our extension) are shell-style globs; a rule with actions also needs one to match.
- `filter` (our extension) is a query (router.query); a rule with a filter also needs the event
  to pass it. A rule whose filter fails does not match, so the next rule of its route is tried.
- An event that no rule sent anywhere goes to `settings.default_targets`. The reference leaves
  open whether a matched drop rule counts as "sent somewhere"; we follow atracker's SDK wording
  ("no routing rule causes the event to be sent to a target"), so it does not.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from router.config import RouteConfig, RuleConfig
from router.events import Event
from router.query import Fields, Query, assume

WILDCARD = "*"
PLANS_KEPT = 4096
DEFAULT_ROUTE = "(default_targets)"


def location_matches(rule_location: str, event_location: str) -> bool:
    """Does a rule location cover an event location? `eu-de` covers `eu-de` and `eu-de-2`."""
    if rule_location in (WILDCARD, event_location):
        return True
    return event_location.startswith(rule_location + "-")


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one event goes: target id -> the name of the route that sent it there."""

    targets: Mapping[str, str]

    @property
    def routed(self) -> bool:
        return bool(self.targets)


class _Rule:
    __slots__ = ("actions", "filter", "locations", "target_ids")

    def __init__(self, rule: RuleConfig) -> None:
        self.locations = rule.locations
        self.target_ids = rule.target_ids
        self.actions = (
            re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in rule.actions))
            if rule.actions
            else None
        )
        self.filter: Query | None = rule.filter

    def matches(self, location: str, action: str) -> bool:
        """The part of a match that depends only on (location, action), hence cacheable."""
        if not any(location_matches(loc, location) for loc in self.locations):
            return False
        return self.actions is None or self.actions.match(action) is not None


# Per route, the candidate rules for one (location, host, action): each with its targets and
# what is left of its filter once those facts are known (None: nothing left, it matches), in
# order, up to the first that matches outright (no later rule can be reached past it).
_Plan = tuple[tuple[str, tuple[tuple[tuple[str, ...], Query | None], ...]], ...]


class RouteTable:
    """The compiled routes and default targets.

    Location, host and action decide most of a match, so that part is planned once per
    (location, host, action) and cached: rules whose location or actions do not match are
    left out, and so is every rule whose filter those three facts rule out (a team's
    `host:svcN` filter on another service's events), while a filter they satisfy is dropped
    from its rule. Without filters left the cache holds the whole Decision; otherwise the
    remaining filters run per event, reading each field of the event once between them.
    """

    def __init__(self, routes: Sequence[RouteConfig], default_targets: Sequence[str]) -> None:
        self._routes = [(route.name, [_Rule(rule) for rule in route.rules]) for route in routes]
        self._default_targets = tuple(default_targets)
        # Plans by (location, host, action), the event's facts tuple itself the key: a look-up
        # without lru_cache's packing of three arguments into a key of its own.
        self._plans: dict[tuple[str, str, str], Decision | _Plan] = {}

    def match(self, event: Event) -> Decision:
        """Where `event` goes."""
        facts = event.facts
        plan = self._plans.get(facts)
        if plan is None:
            plan = self._plan(facts)
        if type(plan) is Decision:
            return plan
        return self._decide(cast(_Plan, plan), Fields(event.body))

    def _plan(self, facts: tuple[str, str, str]) -> Decision | _Plan:
        """The plan for `facts`, made and remembered (up to PLANS_KEPT of them: a producer's
        events repeat a few, and a flood of distinct actions only refills the table)."""
        if len(self._plans) >= PLANS_KEPT:
            self._plans.clear()
        plan = self._plans[facts] = self._make_plan(*facts)
        return plan

    def _make_plan(self, location: str, host: str, action: str) -> Decision | _Plan:
        known = {"location": location, "host": host, "action": action}
        plan: list[tuple[str, tuple[tuple[tuple[str, ...], Query | None], ...]]] = []
        for name, rules in self._routes:
            candidates: list[tuple[tuple[str, ...], Query | None]] = []
            for rule in rules:
                if not rule.matches(location, action):
                    continue
                left = True if rule.filter is None else assume(rule.filter.root, known)
                if left is False:
                    continue  # ruled out: the route's next rule is tried, as when it fails
                candidates.append((rule.target_ids, None if left is True else Query(left)))
                if left is True:
                    break
            if candidates:
                plan.append((name, tuple(candidates)))
        frozen = tuple(plan)
        if all(query is None for _, rules in frozen for _, query in rules):
            return self._decide(frozen, Fields({}))
        return frozen

    def _decide(self, plan: _Plan, fields: Fields) -> Decision:
        targets: dict[str, str] = {}
        for name, rules in plan:
            for target_ids, query in rules:
                if query is None or query.matches_fields(fields):
                    for target_id in target_ids:
                        targets.setdefault(target_id, name)
                    break
        if not targets:
            targets = dict.fromkeys(self._default_targets, DEFAULT_ROUTE)
        return Decision(targets)
