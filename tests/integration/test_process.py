"""The daemon as a real process: `serve` from a config file, SIGTERM drains, bad config refused."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import orjson
import yaml

from tests.fakes import make_event, read_ndjson
from tests.helpers import free_port, log_lines, reap, serve, spawn, terminate


def write_config(tmp_path: Path, port: int) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"path": str(tmp_path / "var")},
        "targets": [
            {
                "id": "archive",
                "target_type": "file",
                "file_endpoint": {"path": str(tmp_path / "var" / "events.ndjson")},
            }
        ],
        "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        "startup": {"validate_targets": False},
    }
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as stderr:
        proc = await serve(config, port, stderr=stderr)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/v1/events",
                data=orjson.dumps([make_event() for _ in range(50)]),
                headers={"Content-Type": "application/json"},
            ) as resp,
        ):
            assert resp.status == 202
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
    assert len(read_ndjson(tmp_path / "var" / "events.ndjson")) == 50
    log = log_lines(log_path)
    assert any("stopped" in line["message"] and "50 delivered" in line["message"] for line in log)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in log)


async def test_serve_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "targets: []\nroutes:\n  - name: r\n    rules: [{locations: ['*'], target_ids: [nope]}]\n"
    )
    proc = await spawn(config, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert "routes[0].rules[0].target_ids[0]: unknown target 'nope'" in err.decode()


async def test_embedded_default_config_passes_check() -> None:
    env = {**os.environ}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        "check",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0
    assert b"OK (1 target, 1 route" in out
