"""Counters for ingest and for delivery attempts; /v1/status shows them.

The books that must balance (received = delivered + dead_lettered + pending) are kept by the
journal, in the same transactions that move events, so they survive restarts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any


def utc_iso(ts: float) -> str:
    """RFC 3339 with milliseconds and Z, as atracker writes its timestamps."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class WriteStatus:
    """atracker's write_status: the outcome of the latest real delivery attempt."""

    status: str = "success"
    last_failure: str | None = None
    reason_for_last_failure: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(slots=True)
class TargetStats:
    """How delivery to one target is going."""

    retries: int = 0
    batches: int = 0
    worker_errors: int = 0
    write_status: WriteStatus = field(default_factory=WriteStatus)

    def record_failure(self, reason: str, at: float) -> None:
        self.write_status = WriteStatus("failed", utc_iso(at), reason)

    def record_success(self) -> None:
        self.write_status.status = "success"


@dataclass(slots=True)
class IngestStats:
    """What ingest did with the events it was offered."""

    requests: int = 0
    accepted: int = 0
    rejected: int = 0
    unrouted: int = 0
    journal_full: int = 0
    dropped_buffer_full: int = 0
    refused_requests: dict[str, int] = field(default_factory=dict)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    reloads: dict[str, int] = field(default_factory=dict)  # by outcome: applied, refused

    def refuse(self, code: str) -> None:
        self.refused_requests[code] = self.refused_requests.get(code, 0) + 1
