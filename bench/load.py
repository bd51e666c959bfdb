"""Load generator: drives real `event-router serve` subprocesses and a null server on loopback.

`python -m bench.load [--seconds S | --requests N] [--concurrency C] [--fsync always,never]
[--json PATH]`

For each scenario (one event per POST, then a JSON array of `--batch-size` events per POST) the
same aiohttp client keeps `--concurrency` requests in flight against, first, the real daemon
once per `storage.fsync` mode in `--fsync` (a fresh daemon and journal each time; a file target
takes every event, as in the default config) and then a "null ingest" server that runs inside
this process and answers 202 without looking at the body. The report gives accepted events/s,
ack latency p50/p99, errors, the daemon's CPU and memory, the ratio router/null per mode, the
cost of durability (fsync never / fsync always, per scenario), and for every daemon run a
correctness check: every event the client got a 2xx for was counted by the daemon and written
exactly once to the NDJSON archive. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from router.evidence.verify import Report, Verifier, verify_files
from router.intake.validation import EventValidator
from router.resources import schemas_dir
from tests.fakes import make_event
from tests.helpers import free_port, ready, reap, spawn, terminate

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_ID = "archive"
# storage.fsync values (router/config.py StorageConfig); the cost of durability compares every
# other mode measured against `always`.
FSYNC_MODES = ("always", "interval", "never")
DURABLE_MODE = "always"
# location label -> the CRN location segment make_event puts in logSourceCRN ("" means global)
LOCATIONS = {"us-south": "us-south", "eu-de": "eu-de", "global": ""}
ACTIONS = (
    "secrets-manager.secret.create",
    "secrets-manager.secret.read",
    "secrets-manager.secrets.list",
    "secrets-manager.secret-metadata.update",
)
EVENT_VARIANTS = 60
BATCH_VARIANTS = 12
HEADERS = {"Content-Type": "application/json"}
REQUEST_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 120.0
# SIGTERM drains for up to shutdown.drain_timeout_s; allow that plus start-up slack.
DRAIN_TIMEOUT_S = 10.0
EXIT_TIMEOUT_S = DRAIN_TIMEOUT_S + 20.0
RSS_SAMPLE_S = 0.1
ERRORS_PRINTED = 20
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Payloads


def build_events(count: int) -> list[dict[str, Any]]:
    """Valid Secrets Manager events, varied by location, action, time and secret; no ids."""
    events = []
    labels = list(LOCATIONS)
    for i in range(count):
        label = labels[i % len(labels)]
        event = make_event(
            location=LOCATIONS[label],
            action=ACTIONS[i % len(ACTIONS)],
            eventTime=f"2024-05-01T12:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}+0000",
            message=f"Secrets Manager: bench event {i} in {label}",
        )
        event["target"] = {**event["target"], "name": f"db-password-{i}"}
        event.pop("id", None)  # the router assigns ids
        events.append(event)
    return events


def check_events(events: Sequence[dict[str, Any]]) -> None:
    """Fail fast, before any load, if the router's own validator would reject a bench event."""
    validator = EventValidator(schemas_dir())
    for index, event in enumerate(events):
        problems = validator.validate(event)
        if problems:
            raise SystemExit(f"bench event {index} is invalid: {problems}")


@dataclass(frozen=True, slots=True)
class Scenario:
    """One request shape: `events_per_request` events per POST, pre-encoded bodies in rotation."""

    name: str
    events_per_request: int
    bodies: tuple[bytes, ...]


def build_scenarios(batch_size: int) -> list[Scenario]:
    events = build_events(EVENT_VARIANTS)
    check_events(events)
    singles = tuple(orjson.dumps(event) for event in events)
    batches = tuple(
        orjson.dumps([events[(b * 7 + i) % len(events)] for i in range(batch_size)])
        for b in range(BATCH_VARIANTS)
    )
    return [
        Scenario("single", 1, singles),
        Scenario(f"batch{batch_size}", batch_size, batches),
    ]


