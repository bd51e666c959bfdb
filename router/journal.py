"""The hand-off between ingest and delivery: one ordered backlog (cursor) per target.

Ingest calls `append` once per request with every accepted event and the targets its routes
chose; when `append` returns, the events are the journal's responsibility. Each delivery worker
reads batches for its own target with `next_batch` and moves that target's cursor with `ack`
once the batch is delivered or dead-lettered, so targets progress independently.

`MemoryJournal` keeps the backlog in process memory: it survives target outages but not a
crash. At shutdown, what it still holds is handed back by `drain` so that the caller can
dead-letter it rather than lose it silently. A durable journal implements the same protocol.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from router.events import Event


@dataclass(frozen=True, slots=True)
class Entry:
    """One event queued for one target, with the route that sent it there."""

    event: Event
    route: str


class Journal(Protocol):
    """What ingest and delivery need from the hand-off between them."""

    async def append(self, routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
        """Take responsibility for each event for each of its targets (target id -> route)."""

    async def next_batch(
        self,
        target_id: str,
        *,
        max_events: int,
        max_bytes: int,
        max_wait_s: float,
        stopping: asyncio.Event,
    ) -> list[Entry]:
        """The next batch for a target; empty only once `stopping` is set and nothing is left."""

    def ack(self, target_id: str, count: int) -> None:
        """The first `count` entries of the target's backlog are done (delivered or dead)."""

    def pending(self, target_id: str) -> int:
        """Entries appended for the target and not yet acknowledged."""

    def oldest_pending_age_s(self, target_id: str) -> float:
        """Seconds since the oldest pending entry of the target was received (0 if none)."""


class _Backlog:
    __slots__ = ("entries", "wakeup")

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.wakeup = asyncio.Event()


class MemoryJournal:
    """An in-process journal: per-target deques, no durability."""

    def __init__(self, target_ids: Sequence[str]) -> None:
        self._backlogs = {target_id: _Backlog() for target_id in target_ids}

    async def append(self, routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
        for event, targets in routed:
            for target_id, route in targets.items():
                backlog = self._backlogs[target_id]
                backlog.entries.append(Entry(event, route))
                backlog.wakeup.set()

    async def next_batch(
        self,
        target_id: str,
        *,
        max_events: int,
        max_bytes: int,
        max_wait_s: float,
        stopping: asyncio.Event,
    ) -> list[Entry]:
        backlog = self._backlogs[target_id]
        while not backlog.entries:
            if stopping.is_set():
                return []
            backlog.wakeup.clear()
            await _first_of(backlog.wakeup, stopping)
        # Linger for more events, up to max_wait_s after the first one, unless stopping.
        deadline = time.monotonic() + max_wait_s
        while len(backlog.entries) < max_events and not stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            backlog.wakeup.clear()
            await _first_of(backlog.wakeup, stopping, timeout_s=remaining)
        batch: list[Entry] = []
        size = 0
        for entry in backlog.entries:
            entry_bytes = len(entry.event.encoded()) + 1
            if batch and (len(batch) >= max_events or size + entry_bytes > max_bytes):
                break
            batch.append(entry)
            size += entry_bytes
        return batch

    def ack(self, target_id: str, count: int) -> None:
        entries = self._backlogs[target_id].entries
        for _ in range(count):
            entries.popleft()

    def pending(self, target_id: str) -> int:
        return len(self._backlogs[target_id].entries)

    def oldest_pending_age_s(self, target_id: str) -> float:
        entries = self._backlogs[target_id].entries
        return max(0.0, time.time() - entries[0].event.received_at) if entries else 0.0

    def drain(self, target_id: str) -> list[Entry]:
        """Remove and return everything still pending for a target (used at shutdown)."""
        entries = self._backlogs[target_id].entries
        out = list(entries)
        entries.clear()
        return out


async def _first_of(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Wait until any of `events` is set, or the timeout passes."""
    waiters = [asyncio.create_task(e.wait(), name="journal-wait") for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
