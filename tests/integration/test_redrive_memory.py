"""Redrives against a real daemon: of a large dead-letter file (a process), with memory
bounded by a chunk, not by the file; and several at once of one target's letters. Every
letter goes back exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import yaml

from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import (
    assert_books_balance,
    drained,
    everything_to,
    file_target,
    free_port,
    reap,
    serve,
    settled,
    terminate,
)

LETTERS = 60_000
# The daemon idles at ~50 MB; holding every letter of the file (72 MB of NDJSON) as parsed
# JSON took it past 450 MB.
MAX_PEAK_RSS_MB = 200


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def write_letters(path: Path, count: int) -> None:
    """`count` letters of a target that refused them, as the daemon writes them, and one of
    another reason."""
    path.parent.mkdir(parents=True, exist_ok=True)
    event = make_event()
    with open(path, "wb") as out:
        for i in range(count):
            event["id"] = f"dead-{i}"
            letter = {
                "event": event,
                "target_id": "archive",
                "route": "all",
                "reason": "permanent_status",
                "message": "the target answered 400",
                "status": 400,
                "response_excerpt": "",
                "attempts": 1,
                "first_attempt_at": "2026-12-01T00:00:00.000Z",
                "last_attempt_at": "2026-12-01T00:00:00.000Z",
                "received_at": "2026-12-01T00:00:00.000Z",
            }
            out.write(orjson.dumps(letter) + b"\n")
        # One letter of another reason, which stays.
        other = {"event": make_event(id="stays"), "target_id": "archive", "reason": "too_large"}
        out.write(orjson.dumps(other) + b"\n")


async def test_a_redrive_of_a_large_dead_letter_file_holds_a_chunk_not_the_file(
    tmp_path: Path,
) -> None:
    port = free_port()
    storage = tmp_path / "var"
    archive = tmp_path / "archive.ndjson"
    letters = storage / "deadletter" / "archive.ndjson"
    write_letters(letters, LETTERS)
    config = tmp_path / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "storage": {"path": str(storage), "fsync": "never"},
                "startup": {"validate_targets": False},
                "evidence": {"enabled": False},
                "targets": [
                    {
                        "id": "archive",
                        "target_type": "file",
                        "file_endpoint": {"path": str(archive)},
                    }
                ],
                "routes": [
                    {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}
                ],
            }
        )
    )
    proc = None
    try:
        proc = await serve(config, port)
        url = f"http://127.0.0.1:{port}/v1/deadletters/archive/redrive?reason=permanent_status"
        async with aiohttp.ClientSession() as session, session.post(url) as resp:
            assert resp.status == 200
            progress = [orjson.loads(line) for line in (await resp.read()).splitlines()]
        assert progress[0] == {"done": 0, "total": LETTERS, "skipped": {}}
        assert progress[-1] == {"done": LETTERS, "total": LETTERS}
        peak_mb = peak_rss_mb(proc.pid)
        await wait_for(lambda: drained(port), timeout_s=120, what="the redriven letters")
        assert peak_mb < MAX_PEAK_RSS_MB, f"peak RSS {peak_mb:.0f} MB"
        ids = [event["id"] for event in read_ndjson(archive)]
        assert len(ids) == len(set(ids)) == LETTERS
        # Only the other reason's letter is left.
        assert [letter["event"]["id"] for letter in read_ndjson(letters)] == ["stays"]
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


async def test_concurrent_redrives_of_one_target_send_each_letter_once(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Three redrives of the same letters at once: the first takes them, the others wait
    for it and find none left; each event reaches the archive once."""
    letters = tmp_path / "var" / "deadletter" / "archive.ndjson"
    await asyncio.to_thread(write_letters, letters, 3000)
    archive = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {"targets": [file_target("archive", archive)], "routes": everything_to("archive")}
    )
    url = f"http://127.0.0.1:{daemon.port}/v1/deadletters/archive/redrive?reason=permanent_status"

    async def redrive(session: aiohttp.ClientSession) -> int:
        async with session.post(url) as resp:
            assert resp.status == 200
            lines = [orjson.loads(line) for line in (await resp.read()).splitlines()]
        assert lines[-1]["done"] == lines[0]["total"]
        return int(lines[0]["total"])

    async with aiohttp.ClientSession() as session:
        totals = await asyncio.gather(*(redrive(session) for _ in range(3)))
    assert sorted(totals) == [0, 0, 3000]
    await wait_for(lambda: settled(daemon), timeout_s=60, what="the redriven letters")
    ids = [event["id"] for event in read_ndjson(archive)]
    assert len(ids) == len(set(ids)) == 3000
    assert [letter["event"]["id"] for letter in read_ndjson(letters)] == ["stays"]
    assert_books_balance(daemon)
