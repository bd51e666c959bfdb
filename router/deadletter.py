"""Dead letters: one JSON line per event that a target will not get, with the reason.

Files live at `<storage.path>/deadletter/<target id>.ndjson` (0600, fsynced), so an operator can
prove what happened to every accepted event that never reached a target, and redrive it later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from router.appendfile import AppendOnlyFile
from router.journal import Entry
from router.metrics import utc_iso


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """Why a batch was given up, and the evidence for it."""

    reason: str  # permanent_status, permanent_error, retries_exhausted, shutdown_undelivered
    message: str
    status: int | None = None
    response_excerpt: str = ""
    attempts: int = 0
    first_attempt_at: float | None = None
    last_attempt_at: float | None = None


class DeadLetters:
    """Appends dead letters to one file per target."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, AppendOnlyFile] = {}

    def path(self, target_id: str) -> Path:
        return self.directory / f"{target_id}.ndjson"

    async def write(self, target_id: str, entries: Sequence[Entry], failure: Failure) -> None:
        lines = b"".join(
            orjson.dumps(
                {
                    "event": entry.event.body,
                    "target_id": target_id,
                    "route": entry.route,
                    "reason": failure.reason,
                    "message": failure.message,
                    "status": failure.status,
                    "response_excerpt": failure.response_excerpt,
                    "attempts": failure.attempts,
                    "first_attempt_at": _iso(failure.first_attempt_at),
                    "last_attempt_at": _iso(failure.last_attempt_at),
                    "received_at": utc_iso(entry.event.received_at),
                }
            )
            + b"\n"
            for entry in entries
        )
        file = self._files.get(target_id)
        if file is None:
            file = self._files[target_id] = AppendOnlyFile(self.path(target_id))
        await asyncio.to_thread(file.append, lines)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else utc_iso(ts)
