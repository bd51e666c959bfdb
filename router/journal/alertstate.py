"""The alerts' durable state, beside the journal: `<storage.path>/alerts.db`.

An alert's window and state (router/alerts) must outlive the process, or a restart would
forget a half-full window, or fire again for a burst it already announced. They live in a
small SQLite file of their own under storage.path (whatever journal backend holds the
events), owned by this package, which is the only one that speaks SQLite:

    alerts(name, state)            one JSON document per alert (router.alerts.state.AlertState)
    outbox(event_id, body, targets) trigger and resolve events decided but not yet journaled

A damaged file is moved aside (`alerts.db.corrupt-<time>`) and the alerts start again: their
windows are counts about events, and must not keep the daemon from starting.

A transition is written to the outbox in the same transaction as the state that caused it,
then journaled, then removed from the outbox: a crash in between journals it at the next
start under the same event id (at least once, as every delivery), and never decides it twice.
WAL mode, all work on one thread. Every save is committed before the producer is answered,
so it survives a process crash (kill -9) at once; it is not fsynced per commit (SQLite's
synchronous=NORMAL, OFF with `storage.fsync: never`): windows are counts about events, not
the events, and an fsync per matching request would cost ingest as much as the journal's
own (a power cut may take the last moments of a window; the journal keeps the events).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from router.appendfile import make_private_dirs
from router.config import ALERTS_FILE, StorageConfig
from router.journal import JournalUnavailableError
from router.journal.sqlite import close_checkpointed, transaction

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (name TEXT PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    event_id TEXT PRIMARY KEY, body BLOB NOT NULL, targets BLOB NOT NULL);
"""
# See the module's docstring: never FULL, the events' own durability is the journal's.
SYNCHRONOUS = {"always": "NORMAL", "interval": "NORMAL", "never": "OFF"}


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An event of the router decided by an alert, and the targets it goes to."""

    event_id: str
    body: dict[str, Any]
    targets: Mapping[str, str]  # target id -> route name


class AlertStore:
    """`load` once at start; `save` the states that changed with the events they decided;
    `sent` once those are journaled."""

    def __init__(self, storage: StorageConfig) -> None:
        self.directory = Path(storage.path)
        self.path = self.directory / ALERTS_FILE
        self._synchronous = SYNCHRONOUS[storage.fsync]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alerts")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise JournalUnavailableError(f"{self.path}: {exc}") from exc

    async def open(self) -> tuple[dict[str, dict[str, Any]], list[Outgoing]]:
        """The stored states by alert name, and the events left in the outbox."""
        return await self._run(self._open_sync)

    def _open_sync(self) -> tuple[dict[str, dict[str, Any]], list[Outgoing]]:
        make_private_dirs(self.directory)
        try:
            return self._read_sync()
        except (sqlite3.DatabaseError, orjson.JSONDecodeError) as exc:
            # Windows are counts about events, not events: a damaged file must not keep the
            # daemon from starting. It is kept aside; the alerts start again from now.
            if self._db is not None:
                self._db.close()
                self._db = None
            aside = self.path.with_name(f"{ALERTS_FILE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                damaged = self.path.with_name(ALERTS_FILE + suffix)
                if damaged.exists():
                    damaged.rename(aside.with_name(aside.name + suffix))
            log.error(
                "alert state %s is damaged (%s); moved to %s, alerts start again",
                self.path,
                exc,
                aside,
            )
            return self._read_sync()

    def _read_sync(self) -> tuple[dict[str, dict[str, Any]], list[Outgoing]]:
        if not self.path.exists():
            self.path.touch(mode=0o600)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.executescript(SCHEMA)
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("quick_check failed")
        states = {name: orjson.loads(state) for name, state in db.execute("SELECT * FROM alerts")}
        outbox = [
            Outgoing(event_id, orjson.loads(body), orjson.loads(targets))
            for event_id, body, targets in db.execute("SELECT * FROM outbox ORDER BY rowid")
        ]
        return states, outbox

    async def save(
        self, states: Mapping[str, dict[str, Any] | None], outgoing: Sequence[Outgoing] = ()
    ) -> None:
        """In one transaction: these states (None: the alert is gone) and these events."""
        rows = {name: orjson.dumps(state) if state else None for name, state in states.items()}
        events = [
            (o.event_id, orjson.dumps(o.body), orjson.dumps(dict(o.targets))) for o in outgoing
        ]
        await self._run(self._save_sync, rows, events)

    def _save_sync(
        self, rows: Mapping[str, bytes | None], events: list[tuple[str, bytes, bytes]]
    ) -> None:
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO alerts VALUES (?, ?)",
                [(name, state) for name, state in rows.items() if state is not None],
            )
            db.executemany(
                "DELETE FROM alerts WHERE name = ?",
                [(name,) for name, state in rows.items() if state is None],
            )
            db.executemany("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?)", events)

    async def sent(self, event_ids: Sequence[str]) -> None:
        """These events are in the journal: out of the outbox."""
        await self._run(self._sent_sync, list(event_ids))

    def _sent_sync(self, event_ids: list[str]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM outbox WHERE event_id = ?", [(i,) for i in event_ids])

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._close_sync)
        self._executor.shutdown(wait=True)

    def _close_sync(self) -> None:
        assert self._db is not None
        db, self._db = self._db, None
        close_checkpointed(db, "alert store")

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        assert self._db is not None, "the alert store is not open"
        return transaction(self._db)