# ---------------------------------------------------------------------------------------------
# The daemon's process: /proc readings


def proc_status_kb(pid: int, key: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: field 3 is state, so utime and stime (14, 15) are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class RssSampler:
    """Polls VmRSS of a process every `interval_s` while a run lasts; keeps the largest value
    seen and every sample as (seconds since start, kB)."""

    pid: int
    interval_s: float = RSS_SAMPLE_S
    max_kb: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list, repr=False)
    _started: float = field(default_factory=time.monotonic)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._poll(), name=f"rss:{self.pid}")

    def elapsed_s(self) -> float:
        """Seconds since start(), on the clock of `samples`."""
        return time.monotonic() - self._started

    async def stop(self) -> int:
        self._stop.set()
        if self._task is not None:
            await self._task
        self._sample()
        return self.max_kb

    def _sample(self) -> None:
        rss = proc_status_kb(self.pid, "VmRSS")
        if rss is not None:
            self.max_kb = max(self.max_kb, rss)
            self.samples.append((time.monotonic() - self._started, rss))

    async def _poll(self) -> None:
        while not self._stop.is_set():
            self._sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)


# ---------------------------------------------------------------------------------------------
# The client


@dataclass(slots=True)
class ErrorLog:
    """Every non-2xx answer or failed request: the first few printed in full, all counted."""

    counts: Counter[str] = field(default_factory=Counter)
    printed: int = 0

    def record(self, where: str, what: str) -> None:
        key = f"{where}: {what[:200]}"
        self.counts[key] += 1
        if self.printed < ERRORS_PRINTED:
            self.printed += 1
            print(f"  ERROR {key}", file=sys.stderr, flush=True)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(slots=True)
