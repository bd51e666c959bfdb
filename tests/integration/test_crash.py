"""`kill -9` under load loses nothing: every event answered 2xx reaches every target."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import yaml

from router.config.model import BatchConfig
from router.targets.file import BATCH_DEFAULTS as FILE_BATCH
from tests.fakes import ScriptedReceiver, make_event, read_ndjson, wait_for
from tests.helpers import Load, drained, free_port, reap, serve, terminate

LOAD_S = 1.5


async def kill_9_under_load(config: Path, port: int, *, at_least: int = 1000) -> list[str]:
    """A daemon process of `config` under load from 4 posters, killed with kill -9 once
    `at_least` events were acknowledged, then started again until its journal drained and
    stopped: the ids answered 202."""
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(config, port)
        load = Load(port, posters=4, for_at_most_s=30)
        acked = load.acked
        await wait_for(lambda: len(acked) >= at_least, timeout_s=60, what="load acknowledged")
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        await load.stop()
        proc = await serve(config, port)
        await wait_for(
            lambda: drained(port), timeout_s=60, what="the journal to drain after the restart"
        )
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
    return acked


async def test_kill_9_under_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    receiver = await ScriptedReceiver(statuses=[200]).start()
    port = free_port()
    archive = tmp_path / "var" / "archive.ndjson"
    config = tmp_path / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "storage": {"path": str(tmp_path / "var"), "fsync": "always"},
                "startup": {"validate_targets": False},
                "targets": [
                    {
                        "id": "archive",
                        "target_type": "file",
                        "file_endpoint": {"path": str(archive)},
                    },
                    {"id": "siem", "target_type": "http", "http_endpoint": {"url": receiver.url}},
                ],
                "routes": [
                    {
                        "name": "all",
                        "rules": [{"locations": ["*"], "target_ids": ["archive", "siem"]}],
                    }
                ],
            }
        )
    )
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(config, port)
        load = Load(port, for_at_most_s=LOAD_S + 5)
        acked = load.acked
        await wait_for(lambda: len(acked) >= 500, what="some load to be acknowledged")
        await asyncio.sleep(LOAD_S)  # keep the load running while the daemon dies
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        await load.stop()
        assert acked, "nothing was acknowledged before the kill"

        proc = await serve(config, port)

        await wait_for(
            lambda: drained(port), timeout_s=60, what="the journal to drain after the restart"
        )
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
        await receiver.stop()

    archived = [e["id"] for e in read_ndjson(archive)]
    sent = [e["id"] for e in receiver.delivered_events]
    for name, got in (("archive", archived), ("siem", sent)):
        missing = set(acked) - set(got)
        assert not missing, f"{name} lost {len(missing)} of {len(acked)} acknowledged events"
    # At-least-once: a batch in flight at the kill may arrive twice, nothing more.
    duplicates = {
        name: len(got) - len(set(got)) for name, got in (("archive", archived), ("siem", sent))
    }
    print(f"acked {len(acked)}; duplicates after kill -9: {duplicates}")
    # One batch of each target, at its default size: a file batch is 2,000 events, an http 500.
    in_flight = {"archive": FILE_BATCH["max_events"], "siem": BatchConfig().max_events}
    assert all(duplicates[name] <= in_flight[name] for name in duplicates), (duplicates, in_flight)


async def test_a_journal_truncated_after_sigterm_gives_back_every_surviving_event(
    tmp_path: Path,
) -> None:
    """The reproduction of issue 10: target down, 2000 events, SIGTERM, journal cut in half."""
    siem = await ScriptedReceiver(statuses=[503]).start()
    port = free_port()
    config = tmp_path / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "storage": {"path": str(tmp_path / "var")},
                "startup": {"validate_targets": False},
                "shutdown": {"drain_timeout_s": 0.5},
                "targets": [
                    {
                        "id": "siem",
                        "target_type": "http",
                        "http_endpoint": {"url": siem.url},
                        "retry": {"max_attempts": 100_000, "max_age_s": 3600, "max_backoff_s": 0.2},
                    }
                ],
                "routes": [
                    {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["siem"]}]}
                ],
            }
        )
    )
    base = f"http://127.0.0.1:{port}"
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(config, port)
        posted: set[str] = set()
        async with aiohttp.ClientSession() as session:
            for n in range(20):
                ids = [f"e{n}-{i}" for i in range(100)]
                async with session.post(
                    f"{base}/v1/events", json=[make_event(id=i) for i in ids]
                ) as resp:
                    assert resp.status == 202
                posted.update(ids)
        assert await terminate(proc) == 0
        journal = tmp_path / "var" / "journal.db"
        os.truncate(journal, journal.stat().st_size // 2)

        proc = await serve(config, port)
        async with aiohttp.ClientSession() as session, session.get(f"{base}/v1/status") as resp:
            status = await resp.json()
        row = status["targets"]["siem"]
        print(
            f"after SIGTERM and truncation: {row['pending']} of 2000 recovered, {row['lost']} lost"
        )
        assert row["pending"] > 0 and row["received"] == 2000
        assert (
            row["received"]
            == row["delivered"] + row["dead_lettered"] + row["pending"] + row["lost"]
        )
        assert status["journal"]["lost_records"] == row["lost"]

        siem.statuses = [200]

        await wait_for(
            lambda: drained(port), timeout_s=30, what="the recovered events to be delivered"
        )
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
        await siem.stop()
    delivered = {e["id"] for e in siem.delivered_events}
    assert len(delivered) == row["pending"] and delivered <= posted
