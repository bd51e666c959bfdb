"""Target validation: send one real test event (`event-router.target.validate`) and report.

atracker test-writes to a target when it is created; we do the same from `event-router
validate-target`, from the management API's validate, and, when `startup.validate_targets` is
on (it is off by default), for every target at start-up.
The test event goes straight to the target, not through the journal: it proves the target
takes events, it is not an audit event anyone produced. A failure is reported loudly and
recorded in the target's write_status, and blocks nothing else.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from router.errors import DeliveryError
from router.observe.metrics import TargetStats
from router.selfevent import validation_event
from router.targets import Target

log = logging.getLogger(__name__)


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
    except Exception as exc:
        # The boundary of the target's code, as in delivery: a test write that raises
        # something else (aiohttp refusing a header) is a failed validation, reported, not
        # an error that takes the worker or the API request down.
        log.exception("target %s: unexpected error in the test write", target.id)
        message = f"target {target.id}: unexpected {type(exc).__name__}: {exc}"
        if stats is not None:
            stats.record_failure(message, time.time())
        return ProbeResult(target.id, False, message)
    if stats is not None:
        stats.record_success()
    return ProbeResult(target.id, True, f"target {target.id} took the test event {event.id}")
