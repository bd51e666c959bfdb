"""Worker processes behave as one daemon: tests of other modules that found a difference when
the whole suite ran with server.workers "auto" (two workers on the 2-CPU machine), run again
here with two workers while their own modules pin one process for its internals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from router.daemon import Daemon
from tests.conftest import StartDaemon
from tests.integration import test_api

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
