"""Worker processes behave as one daemon: what differed with two workers (server.workers "auto"
on the 2-CPU machine) from one process. Tests of other modules that found a difference when the
whole suite ran with the default, run again here with two workers while their own modules pin
one process for its internals, and state that each process held for itself (redaction's run
key, the alerts' clock) where one daemon holds one."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.daemon import Daemon
from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.integration import test_api
from tests.integration.test_workers import children

WORKERS = {"host": "127.0.0.1", "port": 0, "workers": 2}


def with_workers(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "server": {**config.get("server", {}), **WORKERS}}


@pytest.fixture
async def api_daemon(start_daemon: StartDaemon, tmp_path: Path) -> Daemon:
    """test_api's daemon (admin and ingest tokens, a file target), with two workers."""
    daemon = await start_daemon(
        with_workers(
            {
                "auth": test_api.auth(),
                "targets": [test_api.file_target("archive", tmp_path / "archive.ndjson")],
                "routes": [
                    {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}
                ],
            }
        )
    )
    assert daemon.worker_pool is not None
    return daemon


async def test_a_refused_admin_action_with_a_line_break_in_its_url_is_audited(
    api_daemon: Daemon, tmp_path: Path
) -> None:
    """A worker passed the owner only paths its catch-all route matched, and `.` stops at a
    line break: `DELETE /api/v2/targets/a%0Ab` got the worker's own 404, unaudited."""
    await test_api.test_a_refused_admin_action_is_recorded_whatever_characters_its_url_holds(
        api_daemon, tmp_path
    )


def process_started_at(pid: int) -> float:
    """When a process was started, as time.time() would have said then (to the kernel's clock
    tick): its /proc/PID/stat start time counts ticks since boot, CLOCK_BOOTTIME's zero."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return since_boot + time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


async def test_an_absence_window_counts_from_when_the_workers_take_events(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """An alert first watched counted its absence window from when the alerts opened, early in
    start-up, before the worker processes were even started: on a busy machine their start
    outlasted a 4 s window, and the alert fired before any producer could send an event. Its
    window now starts once they listen, after each of them was started."""
    daemon = await start_daemon(
        with_workers(
            {
                "targets": [test_api.file_target("archive", tmp_path / "archive.ndjson")],
                "routes": [
                    {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}
                ],
                "alerts": [
                    {
                        "name": "silent",
                        "query": "host:secrets-manager",
                        "absence": {"window_s": 60},
                        "target_ids": ["archive"],
                    }
                ],
            }
        )
    )
    assert daemon.worker_pool is not None
    workers = children(os.getpid())  # this test's in-process daemon's workers
    assert len(workers) == 2
    since = daemon.alerts.states["silent"].since
    assert since >= max(process_started_at(pid) for pid in workers)


async def test_hashed_values_correlate_across_the_workers_without_a_hash_key(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Without redaction.hash_key the key of `hash` is drawn at start, so equal values hash
    equally within one run: each worker process drew its own, and the same API key hashed to
    two values, depending on which worker the producer's connection reached."""
    archive = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        with_workers(
            {
                "targets": [test_api.file_target("archive", archive)],
                "routes": [
                    {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}
                ],
            }
        )
    )
    sent = 24  # each on a connection of its own: the kernel spreads them over both workers
    for n in range(sent):
        event = make_event(id=f"k{n}", responseData={"apiKey": "k-123"})
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{daemon.port}/v1/events", json=[event]) as resp,
        ):
            assert resp.status == 202
    await wait_for(lambda: len(read_ndjson(archive)) == sent, what="every event written")
    hashed = {event["responseData"]["apiKey"] for event in read_ndjson(archive)}
    assert len(hashed) == 1 and "k-123" not in next(iter(hashed)), hashed
