"""Target validation: send one real test event (`event-router.target.validate`) and report.

atracker test-writes to a target when it is created; we do the same from `event-router
validate-target` and, unless `delivery.validate_on_start` is off, for every target at start-up.
The test event goes straight to the target, not through the journal: it proves the target
takes events, it is not an audit event anyone produced. A failure is reported loudly and
recorded in the target's write_status, and blocks nothing else.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from router import __version__
from router.errors import DeliveryError
from router.events import Event
from router.metrics import TargetStats, utc_iso
from router.targets import Target

ACTION = "event-router.target.validate"


def validation_event(target_id: str) -> Event:
    """A schema-valid Activity Tracker event from the router itself, naming the target."""
    host = socket.gethostname().lower()
    instance = "".join(c if c.isalnum() or c == "-" else "-" for c in host) or "router"
    crn = f"crn:v1:local:local:event-router:global:a/local:{instance}::"
    target_crn = f"crn:v1:local:local:event-router:global:a/local:{instance}:target:{target_id}"
    return Event.from_body(
        {
            "action": ACTION,
            "eventTime": utc_iso(time.time()).replace("Z", "+00:00"),
            "initiator": {
                "id": f"event-router-{instance}",
                "name": "event-router",
                "typeURI": "service/security/clientid",
                "credential": {"type": "token"},
                "host": {"address": "", "agent": f"event-router/{__version__}"},
            },
            "target": {
                "id": target_crn,
                "name": target_id,
                "typeURI": "event-router/target",
            },
            "outcome": "success",
            "reason": {"reasonCode": 200, "reasonType": "OK"},
            "severity": "normal",
            "observer": {"name": "ActivityTracker"},
            "logSourceCRN": crn,
            "message": f"event-router: validate target {target_id}",
            "saveServiceCopy": False,
            "dataEvent": False,
        }
    )


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one test write."""

    target_id: str
    ok: bool
    message: str


async def probe(target: Target, stats: TargetStats | None = None) -> ProbeResult:
    """Start the target if needed, send the test event, and record the outcome."""
    event = validation_event(target.id)
    try:
        await target.start()
        reason = target.unsendable(event)
        if reason is not None:
            raise DeliveryError(target.id, f"the test event is unsendable: {reason}")
        await target.send([event])
    except DeliveryError as exc:
        if stats is not None:
            stats.record_failure(str(exc), time.time())
        return ProbeResult(target.id, False, str(exc))
    except OSError as exc:
        if stats is not None:
            stats.record_failure(f"target {target.id}: {exc}", time.time())
        return ProbeResult(target.id, False, f"target {target.id}: {exc}")
    if stats is not None:
        stats.record_success()
    return ProbeResult(target.id, True, f"target {target.id} took the test event {event.id}")
