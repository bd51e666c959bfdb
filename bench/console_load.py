"""Ingest with the web console open and without: does the page slow ingest, and does it keep
working?

`python -m bench.console_load [--seconds S] [--rate N] [--rounds R]`

A real `event-router serve` process (a file target takes every event, auth on) is offered
`--rate` events/s (batches of 100, at most 32 requests in flight) for `--seconds`, first with
no browser, then with Debian's chromium (Playwright) showing the console signed in on the
targets panel (it samples /v1/status every 2 s) and a second tab tailing every event
(`/v1/tail` with an empty query: the worst case, everything matches), alternately for
`--rounds` rounds. It reports, per run, the events/s the daemon accepted, the p99 ack latency,
and what the page showed: the tail's count of events seen and the ingest rate the targets panel
last sampled, and the daemon process's CPU time per accepted event (on a small machine the
browser competes for the same cores; the CPU per event says what the page costs the daemon
itself). Every run checks that every acknowledged event was written to the archive once.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from playwright.async_api import Browser, async_playwright, expect

from tests.fakes import make_event, read_ndjson
from tests.helpers import free_port, reap, serve, terminate

ADMIN = "bench-admin-token"
INGEST = "bench-ingest-token"
BATCH = 100
IN_FLIGHT = 32


@dataclass
class Run:
    console: bool
    offered_per_s: int
    accepted: int = 0
    seconds: float = 0.0
    latencies: list[float] | None = None
    tail_seen: str = ""
    panel_rate: str = ""
    cpu_s: float = 0.0  # the daemon process's CPU time (user + system) during the run

    @property
    def per_s(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0

    def row(self) -> str:
        lat = sorted(self.latencies or [0.0])
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        page = f"\n    page: {self.tail_seen} | {self.panel_rate}" if self.console else ""
        per_event = 1e6 * self.cpu_s / self.accepted if self.accepted else 0.0
        return (
            f"{'console' if self.console else 'no console':<11} offered {self.offered_per_s:>6}/s"
            f"  accepted {self.per_s:>8.0f}/s  p99 {p99:6.1f} ms"
            f"  daemon CPU {per_event:5.1f} us/event{page}"
        )


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def offer(port: int, rate: int, seconds: float, run: Run) -> None:
    """`rate` events/s in batches of BATCH, at most IN_FLIGHT requests at once."""
    bodies = [orjson.dumps([make_event(id=f"{n}-{i}") for i in range(BATCH)]) for n in range(8)]
    url = f"http://127.0.0.1:{port}/v1/events"
    headers = {"Authorization": f"Bearer {INGEST}", "Content-Type": "application/json"}
    slots = asyncio.Semaphore(IN_FLIGHT)
    latencies: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    interval = BATCH / rate
    async with aiohttp.ClientSession() as session:

        async def send(body: bytes) -> None:
            try:
                began = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    answer = await resp.json()
                    if resp.status == 202:
                        run.accepted += answer["accepted"]
                latencies.append(time.perf_counter() - began)
            finally:
                slots.release()

        start = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - start < seconds:
            due = start + n * interval
            if due > now:
                await asyncio.sleep(due - now)
            await slots.acquire()
            task = asyncio.create_task(send(bodies[n % len(bodies)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*tasks)
        run.seconds = time.perf_counter() - start
    run.latencies = latencies


async def open_console(browser: Browser, port: int) -> tuple[Any, Any]:
    """A tab on the targets panel and a tab tailing every event, both signed in."""
    pages = []
    for panel in ("targets", "tail"):
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{port}/console")
        await page.fill("#token", ADMIN)
        await page.click("#login-form button[type=submit]")
        await expect(page.locator("#targets-table tbody tr")).to_have_count(1, timeout=15_000)
        if panel == "tail":
            await page.click("#tabs button[data-panel=tail]")
            await page.click("#tail-start")
            await expect(page.locator("#tail-status")).to_contain_text("tailing", timeout=15_000)
        pages.append(page)
    return pages[0], pages[1]


async def one_run(root: Path, browser: Browser | None, rate: int, seconds: float) -> Run:
    port = free_port()
    archive = root / f"archive-{port}.ndjson"
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"path": str(root / f"var-{port}")},
        "startup": {"validate_targets": False},
        "auth": {
            "admin_tokens": [{"name": "ops", "sha256": digest(ADMIN)}],
            "ingest_tokens": [{"name": "bench", "sha256": digest(INGEST)}],
        },
        "targets": [
            {"id": "archive", "target_type": "file", "file_endpoint": {"path": str(archive)}}
        ],
        "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
    }
    path = root / f"router-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await serve(path, port)
    run = Run(console=browser is not None, offered_per_s=rate)
    try:
        pages = await open_console(browser, port) if browser is not None else None
        before = cpu_seconds(proc.pid)
        await offer(port, rate, seconds, run)
        run.cpu_s = cpu_seconds(proc.pid) - before
        if pages is not None:
            targets, tail = pages
            run.tail_seen = (await tail.locator("#tail-status").inner_text()).split(": ", 1)[-1]
            run.panel_rate = await targets.locator("#ingest-line").inner_text()
            for page in pages:
                await page.close()
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
    written = len(read_ndjson(archive))  # evidence checkpoints are not events
    assert written == run.accepted, (written, run.accepted)
    return run


async def main(seconds: float, rate: int, rounds: int) -> None:
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=args
            )
            for _ in range(rounds):
                for with_console in (False, True):
                    run = await one_run(Path(tmp), browser if with_console else None, rate, seconds)
                    print(run.row(), flush=True)
                    runs.append(run)
            await browser.close()
    for with_console in (False, True):
        rates = [r.per_s for r in runs if r.console == with_console]
        label = "console" if with_console else "no console"
        print(f"median accepted/s, {label}: {statistics.median(rates):.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=10_000, help="events/s offered")
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    asyncio.run(main(options.seconds, options.rate, options.rounds))
