"""Activity Tracker events that the router emits about itself (service `event-router`).

The router is an audited component like any other: a target test write and a refused login
are events with the same shape a producer's would have, validated against the same schemas
(`schemas/catalog/event-router.json` lists the actions) and routed by the same rules. This
module builds them; it does no I/O, so whoever emits one decides where it goes.
"""

from __future__ import annotations

import functools
import socket
import time
from typing import Any

from router import __version__
from router.metrics import utc_iso

SERVICE = "event-router"


@functools.cache
def instance_name() -> str:
    """This host's name, reduced to what a CRN segment may hold."""
    host = socket.gethostname().lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in host) or "router"


def instance_crn(resource: str = "") -> str:
    """The CRN of this router instance (its logSourceCRN), or of one of its resources."""
    return f"crn:v1:local:local:{SERVICE}:global:a/local:{instance_name()}:{resource}"


def router_event(
    *,
    action: str,
    message: str,
    target: dict[str, str],
    outcome: str = "success",
    reason_code: int = 200,
    reason_type: str = "OK",
    severity: str = "normal",
    initiator: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of a schema-valid event from this router. The initiator defaults to the
    router itself; `extra` adds fields such as `requestData`."""
    instance = instance_name()
    return {
        "action": action,
        "eventTime": utc_iso(time.time()).replace("Z", "+00:00"),
        "initiator": initiator
        or {
            "id": f"{SERVICE}-{instance}",
            "name": SERVICE,
            "typeURI": "service/security/clientid",
            "credential": {"type": "token"},
            "host": {"address": "", "agent": f"{SERVICE}/{__version__}"},
        },
        "target": target,
        "outcome": outcome,
        "reason": {"reasonCode": reason_code, "reasonType": reason_type},
        "severity": severity,
        "observer": {"name": "ActivityTracker"},
        "logSourceCRN": instance_crn(":"),
        "message": message,
        "saveServiceCopy": False,
        "dataEvent": False,
        **(extra or {}),
    }
