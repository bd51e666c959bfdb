"""The router against the floor: the same client and payload against a bare aiohttp server and
against `event-router serve`, one after the other, with the ratios of the two.

`python -m bench.compare [--seconds 15] [--warmup 3] [--threads 2] [--connections 50]
[--scenarios single,batch100,routes30] [--workers 1,2] [--baseline DIR [--baseline-workers N]]
[--json PATH] [--short]`

The floor is what any durable HTTP ingest must at least do: a bare aiohttp handler that reads
the body, `json.loads` it, appends one line per event to a file and fsyncs it before answering
(the router's `storage.fsync: always`). The router runs with a file target taking every event
and `storage.fsync: always`; its figures include delivery, since an event is only counted as
WRITTEN once its line is in the target's file. The client is wrk (Debian's `wrk`), which keeps
`--connections` requests in flight from `--threads` threads and is written in C, so it is not
what limits either server (its own CPU is reported beside theirs).

Per server and scenario: a warm-up, the drain of what it left, then the measured run and its
drain. Figures: requests/s and accepted events/s (2xx answers of the measured run), WRITTEN
events/s (lines the run added to the file, over the run plus its drain), p50/p99 ack latency,
server CPU per accepted event (user + system over the server's whole process tree, from
/proc, run and drain included) and peak RSS (the tree's summed VmRSS, sampled). The scenarios:

- `single`: one 1,088-byte Secrets Manager event per POST (floor and router);
- `batch100`: a JSON array of 100 such events per POST (floor and router);
- `routes30`: batch100 against a router with 30 routes of 3 rules each (locations, action globs
  and a query filter in every route): compared with the router's batch100, not with the floor.

`--workers 1,2` runs the router once per `server.workers` value in each scenario (`router` is
1, `wN` is N worker processes and the journal owner; CPU and RSS are summed over all of them).

`--short` runs every scenario for a second with a brief warm-up (a smoke test of the bench
itself, for CI; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.load import (
    REPO_ROOT,
    TARGET_ID,
    DaemonProcess,
    archive_config,
    check_events,
    get_status,
    kill_if_running,
    pending,
    spawn_daemon,
    stop_daemon,
    wait_ready,
)
from tests.fakes import make_event
from tests.helpers import free_port, reap, terminate

EVENT_BYTES = 1088
BATCH_SIZE = 100
ROUTES = 30
SCENARIOS = ("single", "batch100", "routes30")
RSS_SAMPLE_S = 0.1
# The floor has drained when its file has not grown for this long.
FLOOR_SETTLE_S = 0.3
DRAIN_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
# A checkpoint line of the evidence chain is not an event.
CHECKPOINT = b'{"_checkpoint":'
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(%(body)s, "rb"))
wrk.body = f:read("*a")
f:close()
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nWRK-JSON {"requests":%%d,"duration_us":%%d,"non2xx":%%d,"socket_errors":%%d,'
    .. '"p50_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


# ---------------------------------------------------------------------------------------------
# Payloads and configs


def bench_event() -> dict[str, Any]:
    """A valid Secrets Manager event (no id: the router assigns one) of exactly EVENT_BYTES as
    compact JSON, padded in its message."""
    event = make_event(message="Secrets Manager: create secret db-password")
    event.pop("id", None)
    event["message"] += " " + "x" * (EVENT_BYTES - len(orjson.dumps(event)) - 1)
    assert len(orjson.dumps(event)) == EVENT_BYTES
    check_events([event])
    return event


def bodies() -> dict[str, tuple[bytes, int]]:
    """Scenario -> (request body, events in it)."""
    event = bench_event()
    batch = orjson.dumps([event] * BATCH_SIZE)
    return {
        "single": (orjson.dumps(event), 1),
        "batch100": (batch, BATCH_SIZE),
        "routes30": (
            batch,
            BATCH_SIZE,
        ),
    }


def many_routes(count: int) -> list[dict[str, Any]]:
    """`count` routes of 3 rules each, as an operator with many teams writes them: locations,
    action globs and a query filter in every route. The bench event passes the location and
    action tests of every first rule, so today each filter runs on each event; none of them
    matches it (its host is secrets-manager), so it reaches the archive as a default target."""
    routes = []
    for n in range(count):
        routes.append(
            {
                "name": f"team-{n}",
                "rules": [
                    {
                        "locations": ["us-south", "eu-de"],
                        "actions": ["secrets-manager.secret.*", "iam-identity.*"],
                        "filter": f"reason.reasonType:Unauthorized host:svc{n}",
                        "target_ids": [TARGET_ID],
                    },
                    {
                        "locations": ["eu-gb", "jp-tok"],
                        "actions": ["*.delete"],
                        "filter": f"severity:critical host:svc{n}",
                        "target_ids": [TARGET_ID],
                    },
                    {
                        "locations": ["*"],
                        "actions": [f"svc{n}.*"],
                        "filter": "outcome:failure",
                        "target_ids": [TARGET_ID],
                    },
                ],
            }
        )
    return routes


def router_config(
    workdir: Path, scenario: str, *, evidence: bool, workers: int = 1
) -> tuple[dict[str, Any], Path]:
    config, archive = archive_config(workdir, free_port(), "always", evidence=evidence)
    # Always named: the default ("auto") would make `router` as many workers as CPUs.
    config["server"]["workers"] = workers
    if scenario == "routes30":
        config["routes"] = many_routes(ROUTES)
        config["settings"] = {"default_targets": [TARGET_ID]}
    return config, archive


# ---------------------------------------------------------------------------------------------
# The floor: a bare aiohttp handler


def serve_floor(port: int, path: Path) -> None:
    """Run the floor server until SIGTERM (in its own process: `--serve-floor`)."""
    from aiohttp import web

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def ingest(request: web.Request) -> web.Response:
        value = json.loads(await request.read())
        items = value if isinstance(value, list) else [value]
        os.write(fd, "".join(json.dumps(item) + "\n" for item in items).encode())
        os.fsync(fd)
        return web.json_response({"accepted": len(items)}, status=202)

    async def readyz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/events", ingest)
    app.router.add_get("/readyz", readyz)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def spawn_floor(workdir: Path) -> DaemonProcess:
    port = free_port()
    log_path = workdir / "floor.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.compare",
            "--serve-floor",
            str(port),
            str(workdir / "floor.ndjson"),
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_fd,
        )
    finally:
        os.close(log_fd)  # the child has its own copy
    return DaemonProcess(proc, "127.0.0.1", port, log_path)


# ---------------------------------------------------------------------------------------------
# /proc: a process tree's CPU and memory


def tree(pid: int) -> list[int]:
    """`pid` and every descendant alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes (all their threads, and children they
    have reaped)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])
    return total / CLK_TCK


