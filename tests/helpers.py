"""Shared helpers for tests and benches: the config pieces, the daemon's HTTP calls and its
books, and a daemon as a real process (spawn, wait until ready, SIGTERM, reap).

Fakes (scripted receivers, events) live in tests/fakes.py; these are the helpers that speak to
the daemon itself, so every test module and bench/ use one copy of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from router.daemon import Daemon
from tests.fakes import ScriptedReceiver, make_event, wait_for

ReceiverFactory = Callable[..., Awaitable[ScriptedReceiver]]

# -- config pieces -----------------------------------------------------------------------------


def file_target(target_id: str, path: Path) -> dict[str, Any]:
    return {"id": target_id, "target_type": "file", "file_endpoint": {"path": str(path)}}


def http_target(target_id: str, url: str, **endpoint: Any) -> dict[str, Any]:
    return {"id": target_id, "target_type": "http", "http_endpoint": {"url": url, **endpoint}}


def everything_to(*target_ids: str) -> list[dict[str, Any]]:
    return [{"name": "all", "rules": [{"locations": ["*"], "target_ids": list(target_ids)}]}]


def patient(target: dict[str, Any]) -> dict[str, Any]:
    """A target that retries for as long as a test needs."""
    return target | {"retry": {"max_attempts": 100_000, "max_age_s": 3600}}


# -- an in-process daemon: its intake and its books ----------------------------------------------


async def post(
    daemon: Daemon,
    body: bytes | Any,
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{daemon.port}/v1/events",
            data=data,
            headers={"Content-Type": content_type, **(headers or {})},
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


class Load:
    """Posters putting a daemon under load for a kill -9, a SIGTERM or a reload test: each
    posts batches of `per_post` events to /v1/events on its own session until `stop()` (or
    `for_at_most_s`), and `acked` keeps the ids answered 202: what must then be delivered.

    A connection that breaks ends its poster (the daemon died), or with `through_restarts`
    is opened again (a worker died and another takes the port; the owner restarts). With
    `strict` every request must be answered 202 on a connection that holds (a reload test's
    daemon never refuses nor dies): anything else fails the poster, and `stop()` raises it."""

    def __init__(
        self,
        port: int,
        *,
        posters: int = 8,
        per_post: int = 10,
        headers: dict[str, str] | None = None,
        through_restarts: bool = False,
        strict: bool = False,
        for_at_most_s: float = 120,
    ) -> None:
        self.acked: list[str] = []
        self._strict = strict
        self._url = f"http://127.0.0.1:{port}/v1/events"
        self._per_post = per_post
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._through_restarts = through_restarts
        self._stopped = asyncio.Event()
        self._until = asyncio.get_running_loop().time() + for_at_most_s
        self._posters = [
            asyncio.create_task(self._post(n), name=f"poster-{n}") for n in range(posters)
        ]

    async def _post(self, poster: int) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        async with aiohttp.ClientSession() as session:
            while not self._stopped.is_set() and loop.time() < self._until:
                ids = [f"p{poster}-{n}-{i}" for i in range(self._per_post)]
                n += 1
                try:
                    async with session.post(
                        self._url,
                        data=orjson.dumps([make_event(id=i) for i in ids]),
                        headers=self._headers,
                    ) as resp:
                        assert resp.status == 202 or not self._strict, resp.status
                        if resp.status == 202:
                            self.acked.extend(ids)
                except (aiohttp.ClientError, ConnectionError):
                    if self._strict:
                        raise
                    if not self._through_restarts:
                        return

    async def stop(self) -> list[str]:
        """Stop posting and wait for the posters' last answers: the ids acknowledged."""
        self._stopped.set()
        await asyncio.gather(*self._posters)
        return self.acked

    async def __aenter__(self) -> Load:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()


def assert_books_balance(daemon: Daemon) -> None:
    for target_id, row in daemon.status()["targets"].items():
        books = row["delivered"] + row["dead_lettered"] + row["pending"] + row["lost"]
        assert row["received"] == books, target_id


def settled(daemon: Daemon) -> bool:
    return all(row["pending"] == 0 for row in daemon.status()["targets"].values())


@contextmanager
def journal_write_locked(storage: Path) -> Iterator[None]:
    """Another process-like connection holds the journal's write lock (BEGIN IMMEDIATE) until
    the block ends: every write of the daemon waits for it, up to SQLite's busy timeout."""
    blocker = sqlite3.connect(storage / "journal.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        yield
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()


# -- a daemon as a real process ------------------------------------------------------------------


def overwrite_root_page(path: Path, table: str) -> None:
    """Garbage over the root page of `table` (a small table: all of it) in the journal file,
    the log emptied into it first, so that a reader finds the page there and not a copy in
    the log."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        [(root,)] = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,))
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)


def free_port() -> int:
    """A port nobody listens on now, for a daemon that runs as its own process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ready(port: int, host: str = "127.0.0.1") -> bool:
    """Does the daemon on `port` answer /readyz with 200?"""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{host}:{port}/readyz") as resp,
        ):
            return resp.status == 200
    except aiohttp.ClientConnectionError:
        return False


async def drained(port: int) -> bool:
    """Has the daemon process on `port` nothing pending for any target (its /v1/status)?"""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/v1/status") as resp,
    ):
        status = await resp.json()
    return all(t["pending"] == 0 for t in status["targets"].values())


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`python -m router ARGS` as a real process: its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def spawn(
    config: Any,
    *args: str,
    stderr: int | None = asyncio.subprocess.DEVNULL,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> asyncio.subprocess.Process:
    """`python -m router serve --config F [args]` as a real process (not waited for); other
    keyword arguments go to create_subprocess_exec (cwd, stdin, stdout)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        "serve",
        "--config",
        str(config),
        *args,
        stderr=stderr,
        env=env,
        **kwargs,
    )


# How long `serve` may take to answer /readyz: by default (server.workers auto) a daemon is a
# journal owner and a worker process per CPU, each importing and building what it needs, on a
# machine the other tests keep busy (7 to 9 s there for one process or three).
SERVE_TIMEOUT_S = 60.0


async def serve(
    config: Any, port: int, *args: str, timeout_s: float = SERVE_TIMEOUT_S, **kwargs: Any
) -> asyncio.subprocess.Process:
    """`spawn` (with `args`), then wait until /readyz answers 200; a daemon that does not get
    there is killed, not left running (its caller has no process to reap)."""
    proc = await spawn(config, *args, **kwargs)

    async def up_or_gone() -> bool:
        return proc.returncode is not None or await ready(port)

    try:
        await wait_for(up_or_gone, timeout_s=timeout_s, what="the daemon to be ready")
        assert proc.returncode is None, f"the daemon exited with {proc.returncode} as it started"
    except BaseException:
        await reap(proc)
        raise
    return proc


async def terminate(proc: asyncio.subprocess.Process, timeout_s: float = 15) -> int:
    """SIGTERM and wait for the exit code (the drain's own promise is under test)."""
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), timeout_s)


async def reap(proc: asyncio.subprocess.Process | None) -> None:
    """A test's `finally`: kill the process if the test left it running."""
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines a daemon wrote to `path`, its stderr. A test that reads the log
    after the fact sends it to a file: a pipe nobody reads until the end blocks the daemon
    once it logged 64 KiB, and the test then sees a hang instead of what it tests."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]
