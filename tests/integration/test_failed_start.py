"""A start that fails lets go of everything it took: the journal's lock, its files, its
threads and tasks, the listening socket. The command line exits after a failed start, but a
process that embeds the daemon (or a test) starts another on the same journal."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from router.config import parse_config
from router.daemon import Daemon
from router.errors import RouterError, StorageLockedError
from router.server.api import ConfigSource
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import assert_books_balance, everything_to, file_target, post

THREAD_PREFIXES = ("journal", "alerts")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def config(tmp_path: Path, port: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "targets": [file_target("archive", tmp_path / "archive.ndjson")],
        "routes": everything_to("archive"),
        **extra,
    }


def open_files_under(directory: Path) -> list[str]:
    """The files under `directory` this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target.startswith(str(directory)):
            found.append(target)
    return found


def daemon_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIXES)]


def damaged_receipt_key(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "receipts.key").write_bytes(b"")  # a start cut short as it made it
    return config(tmp_path, evidence={"receipts": True})


FAILURES: dict[str, Callable[[Path, int], dict[str, Any]]] = {
    "port in use": lambda tmp_path, port: config(tmp_path, port),
    "damaged receipt key": lambda tmp_path, port: damaged_receipt_key(tmp_path),
}


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_a_failed_start_releases_the_journal_so_another_daemon_starts_on_it(
    tmp_path: Path, taken_port: int, failure: str
) -> None:
    """The first start fails after it opened the journal (the lock), the alert store and the
    archives and started the delivery workers; they were kept until the process ended, so
    the second start in the same process failed with the journal in use."""
    threads_before = daemon_threads()
    data = FAILURES[failure](tmp_path, taken_port)
    first = Daemon(parse_config(data), ConfigSource(None, data))
    with pytest.raises((OSError, RouterError)):
        await first.start()
    assert not first.ready
    assert open_files_under(tmp_path) == [], "a failed start keeps files open"
    await wait_for(lambda: daemon_threads() == threads_before, what="the daemon's threads to end")
    leftovers = [
        task.get_name()
        for task in asyncio.all_tasks()
        if task is not asyncio.current_task() and not task.done()
    ]
    assert leftovers == [], "a failed start leaves tasks running"
    await first.stop()  # what the command line does after a failed start: harmless

    if (tmp_path / "var" / "receipts.key").exists():
        (tmp_path / "var" / "receipts.key").unlink()
    second_data = config(tmp_path)
    second = Daemon(parse_config(second_data), ConfigSource(None, second_data))
    await second.start()
    try:
        status, _ = await post(second, make_event(id="after"))
        assert status == 202
        await wait_for(
            lambda: "after" in {e["id"] for e in read_ndjson(tmp_path / "archive.ndjson")}
        )
        assert_books_balance(second)
    finally:
        await second.stop()


async def test_a_start_refused_for_a_journal_in_use_leaves_its_holder_running(
    tmp_path: Path,
) -> None:
    """What the refused start lets go of is its own: the holder keeps its lock and its files."""
    data = config(tmp_path)
    holder = Daemon(parse_config(data), ConfigSource(None, data))
    await holder.start()
    try:
        second = Daemon(parse_config(data), ConfigSource(None, data))
        with pytest.raises(StorageLockedError):
            await second.start()
        status, _ = await post(holder, make_event(id="still"))
        assert status == 202
        await wait_for(
            lambda: "still" in {e["id"] for e in read_ndjson(tmp_path / "archive.ndjson")}
        )
        third = Daemon(parse_config(data), ConfigSource(None, data))
        with pytest.raises(StorageLockedError):
            await third.start()
        assert_books_balance(holder)
    finally:
        await holder.stop()