def rss_kb(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


@dataclass(slots=True)
class TreeWatch:
    """Samples a process tree's summed RSS while a run lasts; its CPU is read before/after."""

    pid: int
    peak_kb: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def cpu_s(self) -> float:
        return cpu_s(tree(self.pid))

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name=f"rss:{self.pid}")

    async def stop(self) -> int:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.peak_kb

    async def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, rss_kb(tree(self.pid)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), RSS_SAMPLE_S)


# ---------------------------------------------------------------------------------------------
# The client


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    client_cpu_s: float


async def wrk(
    url: str, body_path: Path, seconds: float, threads: int, connections: int
) -> WrkResult:
    """One wrk run; its figures from the script's `done` (a JSON line)."""
    script = body_path.with_suffix(".lua")
    script.write_text(WRK_SCRIPT % {"body": json.dumps(str(body_path))}, encoding="utf-8")
    before = os.times()
    proc = await asyncio.create_subprocess_exec(
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    after = os.times()
    for line in out.decode().splitlines():
        if line.startswith("WRK-JSON "):
            data = json.loads(line.removeprefix("WRK-JSON "))
            return WrkResult(
                requests=data["requests"],
                duration_s=data["duration_us"] / 1e6,
                non2xx=data["non2xx"],
                socket_errors=data["socket_errors"],
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                max_ms=data["max_us"] / 1000,
                client_cpu_s=(after.children_user + after.children_system)
                - (before.children_user + before.children_system),
            )
    raise RuntimeError(f"wrk gave no result: {out.decode()[-500:]} {err.decode()[-500:]}")


# ---------------------------------------------------------------------------------------------
# One server, one scenario


def count_lines(path: Path) -> int:
    """Event lines in `path` and its rotated siblings (checkpoint lines excluded)."""
    total = 0
    for file in [path, *path.parent.glob(path.name + ".*")]:
        if not file.is_file():
            continue
        with open(file, "rb") as f:
            tail = b""
            while chunk := f.read(1 << 22):
                data = tail + chunk
                total += chunk.count(b"\n") - data.count(b"\n" + CHECKPOINT)
                tail = data[-len(CHECKPOINT) :]
        with open(file, "rb") as f:
            total -= f.read(len(CHECKPOINT)) == CHECKPOINT
    return total


@dataclass(slots=True)
class Run:
    """What one scenario did against one server."""

    server: str
    scenario: str
    events_per_request: int
    seconds: float = 0.0
    requests: int = 0
    accepted_events: int = 0
    errors: int = 0
    written_events: int = 0
    drain_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    @property
    def accepted_per_s(self) -> float:
        return self.accepted_events / self.seconds if self.seconds else 0.0

    @property
    def written_per_s(self) -> float:
        elapsed = self.seconds + self.drain_s
        return self.written_events / elapsed if elapsed else 0.0

    @property
    def cpu_us_per_event(self) -> float:
        return 1e6 * self.server_cpu_s / self.accepted_events if self.accepted_events else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "requests_per_s": round(self.requests_per_s, 1),
            "accepted_per_s": round(self.accepted_per_s, 1),
            "written_per_s": round(self.written_per_s, 1),
            "cpu_us_per_event": round(self.cpu_us_per_event, 1),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Load:
    seconds: float
    warmup_s: float
    threads: int
    connections: int


async def drained(server: DaemonProcess, archive: Path, expected: int, router: bool) -> float:
    """Until nothing is pending (the router), or the file holds at least `expected` lines and
    has stopped growing (the floor: requests wrk left in flight still land after it stops).
    Returns when (monotonic) the server was first seen drained."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    last, last_seen = -1, time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if router:
                if pending(await get_status(session, server.base_url)) == 0:
                    return time.monotonic()
            else:
                lines = await asyncio.to_thread(count_lines, archive)
                if lines >= expected and lines == last:
                    return last_seen
                last, last_seen = lines, time.monotonic()
            await asyncio.sleep(FLOOR_SETTLE_S if not router else 0.05)
    raise RuntimeError(f"{server.base_url} did not drain within {DRAIN_TIMEOUT_S}s")


async def measure(
    server: DaemonProcess,
    archive: Path,
    scenario: str,
    body: tuple[bytes, int],
    load: Load,
    workdir: Path,
    *,
    name: str,
) -> Run:
    """Warm up, drain, then the measured run and its drain."""
    data, per_request = body
    body_path = workdir / f"{scenario}.json"
    body_path.write_bytes(data)
    url = f"{server.base_url}/v1/events"
    router = name != "floor"
    run = Run(name, scenario, per_request)
    if load.warmup_s > 0:
        await wrk(url, body_path, load.warmup_s, load.threads, load.connections)
    await drained(server, archive, 0, router)
    before_lines = await asyncio.to_thread(count_lines, archive)
    watch = TreeWatch(server.pid)
    cpu_before = watch.cpu_s()
    watch.start()
    result = await wrk(url, body_path, load.seconds, load.threads, load.connections)
    load_end = time.monotonic()
    run.seconds = result.duration_s
    run.requests = result.requests
    run.errors = result.non2xx + result.socket_errors
    run.accepted_events = (result.requests - result.non2xx) * per_request
    expected = before_lines + run.accepted_events
    run.drain_s = max(0.0, await drained(server, archive, expected, router) - load_end)
    run.server_cpu_s = watch.cpu_s() - cpu_before
    run.peak_rss_mb = round(await watch.stop() / 1024, 1)
    run.written_events = await asyncio.to_thread(count_lines, archive) - before_lines
    run.p50_ms, run.p99_ms, run.max_ms = result.p50_ms, result.p99_ms, result.max_ms
    run.client_cpu_s = result.client_cpu_s
    print(
        f"  {run.server:<7}{scenario:<10} {run.requests_per_s:>9.0f} req/s "
        f"{run.written_per_s:>9.0f} written ev/s  {run.cpu_us_per_event:>6.1f} us/ev",
        file=sys.stderr,
        flush=True,
    )
    return run


async def floor_run(scenario: str, body: tuple[bytes, int], load: Load, workdir: Path) -> Run:
    os.makedirs(workdir)
    server = await spawn_floor(workdir)
    try:
        await wait_ready(server)
        return await measure(
            server, workdir / "floor.ndjson", scenario, body, load, workdir, name="floor"
        )
    except BaseException:
        server.print_log_tail()
        raise
    finally:
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            await terminate(server.proc, 10)
        await reap(server.proc)


async def spawn_router(workdir: Path, config: dict[str, Any], checkout: Path) -> DaemonProcess:
    """`python -m router serve` from `checkout` (this one, or --baseline's)."""
    if checkout == REPO_ROOT:
        return await spawn_daemon(workdir, config)
    config_path = workdir / "router.yaml"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log_path = workdir / "daemon.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router",
            "serve",
            "--config",
            str(config_path),
            "--log-level",
            "warning",
            cwd=checkout,
            env={**os.environ, "PYTHONPATH": str(checkout)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_fd,
        )
    finally:
        os.close(log_fd)
    return DaemonProcess(proc, "127.0.0.1", config["server"]["port"], log_path)


async def router_run(
    scenario: str,
    body: tuple[bytes, int],
    load: Load,
    workdir: Path,
    *,
    evidence: bool,
    name: str = "router",
    checkout: Path = REPO_ROOT,
    workers: int = 1,
) -> Run:
    os.makedirs(workdir)
    config, archive = router_config(workdir, scenario, evidence=evidence, workers=workers)
    server = await spawn_router(workdir, config, checkout)
    try:
        await wait_ready(server)
        run = await measure(server, archive, scenario, body, load, workdir, name=name)
        async with aiohttp.ClientSession() as session:
            books = (await get_status(session, server.base_url))["targets"][TARGET_ID]
        if books["delivered"] != books["received"] or books["dead_lettered"]:
            raise RuntimeError(f"the router's books do not show every event delivered: {books}")
        code, _ = await stop_daemon(server)
        if code != 0:
            raise RuntimeError(f"the router exited with {code} on SIGTERM")
        return run
    except BaseException:
        server.print_log_tail()
        raise
    finally:
        await kill_if_running(server)


# ---------------------------------------------------------------------------------------------
# The report


def ratios(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Per scenario: router/floor (routes30: over the router's own batch100); with --baseline
    also base/floor and router/base."""
    by = {(r.server, r.scenario): r for r in runs}
    out: dict[str, dict[str, Any]] = {}

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if b else float("nan")

    pairs = []
    for server, scenario in by:
        if server == "floor":
            continue
        over = (server, "batch100") if scenario == "routes30" else ("floor", scenario)
        pairs.append((f"{server} {scenario}", (server, scenario), over))
        if server == "router" and ("base", scenario) in by:
            pairs.append((f"router/base {scenario}", (server, scenario), ("base", scenario)))
        if server.startswith("w") and ("router", scenario) in by:
            pairs.append((f"{server}/router {scenario}", (server, scenario), ("router", scenario)))
    for label, key, base_key in pairs:
        run, base = by[key], by.get(base_key)
        if base is None:
            continue
        out[label] = {
            "over": f"{base_key[0]} {base_key[1]}",
            "requests_per_s": ratio(run.requests_per_s, base.requests_per_s),
            "written_per_s": ratio(run.written_per_s, base.written_per_s),
            "p99": ratio(run.p99_ms, base.p99_ms),
            "cpu_per_event": ratio(run.cpu_us_per_event, base.cpu_us_per_event),
            "peak_rss": ratio(run.peak_rss_mb, base.peak_rss_mb),
        }
    return out


def format_report(report: dict[str, Any]) -> str:
    meta = report["meta"]
    out = [
        "",
        f"bench.compare: wrk {meta['threads']} threads x {meta['connections']} connections, "
        f"{meta['seconds']} s after a {meta['warmup_s']} s warm-up, {meta['event_bytes']} B "
        f"event, fsync always, file target, {meta['cpus']} CPUs, Python {meta['python']}",
        "",
    ]
    header = (
        f"{'server':<7}{'scenario':<10}{'req/s':>9}{'acc ev/s':>10}{'WRITTEN ev/s':>13}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'CPU us/ev':>10}{'RSS MB':>8}{'drain s':>8}{'errors':>7}"
        f"{'wrk CPU':>8}"
    )
    out += [header, "-" * len(header)]
    for run in report["runs"]:
        out.append(
            f"{run['server']:<7}{run['scenario']:<10}{run['requests_per_s']:>9.0f}"
            f"{run['accepted_per_s']:>10.0f}{run['written_per_s']:>13.0f}"
            f"{run['p50_ms']:>8.2f}{run['p99_ms']:>8.2f}{run['cpu_us_per_event']:>10.1f}"
            f"{run['peak_rss_mb']:>8.1f}{run['drain_s']:>8.2f}{run['errors']:>7}"
            f"{100 * run['client_cpu_s'] / run['seconds'] if run['seconds'] else 0:>7.0f}%"
        )
    out.append("")
    for label, r in report["ratios"].items():
        out.append(
            f"{label:<20} / {r['over']:<16} req/s {r['requests_per_s']:.2f}x  "
            f"WRITTEN ev/s {r['written_per_s']:.2f}x  p99 {r['p99']:.2f}x  "
            f"CPU/ev {r['cpu_per_event']:.2f}x  RSS {r['peak_rss']:.2f}x"
        )
    return "\n".join(out)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(
        seconds=args.seconds,
        warmup_s=args.warmup,
        threads=args.threads,
        connections=args.connections,
    )
    payloads = bodies()
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = Path(tempfile.mkdtemp(prefix="er-compare-"))
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="er-compare-")))
        for scenario in args.scenarios:
            if scenario != "routes30":
                runs.append(
                    await floor_run(
                        scenario, payloads[scenario], load, workdir / f"floor-{scenario}"
                    )
                )
            for workers in args.workers:
                name = worker_run_name(workers)
                runs.append(
                    await router_run(
                        scenario,
                        payloads[scenario],
                        load,
                        workdir / f"{name}-{scenario}",
                        evidence=args.evidence,
                        name=name,
                        workers=workers,
                    )
                )
            if args.baseline is not None:
                runs.append(
                    await router_run(
                        scenario,
                        payloads[scenario],
                        load,
                        workdir / f"base-{scenario}",
                        evidence=args.evidence,
                        name="base",
                        checkout=args.baseline.absolute(),
                        workers=args.baseline_workers,
                    )
                )
            # Each run's files go once measured: a long run writes gigabytes.
            if not args.keep:
                for path in workdir.iterdir():
                    shutil.rmtree(path, ignore_errors=True)
    return {
        "meta": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "seconds": load.seconds,
            "warmup_s": load.warmup_s,
            "threads": load.threads,
            "connections": load.connections,
            "event_bytes": EVENT_BYTES,
            "batch_size": BATCH_SIZE,
            "evidence": args.evidence,
        },
        "runs": [r.as_dict() for r in runs],
        "ratios": ratios(runs),
    }


def worker_run_name(workers: int) -> str:
    """`router` for one process (server.workers 1), `wN` for N worker processes."""
    return "router" if workers == 1 else f"w{workers}"


def worker_counts(value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or any(count < 1 for count in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError("expected distinct counts such as 1,2")
    return counts


def scenario_list(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names or any(name not in SCENARIOS for name in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list from {SCENARIOS}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="measured run (default 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--scenarios", type=scenario_list, default=SCENARIOS)
    parser.add_argument(
        "--workers",
        type=worker_counts,
        default=(1,),
        help="run the router once per server.workers value, e.g. 1,2 (default 1); a run with "
        "N workers is named wN and compared with the floor and with `router` (1)",
    )
    parser.add_argument(
        "--evidence",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the archive's hash chain (evidence.enabled, on by default, as in the daemon)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run the router of this checkout (e.g. a worktree of main) as `base`, "
        "after this one's, for before/after figures from one invocation",
    )
    parser.add_argument(
        "--baseline-workers",
        type=int,
        default=1,
        help="server.workers of the baseline's router (default 1): 2 compares w2 before/after",
    )
    parser.add_argument("--short", action="store_true", help="1 s runs: a smoke test (CI)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the servers' directories")
    parser.add_argument("--serve-floor", nargs=2, metavar=("PORT", "PATH"), help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.serve_floor:
        serve_floor(int(args.serve_floor[0]), Path(args.serve_floor[1]))
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    if args.short:
        args.seconds, args.warmup = 1.0, 0.5
    report = asyncio.run(run(args))
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
