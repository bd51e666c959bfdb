"""Shared fixtures: a real daemon on 127.0.0.1:0 and real scripted HTTP receivers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from router.app import Daemon
from router.config import parse_config
from tests.fakes import ScriptedReceiver

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
        daemon = Daemon(parse_config(data))
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