class RunResult:
    """What one scenario did against one server."""

    scenario: str
    server: str
    events_per_request: int
    fsync: str | None = None  # storage.fsync of the daemon; None for the null server
    requests: int = 0
    ok_requests: int = 0
    ok_events: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    client_cpu_s: float = 0.0
    daemon_cpu_s: float | None = None
    daemon_rss_max_mb: float | None = None
    backlog_at_end: int | None = None
    drain_s: float | None = None
    cut_short: bool = False

    @property
    def events_per_s(self) -> float:
        return self.ok_events / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.ok_requests / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of the 2xx ack latencies."""
        values = sorted(self.latencies_ms)
        if not values:
            return math.nan
        return values[max(0, math.ceil(q * len(values)) - 1)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "server": self.server,
            "fsync": self.fsync,
            "events_per_request": self.events_per_request,
            "requests": self.requests,
            "ok_requests": self.ok_requests,
            "ok_events": self.ok_events,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "events_per_s": round(self.events_per_s, 1),
            "requests_per_s": round(self.requests_per_s, 1),
            "latency_ms": {
                "p50": round(self.percentile_ms(0.50), 3),
                "p90": round(self.percentile_ms(0.90), 3),
                "p99": round(self.percentile_ms(0.99), 3),
                "max": round(max(self.latencies_ms, default=math.nan), 3),
            },
            "client_cpu_pct": round(100 * self.client_cpu_s / self.elapsed_s, 1)
            if self.elapsed_s
            else None,
            "daemon_cpu_pct": round(100 * self.daemon_cpu_s / self.elapsed_s, 1)
            if self.daemon_cpu_s is not None and self.elapsed_s
            else None,
            "daemon_rss_max_mb": self.daemon_rss_max_mb,
            "backlog_at_end": self.backlog_at_end,
            "drain_s": self.drain_s,
            "cut_short": self.cut_short,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Load:
    """How hard and how long: `requests` per scenario if set, else `seconds`."""

    concurrency: int
    seconds: float
    requests: int | None
    max_seconds: float


async def drive(
    url: str,
    scenario: Scenario,
    load: Load,
    errors: ErrorLog,
    *,
    server: str,
    fsync: str | None = None,
    daemon_pid: int | None = None,
) -> RunResult:
    """Keep `load.concurrency` POSTs in flight until the time or request budget is spent."""
    result = RunResult(scenario.name, server, scenario.events_per_request, fsync=fsync)
    bodies = scenario.bodies
    budget_s = load.max_seconds if load.requests is not None else load.seconds
    issued = 0
    where = "/".join(part for part in (server, fsync, scenario.name) if part)
    connector = aiohttp.TCPConnector(limit=load.concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    sampler = RssSampler(daemon_pid) if daemon_pid is not None else None

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        while time.monotonic() < deadline:
            if load.requests is not None and issued >= load.requests:
                return
            body = bodies[issued % len(bodies)]
            issued += 1
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=HEADERS) as response:
                    answer = await response.read()
                    latency_ms = (time.perf_counter() - started) * 1000
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.errors += 1
                errors.record(where, f"{type(exc).__name__}: {exc}")
                continue
            if 200 <= status < 300:
                result.ok_requests += 1
                result.ok_events += scenario.events_per_request
                result.latencies_ms.append(latency_ms)
            else:
                result.errors += 1
                errors.record(where, f"HTTP {status}: {answer.decode('utf-8', 'replace')}")

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        cpu_before = time.process_time()
        daemon_cpu_before = proc_cpu_s(daemon_pid) if daemon_pid is not None else 0.0
        if sampler is not None:
            sampler.start()
        started = time.perf_counter()
        deadline = time.monotonic() + budget_s
        await asyncio.gather(*(worker(session) for _ in range(load.concurrency)))
        result.elapsed_s = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu_before
        if daemon_pid is not None:
            result.daemon_cpu_s = proc_cpu_s(daemon_pid) - daemon_cpu_before
        if sampler is not None:
            result.daemon_rss_max_mb = round(await sampler.stop() / 1024, 1)
    result.requests = issued
    result.cut_short = load.requests is not None and issued < load.requests
    return result


# ---------------------------------------------------------------------------------------------
# The real daemon


def archive_config(
    workdir: Path, port: int, fsync: str, *, evidence: bool = True
) -> tuple[dict[str, Any], Path]:
    """A config like the embedded default, with `storage.fsync` set: one file target that takes
    every event (its hash chain written unless `evidence` is off: --no-evidence). Returns the
    config and the path of the NDJSON archive."""
    archive = workdir / "var" / "events.ndjson"
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"path": str(workdir / "var"), "fsync": fsync},
        "shutdown": {"drain_timeout_s": DRAIN_TIMEOUT_S},
        # The start-up test write would add one event the load generator did not send.
        "startup": {"validate_targets": False},
        "targets": [
            {
                "id": TARGET_ID,
                "name": "Bench archive",
                "target_type": "file",
                # Default rotation size (so rotation is exercised); enough files to keep all.
                # The archive's own fsync stays at its default (on) in every storage.fsync mode.
                "file_endpoint": {"path": str(archive), "max_files": 100},
            }
        ],
        "routes": [
            {"name": "everything", "rules": [{"locations": ["*"], "target_ids": [TARGET_ID]}]}
        ],
        "evidence": {"enabled": evidence},
    }
    return config, archive


@dataclass(slots=True)
class DaemonProcess:
    """`event-router serve` in a subprocess, its base URL, and where its stderr goes."""

    proc: asyncio.subprocess.Process
    host: str
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()

    def print_log_tail(self, lines: int = 20) -> None:
        print("the run failed; the daemon's log ends with:", file=sys.stderr)
        for line in self.log_lines()[-lines:]:
            print(f"  {line[:500]}", file=sys.stderr)


async def spawn_daemon(workdir: Path, config: dict[str, Any]) -> DaemonProcess:
    """Write `config` to `workdir/router.yaml` and start `python -m router serve` on it; its
    stderr (warnings and errors) goes to `workdir/daemon.log`."""
    config_path = workdir / "router.yaml"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    log_path = workdir / "daemon.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = await spawn(
            config_path,
            "--log-level",
            "warning",
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_fd,
        )
    finally:
        os.close(log_fd)  # the child has its own copy
    server = config["server"]
    return DaemonProcess(proc, server["host"], server["port"], log_path)


async def wait_ready(daemon: DaemonProcess) -> None:
    """Until /readyz answers 200 (tests.helpers.ready); a daemon that exits first fails."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if daemon.proc.returncode is not None:
            raise RuntimeError(f"the daemon exited with {daemon.proc.returncode} during start-up")
        if await ready(daemon.port, daemon.host):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the daemon was not ready within {READY_TIMEOUT_S}s")


