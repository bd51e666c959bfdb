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
from functools import lru_cache
from typing import Any

from router.config import RouteConfig, RuleConfig
from router.events import Event
from router.query import Query

WILDCARD = "*"
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


# Per route, the rules that match a (location, action) in order, up to the first without a
# filter (no later rule can be reached past it).
_Plan = tuple[tuple[str, tuple[_Rule, ...]], ...]


class RouteTable:
    """The compiled routes and default targets.

    Location and action decide most of a match, so that part is cached per (location,
    action): without filters the cache holds the whole Decision; with filters it holds the
    candidate rules, and only their filters run per event.
    """

    def __init__(self, routes: Sequence[RouteConfig], default_targets: Sequence[str]) -> None:
        self._routes = [(route.name, [_Rule(rule) for rule in route.rules]) for route in routes]
        self._default_targets = tuple(default_targets)
        self._plan = lru_cache(maxsize=4096)(self._make_plan)

    def match(self, event: Event) -> Decision:
        """Where `event` goes."""
        plan = self._plan(event.location, event.action)
        if isinstance(plan, Decision):
            return plan
        return self._decide(plan, event.body)

    def _make_plan(self, location: str, action: str) -> Decision | _Plan:
        plan: list[tuple[str, tuple[_Rule, ...]]] = []
        for name, rules in self._routes:
            candidates: list[_Rule] = []
            for rule in rules:
                if rule.matches(location, action):
                    candidates.append(rule)
                    if rule.filter is None:
                        break
            if candidates:
                plan.append((name, tuple(candidates)))
        frozen = tuple(plan)
        if all(rule.filter is None for _, rules in frozen for rule in rules):
            return self._decide(frozen, {})
        return frozen

    def _decide(self, plan: _Plan, body: Mapping[str, Any]) -> Decision:
        targets: dict[str, str] = {}
        for name, rules in plan:
            for rule in rules:
                if rule.filter is None or rule.filter.matches(body):
                    for target_id in rule.target_ids:
                        targets.setdefault(target_id, name)
                    break
        if not targets:
            targets = dict.fromkeys(self._default_targets, DEFAULT_ROUTE)
        return Decision(targets)
