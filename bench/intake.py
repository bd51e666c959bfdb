"""What the event loop alone spends per event on the batched ingest path, the journal left out.

`python -m bench.intake [--requests N] [--repeat R] [--scenario batch100|routes30] [--profile]`
plays the part of `Ingest._handle` for N bodies of 100 events each (bench.compare's body and
config): decode, then `Acceptor.accept` (limits, validation, redaction, routing, receipts off,
the tail without subscribers), then the 202 answer's body, with a journal that takes every
offer at once. Printed per run: CPU microseconds per event (the lowest of the runs is the
figure: the machine is shared). `--profile` prints cProfile's top functions of one run instead.
The bodies are fresh bytes per request, as the network would hand them, and the items are
decoded per request, so nothing is shared between requests that a real server would not share;
each event has its own eventTime (bench.compare's wrk sends one body over and over), so what is
remembered across events is only what a producer's events really repeat (action, CRN, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import orjson

from bench.compare import BATCH_SIZE, ROUTES, bench_event, many_routes, router_config
from router.config import parse_config
from router.deadletter import DeadLetters
from router.events import Event
from router.intake.accept import Acceptor
from router.intake.http import decode, outcome_response
from router.journal import Journal
from router.observe.metrics import IngestStats
from router.reload import redactor_for, validator_for
from router.routing import RouteTable
from router.server.collector import settle
from router.server.tail import TailHub

SCENARIOS = ("batch100", "routes30")


class NullJournal:
    """Takes every offer at once: the journal's cost is another helper's bench."""

    MAKES_ROOM_ITSELF = False

    async def append(self, routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
        return None


def build(scenario: str) -> Acceptor:
    workdir = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    data, _ = router_config(workdir, scenario, evidence=True)
    if scenario == "routes30":
        assert len(many_routes(ROUTES)) == len(data["routes"])
    config = parse_config(data)
    return Acceptor(
        server=config.server,
        validator=validator_for(config),
        routes=RouteTable(config.routes, config.settings.default_targets),
        journal=cast(Journal, NullJournal()),
        stats=IngestStats(),
        storage=config.storage,
        dead_letters=DeadLetters(config.storage.dead_letter_dir()),
        tail=TailHub(),
        redactor=redactor_for(config),
    )


def body(event: dict[str, Any], request: int) -> bytes:
    """A batch of `event`, each with an eventTime of its own."""
    events = []
    for n in range(BATCH_SIZE):
        second = request * BATCH_SIZE + n
        when = f"2024-05-01T{second // 3600 % 24:02d}:{second // 60 % 60:02d}:{second % 60:02d}"
        events.append({**event, "eventTime": f"{when}.{n:02d}+0000"})
    return orjson.dumps(events)


async def run_once(acceptor: Acceptor, bodies: list[bytes]) -> float:
    """CPU seconds per event over `bodies`. The run is marked for callgrind's instruction
    count: `valgrind --tool=callgrind --zero-before=os_sched_yield --dump-before=os_getpgrp
    python -m bench.intake --requests 20 --repeat 2` dumps one file per run (`.2`, the
    second run, has its caches warm)."""
    os.sched_yield()  # the start, for callgrind (--zero-before=os_sched_yield)
    cpu = time.process_time()
    for body in bodies:
        items = decode(body, "application/json")
        outcome = await acceptor.accept(items)
        assert outcome.accepted == BATCH_SIZE, outcome.results[0]
        outcome_response(outcome)
    cpu = time.process_time() - cpu
    os.getpgrp()  # the end (--dump-before=os_getpgrp)
    return cpu / (len(bodies) * BATCH_SIZE)


async def main_async(args: argparse.Namespace) -> None:
    acceptor = build(args.scenario)
    event = bench_event()
    settle()  # the collector as `serve` and each worker set it after start
    for _ in range(args.repeat):
        bodies = [body(event, n) for n in range(args.requests)]
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            await run_once(acceptor, bodies)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
            return
        print(
            f"{args.scenario}: {1e6 * await run_once(acceptor, bodies):.1f} us CPU/event "
            f"({args.requests} requests of {BATCH_SIZE})",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.intake")
    parser.add_argument("--requests", type=int, default=200, help="bodies of 100 (200)")
    parser.add_argument("--repeat", type=int, default=5, help="runs (5)")
    parser.add_argument("--scenario", choices=SCENARIOS, default="batch100")
    parser.add_argument("--profile", action="store_true", help="cProfile one run")
    args: Any = parser.parse_args(argv)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
