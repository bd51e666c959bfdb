"""Activity Tracker events that the router emits about itself (service `event-router`).

The router is an audited component like any other: a target test write and a refused login
are events with the same shape a producer's would have, validated against the same schemas
(`schemas/catalog/event-router.json` lists the actions) and routed by the same rules. Every
one of them is built here (a login refused or summed up, a management API change, a config
reload, a target's test write); this module does no I/O, so whoever emits one decides where
it goes (the daemon's `record_own` journals them through the acceptor).
"""

from __future__ import annotations

import functools
import socket
import time
from collections import Counter
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import quote

from router import __version__
from router.events import Event
from router.observe.logformat import counted
from router.observe.metrics import utc_iso

SERVICE = "event-router"
LOGIN_ACTION: Final = "event-router.instance.login"
VALIDATE_ACTION: Final = "event-router.target.validate"
RELOAD_ACTION: Final = "event-router.config.reload"
CHAIN_MISSING_ACTION: Final = "event-router.chain.missing"
ALERT_TRIGGER_ACTION: Final = "event-router.alert.trigger"
ALERT_RESOLVE_ACTION: Final = "event-router.alert.resolve"
ALERT_ACTIONS: Final = frozenset({ALERT_TRIGGER_ACTION, ALERT_RESOLVE_ACTION})
# Client addresses named in a summary of refused logins, the busiest first.
SUMMARY_CLIENTS: Final = 20
# What an event of the router quotes (a refused name, a config problem) is cut to this many
# characters, so the event stays far below server.max_string_chars: an audit event that is
# itself rejected would leave the action it reports unrecorded.
MAX_QUOTED_CHARS = 2000


