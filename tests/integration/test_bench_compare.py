"""bench/compare.py works end to end: a short run against the floor and the router (figures
are not asserted; a shared machine makes them meaningless in a test)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)"
)


@pytest.mark.timeout(180)
async def test_short_compare_measures_floor_router_and_baseline_and_their_ratios(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "compare.json"
    # The baseline is another checkout's router (run from its directory); this one, by another
    # path, stands in for it.
    baseline = tmp_path / "baseline-checkout"
    baseline.symlink_to(REPO_ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.compare",
        "--short",
        "--scenarios",
        "single,batch100,routes30",
        "--json",
        str(report_path),
        "--baseline",
        str(baseline),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 170)
    assert proc.returncode == 0, err.decode()[-2000:]
    report = json.loads(report_path.read_text())
    runs = {(r["server"], r["scenario"]): r for r in report["runs"]}
    assert set(runs) == {
        ("floor", "single"),
        ("router", "single"),
        ("floor", "batch100"),
        ("router", "batch100"),
        ("router", "routes30"),
        ("base", "single"),
        ("base", "batch100"),
        ("base", "routes30"),
    }
    for run in runs.values():
        # Everything accepted was written: the drain waited for it. wrk stops counting at the
        # end of its time but its last requests (one per connection at most) still land.
        in_flight = report["meta"]["connections"] * run["events_per_request"]
        assert run["accepted_events"] > 0
        assert 0 <= run["written_events"] - run["accepted_events"] <= in_flight, run
        assert run["server_cpu_s"] > 0 and run["peak_rss_mb"] > 0
    assert set(report["ratios"]) == {
        f"{server} {scenario}"
        for server in ("router", "base", "router/base")
        for scenario in ("single", "batch100", "routes30")
    }
    assert "WRITTEN ev/s" in out.decode()


@pytest.mark.timeout(120)
async def test_short_compare_runs_the_router_with_one_and_with_two_workers(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "compare.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.compare",
        "--short",
        "--scenarios",
        "batch100",
        "--workers",
        "1,2",
        "--json",
        str(report_path),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 110)
    assert proc.returncode == 0, err.decode()[-2000:]
    report = json.loads(report_path.read_text())
    runs = {(r["server"], r["scenario"]): r for r in report["runs"]}
    assert set(runs) == {("floor", "batch100"), ("router", "batch100"), ("w2", "batch100")}
    for run in runs.values():
        in_flight = report["meta"]["connections"] * run["events_per_request"]
        assert 0 <= run["written_events"] - run["accepted_events"] <= in_flight, run
    assert set(report["ratios"]) == {"router batch100", "w2 batch100", "w2/router batch100"}
