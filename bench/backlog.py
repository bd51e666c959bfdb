"""Backlog bench: peak memory and drain rate of a real daemon whose only target is down.

`python -m bench.backlog [--events N] [--drain-timeout S] [--json PATH]`

Starts `event-router serve` as a subprocess with one `http` target whose URL is a closed port on
127.0.0.1 (retries effectively unbounded, so nothing is dead-lettered) and `storage.fsync:
always`. Posts `--events` events (each with a unique id) in batches of `--batch-size` with
`--concurrency` requests in flight, while sampling the daemon's VmRSS; confirms in /v1/status
that every acknowledged event is pending. Then opens a null receiver on the target's port and
measures how fast the backlog drains, checking that every acknowledged id arrived (and how many
arrived twice). Reports ingest events/s, peak RSS (VmHWM), RSS at the end of ingest, journal
size and drain events/s. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import math
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench.compare import cpu_s, tree
from bench.load import (
    Check,
    DaemonProcess,
    ErrorLog,
    RssSampler,
    build_events,
    check_events,
    finish,
    get_status,
    kill_if_running,
    pending,
    proc_status_kb,
    spawn_daemon,
    stop_daemon,
    wait_ready,
)
from tests.helpers import free_port

TARGET_ID = "downstream"
ID_PREFIX = "bl-"
EVENT_VARIANTS = 60
HEADERS = {"Content-Type": "application/json"}
GiB = 1024 * 1024 * 1024
MiB = 1024 * 1024
RSS_SAMPLE_S = 0.5
STATUS_POLL_S = 0.25
# A 1000-event batch waits for one group commit; allow for a slow disk under load.
REQUEST_TIMEOUT_S = 120.0
CONTROL_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 10.0  # the daemon's shutdown.drain_timeout_s
EXIT_TIMEOUT_S = DRAIN_TIMEOUT_S + 20.0
CLOSED_PORT_TRIES = 20
# The worker retries the target every <= this many seconds while it is down, so the drain
# starts at most this long after the receiver opens (reported as "first delivery after").
MAX_BACKOFF_S = 1.0


# ---------------------------------------------------------------------------------------------
# Events with unique ids, built from a few pre-encoded variants


def event_id(index: int) -> str:
    return f"{ID_PREFIX}{index:08d}"


def id_index(value: Any, events: int) -> int | None:
    """The bench index of an id, or None for an id this run never sent."""
    if not isinstance(value, str) or not value.startswith(ID_PREFIX):
        return None
    digits = value[len(ID_PREFIX) :]
    if not digits.isdigit():
        return None
    index = int(digits)
    return index if index < events else None


@dataclass(frozen=True, slots=True)
class Payloads:
    """Encoded events without an id (`{...}`); `batch` splices `"id":"bl-N",` into each."""

    variants: tuple[bytes, ...]
    batch_size: int
    events: int

    @classmethod
    def build(cls, batch_size: int, events: int) -> Payloads:
        bodies = build_events(EVENT_VARIANTS)
        variants = tuple(orjson.dumps(body) for body in bodies)
        payloads = cls(variants, batch_size, events)
        # The spliced form must be exactly what the router's validator accepts.
        check_events([orjson.loads(payloads.event(i)) for i in range(len(variants))])
        return payloads

    @property
    def batches(self) -> int:
        return math.ceil(self.events / self.batch_size)

    def bounds(self, batch: int) -> range:
        return range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.events))

    def event(self, index: int) -> bytes:
        variant = self.variants[index % len(self.variants)]
        return b'{"id":"' + event_id(index).encode() + b'",' + variant[1:]

    def batch(self, batch: int) -> bytes:
        return b"[" + b",".join(self.event(i) for i in self.bounds(batch)) + b"]"


# ---------------------------------------------------------------------------------------------
# The daemon: one http target on a closed port


def closed_port() -> int:
    """A loopback port that refuses connections now (nobody listens on it)."""
    for _ in range(CLOSED_PORT_TRIES):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED:
                return port
    raise RuntimeError(f"no closed port on 127.0.0.1 after {CLOSED_PORT_TRIES} tries")


def backlog_config(
    workdir: Path, port: int, target_port: int, max_bytes: int, workers: int = 1
) -> dict[str, Any]:
    """fsync always, a journal big enough for the whole backlog, one http target that is down
    and retried without limit (so nothing is dead-lettered), taking every event."""
    return {
        "server": {"host": "127.0.0.1", "port": port, "workers": workers},
        "storage": {"path": str(workdir / "var"), "fsync": "always", "max_bytes": max_bytes},
        "shutdown": {"drain_timeout_s": DRAIN_TIMEOUT_S},
        # The start-up test write would add one event the load generator did not send.
        "startup": {"validate_targets": False},
        "targets": [
            {
                "id": TARGET_ID,
                "name": "Bench downstream",
                "target_type": "http",
                "http_endpoint": {"url": f"http://127.0.0.1:{target_port}/ingest"},
                "retry": {
                    "max_attempts": 1_000_000_000,
                    "max_age_s": 1_000_000_000,
                    "initial_backoff_s": 0.1,
                    "max_backoff_s": MAX_BACKOFF_S,
                },
            }
        ],
        "routes": [
            {"name": "everything", "rules": [{"locations": ["*"], "target_ids": [TARGET_ID]}]}
        ],
    }


def tree_kb(pid: int, name: str) -> int:
    """A /proc/<pid>/status figure (VmRSS, VmHWM) summed over the daemon's processes: the
    journal owner and its workers with server.workers > 1 (summed peaks: an upper bound)."""
    return sum(proc_status_kb(one, name) or 0 for one in tree(pid))


def by_process_mb(pid: int, name: str) -> dict[str, float]:
    """A /proc/<pid>/status figure per process, in MB: the owner first, then its workers (by
    process id): where a sum over processes goes."""
    found = {}
    for index, one in enumerate([pid, *sorted(set(tree(pid)) - {pid})]):
        kb = proc_status_kb(one, name)
        if kb is not None:
            found["owner" if index == 0 else f"worker {one}"] = round(kb / 1024, 1)
    return found


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the daemon's processes (owner and workers)."""
    return cpu_s(tree(pid))


