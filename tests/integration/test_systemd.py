"""Running under systemd: the sd_notify protocol from a real process, SIGHUP, and the unit file
checked by `systemd-analyze verify`."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from router.config import ShutdownConfig
from router.observe.sdnotify import notify
from tests.fakes import make_event
from tests.helpers import free_port, log_lines, ready, spawn
from tests.integration.test_process import write_config

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "event-router.service"


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket bound where systemd's would be; a short path (sun_path is 108
    bytes, and pytest's tmp_path can be longer)."""
    with (
        tempfile.TemporaryDirectory(prefix="sdn-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = os.path.join(directory, "notify")
        sock.bind(path)
        sock.setblocking(False)
        yield sock, path


async def receive(sock: socket.socket) -> list[str]:
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 65536), 15)
    return data.decode().split("\n")


def test_notify_does_nothing_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


async def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"event-router-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1", "STATUS=two\nlines")
        assert await receive(sock) == ["READY=1", "STATUS=two lines"]


async def test_daemon_notifies_ready_reloading_and_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    port = free_port()
    config = write_config(tmp_path, port)
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as stderr:
        proc = await spawn(config, stderr=stderr, env={**os.environ, "NOTIFY_SOCKET": path})
    try:
        first = await receive(sock)
        assert first[0] == "READY=1"
        assert any(line.startswith("STATUS=serving on port") for line in first)
        assert await ready(port), "READY=1 is sent only once /readyz answers 200"

        proc.send_signal(signal.SIGHUP)
        reloading, reloaded = await receive(sock), await receive(sock)
        assert reloading[0] == "RELOADING=1"
        assert reloaded[0] == "READY=1" and "STATUS=reloaded" in reloaded
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/v1/events",
                data=orjson.dumps([make_event()]),
                headers={"Content-Type": "application/json"},
            ) as resp,
        ):
            assert resp.status == 202, "the daemon serves on after a SIGHUP reload"
        assert proc.returncode is None

        proc.send_signal(signal.SIGTERM)
        stopping = await receive(sock)
        assert stopping[0] == "STOPPING=1"
        assert any(line.startswith("STATUS=draining") for line in stopping)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = log_lines(log_path)
    assert any(line["message"].startswith("config reloaded") for line in log)


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing; .ci/run installs Debian's systemd package")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); CI installs it")
    return found


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this environment's entry point.
    entry_point = Path(sys.executable).parent / "event-router"
    assert entry_point.exists(), entry_point
    text = UNIT.read_text()
    assert "ExecStart=/opt/event-router/bin/event-router " in text
    unit = tmp_path / UNIT.name
    unit.write_text(
        text.replace("ExecStart=/opt/event-router/bin/event-router ", f"ExecStart={entry_point} ")
    )
    result = subprocess.run(
        [systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys too, so its warnings count as failures here.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_file_promises_what_the_daemon_does() -> None:
    settings: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, val = line.partition("=")
            settings[key] = val
    assert settings["Type"] == "notify"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["DynamicUser"] == "yes"
    assert settings["StateDirectory"] == "event-router"
    assert settings["ProtectSystem"] == "strict"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["CapabilityBoundingSet"] == settings["AmbientCapabilities"] == ""
    assert "AF_UNIX" in settings["RestrictAddressFamilies"], "NOTIFY_SOCKET is a unix socket"
    assert int(settings["TimeoutStopSec"]) > 2 * ShutdownConfig().drain_timeout_s
