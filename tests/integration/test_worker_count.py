"""server.workers "auto" (the default) as real `serve` processes: as many worker processes as
CPUs this process may use, one process on one usable CPU (its affinity set before it starts),
the number and its basis in /v1/status and the start-up line; a reload never starts or stops
workers (a changed server.workers needs a restart), and `--workers` wins over the file at start
and at every reload."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from router.server.workercount import resolve_workers
from tests import helpers
from tests.fakes import make_event, wait_for
from tests.helpers import free_port, reap, terminate
from tests.integration.test_workers import children, serve, status_of

AUTO = resolve_workers("auto")


def write_config(tmp_path: Path, port: int, **server: Any) -> Path:
    """A file target and a route; server.workers only where `server` names it."""
    config = {
        "server": {"host": "127.0.0.1", "port": port, **server},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "targets": [
            {
                "id": "archive",
                "target_type": "file",
                "file_endpoint": {"path": str(tmp_path / "var" / "archive.ndjson")},
            }
        ],
        "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
    }
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def post(port: int, event_id: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/v1/events",
            data=orjson.dumps(make_event(id=event_id)),
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        return resp.status


async def reloads(port: int, outcome: str) -> int:
    """event_router_config_reloads_total{outcome=...} from /metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    prefix = f'event_router_config_reloads_total{{outcome="{outcome}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return int(float(lines[0].removeprefix(prefix))) if lines else 0


def assert_shows(status: dict[str, Any], setting: int | str, count: int) -> None:
    """/v1/status's workers section for `count` processes taking ingest."""
    workers = status["workers"]
    assert workers["setting"] == setting
    assert workers["configured"] == count
    if count > 1:
        assert workers["running"] == count
        assert workers["restarts"] == 0
    else:
        assert "running" not in workers  # one process: no worker processes


async def test_a_config_without_workers_runs_one_worker_per_usable_cpu(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as stderr:
        proc = await serve(write_config(tmp_path, port), port, stderr=stderr)
    try:
        status = await status_of(port)
        assert_shows(status, "auto", AUTO.count)
        assert status["workers"]["basis"] == AUTO.basis
        assert len(children(proc.pid)) == (AUTO.count if AUTO.count > 1 else 0)
        assert await post(port, "auto-1") == 202
        assert await terminate(proc, timeout_s=30) == 0
    finally:
        await reap(proc)
    started = [line for line in log.read_text().splitlines() if " ready on " in line]
    assert len(started) == 1
    assert AUTO.describe() in started[0]


async def test_auto_with_one_usable_cpu_is_one_process(tmp_path: Path) -> None:
    """A process allowed one CPU (as taskset or a cpuset gives it) runs as workers: 1 did."""
    port = free_port()
    cpu = min(os.sched_getaffinity(0))
    proc = await serve(
        write_config(tmp_path, port),
        port,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    try:
        status = await status_of(port)
        assert_shows(status, "auto", 1)
        assert status["workers"]["basis"] == "1 CPU in this process's affinity"
        assert children(proc.pid) == set()
        assert await post(port, "one-cpu") == 202
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


async def test_a_reload_that_changes_workers_is_refused_and_changes_no_process(
    tmp_path: Path,
) -> None:
    """server is restart-only: a reload to another server.workers is refused whole, the
    running workers stay; the same setting again (auto resolving to whatever it resolves to)
    is no change, and the rest of that reload applies."""
    port = free_port()
    config = write_config(tmp_path, port, workers=2)
    data = yaml.safe_load(config.read_text())
    proc = await serve(config, port)
    try:
        before = children(proc.pid)
        assert len(before) == 2
        data["server"]["workers"] = "auto"
        config.write_text(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: reloads_are(port, "refused", 1), what="the refused reload")
        assert_shows(await status_of(port), 2, 2)
        assert children(proc.pid) == before

        data["server"]["workers"] = 2
        data["routes"][0]["name"] = "renamed"
        config.write_text(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: reloads_are(port, "applied", 1), what="the applied reload")
        assert_shows(await status_of(port), 2, 2)
        assert children(proc.pid) == before
        assert await post(port, "after-reloads") == 202
        assert await terminate(proc, timeout_s=30) == 0
    finally:
        await reap(proc)


async def test_workers_on_the_command_line_win_over_the_file_at_start_and_at_reload(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = write_config(tmp_path, port, workers=2)
    data = yaml.safe_load(config.read_text())
    proc = await helpers.serve(config, port, "--workers", "1")
    try:
        assert_shows(await status_of(port), 1, 1)
        assert children(proc.pid) == set()
        # The file's server.workers changes, and a route: with --workers the server section
        # is what it was, so the reload applies.
        data["server"]["workers"] = "auto"
        data["routes"][0]["name"] = "renamed"
        config.write_text(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: reloads_are(port, "applied", 1), what="the applied reload")
        assert_shows(await status_of(port), 1, 1)
        assert children(proc.pid) == set()
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


async def test_workers_on_the_command_line_must_be_auto_or_a_number_in_bounds(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, free_port())
    for value in ("0", "65", "many"):
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "router", "serve", "--config", str(config)),
            *("--workers", value),
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        assert proc.returncode == 2
        assert b"--workers: auto or a number from 1 to 64" in err


async def reloads_are(port: int, outcome: str, count: int) -> bool:
    return await reloads(port, outcome) == count
