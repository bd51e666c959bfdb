"""What the router knows about one accepted event, beyond its JSON body.

The routing location is segment 5 of `logSourceCRN` (an empty segment means `global`), and the
producing service is segment 4. Both are derived once, at ingest, so routing and delivery never
parse the CRN again.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

GLOBAL = "global"


def crn_parts(crn: str) -> list[str]:
    """Split a CRN into its ten segments; the resource (last) keeps any further colons."""
    parts = crn.split(":", 9)
    return parts + [""] * (10 - len(parts))


def crn_location(crn: str) -> str:
    """The routing location of a CRN: its 6th segment, or `global` when that is empty."""
    return crn_parts(crn)[5] or GLOBAL


def crn_service(crn: str) -> str:
    """The service name segment of a CRN, e.g. `secrets-manager`."""
    return crn_parts(crn)[4]


def action_service(action: str) -> str:
    """The service an action belongs to; VPC (`is.`) services have two dotted parts."""
    head, _, rest = action.partition(".")
    if head == "is" and rest:
        return "is." + rest.partition(".")[0]
    return head


def new_event_id() -> str:
    """A fresh id for an event that arrived without one."""
    return str(uuid.uuid4())


@dataclass(slots=True)
class Event:
    """An accepted event: its body (with `id` set) and the facts routing needs."""

    id: str
    body: dict[str, Any]
    location: str
    service: str
    action: str
    received_at: float = field(default_factory=time.time)
    _encoded: bytes | None = field(default=None, repr=False)
    # True for a journal record that failed its checksum: it is dead-lettered, never sent.
    corrupt: bool = False

    @classmethod
    def from_body(
        cls,
        body: dict[str, Any],
        *,
        received_at: float | None = None,
        encoded: bytes | None = None,
    ) -> Event:
        """Wrap a body that passed validation; assigns an id when the producer sent none.
        The journal passes the original receive time and the bytes it stored."""
        if not body.get("id"):
            body["id"] = new_event_id()
        crn = body["logSourceCRN"]
        return cls(
            id=body["id"],
            body=body,
            location=crn_location(crn),
            service=crn_service(crn),
            action=body["action"],
            received_at=time.time() if received_at is None else received_at,
            _encoded=encoded,
        )

    @classmethod
    def corrupt_record(cls, seq: int, raw: bytes | None) -> Event:
        """Stands in for an unreadable journal record, so that its fate is still written down."""
        excerpt = (raw or b"")[:512].decode("utf-8", "replace")
        body = {"journal_seq": seq, "raw_excerpt": excerpt}
        return cls(
            id=f"journal-seq-{seq}", body=body, location="", service="", action="", corrupt=True
        )

    def encoded(self) -> bytes:
        """The body as compact JSON, computed once and shared by every target."""
        if self._encoded is None:
            self._encoded = orjson.dumps(self.body)
        return self._encoded
