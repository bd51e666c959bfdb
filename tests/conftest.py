"""Shared fixtures: a real daemon on 127.0.0.1:0, real scripted HTTP receivers, and real NATS."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from router.config import parse_config
from router.daemon import Daemon
from router.server.api import ConfigSource
from tests.fakes import ScriptedReceiver
from tests.peers.nats import NatsCluster, NatsServer

FAST_DELIVERY = {
    "batch": {"max_wait_s": 0.01},
    "retry": {"initial_backoff_s": 0.01, "max_backoff_s": 0.05, "max_attempts": 5},
}

StartDaemon = Callable[[dict[str, Any]], Awaitable[Daemon]]


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[StartDaemon]:
    """Start a real Daemon from a config dict (storage under tmp_path, port 0, fast retries)."""
    daemons: list[Daemon] = []

    async def start(data: dict[str, Any]) -> Daemon:
        data = {
            "server": {"host": "127.0.0.1", "port": 0},
            "storage": {"path": str(tmp_path / "var")},
            "delivery": FAST_DELIVERY,
            "shutdown": {"drain_timeout_s": 5},
            # Test writes would add an event to every target; the probe tests turn them on.
            "startup": {"validate_targets": False},
            **data,
        }
        # One process unless the caller names server.workers: these tests inspect the
        # in-process Daemon (its counters, acceptor, journal), which worker processes would
        # hold instead. The default (auto) is what the `serve` process tests run.
        data["server"] = {"workers": 1, **data["server"]}
        daemon = Daemon(parse_config(data), ConfigSource(None, data))
        await daemon.start()
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        if daemon.ready:
            await daemon.stop()


@pytest.fixture
async def receiver_factory() -> AsyncIterator[Callable[..., Awaitable[ScriptedReceiver]]]:
    """Start ScriptedReceivers: `await receiver_factory([503, 503, 200])`."""
    receivers: list[ScriptedReceiver] = []

    async def make(statuses: Sequence[int] = (200,), **kwargs: Any) -> ScriptedReceiver:
        receiver = await ScriptedReceiver(statuses=statuses, **kwargs).start()
        receivers.append(receiver)
        return receiver

    yield make
    for receiver in receivers:
        await receiver.stop()


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(d / f"{name}.ext"),
            "-out",
            str(d / f"{name}.pem"),
        )
    return d


# NATS JetStream (tests/peers/nats.py), for the modules that test on it: one server (or one
# cluster) per module, its streams named apart by each test.


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path_factory.mktemp("nats-cluster")) as cluster:
        yield cluster
