"""The `file` target: NDJSON archives on local disk, one event per line, rotated by size.

`path` is the live file; when the next batch would take it past `max_bytes` it is renamed to
`path.1` (older ones shift to `.2` ... up to `max_files`, the oldest is removed). A batch is
never split across two files, so each file holds whole lines only.
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


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEndpointConfig:
    """An NDJSON archive on local disk, rotated by size."""

    path: str
    max_bytes: int = 100 * 1024 * 1024
    max_files: int = 10
    fsync: bool = True


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

    async def start(self) -> None:
        await asyncio.to_thread(self._file.open)

    def unsendable(self, event: Event) -> str | None:
        return None

    def requests(self, batch: Sequence[Event]) -> Iterator[Sequence[Event]]:
        yield batch  # one request (one write) takes the whole batch

    async def send(self, batch: Sequence[Event]) -> None:
        data = b"".join(event.encoded() + b"\n" for event in batch)
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
