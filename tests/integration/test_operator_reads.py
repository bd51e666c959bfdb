"""Operator reads (archive search, receipt lookups, dead-letter pages) scan files in threads:
however many an admin token asks for at once, deliveries, whose file and dead-letter writes
also run in threads, must not queue behind them."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import orjson

from router.daemon import Daemon
from tests.conftest import StartDaemon
from tests.fakes import make_event, wait_for
from tests.helpers import everything_to, file_target, post

ADMIN = "an-admin-token-for-reads-000001"
INGEST = "an-ingest-token-for-reads-00001"
ARCHIVED = 25_000  # ~24 MB: a receipt lookup for a missing id reads all of it
LOOKUPS = 40


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def delivered_last(path: Path, event_id: str) -> bool:
    """Is `event_id` among the archive's last lines (read from the end, not parsed whole)?"""
    with open(path, "rb") as f:
        f.seek(max(path.stat().st_size - 8192, 0))
        return f'"id":"{event_id}"'.encode() in f.read()


def write_archive(path: Path) -> None:
    event = make_event()
    with open(path, "wb") as out:
        for i in range(ARCHIVED):
            event["id"] = f"old-{i}"
            out.write(orjson.dumps(event) + b"\n")


async def test_a_flood_of_receipt_lookups_and_searches_does_not_hold_up_delivery(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """40 lookups of a missing receipt and 40 searches over a 24 MB archive took every
    thread of the default pool, where the file target writes: one event's delivery waited
    for nearly all of them (27 s against 0.2 s with a 145 MB archive). Operator reads now
    take turns on threads of their own."""
    archive = tmp_path / "archive.ndjson"
    await asyncio.to_thread(write_archive, archive)
    daemon: Daemon = await start_daemon(
        {
            "auth": {
                "admin_tokens": [{"name": "ops", "sha256": sha256(ADMIN)}],
                "ingest_tokens": [{"name": "sm", "sha256": sha256(INGEST)}],
            },
            "targets": [file_target("archive", archive)],
            "routes": everything_to("archive"),
        }
    )
    base = f"http://127.0.0.1:{daemon.port}"
    finished = 0

    async def read(session: aiohttp.ClientSession, path: str) -> None:
        nonlocal finished
        async with session.get(base + path, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            await r.read()
            assert r.status in (200, 404)
        finished += 1

    async with aiohttp.ClientSession() as session:
        paths = [f"/v1/receipts/missing-{i}" for i in range(LOOKUPS)]
        paths += [f"/v1/search?target=archive&query=nowhere{i}" for i in range(LOOKUPS)]
        flood = [asyncio.create_task(read(session, path)) for path in paths]
        try:
            # Reads answered (so the flood is real), and by then every one of them is queued
            # for a thread: the event comes behind them all. (Posted at once, it could reach
            # a thread before most of the reads did, and the test passed, now and then, with
            # the reads on the default pool again.)
            await wait_for(lambda: finished >= 2, timeout_s=30, what="the first reads answered")
            status, answer = await post(
                daemon, [make_event(id="fresh")], headers={"Authorization": f"Bearer {INGEST}"}
            )
            assert status == 202, answer
            await wait_for(
                lambda: delivered_last(archive, "fresh"),
                timeout_s=120,
                what="the fresh event in the archive",
            )
            assert finished < len(paths) // 2, f"delivered after {finished} reads of {len(paths)}"
        finally:
            await asyncio.gather(*flood, return_exceptions=True)
    assert finished == len(paths), "every read answered"
