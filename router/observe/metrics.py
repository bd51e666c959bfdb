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


# A delivery worker that failed this many times in a row without settling a batch is
# "failing" (while events wait for it): its target gets nothing until someone looks, so
# /readyz and the metrics say so.
WORKER_FAILING_AFTER = 3


@dataclass(slots=True)
class TargetStats:
    """How delivery to one target is going."""

    retries: int = 0
    batches: int = 0
    worker_errors: int = 0
    worker_errors_in_a_row: int = 0  # since the worker last settled a batch
    write_status: WriteStatus = field(default_factory=WriteStatus)

    def record_failure(self, reason: str, at: float) -> None:
        self.write_status = WriteStatus("failed", utc_iso(at), reason)

    def record_worker_error(self, reason: str, at: float) -> None:
        """The worker itself failed (not a send it classified); it restarts after a pause."""
        self.worker_errors += 1
        self.worker_errors_in_a_row += 1
        self.record_failure(reason, at)

    @property
    def worker_failing(self) -> bool:
        return self.worker_errors_in_a_row >= WORKER_FAILING_AFTER

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
