"""reload.watch: a change is seen whenever it is made, also while the daemon is starting."""

from __future__ import annotations

import asyncio
from pathlib import Path

from router.cli.serve import fingerprint, watch
from tests.fakes import wait_for


async def test_a_change_made_before_the_watch_first_looks_is_seen(tmp_path: Path) -> None:
    """The file is fingerprinted as `serve` loaded it, not when the watch task first runs:
    the task first ran somewhere inside start-up, and a file changed in between (a deploy
    writing the new config as /readyz turned 200) was taken as the file it started with."""
    path = tmp_path / "router.yaml"
    path.write_text("targets: []\n")
    changes: list[str] = []
    watching = asyncio.create_task(
        watch(path, 0.01, lambda: changes.append("changed"), fingerprint(path))
    )
    path.write_text("targets: []\nroutes: []\n")  # before the task has run at all
    try:
        await wait_for(lambda: bool(changes), timeout_s=10, what="the change to be seen")
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