async def get_status(session: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    async with session.get(f"{base_url}/v1/status") as response:
        response.raise_for_status()
        status: dict[str, Any] = orjson.loads(await response.read())
        return status


def pending(status: dict[str, Any]) -> int:
    return sum(int(target["pending"]) for target in status["targets"].values())


async def settle(
    session: aiohttp.ClientSession, base_url: str, timeout_s: float
) -> tuple[dict[str, Any], float, bool]:
    """Wait for every target's backlog to empty: (last status, seconds waited, settled?)."""
    started = time.monotonic()
    while True:
        status = await get_status(session, base_url)
        waited = time.monotonic() - started
        if pending(status) == 0:
            return status, waited, True
        if waited > timeout_s:
            return status, waited, False
        await asyncio.sleep(0.05)


async def stop_daemon(
    daemon: DaemonProcess, timeout_s: float = EXIT_TIMEOUT_S
) -> tuple[int | None, float]:
    """SIGTERM, then wait for the drain; (exit code or None if it had to be killed, seconds)."""
    started = time.monotonic()
    try:
        code = await terminate(daemon.proc, timeout_s)
    except TimeoutError:
        await reap(daemon.proc)
        return None, time.monotonic() - started
    return code, time.monotonic() - started


async def kill_if_running(daemon: DaemonProcess) -> None:
    """After a failed run: the daemon must not outlive the bench."""
    await reap(daemon.proc)


def read_archive(archive: Path) -> tuple[int, int, int]:
    """(lines, distinct ids, files) over the live NDJSON file and its rotated siblings."""
    files = [archive, *sorted(archive.parent.glob(archive.name + ".*"))]
    lines = 0
    ids: set[str] = set()
    present = 0
    for path in files:
        if not path.exists():
            continue
        present += 1
        with open(path, "rb") as f:
            for line in f:
                # Checkpoint lines of the evidence chain are not events.
                if line.strip() and not line.startswith(b'{"_checkpoint":'):
                    lines += 1
                    ids.add(orjson.loads(line).get("id", ""))
    return lines, len(ids), present


@dataclass(slots=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(slots=True)
class DaemonRun:
    """One daemon's life in the bench: its fsync mode, its scenarios, memory, exit, checks."""

    fsync: str
    runs: list[RunResult] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    idle_rss_kb: int = 0
    hwm_kb: int = 0
    end_rss_kb: int = 0
    exit_code: int | None = None
    stop_s: float = 0.0
    log: list[str] = field(default_factory=list)

    @property
    def events_acked(self) -> int:
        return sum(r.ok_events for r in self.runs)

    def as_dict(self) -> dict[str, Any]:
        vmhwm_mb = round(self.hwm_kb / 1024, 1)
        return {
            "fsync": self.fsync,
            "idle_rss_mb": round(self.idle_rss_kb / 1024, 1),
            # VmHWM can lag VmRSS by a little (the kernel folds per-thread RSS counters in
            # lazily), so the peak is the larger of it and the highest VmRSS sample.
            "vmhwm_mb": vmhwm_mb,
            "rss_sample_max_mb": max((r.daemon_rss_max_mb or 0.0 for r in self.runs), default=0),
            "peak_rss_mb": max(vmhwm_mb, *(r.daemon_rss_max_mb or 0.0 for r in self.runs)),
            "end_rss_mb": round(self.end_rss_kb / 1024, 1),
            "exit_code": self.exit_code,
            "stop_s": round(self.stop_s, 3),
            "log_lines": len(self.log),
            "log_tail": self.log[-10:],
            "correctness": {
                "pass": all(c.ok for c in self.checks),
                "events_acked": self.events_acked,
                "checks": [c.as_dict() for c in self.checks],
            },
        }


async def run_daemon(
    fsync: str,
    scenarios: Sequence[Scenario],
    load: Load,
    errors: ErrorLog,
    workdir: Path,
    *,
    evidence: bool = True,
) -> DaemonRun:
    """Start a fresh daemon with `storage.fsync: <fsync>`, run every scenario against it, stop
    it with SIGTERM and check that every event it acknowledged was archived exactly once."""
    config, archive = archive_config(workdir, free_port(), fsync, evidence=evidence)
    daemon = await spawn_daemon(workdir, config)
    result = DaemonRun(fsync)
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        ) as control:
            await wait_ready(daemon)
            result.idle_rss_kb = proc_status_kb(daemon.pid, "VmRSS") or 0
            url = f"{daemon.base_url}/v1/events"
            for scenario in scenarios:
                print(f"router    fsync {fsync:<8} {scenario.name:<10} ...", file=sys.stderr)
                run = await drive(
                    url,
                    scenario,
                    load,
                    errors,
                    server="router",
                    fsync=fsync,
                    daemon_pid=daemon.pid,
                )
                status = await get_status(control, daemon.base_url)
                run.backlog_at_end = pending(status)
                _, waited, _ = await settle(control, daemon.base_url, SETTLE_TIMEOUT_S)
                run.drain_s = round(waited, 3)
                result.runs.append(run)
            status, _, settled = await settle(control, daemon.base_url, SETTLE_TIMEOUT_S)
        result.hwm_kb = proc_status_kb(daemon.pid, "VmHWM") or 0
        result.end_rss_kb = proc_status_kb(daemon.pid, "VmRSS") or 0
        result.exit_code, result.stop_s = await stop_daemon(daemon)
    except BaseException:
        daemon.print_log_tail()
        raise
    finally:
        await kill_if_running(daemon)
    lines, distinct_ids, files = await asyncio.to_thread(read_archive, archive)
    result.log = daemon.log_lines()

    sent = result.events_acked
    target = status["targets"][TARGET_ID]
    ingest = status["ingest"]
    result.checks = [
        Check("pending 0 after the run", settled, f"pending {pending(status)}"),
        Check(
            "ingest.accepted == events acked 2xx",
            ingest["accepted"] == sent,
            f"{ingest['accepted']} vs {sent}",
        ),
        Check(
            "nothing rejected or refused",
            ingest["rejected"] == 0 and not ingest["refused_requests"],
            f"rejected {ingest['rejected']}, refused {ingest['refused_requests']}",
        ),
        Check(
            "target delivered == events acked 2xx, none dead-lettered",
            target["delivered"] == sent and target["dead_lettered"] == 0,
            f"delivered {target['delivered']}, dead-lettered {target['dead_lettered']}",
        ),
        Check(
            "NDJSON lines == events acked 2xx", lines == sent, f"{lines} lines in {files} file(s)"
        ),
        Check("every line a distinct id", distinct_ids == lines, f"{distinct_ids} distinct ids"),
        Check(
            "SIGTERM exits 0",
            result.exit_code == 0,
            f"exit {result.exit_code} after {result.stop_s:.2f}s",
        ),
    ]
    if evidence:
        report = await asyncio.to_thread(verify_archive, archive)
        result.checks.append(
            Check(
                "event-router verify: the archive's chain is intact",
                report.ok and report.events == sent,
                report.broken or report.summary(),
            )
        )
    return result


def verify_archive(archive: Path) -> Report:
    """What `event-router verify` says of the archive and its rotated siblings."""
    files = [archive, *archive.parent.glob(archive.name + ".*")]
    return verify_files([path for path in files if path.exists()], Verifier())


# ---------------------------------------------------------------------------------------------
# The null server: the same client against a server that does nothing


async def null_ingest(request: web.Request) -> web.Response:
    await request.read()  # take the body off the socket, as any server must; nothing more
    return web.Response(status=202)


async def start_null_server() -> tuple[web.AppRunner, str]:
    app = web.Application(client_max_size=64 * MiB)
    app.router.add_post("/v1/events", null_ingest)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/v1/events"


# ---------------------------------------------------------------------------------------------
# The run and its report


def durability_cost(
    daemons: Sequence[DaemonRun], scenarios: Sequence[Scenario]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per mode other than `always`, per scenario: both modes' figures and mode/always events/s.

    Empty unless `always` was measured along with at least one other mode."""
    by_mode = {d.fsync: {r.scenario: r for r in d.runs} for d in daemons}
    if DURABLE_MODE not in by_mode:
        return {}
    cost: dict[str, dict[str, dict[str, Any]]] = {}
    for mode, runs in by_mode.items():
        if mode == DURABLE_MODE:
            continue
        cost[mode] = {}
        for scenario in scenarios:
            durable, fast = by_mode[DURABLE_MODE][scenario.name], runs[scenario.name]
            ratio = fast.events_per_s / durable.events_per_s if durable.events_per_s else math.nan
            cost[mode][scenario.name] = {
                "events_per_s": {
                    DURABLE_MODE: round(durable.events_per_s, 1),
                    mode: round(fast.events_per_s, 1),
                },
                "p50_ms": {
                    DURABLE_MODE: round(durable.percentile_ms(0.50), 3),
                    mode: round(fast.percentile_ms(0.50), 3),
                },
                "p99_ms": {
                    DURABLE_MODE: round(durable.percentile_ms(0.99), 3),
                    mode: round(fast.percentile_ms(0.99), 3),
                },
                f"ratio_{mode}_over_{DURABLE_MODE}": round(ratio, 3),
            }
    return cost


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(
        concurrency=args.concurrency,
        seconds=args.seconds,
        requests=args.requests,
        max_seconds=args.max_seconds,
    )
    scenarios = build_scenarios(args.batch_size)
    errors = ErrorLog()
    daemons: list[DaemonRun] = []
    null_runs: list[RunResult] = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = Path(tempfile.mkdtemp(prefix="event-router-bench-"))
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="er-bench-")))
        for fsync in args.fsync:
            # A fresh daemon and journal per mode, so no run inherits another's file or cache.
            daemon_dir = workdir / f"fsync-{fsync}"
            daemon_dir.mkdir()
            daemons.append(
                await run_daemon(fsync, scenarios, load, errors, daemon_dir, evidence=args.evidence)
            )

    runner, null_url = await start_null_server()
    try:
        for scenario in scenarios:
            print(f"null      {'':<14} {scenario.name:<10} ...", file=sys.stderr, flush=True)
            null_runs.append(await drive(null_url, scenario, load, errors, server="null"))
    finally:
        await runner.cleanup()

    null_by_scenario = {n.scenario: n for n in null_runs}
    ratios = {
        d.fsync: {
            r.scenario: round(
                r.events_per_s / null_by_scenario[r.scenario].events_per_s
                if null_by_scenario[r.scenario].events_per_s
                else math.nan,
                3,
            )
            for r in d.runs
        }
        for d in daemons
    }
    report: dict[str, Any] = {
        "meta": {
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "cpus": os.cpu_count(),
            "concurrency": load.concurrency,
            "seconds": None if load.requests is not None else load.seconds,
            "requests": load.requests,
            "batch_size": args.batch_size,
            "fsync": list(args.fsync),
            "event_bytes": round(sum(map(len, scenarios[0].bodies)) / len(scenarios[0].bodies)),
            "target": "file (its own fsync on), default batch (500 events / 1 MiB / 0.2 s)",
            "evidence": args.evidence,
        },
        "runs": [r.as_dict() for d in daemons for r in d.runs] + [n.as_dict() for n in null_runs],
        "ratio_router_over_null": ratios,
        "cost_of_durability": durability_cost(daemons, scenarios),
        "daemons": [d.as_dict() for d in daemons],
        "errors": {"total": errors.total, "by_kind": dict(errors.counts.most_common(20))},
        "correctness": {
            "pass": all(c.ok for d in daemons for c in d.checks),
            "events_acked": sum(d.events_acked for d in daemons),
        },
    }
    if args.keep:
        report["meta"]["workdir"] = str(workdir)
    return report


def format_durability(cost: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    out: list[str] = []
    for mode, scenarios in cost.items():
        out += [
            "",
            f"cost of durability: storage.fsync {DURABLE_MODE} vs {mode} "
            f"(same client and load; ratio = {mode} events/s / {DURABLE_MODE} events/s)",
        ]
        a, b = DURABLE_MODE[:6], mode[:6]
        header = (
            f"{'scenario':<10}{'events/s ' + a:>16}{b:>9}{'ratio':>8}"
            f"{'p50 ms ' + a:>16}{b:>9}{'p99 ms ' + a:>16}{b:>9}"
        )
        out += [header, "-" * len(header)]
        for name, c in scenarios.items():
            eps, p50, p99 = c["events_per_s"], c["p50_ms"], c["p99_ms"]
            ratio = c[f"ratio_{mode}_over_{DURABLE_MODE}"]
            out.append(
                f"{name:<10}{eps[DURABLE_MODE]:>16.0f}{eps[mode]:>9.0f}{ratio:>7.2f}x"
                f"{p50[DURABLE_MODE]:>16.2f}{p50[mode]:>9.2f}"
                f"{p99[DURABLE_MODE]:>16.2f}{p99[mode]:>9.2f}"
            )
    return out


def format_report(report: dict[str, Any]) -> str:
    meta = report["meta"]
    budget = (
        f"{meta['requests']} requests" if meta["requests"] is not None else f"{meta['seconds']}s"
    )
    out = [
        "",
        f"event-router load: {budget} per scenario, {meta['concurrency']} in flight, "
        f"{meta['cpus']} CPUs, Python {meta['python']}, aiohttp {meta['aiohttp']}, "
        f"~{meta['event_bytes']} B/event, storage.fsync {','.join(meta['fsync'])}, "
        f"target {meta['target']}",
        "",
    ]
    header = (
        f"{'server':<7}{'fsync':<7}{'scenario':<10}{'requests':>9}{'events':>9}{'errors':>7}"
        f"{'events/s':>10}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        f"{'cli CPU':>8}{'rtr CPU':>8}{'RSS MB':>8}{'backlog':>8}{'drain s':>8}"
    )
    out += [header, "-" * len(header)]

    def opt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}%"

    for run in report["runs"]:
        lat = run["latency_ms"]
        out.append(
            f"{run['server']:<7}{run['fsync'] or '-':<7}{run['scenario']:<10}"
            f"{run['requests']:>9}{run['ok_events']:>9}"
            f"{run['errors']:>7}{run['events_per_s']:>10.0f}{run['requests_per_s']:>8.0f}"
            f"{lat['p50']:>8.2f}{lat['p99']:>8.2f}{lat['max']:>8.1f}"
            f"{pct(run['client_cpu_pct']):>8}{pct(run['daemon_cpu_pct']):>8}"
            f"{opt(run['daemon_rss_max_mb'], '.1f'):>8}{opt(run['backlog_at_end'], 'd'):>8}"
            f"{opt(run['drain_s'], '.2f'):>8}"
            + ("  (cut short by --max-seconds)" if run["cut_short"] else "")
        )
    out.append("")
    for fsync, ratios in report["ratio_router_over_null"].items():
        for scenario, ratio in ratios.items():
            out.append(f"ratio router/null events/s, fsync {fsync:<7} {scenario:<10} {ratio:6.3f}")
    cost = report["cost_of_durability"]
    if cost:
        out += format_durability(cost)
    else:
        out.append(f"(no cost of durability: --fsync needs {DURABLE_MODE} and another mode)")
    out.append("")
    for daemon in report["daemons"]:
        out.append(
            f"daemon fsync {daemon['fsync']}: RSS idle {daemon['idle_rss_mb']} MB, "
            f"peak {daemon['peak_rss_mb']} MB (VmHWM {daemon['vmhwm_mb']} MB, highest VmRSS "
            f"sample {daemon['rss_sample_max_mb']} MB), at end {daemon['end_rss_mb']} MB"
        )
    out.append(f"errors: {report['errors']['total']}")
    for kind, count in report["errors"]["by_kind"].items():
        out.append(f"  {count:>7} x {kind}")
    for daemon in report["daemons"]:
        if daemon["log_lines"]:
            out.append(
                f"daemon fsync {daemon['fsync']} logged {daemon['log_lines']} line(s) at "
                "warning or above; last ones:"
            )
            out += [f"  {line[:300]}" for line in daemon["log_tail"]]
    for daemon in report["daemons"]:
        correctness = daemon["correctness"]
        out.append("")
        for check in correctness["checks"]:
            out.append(f"  [{'ok' if check['ok'] else 'FAIL'}] {check['name']}: {check['detail']}")
        verdict = "PASS" if correctness["pass"] else "FAIL"
        out.append(
            f"correctness, fsync {daemon['fsync']}: {verdict} "
            f"({correctness['events_acked']} events acked 2xx)"
        )
    verdict = "PASS" if report["correctness"]["pass"] else "FAIL"
    out.append(f"correctness: {verdict}")
    return "\n".join(out)


def fsync_modes(value: str) -> tuple[str, ...]:
    """`--fsync always,never` -> ("always", "never"): known modes, each once, in that order."""
    modes = tuple(mode.strip() for mode in value.split(",") if mode.strip())
    unknown = [mode for mode in modes if mode not in FSYNC_MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of distinct modes from {', '.join(FSYNC_MODES)}"
        )
    return modes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description="Load-test a real event-router daemon against a null server on loopback.",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--seconds", type=float, default=10.0, help="duration of each scenario (default 10)"
    )
    budget.add_argument("--requests", type=int, help="requests per scenario instead of --seconds")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=300.0,
        help="with --requests, stop a scenario after this long anyway (default 300)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--batch-size", type=int, default=100, help="events per batch request")
    parser.add_argument(
        "--fsync",
        type=fsync_modes,
        default=(DURABLE_MODE, "never"),
        help="storage.fsync modes to run the daemon with, one daemon run each, in this order "
        "(default always,never)",
    )
    parser.add_argument(
        "--evidence",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the archive's hash chain and checkpoints (evidence.enabled; default on): run "
        "once with and once with --no-evidence to see what the chain costs",
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the daemons' temp directory")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1 or args.batch_size < 1 or (args.requests or 1) < 1:
        raise SystemExit("--concurrency, --batch-size and --requests must be at least 1")
    finish(asyncio.run(run(args)), format_report, args.json)


def finish(
    report: dict[str, Any], text: Callable[[dict[str, Any]], str], json_path: Path | None
) -> None:
    """Print the report (and write it as JSON if asked); exit 1 when its correctness check
    failed, so a bench that lost or repeated events fails its caller (CI's smoke runs)."""
    print(text(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"JSON report: {json_path}")
    sys.exit(0 if report["correctness"]["pass"] else 1)


if __name__ == "__main__":
    main()
