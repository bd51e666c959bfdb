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
from router.observe.metrics import utc_iso

SERVICE = "event-router"
# What an event of the router quotes (a refused name, a config problem) is cut to this many
# characters, so the event stays far below server.max_string_chars: an audit event that is
# itself rejected would leave the action it reports unrecorded.
MAX_QUOTED_CHARS = 2000


def clip(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text`, or its start and how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def clipped(value: Any) -> Any:
    """Every string of `value`, at any depth, clipped."""
    if isinstance(value, str):
        return clip(value)
    if isinstance(value, dict):
        return {k: clipped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clipped(v) for v in value]
    return value


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
    router itself; `extra` adds fields such as `requestData`. Quoted values are clipped."""
    instance = instance_name()
    body = {
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
    result: dict[str, Any] = clipped(body)
    return result
