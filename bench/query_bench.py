"""Micro-benchmark: what a route filter costs per event, next to routing without one.

    python -m bench.query_bench [--events 2000] [--repeat 7]

For each case it times `repeat` passes over the same realistic events (Secrets Manager
events from tests.fakes, a third of them failures) and prints the best pass, in
microseconds per event: best-of-N hides scheduler noise, which is what a micro-benchmark
should measure. Cases:

- `RouteTable.match`, no filter: the cached (location, action) decision, the price every
  event pays today;
- each seed query's compiled `Query.matches` on its own;
- `RouteTable.match` with an alerting rule whose filter is the seed query (cache + filter);
- `parse` (parse and compile once, as config loading does), for scale.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from router.config import RouteConfig, RuleConfig
from router.events import Event
from router.query import Query, parse
from router.routing import RouteTable
from tests.fakes import make_event, sm_crn

SEED_QUERIES = (
    "host:secrets-manager action:secrets-manager.secret.create",
    "host:secrets-manager reason.reasonType:Unauthorized",
    f"app:{sm_crn('us-south')}",
)
MORE_QUERIES = (
    "reason.reasonCode:>=400 -severity:normal",
    "host:secrets-manager (action:secrets-manager.secret.create OR "
    "action:secrets-manager.secret.delete) outcome:==success",
    '"db-password"',
)
ACTIONS = (
    "secrets-manager.secret.create",
    "secrets-manager.secret.read",
    "secrets-manager.secret.delete",
    "secrets-manager.secret-group.create",
)
LOCATIONS = ("us-south", "us-east", "eu-de", "jp-tok", "")


def build_events(count: int) -> list[Event]:
    events = []
    for i in range(count):
        fields: dict[str, Any] = {}
        if i % 3 == 0:
            fields = {
                "outcome": "failure",
                "severity": "warning",
                "reason": {"reasonCode": 401, "reasonType": "Unauthorized"},
            }
        body = make_event(
            location=LOCATIONS[i % len(LOCATIONS)], action=ACTIONS[i % len(ACTIONS)], **fields
        )
        body["id"] = f"bench-{i}"
        events.append(Event.from_body(body))
    return events


def best_us_per_call(
    work: Callable[[Sequence[Any]], object], items: Sequence[Any], repeat: int
) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        work(items)
        best = min(best, time.perf_counter() - start)
    return best / len(items) * 1e6


def evaluate_all(query: Query) -> Callable[[Sequence[dict[str, Any]]], object]:
    matches = query.matches
    return lambda bodies: [matches(body) for body in bodies]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    events = build_events(args.events)
    bodies = [event.body for event in events]

    archive = RuleConfig(locations=("*",), target_ids=("archive",))
    plain = RouteTable(
        [
            RouteConfig(id="archive", name="archive", rules=(archive,)),
            RouteConfig(
                id="regional",
                name="regional",
                rules=(
                    RuleConfig(
                        locations=("us-south",), target_ids=("siem",), actions=("*.secret.*",)
                    ),
                ),
            ),
        ],
        [],
    )

    def route_all(table: RouteTable) -> Callable[[Sequence[Event]], object]:
        return lambda items: [table.match(e) for e in items]

    rows: list[tuple[str, float, str]] = []
    rows.append(
        (
            "RouteTable.match, no filter",
            best_us_per_call(route_all(plain), events, args.repeat),
            "",
        )
    )
    for text in (*SEED_QUERIES, *MORE_QUERIES):
        query = parse(text)
        hits = sum(query.matches(b) for b in bodies)
        rows.append(
            (
                f"Query.matches  {text if len(text) < 60 else text[:57] + '...'}",
                best_us_per_call(evaluate_all(query), bodies, args.repeat),
                f"{hits}/{len(bodies)} match",
            )
        )
    alerting = RouteTable(
        [
            RouteConfig(
                id="alerts",
                name="alerts",
                rules=(
                    RuleConfig(
                        locations=("*",),
                        target_ids=("webhook",),
                        filter=parse(SEED_QUERIES[1]),
                    ),
                ),
            ),
            RouteConfig(id="archive", name="archive", rules=(archive,)),
        ],
        [],
    )
    rows.append(
        (
            "RouteTable.match, alerting rule with seed filter 2",
            best_us_per_call(route_all(alerting), events, args.repeat),
            "",
        )
    )
    texts = list(SEED_QUERIES) * 100
    rows.append(
        (
            "parse + compile a seed query (once per config load)",
            best_us_per_call(lambda items: [parse(t) for t in items], texts, args.repeat),
            "",
        )
    )

    print(
        f"query bench: {len(events)} events, best of {args.repeat} passes; Python "
        f"{platform.python_version()} on {platform.machine()}",
        file=sys.stderr,
    )
    width = max(len(name) for name, _, _ in rows)
    for name, us, note in rows:
        print(f"{name:<{width}}  {us:7.2f} us/event  {note}".rstrip())


if __name__ == "__main__":
    main()
