"""The command line's clients find a running daemon from the config alone, the same way:
`clients.base_url` (https when server.tls is on)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

from router.clients import base_url
from router.config import parse_config
from tests.conftest import StartDaemon
from tests.fakes import make_event
from tests.helpers import everything_to, file_target, free_port


def tls_daemon_config(pki: Path, tmp_path: Path, port: int) -> dict[str, Any]:
    return {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "tls": {"cert_file": str(pki / "server.pem"), "key_file": str(pki / "server.key")},
        },
        "storage": {"path": str(tmp_path / "var")},
        "targets": [file_target("archive", tmp_path / "archive.ndjson")],
        "routes": everything_to("archive"),
    }


def test_base_url_follows_server_tls_unless_a_url_is_given(pki: Path, tmp_path: Path) -> None:
    tls = parse_config(tls_daemon_config(pki, tmp_path, 8443))
    plain = parse_config({**tls_daemon_config(pki, tmp_path, 8080), "server": {"port": 8080}})
    assert base_url(tls) == "https://127.0.0.1:8443"
    assert base_url(plain) == "http://127.0.0.1:8080"
    assert base_url(tls, "http://elsewhere:1") == "http://elsewhere:1"


async def test_tail_follows_a_tls_daemon_from_its_config_without_url(
    start_daemon: StartDaemon, pki: Path, tmp_path: Path
) -> None:
    data = tls_daemon_config(pki, tmp_path, free_port())
    daemon = await start_daemon(data)
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "router", "tail", "--config", str(config), "--limit", "1"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SSL_CERT_FILE": str(pki / "ca.pem")},  # trust the test CA
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        first = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        assert first.startswith(f"tailing https://127.0.0.1:{daemon.config.server.port}"), first
        outcome = await daemon.acceptor.accept([make_event(id="over-tls")])
        assert outcome.accepted == 1
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert orjson.loads(line)["id"] == "over-tls"
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
