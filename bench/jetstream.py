"""Scale-out bench: routers on NATS JetStream (storage.backend jetstream) against one router on
SQLite, with real `event-router serve` processes and real nats-server processes on loopback.

`python -m bench.jetstream [--seconds S] [--concurrency C] [--batch-size B] [--json PATH]
[--evidence]`

Scenarios: SQLite (fsync always) with one router; JetStream on one node (replicas 1) with one
router and with two; JetStream on a three-node cluster with replicas 1 and 3, one router and
two. Producers keep `--concurrency` POSTs of `--batch-size` events in flight, round-robin over
the routers (as behind a load balancer), for `--seconds`; then the bench waits until every
router's books show nothing pending. Reported per scenario: events/s acknowledged (ingest),
events/s delivered (until the backlog drained), and CPU per event of every process (each
router, each nats-server), because on this machine the processes share the cores: per-process
CPU per event is what predicts scaling on machines of their own. Each run is checked: every
acknowledged event is in the routers' archives (file targets), and the count of lines equals
the events acknowledged (nothing twice when nothing died). `--evidence` runs the routers with
evidence on: each archive chained (on JetStream a chain per router, its head kept in the KV
bucket after every acknowledged batch).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.load import build_events, proc_cpu_s
from tests.fakes import read_ndjson
from tests.helpers import free_port, ready, reap, spawn, terminate
from tests.peers.nats import NatsCluster, NatsServer

TARGET_ID = "archive"
READY_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    backend: str  # sqlite | jetstream
    routers: int = 1
    cluster: bool = False
    replicas: int = 1


SCENARIOS = (
    Scenario("sqlite, 1 router", "sqlite"),
    Scenario("jetstream 1 node R1, 1 router", "jetstream"),
    Scenario("jetstream 1 node R1, 2 routers", "jetstream", routers=2),
    Scenario("jetstream 3 nodes R1, 1 router", "jetstream", cluster=True),
    Scenario("jetstream 3 nodes R3, 1 router", "jetstream", cluster=True, replicas=3),
    Scenario("jetstream 3 nodes R3, 2 routers", "jetstream", routers=2, cluster=True, replicas=3),
)


@dataclass(slots=True)
class Result:
    scenario: str
    acked_events: int = 0
    ingest_s: float = 0.0
    drained_s: float = 0.0
    errors: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    archived_lines: int = 0
    missing: int = 0

    @property
    def ingest_eps(self) -> float:
        return self.acked_events / self.ingest_s if self.ingest_s else 0.0

    @property
    def delivered_eps(self) -> float:
        return self.acked_events / self.drained_s if self.drained_s else 0.0

    def cpu_us_per_event(self) -> dict[str, float]:
        n = max(self.acked_events, 1)
        return {name: round(cpu * 1e6 / n, 1) for name, cpu in self.cpu_s.items()}


def router_config(
    workdir: Path,
    port: int,
    scenario: Scenario,
    servers: Sequence[str],
    stream: str,
    *,
    evidence: bool = False,
) -> Path:
    storage: dict[str, Any] = {"path": str(workdir / "var"), "fsync": "always"}
    if scenario.backend == "jetstream":
        storage |= {
            "backend": "jetstream",
            "jetstream": {
                "servers": list(servers),
                "stream": stream,
                "replicas": scenario.replicas,
                "max_bytes": 256 * 1024 * 1024,
                "share_config": False,  # each router its own archive path
            },
        }
    config = {
        "server": {"host": "127.0.0.1", "port": port, "max_concurrent_requests": 64},
        "storage": storage,
        "evidence": {"enabled": evidence},
        "startup": {"validate_targets": False},
        "targets": [
            {
                "id": TARGET_ID,
                "target_type": "file",
                "file_endpoint": {"path": str(workdir / "archive.ndjson")},
            }
        ],
        "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": [TARGET_ID]}]}],
    }
    path = workdir / "router.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


async def wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def pending(ports: Sequence[int]) -> int:
    total = 0
    async with aiohttp.ClientSession() as session:
        for port in ports:
            async with session.get(f"http://127.0.0.1:{port}/v1/status") as resp:
                status = await resp.json()
            total += status["targets"][TARGET_ID]["pending"]
    return total


async def drive(
    ports: Sequence[int], seconds: float, concurrency: int, batch_size: int
) -> tuple[list[str], int, float]:
    """POST batches with fresh ids round-robin over the routers: (acked ids, errors, seconds)."""
    events = build_events(60)
    acked: list[str] = []
    errors = 0
    counter = itertools.count()
    stop_at = time.monotonic() + seconds

    async def producer(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            n = next(counter)
            ids = [f"b{n}-{i}" for i in range(batch_size)]
            body = orjson.dumps(
                [events[(n + i) % len(events)] | {"id": ids[i]} for i in range(batch_size)]
            )
            port = ports[n % len(ports)]
            try:
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/events",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    await resp.read()
                    if resp.status == 202:
                        acked.extend(ids)
                    else:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(producer(session) for _ in range(concurrency)))
    return acked, errors, time.monotonic() - started


async def run(scenario: Scenario, args: argparse.Namespace, base: Path) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="js-", dir=base))
    result = Result(scenario.name + (", evidence" if args.evidence else ""))
    nats: list[NatsServer] = []
    cluster: NatsCluster | None = None
    servers: list[str] = []
    if scenario.backend == "jetstream":
        if scenario.cluster:
            cluster = NatsCluster(workdir / "nats").start()
            nats = cluster.nodes
        else:
            nats = [NatsServer(workdir / "nats").start()]
        servers = [node.url for node in nats]
    procs = []
    ports = [free_port() for _ in range(scenario.routers)]
    try:
        for i, port in enumerate(ports):
            # Each router lists the servers starting at a different node, spreading connections.
            own = servers[i % len(servers) :] + servers[: i % len(servers)] if servers else []
            config = router_config(
                workdir / f"r{i + 1}", port, scenario, own, "BENCH", evidence=args.evidence
            )
            procs.append(await spawn(config))
        for port in ports:
            await wait(lambda port=port: ready(port), READY_TIMEOUT_S, "a router to be ready")
        cpu_before = {f"router{i + 1}": proc_cpu_s(p.pid) for i, p in enumerate(procs)}
        cpu_before |= {f"nats-{n.server_name}": proc_cpu_s(n.pid) for n in nats}
        started = time.monotonic()
        acked, result.errors, result.ingest_s = await drive(
            ports, args.seconds, args.concurrency, args.batch_size
        )

        async def drained() -> bool:
            return await pending(ports) == 0

        await wait(drained, DRAIN_TIMEOUT_S, "the backlog to drain")
        result.drained_s = time.monotonic() - started
        result.acked_events = len(acked)
        cpu_after = {f"router{i + 1}": proc_cpu_s(p.pid) for i, p in enumerate(procs)}
        cpu_after |= {f"nats-{n.server_name}": proc_cpu_s(n.pid) for n in nats}
        result.cpu_s = {k: round(cpu_after[k] - cpu_before[k], 3) for k in cpu_before}
        for proc in procs:
            await terminate(proc, 60)
        # The file target rotates at 100 MiB: a long run's archive is several files.
        lines = [
            e["id"]
            for i in range(scenario.routers)
            for path in (workdir / f"r{i + 1}").glob("archive.ndjson*")
            for e in read_ndjson(path)
        ]
        result.archived_lines = len(lines)
        result.missing = len(set(acked) - set(lines))
    finally:
        for proc in procs:
            await reap(proc)
        if cluster is not None:
            cluster.stop()
        else:
            for node in nats:
                node.stop()
    return result


def table(results: Sequence[Result]) -> str:
    rows = [
        "| scenario | acked events | ingest events/s | delivered events/s | 503/errors "
        "| CPU µs per event, per process | archived lines / missing |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        cpu = ", ".join(f"{k} {v:g}" for k, v in r.cpu_us_per_event().items())
        rows.append(
            f"| {r.scenario} | {r.acked_events} | {r.ingest_eps:,.0f} | {r.delivered_eps:,.0f} "
            f"| {r.errors} | {cpu} | {r.archived_lines} / {r.missing} |"
        )
    return "\n".join(rows)


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jetstream", description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--only", help="run the scenarios whose name contains this")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--evidence", action="store_true", help="chained archives (evidence on)")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-jetstream-") as base:
        for scenario in SCENARIOS:
            if args.only and args.only not in scenario.name:
                continue
            print(f"running: {scenario.name}", file=sys.stderr, flush=True)
            results.append(await run(scenario, args, Path(base)))
    print(
        f"{os.cpu_count()} CPUs; {args.seconds:g}s of load per scenario, "
        f"{args.concurrency} POSTs of {args.batch_size} events in flight"
    )
    print(table(results))
    if args.json:
        args.json.write_text(
            json.dumps([asdict(r) | {"cpu_us_per_event": r.cpu_us_per_event()} for r in results])
        )
    return 0 if all(r.missing == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