class TreeRssSampler(RssSampler):
    """RssSampler over the daemon's processes: each sample is their VmRSS summed."""

    __slots__ = ()

    def _sample(self) -> None:
        rss = tree_kb(self.pid, "VmRSS")
        if rss:
            self.max_kb = max(self.max_kb, rss)
            self.samples.append((time.monotonic() - self._started, rss))


def proc_write_bytes(pid: int) -> int:
    """Bytes the process has caused to be written to storage (`write_bytes` of /proc/<pid>/io):
    journal, WAL, checkpoints and vacuum, as the block layer sees them."""
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def journal_disk_bytes(workdir: Path) -> int:
    """The journal's files on disk (database, WAL, shared memory)."""
    var = workdir / "var"
    return sum(p.stat().st_size for p in var.glob("journal.db*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# Ingest: grow the backlog


@dataclass(slots=True)
class IngestResult:
    posted_events: int = 0
    acked_events: int = 0
    requests: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    daemon_cpu_s: float = 0.0
    cut_short: bool = False
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    progress: list[dict[str, Any]] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.acked_events / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        values = sorted(self.latencies_ms)
        if not values:
            return math.nan
        return values[max(0, math.ceil(q * len(values)) - 1)]


async def ingest(
    daemon: DaemonProcess,
    payloads: Payloads,
    acked: bytearray,
    errors: ErrorLog,
    *,
    concurrency: int,
    progress_every: int,
    timeout_s: float,
) -> IngestResult:
    """Post every batch once (no resend: a failed request is an error, its events are not
    acknowledged), `concurrency` in flight; mark acknowledged batches in `acked`."""
    result = IngestResult()
    url = f"{daemon.base_url}/v1/events"
    next_batch = 0
    next_report = progress_every
    last_report = (0.0, 0)
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    cpu_before = proc_cpu_s(daemon.pid)

    def report_progress() -> None:
        nonlocal next_report, last_report
        now = time.perf_counter() - started
        window_s, window_events = now - last_report[0], result.acked_events - last_report[1]
        rss_kb = tree_kb(daemon.pid, "VmRSS")
        row = {
            "acked": result.acked_events,
            "elapsed_s": round(now, 2),
            "events_per_s": round(result.acked_events / now, 1) if now else 0.0,
            "window_events_per_s": round(window_events / window_s, 1) if window_s else 0.0,
            "rss_mb": round(rss_kb / 1024, 1),
        }
        result.progress.append(row)
        print(
            f"  ingest {row['acked']:>9} acked  {now:7.1f}s  {row['events_per_s']:>8.0f} ev/s "
            f"(last {window_events}: {row['window_events_per_s']:>8.0f} ev/s)  "
            f"RSS {row['rss_mb']:.1f} MB",
            file=sys.stderr,
            flush=True,
        )
        last_report = (now, result.acked_events)
        while next_report <= result.acked_events:
            next_report += progress_every

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_batch
        while next_batch < payloads.batches:
            if time.monotonic() >= deadline:
                result.cut_short = True
                return
            batch = next_batch
            next_batch += 1
            body = payloads.batch(batch)
            count = len(payloads.bounds(batch))
            result.requests += 1
            result.posted_events += count
            sent_at = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=HEADERS) as response:
                    answer = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.errors += 1
                errors.record("ingest", f"{type(exc).__name__}: {exc}")
                continue
            accepted = orjson.loads(answer).get("accepted") if 200 <= status < 300 else None
            if accepted != count:
                result.errors += 1
                errors.record(
                    "ingest", f"HTTP {status} ({accepted} of {count} accepted): {answer[:300]!r}"
                )
                continue
            result.latencies_ms.append((time.perf_counter() - sent_at) * 1000)
            acked[batch] = 1
            result.acked_events += count
            if result.acked_events >= next_report:
                report_progress()

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    ) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    result.daemon_cpu_s = proc_cpu_s(daemon.pid) - cpu_before
    if not result.progress or result.progress[-1]["acked"] != result.acked_events:
        report_progress()
    return result