def clip(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text`, or its start and how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def clipped(value: Any, limit: int = MAX_QUOTED_CHARS) -> Any:
    """Every string of `value`, at any depth, clipped to `limit`."""
    if isinstance(value, str):
        return clip(value, limit)
    if isinstance(value, dict):
        return {k: clipped(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [clipped(v, limit) for v in value]
    return value


@functools.cache
def instance_name() -> str:
    """This host's name, reduced to what a CRN segment may hold."""
    host = socket.gethostname().lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in host) or "router"


def instance_crn(resource: str = "") -> str:
    """The CRN of this router instance (its logSourceCRN), or of one of its resources. A
    resource quoted from a request (an id in a management API URL) may hold a line break,
    which the CRN pattern cannot: its unprintable characters are percent-escaped, or the
    event that quotes it (a refused change's audit) would be rejected and go unrecorded."""
    if not resource.isprintable():
        resource = "".join(c if c.isprintable() else quote(c, safe="") for c in resource)
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


def refusal_event(
    *,
    endpoint: str,
    address: str,
    agent: str,
    principal: str | None,
    status: int,
    reason_type: str,
    why: str,
) -> dict[str, Any]:
    """A refused request (a bad token, a client fault): who, from where, and why."""
    body = router_event(
        action=LOGIN_ACTION,
        message=f"event-router: refused {endpoint} from {address or 'unknown'}: {why}",
        target={
            "id": instance_crn("endpoint:" + endpoint.replace(":", "")),
            "name": endpoint,
            "typeURI": "event-router/endpoint",
        },
        outcome="failure",
        reason_code=status,
        reason_type=reason_type,
        severity="critical",
        initiator={
            "id": principal or "anonymous",
            "name": principal or "anonymous",
            "typeURI": "service/security/clientid",
            "credential": {"type": "token" if principal else "unknown"},
            "host": {"address": address, "agent": agent},
        },
    )
    body["reason"]["reasonForFailure"] = clip(why)
    return body


def summary_event(total: int, by_address: Counter[str]) -> dict[str, Any]:
    """The refusals the rate limits kept out of the journal, summed up, by address."""
    busiest = dict(by_address.most_common(SUMMARY_CLIENTS))
    body = router_event(
        action=LOGIN_ACTION,
        message=f"event-router: {counted(total, 'more refused attempt')} from "
        f"{counted(len(by_address), 'address', 'addresses')}, not recorded one by one "
        "(rate limit)",
        target={
            "id": instance_crn(":"),
            "name": "event-router",
            "typeURI": "event-router/instance",
        },
        outcome="failure",
        reason_code=401,
        reason_type="Unauthorized",
        severity="critical",
        extra={"requestData": {"suppressed_attempts": total, "by_address": busiest}},
    )
    body["initiator"]["host"]["address"] = next(iter(busiest), "")
    body["reason"]["reasonForFailure"] = "rate-limited refusals"
    return body


def change_event(
    *,
    action: str,
    subject: str,
    who: str,
    address: str,
    initial: str,
    new: str | None,
    failure: str | None,
    status: int = 400,
) -> dict[str, Any]:
    """A management API change (`action` such as target.create) to `subject` (target:ID),
    applied or refused; `initial` and `new` are the config digests before and after."""
    return router_event(
        action=f"{SERVICE}.{action}",
        message=f"event-router: {action.replace('.', ' ')} {subject}"
        + (" -failure" if failure else ""),
        target={
            "id": instance_crn(subject),
            "name": subject.split(":", 1)[-1],
            "typeURI": f"event-router/{subject.split(':', 1)[0]}",
        },
        outcome="failure" if failure else "success",
        reason_code=status if failure else 200,
        reason_type=HTTPStatus(status).phrase if failure else "OK",
        severity="warning" if failure or action.endswith("delete") else "normal",
        initiator={
            "id": f"token-{who}",
            "name": who,
            "typeURI": "service/security/clientid",
            "credential": {"type": "token"},
            "host": {"address": address},
        },
        extra={
            "requestData": {
                "updateType": action.rsplit(".", 1)[-1],
                "initialValue": initial,
                "newValue": new,
                **({"reasonForFailure": failure} if failure else {}),
            }
        },
    )


def reload_event(
    *,
    initiator: str,
    initial: str,
    new: str | None,
    added: Sequence[str],
    changed: Sequence[str],
    removed: Sequence[str],
    failure: str | None,
) -> dict[str, Any]:
    """A config reload, applied or refused, with the targets it added, changed and removed."""
    return router_event(
        action=RELOAD_ACTION,
        message=f"event-router: reload config {'failed' if failure else 'applied'}",
        target={
            "id": instance_crn("config:router.yaml"),
            "name": "configuration",
            "typeURI": "event-router/config",
        },
        outcome="failure" if failure else "success",
        reason_code=400 if failure else 200,
        reason_type="Bad Request" if failure else "OK",
        severity="warning",
        initiator={
            "id": f"event-router-{initiator}",
            "name": initiator,
            "typeURI": "service/security/clientid",
            "credential": {"type": "token"},
        },
        extra={
            "requestData": {
                "updateType": "config",
                "initialValue": initial,
                "newValue": new,
                "targetsAdded": list(added),
                "targetsChanged": list(changed),
                "targetsRemoved": list(removed),
                **({"reasonForFailure": failure} if failure else {}),
            }
        },
    )


def alert_event(
    *,
    kind: str,
    name: str,
    query: str,
    view: str | None,
    presence: bool,
    count: int,
    threshold: int | None,
    window_s: float,
    sample: Sequence[str],
    firings: int,
) -> dict[str, Any]:
    """An alert's trigger (`kind` trigger) or resolve: its name, query (and view), the
    matches in its window when it happened, its threshold or absence window, and the ids of
    the latest matching events, so a receiver can look them up (`event-router query`)."""
    triggered = kind == "trigger"
    if presence:
        what = f"{counted(count, 'match', 'matches')} in {window_s:g} s (threshold {threshold})"
    else:
        what = f"no match for {window_s:g} s" if triggered else "a match came"
    return router_event(
        action=ALERT_TRIGGER_ACTION if triggered else ALERT_RESOLVE_ACTION,
        message=f"event-router: alert {name} {'triggered' if triggered else 'resolved'}: {what}",
        target={
            "id": instance_crn(f"alert:{name}"),
            "name": name,
            "typeURI": "event-router/alert",
        },
        severity="warning" if triggered else "normal",
        extra={
            "requestData": {
                "alert": name,
                "query": query,
                **({"view": view} if view else {}),
                "condition": "presence" if presence else "absence",
                "state": "firing" if triggered else "ok",
                "count": count,
                **({"threshold": threshold} if presence else {}),
                "window_s": window_s,
                "firings": firings,
                "sample_event_ids": list(sample),
            }
        },
    )


def router_target(target_id: str) -> dict[str, str]:
    """The `target` of an event about one of the router's targets."""
    return {
        "id": instance_crn(f"target:{target_id}"),
        "name": target_id,
        "typeURI": "event-router/target",
    }


def chain_missing_event(target_id: str, missing: dict[str, Any]) -> dict[str, Any]:
    """A chained target's files found short of the head the journal kept, at start: places
    written and acknowledged were cut off its archive while the router was down. `missing`
    is the chain's report (first_seq, last_seq, found_seq, message), so an operator's alerting
    sees a cut archive with its numbers, not only the log line."""
    return router_event(
        action=CHAIN_MISSING_ACTION,
        message=f"event-router: chain of target {target_id} cut: {missing['message']}",
        target=router_target(target_id),
        outcome="failure",
        reason_code=409,
        reason_type="Conflict",
        severity="critical",
        extra={
            "requestData": {
                "target_id": target_id,
                "first_seq": missing["first_seq"],
                "last_seq": missing["last_seq"],
                "found_seq": missing["found_seq"],
                "reasonForFailure": missing["message"],
            }
        },
    )


def validation_event(target_id: str) -> Event:
    """The test write of a target's validation: an event from the router, naming the target."""
    return Event.from_body(
        router_event(
            action=VALIDATE_ACTION,
            message=f"event-router: validate target {target_id}",
            target=router_target(target_id),
        )
    )
