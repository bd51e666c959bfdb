"""The `file` target: NDJSON archives on local disk, one event per line, rotated by size.

`path` is the live file; when the next batch would take it past `max_bytes` it is renamed to
`path.1` (older ones shift to `.2` ... up to `max_files`, the oldest is removed). A batch is
never split across two files, so each file holds whole lines only.

With evidence on (router/evidence), `chain` is set before `start`: every line then carries its
`_chain` link, computed here, in the write, under the chain's lock, and the chain's head moves
only once the write succeeded. At the first start a torn last line (kill -9 mid-write) is cut,
and the chain goes on from the last whole line; files that end short of the head the journal
kept with the last ack (lines cut while the daemon was down) are reported (Chain.check_files).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from router.appendfile import AppendOnlyFile
from router.errors import RetryableDeliveryError
from router.events import Event
from router.evidence.chain import Chain, cut_torn_tail, last_link


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEndpointConfig:
    """An NDJSON archive on local disk, rotated by size."""

    path: str
    max_bytes: int = 100 * 1024 * 1024
    max_files: int = 10
    fsync: bool = True


MiB = 1024 * 1024
# Batch settings of a file target under `delivery.batch` and its own `batch`: a batch is one
# write and one fsync, then one ack in the journal (another fsync), whatever its size, so under
# load the worker's pace is batches, not events: 500 events a batch (the delivery default, for
# a receiver's request) kept it behind a busy intake, its backlog read back from the journal.
# bench.compare batch100 (one process, one invocation each, load 4, against main): 500 events
# 50.9 us/event (0.86x main), 2,000 40.4 (0.79x) at +7 MB peak RSS, 5,000 43.9 (0.76x) at
# +30 MB. max_wait_s stays the delivery default's (0.2 s): a batch still goes out as soon as
# the first of it has waited that long.
BATCH_DEFAULTS: Final[Mapping[str, Any]] = {"max_events": 2000, "max_bytes": 4 * MiB}

# The JSON Schema of `file_endpoint` (the config loader puts it in the target section).
ENDPOINT_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "minLength": 1},
        "max_bytes": {"type": "integer", "minimum": 1024},
        "max_files": {"type": "integer", "minimum": 1},
        "fsync": {"type": "boolean"},
    },
}


class FileTarget:
    """Appends batches to an NDJSON file."""

    def __init__(self, target_id: str, endpoint: FileEndpointConfig) -> None:
        self.id = target_id
        self.path = Path(endpoint.path)
        self.max_bytes = endpoint.max_bytes
        self.max_files = endpoint.max_files
        self._file = AppendOnlyFile(self.path, fsync=endpoint.fsync)
        self.chain: Chain | None = None
        self._recovered = False

    async def start(self) -> None:
        if self.chain is not None and not self._recovered:
            async with self.chain.lock:  # no chained write runs while the tail is repaired
                await asyncio.to_thread(self._recover, self.chain)
            self._recovered = True
        await asyncio.to_thread(self._file.open)

    def _recover(self, chain: Chain) -> None:
        cut_torn_tail(self.path)
        rotated = self.path.with_name(f"{self.path.name}.1")
        chain.found_in_files(last_link(self.path) or last_link(rotated))
        chain.check_files(str(self.path))

    def unsendable(self, event: Event) -> str | None:
        return None

    def requests(self, batch: Sequence[Event]) -> Iterator[Sequence[Event]]:
        yield batch  # one request (one write) takes the whole batch

    async def send(self, batch: Sequence[Event]) -> None:
        chain = self.chain
        if chain is None:
            # Each line's newline by the join, not by a copy of each event's bytes plus one.
            await self._send(b"\n".join([*(event.encoded() for event in batch), b""]))
            return
        # A worker cancelled at the drain timeout must not let go of the chain while its
        # write still runs in a thread: the write, the head and the lock end together.
        await asyncio.shield(asyncio.ensure_future(self._send_chained(chain, batch)))

    async def _send_chained(self, chain: Chain, batch: Sequence[Event]) -> None:
        async with chain.lock:
            data, head = chain.link_block([event.encoded() for event in batch])
            await self._send(data)
            chain.advance(head)
            if chain.after_write is not None:
                await chain.after_write(chain)

    async def write_line(self, line: bytes) -> None:
        """Append one line that is not an event (a checkpoint); the caller holds the chain lock."""
        await asyncio.to_thread(self._write, line + b"\n")

    async def _send(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._write, data)
        except OSError as exc:
            # Disk full, a read-only remount, a permission an operator can fix: all may pass,
            # and the retry policy's age bound turns a lasting failure into dead letters.
            raise RetryableDeliveryError(
                self.id, f"cannot write {self.path}: {exc.strerror or exc}"
            ) from exc

    def _write(self, data: bytes) -> None:
        size = self._file.size()
        if size and size + len(data) > self.max_bytes:
            self._rotate()
        self._file.append(data)

    def _rotate(self) -> None:
        self._file.close()
        oldest = self.path.with_name(f"{self.path.name}.{self.max_files}")
        if oldest.exists():
            oldest.unlink()
        for n in range(self.max_files - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file.open()

    async def close(self) -> None:
        self._file.close()