# ---------------------------------------------------------------------------------------------
# Drain: the target comes back


@dataclass(slots=True)
class NullReceiver:
    """The target come back: answers 200 to every batch and counts each id it sees."""

    events: int
    counts: bytearray = field(init=False)
    requests: int = 0
    received: int = 0
    unexpected: int = 0
    first_at: float | None = None
    last_at: float | None = None

    def __post_init__(self) -> None:
        self.counts = bytearray(self.events)

    async def handle(self, request: web.Request) -> web.Response:
        batch = orjson.loads(await request.read())
        now = time.monotonic()
        self.first_at = self.first_at or now
        self.last_at = now
        self.requests += 1
        self.received += len(batch)
        for event in batch:
            index = id_index(event.get("id"), self.events)
            if index is None:
                self.unexpected += 1
            elif self.counts[index] < 255:
                self.counts[index] += 1
        return web.Response(status=200)

    def tally(self, acked: bytearray, batch_size: int) -> tuple[int, int, int]:
        """(acknowledged ids never received, extra copies received, ids received but never
        acknowledged)."""
        missing = duplicates = unacked = 0
        for index, count in enumerate(self.counts):
            if acked[index // batch_size]:
                missing += count == 0
            elif count:
                unacked += 1
            duplicates += max(0, count - 1)
        return missing, duplicates, unacked


async def start_receiver(receiver: NullReceiver, port: int) -> web.AppRunner:
    app = web.Application(client_max_size=64 * MiB)
    app.router.add_post("/ingest", receiver.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@dataclass(slots=True)
class DrainResult:
    drained: bool = False
    pending_left: int = 0
    elapsed_s: float = 0.0
    first_delivery_s: float | None = None
    daemon_cpu_s: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)

    def events_per_s(self, events: int) -> float:
        return events / self.elapsed_s if self.elapsed_s else 0.0


async def drain(
    daemon: DaemonProcess,
    control: aiohttp.ClientSession,
    receiver: NullReceiver,
    opened_at: float,
    timeout_s: float,
) -> DrainResult:
    """Poll /v1/status until nothing is pending or the deadline passes."""
    result = DrainResult()
    cpu_before = proc_cpu_s(daemon.pid)
    deadline = opened_at + timeout_s
    next_report = opened_at + 10.0
    while True:
        status = await get_status(control, daemon.base_url)
        now = time.monotonic()
        result.status, result.pending_left = status, pending(status)
        if result.pending_left == 0 or now >= deadline or daemon.proc.returncode is not None:
            break
        if now >= next_report:
            print(
                f"  drain  {receiver.received:>9} received {now - opened_at:7.1f}s  "
                f"pending {result.pending_left}",
                file=sys.stderr,
                flush=True,
            )
            next_report += 10.0
        await asyncio.sleep(STATUS_POLL_S)
    result.elapsed_s = now - opened_at
    result.drained = result.pending_left == 0
    result.daemon_cpu_s = proc_cpu_s(daemon.pid) - cpu_before
    if receiver.first_at is not None:
        result.first_delivery_s = receiver.first_at - opened_at
    return result


# ---------------------------------------------------------------------------------------------
# The run and its report


async def run(args: argparse.Namespace) -> dict[str, Any]:
    payloads = Payloads.build(args.batch_size, args.events)
    acked = bytearray(payloads.batches)
    receiver = NullReceiver(args.events)
    errors = ErrorLog()
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = Path(tempfile.mkdtemp(prefix="event-router-backlog-"))
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="er-backlog-")))
        target_port = closed_port()
        config = backlog_config(
            workdir, free_port(), target_port, args.max_bytes, workers=args.workers
        )
        daemon = await spawn_daemon(workdir, config)
        sampler = TreeRssSampler(daemon.pid, interval_s=RSS_SAMPLE_S)
        runner: web.AppRunner | None = None
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S)
            ) as control:
                await wait_ready(daemon)
                idle_rss_kb = tree_kb(daemon.pid, "VmRSS")
                idle_by_process = by_process_mb(daemon.pid, "VmRSS")
                written_before = proc_write_bytes(daemon.pid)
                sampler.start()
                print(
                    f"ingest: {args.events} events in batches of {args.batch_size}, "
                    f"{args.concurrency} in flight; target down (127.0.0.1:{target_port})",
                    file=sys.stderr,
                    flush=True,
                )
                ingested = await ingest(
                    daemon,
                    payloads,
                    acked,
                    errors,
                    concurrency=args.concurrency,
                    progress_every=args.progress_every,
                    timeout_s=args.ingest_timeout,
                )
                ingest_end_s = sampler.elapsed_s()
                after_ingest = await get_status(control, daemon.base_url)
                rss_end_ingest_kb = tree_kb(daemon.pid, "VmRSS")
                disk_after_ingest = journal_disk_bytes(workdir)
                written_ingest = proc_write_bytes(daemon.pid) - written_before

                print(
                    f"drain: receiver up on 127.0.0.1:{target_port}, "
                    f"deadline {args.drain_timeout:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
                runner = await start_receiver(receiver, target_port)
                opened_at = time.monotonic()
                drained = await drain(daemon, control, receiver, opened_at, args.drain_timeout)
                rss_end_drain_kb = tree_kb(daemon.pid, "VmRSS")
                hwm_kb = tree_kb(daemon.pid, "VmHWM")
                hwm_by_process = by_process_mb(daemon.pid, "VmHWM")
                await sampler.stop()
                disk_after_drain = journal_disk_bytes(workdir)
                written_drain = proc_write_bytes(daemon.pid) - written_before - written_ingest
            exit_code, stop_s = await stop_daemon(daemon, EXIT_TIMEOUT_S)
        except BaseException:
            daemon.print_log_tail()
            raise
        finally:
            await kill_if_running(daemon)
            if runner is not None:
                await runner.cleanup()
        daemon_log = daemon.log_lines()

    missing, duplicates, unacked = receiver.tally(acked, args.batch_size)
    acked_events = ingested.acked_events
    target_after_ingest = after_ingest["targets"][TARGET_ID]
    target_end = drained.status["targets"][TARGET_ID]
    ingest_samples = [kb for t, kb in sampler.samples if t <= ingest_end_s]
    checks = [
        Check(
            "every batch acknowledged",
            ingested.errors == 0 and acked_events == args.events,
            f"{acked_events} of {args.events} events acked, {ingested.errors} failed requests"
            + (" (cut short by --ingest-timeout)" if ingested.cut_short else ""),
        ),
        Check(
            "pending after ingest == events acked",
            pending(after_ingest) == acked_events,
            f"pending {pending(after_ingest)}, accepted {after_ingest['ingest']['accepted']}",
        ),
        Check(
            "nothing delivered or dead-lettered while the target was down",
            target_after_ingest["delivered"] == 0 and target_after_ingest["dead_lettered"] == 0,
            f"delivered {target_after_ingest['delivered']}, "
            f"dead-lettered {target_after_ingest['dead_lettered']}",
        ),
        Check(
            "backlog drained before --drain-timeout",
            drained.drained,
            f"pending {drained.pending_left} after {drained.elapsed_s:.1f}s",
        ),
        Check(
            "target delivered == events acked, none dead-lettered",
            target_end["delivered"] == acked_events and target_end["dead_lettered"] == 0,
            f"delivered {target_end['delivered']}, dead-lettered {target_end['dead_lettered']}",
        ),
        Check("every acked id received", missing == 0, f"{missing} missing"),
        Check(
            "no id received twice, none unknown",
            duplicates == 0 and unacked == 0 and receiver.unexpected == 0,
            f"{duplicates} duplicates, {unacked} never acked, {receiver.unexpected} unknown",
        ),
        Check("SIGTERM exits 0", exit_code == 0, f"exit {exit_code} after {stop_s:.2f}s"),
    ]
    report: dict[str, Any] = {
        "meta": {
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "cpus": os.cpu_count(),
            "events": args.events,
            "batch_size": args.batch_size,
            "concurrency": args.concurrency,
            "workers": args.workers,
            "progress_every": args.progress_every,
            "event_bytes": round(sum(map(len, payloads.variants)) / len(payloads.variants)),
            "storage": {"fsync": "always", "max_bytes": args.max_bytes},
            "target": f"http, down at 127.0.0.1:{target_port}; retry every <= {MAX_BACKOFF_S}s",
        },
        "ingest": {
            "events_acked": acked_events,
            "requests": ingested.requests,
            "errors": ingested.errors,
            "elapsed_s": round(ingested.elapsed_s, 2),
            "events_per_s": round(ingested.events_per_s, 1),
            "latency_ms": {
                "p50": round(ingested.percentile_ms(0.50), 1),
                "p99": round(ingested.percentile_ms(0.99), 1),
                "max": round(max(ingested.latencies_ms, default=math.nan), 1),
            },
            "daemon_cpu_pct": round(100 * ingested.daemon_cpu_s / ingested.elapsed_s, 1)
            if ingested.elapsed_s
            else None,
            "cut_short": ingested.cut_short,
            "progress": ingested.progress,
            "pending_after": pending(after_ingest),
        },
        "journal": {
            "used_bytes_after_ingest": after_ingest["journal"]["used_bytes"],
            "disk_bytes_after_ingest": disk_after_ingest,
            "used_bytes_after_drain": drained.status["journal"]["used_bytes"],
            "disk_bytes_after_drain": disk_after_drain,
            "written_bytes_ingest": written_ingest,
            "written_bytes_drain": written_drain,
        },
        "drain": {
            "drained": drained.drained,
            "pending_left": drained.pending_left,
            "elapsed_s": round(drained.elapsed_s, 2),
            "first_delivery_s": None
            if drained.first_delivery_s is None
            else round(drained.first_delivery_s, 2),
            "events_per_s": round(drained.events_per_s(target_end["delivered"]), 1),
            "delivered": target_end["delivered"],
            "receiver_requests": receiver.requests,
            "receiver_events": receiver.received,
            "daemon_cpu_pct": round(100 * drained.daemon_cpu_s / drained.elapsed_s, 1)
            if drained.elapsed_s
            else None,
            "missing": missing,
            "duplicates": duplicates,
            "received_never_acked": unacked,
            "unknown_ids": receiver.unexpected,
        },
        "rss": {
            "idle_mb": round(idle_rss_kb / 1024, 1),
            "vmhwm_mb": round(hwm_kb / 1024, 1),
            "idle_by_process_mb": idle_by_process,
            "vmhwm_by_process_mb": hwm_by_process,
            "peak_sample_mb": round(sampler.max_kb / 1024, 1),
            "peak_during_ingest_mb": round(max(ingest_samples, default=0) / 1024, 1),
            "end_of_ingest_mb": round(rss_end_ingest_kb / 1024, 1),
            "end_of_drain_mb": round(rss_end_drain_kb / 1024, 1),
            "samples": [(round(t, 1), round(kb / 1024, 1)) for t, kb in sampler.samples],
        },
        "daemon": {
            "exit_code": exit_code,
            "stop_s": round(stop_s, 2),
            "log_lines": len(daemon_log),
            "log_tail": daemon_log[-10:],
        },
        "errors": {"total": errors.total, "by_kind": dict(errors.counts.most_common(20))},
        "correctness": {
            "pass": all(c.ok for c in checks),
            "checks": [c.as_dict() for c in checks],
        },
    }
    if args.keep:
        report["meta"]["workdir"] = str(workdir)
    return report


def format_report(report: dict[str, Any]) -> str:
    meta, ing, drn, rss, jrn = (report[k] for k in ("meta", "ingest", "drain", "rss", "journal"))
    out = [
        "",
        f"event-router backlog: {meta['events']} events in batches of {meta['batch_size']}, "
        f"{meta['concurrency']} in flight, server.workers {meta['workers']}, "
        f"{meta['cpus']} CPUs, Python {meta['python']}, "
        f"aiohttp {meta['aiohttp']}, ~{meta['event_bytes']} B/event, storage.fsync always, "
        f"target {meta['target']}",
        "",
    ]
    header = (
        f"{'events':>9}{'ingest ev/s':>13}{'peak RSS MB':>13}{'RSS end ingest':>16}"
        f"{'journal MB':>12}{'drain ev/s':>12}{'missing':>9}{'duplicates':>12}"
    )
    out += [header, "-" * len(header)]
    out.append(
        f"{ing['events_acked']:>9}{ing['events_per_s']:>13.0f}{rss['vmhwm_mb']:>13.1f}"
        f"{rss['end_of_ingest_mb']:>16.1f}{jrn['used_bytes_after_ingest'] / MiB:>12.1f}"
        f"{drn['events_per_s']:>12.0f}{drn['missing']:>9}{drn['duplicates']:>12}"
    )
    out += [
        "",
        f"peak RSS is VmHWM read before SIGTERM; RSS idle {rss['idle_mb']} MB, highest 0.5 s "
        f"sample {rss['peak_sample_mb']} MB (during ingest {rss['peak_during_ingest_mb']} MB), "
        f"at end of drain {rss['end_of_drain_mb']} MB",
        "per process, idle / peak (VmHWM) MB: "
        + ", ".join(
            f"{name} {rss['idle_by_process_mb'].get(name, '-')} / {peak}"
            for name, peak in rss["vmhwm_by_process_mb"].items()
        ),
        f"ingest: {ing['elapsed_s']}s, {ing['requests']} requests, {ing['errors']} errors, "
        f"ack latency p50 {ing['latency_ms']['p50']} ms p99 {ing['latency_ms']['p99']} ms "
        f"max {ing['latency_ms']['max']} ms, daemon CPU {ing['daemon_cpu_pct']}%"
        + (" (cut short by --ingest-timeout)" if ing["cut_short"] else ""),
        f"ingest per {meta['progress_every']} acked (events/s): "
        + ", ".join(f"{p['window_events_per_s']:.0f}" for p in ing["progress"]),
        f"journal: used_bytes {jrn['used_bytes_after_ingest'] / MiB:.1f} MB after ingest "
        f"({jrn['disk_bytes_after_ingest'] / MiB:.1f} MB of files on disk), "
        f"{jrn['used_bytes_after_drain'] / MiB:.1f} MB after drain "
        f"({jrn['disk_bytes_after_drain'] / MiB:.1f} MB on disk); the daemon wrote "
        f"{jrn['written_bytes_ingest'] / MiB:.0f} MB to storage during ingest, "
        f"{jrn['written_bytes_drain'] / MiB:.0f} MB during the drain",
        f"drain: {drn['delivered']} delivered in {drn['elapsed_s']}s from the receiver opening "
        f"(first delivery after {drn['first_delivery_s']}s), {drn['receiver_requests']} "
        f"requests, {drn['receiver_events']} events received, daemon CPU "
        f"{drn['daemon_cpu_pct']}%" + ("" if drn["drained"] else f", {drn['pending_left']} LEFT"),
        f"errors: {report['errors']['total']}",
    ]
    for kind, count in report["errors"]["by_kind"].items():
        out.append(f"  {count:>7} x {kind}")
    daemon = report["daemon"]
    if daemon["log_lines"]:
        out.append(f"daemon logged {daemon['log_lines']} line(s) at warning or above; last ones:")
        out += [f"  {line[:300]}" for line in daemon["log_tail"]]
    out.append("")
    correctness = report["correctness"]
    for check in correctness["checks"]:
        out.append(f"  [{'ok' if check['ok'] else 'FAIL'}] {check['name']}: {check['detail']}")
    out.append(f"correctness: {'PASS' if correctness['pass'] else 'FAIL'}")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backlog",
        description="Peak RSS and drain rate of a real daemon with its only target down.",
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="events to backlog")
    parser.add_argument("--batch-size", type=int, default=1000, help="events per request")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument(
        "--max-bytes", type=int, default=4 * GiB, help="storage.max_bytes (default 4 GiB)"
    )
    parser.add_argument(
        "--progress-every", type=int, default=100_000, help="print ingest progress every N events"
    )
    parser.add_argument(
        "--ingest-timeout",
        type=float,
        default=1800.0,
        help="stop posting after this many seconds (default 1800)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        help="give up waiting for the backlog to drain after this many seconds (default 600)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server.workers (default 1); RSS and CPU are summed over the owner and workers",
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's temp directory")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if min(args.events, args.batch_size, args.concurrency, args.progress_every) < 1:
        raise SystemExit("--events, --batch-size, --concurrency, --progress-every must be >= 1")
    finish(asyncio.run(run(args)), format_report, args.json)


if __name__ == "__main__":
    main()
