"""The durable hand-off between intake and delivery: one backlog (cursor) per target.

Intake appends each accepted event with the targets its routes chose, and answers the
producer only once `append` returned; each delivery worker reads its own target's backlog
with `next_batch` and settles a batch with `ack`. This module is what they see: the Journal
protocol, its Entry and Books, and its errors, nothing of a backend. sqlite/ is the journal
on local disk (SQLite in WAL mode, a CRC per record; salvage.py reads back what survives of a
damaged file); another backend (a JetStream stream) implements the same protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import ClassVar, Protocol

from router.errors import RouterError
from router.events import Event


class JournalFullError(RouterError):
    """The journal holds storage.max_bytes; ingest answers 503 until targets drain it."""


class JournalUnavailableError(RouterError):
    """The journal's storage failed a write (a full disk, an I/O error): intake answers 503,
    a worker retries its ack. Each backend turns its own errors into this one."""


class ChainFencedError(RouterError):
    """A chain's record (router/evidence: its head, checkpoint and plan) was taken by another
    process since this one last wrote it: this one's writes to it are refused from then on
    (fencing), so two writers never fork one record."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One event owed to one target, with the route that sent it there."""

    seq: int
    event: Event
    route: str


@dataclass(slots=True)
class Books:
    """Per target: received = delivered + dead_lettered + pending + lost, at every moment.
    `lost` moves only when a damaged journal is salvaged: events whose bytes did not survive."""

    received: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    pending: int = 0
    oldest_received_at: float | None = None
    lost: int = 0


class Journal(Protocol):
    """What ingest and delivery need from the hand-off between them."""

    # True where `append` has already made room (storage.when_full: the owner's Acceptor shed
    # the stuck target) before it raises JournalFullError, as a worker's hand-off does: the
    # worker's Acceptor then asks once, and does not shed in its own process.
    MAKES_ROOM_ITSELF: ClassVar[bool]

    async def append(self, routed: Sequence[tuple[Event, Mapping[str, str]]]) -> None:
        """Make each event durable for each of its targets (target id -> route name)."""

    async def next_batch(
        self,
        target_id: str,
        *,
        max_events: int,
        max_bytes: int,
        max_wait_s: float,
        stopping: asyncio.Event,
    ) -> list[Entry]:
        """The target's next batch; empty only once `stopping` is set and nothing is left."""

    async def ack(self, target_id: str, batch: Sequence[Entry], *, dead_lettered: int) -> None:
        """The batch is settled for the target: `dead_lettered` of it written as dead letters,
        the rest delivered."""

    def books(self, target_id: str) -> Books:
        """The target's counters."""

    def shed_order(self) -> list[str]:
        """Targets with a backlog, the stuck one (oldest pending event) first."""

    def shed(self, target_id: str, count: int) -> AbstractAsyncContextManager[list[Entry]]:
        """The target's oldest pending entries, removed once the caller dead-lettered them."""
