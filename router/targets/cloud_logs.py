"""The `cloud_logs` target: IBM Cloud Logs (and Coralogix), `POST /logs/v1/singles`.

Each event becomes one log record the way IBM's own routing writes audit events into Cloud Logs:
`applicationName` `ibm-audit-event`, `subsystemName` `<service>:<instance>` from the event's
logSourceCRN, the event object as `text`, its `eventTime` as `timestamp` (ms) and its severity
mapped normal -> 3 (Info), warning -> 4 (Warn), critical -> 6 (Critical).

A batch is split into requests under `max_request_bytes` (2 MB), each sent, retried and
settled (delivered or dead-lettered) on its own by the worker. An event that can never be
taken is refused before any attempt, so it is dead-lettered with the reason instead of retried
for ever: over `max_event_bytes` (32 KB) is `too_large`, and an eventTime older than 24 hours
or more than 4 hours ahead is `too_old` / `too_far_in_future` (Cloud Logs would drop it while
answering 200). On 401/403 the IAM token is refreshed and the request tried once more before
the failure counts.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson

from router.errors import PermanentDeliveryError
from router.events import Event, crn_parts
from router.iam import SET_BY_LOADER, TrustedProfileConfig, token_source
from router.targets._net import AddressBound, new_session, post


@dataclass(frozen=True, slots=True, kw_only=True)
class CloudLogsEndpointConfig:
    """An IBM Cloud Logs instance (Coralogix-compatible `/logs/v1/singles`), reached with an
    IAM token for `api_key`: the endpoint's own, else the daemon's identity (the top-level
    `iam` section: a key or a trusted profile), as atracker's model has only `target_crn`
    (Cloud Logs takes service-to-service authorisation only). The ingress URL is derived
    from `target_crn` unless `ingress_url` overrides it (Coralogix, a test server)."""

    target_crn: str
    # Once loaded, one of the two is set: the endpoint's own key, else the daemon's identity
    # (its key, or its trusted profile: never in the YAML's endpoint, the loader sets it).
    api_key: str = field(default="", repr=False)
    trusted_profile: TrustedProfileConfig | None = field(default=None, metadata=SET_BY_LOADER)
    ingress_url: str | None = None
    iam_url: str = "https://iam.cloud.ibm.com"
    private: bool = False
    application_name: str = "ibm-audit-event"
    # Default: `<service>:<instance>` of each event's logSourceCRN, as IBM's own routing does.
    subsystem_name: str | None = None
    computer_name: str | None = None  # default: this host's name
    timeout_s: float = 30.0
    tls_verify: bool = True
    # Cloud Logs takes up to 2 MB per request and 32 KB per log record.
    max_request_bytes: int = 2_000_000
    max_event_bytes: int = 32 * 1024


# The JSON Schema of `cloudlogs_endpoint` (the config loader puts it in the target section).
ENDPOINT_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["target_crn"],
    "properties": {
        "target_crn": {
            "type": "string",
            "pattern": "^crn:v1:[a-z0-9-]+:(public|dedicated|local):logs:[a-z0-9-]+:[^:]*:"
            "[0-9a-fA-F-]+:[^:]*:[^:]*$",
            "description": "CRN of the Cloud Logs instance: its region and instance GUID give "
            "the ingress URL",
        },
        "api_key": {
            "type": "string",
            "minLength": 1,
            "description": "Use a reference: ${env:NAME} or ${file:/path}",
        },
        "ingress_url": {"type": "string", "pattern": "^https?://"},
        "iam_url": {"type": "string", "pattern": "^https?://"},
        "private": {"type": "boolean"},
        "application_name": {"type": "string", "minLength": 1},
        "subsystem_name": {"type": "string", "minLength": 1},
        "computer_name": {"type": "string", "minLength": 1},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "tls_verify": {"type": "boolean"},
        "max_request_bytes": {"type": "integer", "minimum": 1024},
        "max_event_bytes": {"type": "integer", "minimum": 1024},
    },
}


def needs_api_key(endpoint: Mapping[str, Any]) -> bool:
    """Cloud Logs takes IAM tokens only: an API key (its own or the daemon's) always."""
    return True


INGEST_PATH = "/logs/v1/singles"
SEVERITY = {"normal": 3, "warning": 4, "critical": 6}
OLDEST_S = 24 * 3600
FURTHEST_AHEAD_S = 4 * 3600
AUTH_STATUSES = frozenset({401, 403})


def ingress_url(target_crn: str, *, private: bool = False) -> str:
    """`https://<guid>.ingress[.private].<region>.logs.cloud.ibm.com` from the instance CRN."""
    parts = crn_parts(target_crn)
    region, guid = parts[5], parts[7]
    network = "ingress.private" if private else "ingress"
    return f"https://{guid}.{network}.{region}.logs.cloud.ibm.com"


def event_ms(event: Event) -> int | None:
    """The eventTime in ms since the epoch (the schema guarantees an ISO 8601 time)."""
    when = event.event_time
    return None if when is None else int(when.timestamp() * 1000)


class CloudLogsTarget:
    """Sends audit events to one Cloud Logs instance."""

    def __init__(self, target_id: str, endpoint: CloudLogsEndpointConfig) -> None:
        self.id = target_id
        self.endpoint = endpoint
        base = endpoint.ingress_url or ingress_url(endpoint.target_crn, private=endpoint.private)
        self.url = base.rstrip("/") + INGEST_PATH
        self.computer_name = endpoint.computer_name or socket.gethostname()
        self.tokens = token_source(endpoint.iam_url, endpoint.api_key, endpoint.trusted_profile)
        self._session: aiohttp.ClientSession | None = None
        self.bound: AddressBound | None = None  # set by build_target (targets/__init__.py)

    async def start(self) -> None:
        if self._session is None:
            self._session = new_session(
                self.endpoint.timeout_s, self.endpoint.tls_verify, self.bound
            )

    def unsendable(self, event: Event) -> str | None:
        if len(self._record(event)) > self.endpoint.max_event_bytes:
            return "too_large"
        ms = event_ms(event)
        now_ms = time.time() * 1000
        if ms is not None and ms < now_ms - OLDEST_S * 1000:
            return "too_old"
        if ms is not None and ms > now_ms + FURTHEST_AHEAD_S * 1000:
            return "too_far_in_future"
        return None

    def _record(self, event: Event) -> bytes:
        """One log record; the event's stored JSON is spliced in as `text`, not re-encoded."""
        crn = crn_parts(event.body.get("logSourceCRN", ""))
        head = {
            "applicationName": self.endpoint.application_name,
            "subsystemName": self.endpoint.subsystem_name or f"{crn[4]}:{crn[7]}",
            "computerName": self.computer_name,
            "severity": SEVERITY.get(event.body.get("severity", ""), 3),
        }
        ms = event_ms(event)
        if ms is not None:
            head["timestamp"] = ms
        return orjson.dumps(head)[:-1] + b',"text":' + event.encoded() + b"}"

    def requests(self, batch: Sequence[Event]) -> Iterator[Sequence[Event]]:
        """Runs of events whose records fit in one request under max_request_bytes; the
        worker settles each on its own."""
        for events, _ in self._grouped(batch):
            yield events

    def _grouped(self, batch: Sequence[Event]) -> Iterator[tuple[list[Event], list[bytes]]]:
        """The runs of `requests`, with their records."""
        events: list[Event] = []
        records: list[bytes] = []
        size = 2  # the brackets of the JSON array
        for event in batch:
            record = self._record(event)
            if records and size + len(record) + 1 > self.endpoint.max_request_bytes:
                yield events, records
                events, records, size = [], [], 2
            events.append(event)
            records.append(record)
            size += len(record) + 1  # and a comma
        if records:
            yield events, records

    async def send(self, batch: Sequence[Event]) -> None:
        await self.start()
        for _, records in self._grouped(batch):
            await self._post(b"[" + b",".join(records) + b"]")

    async def _post(self, body: bytes) -> None:
        assert self._session is not None
        for attempt in (1, 2):
            token = await self.tokens.token(self._session, self.id)
            refused = False

            async def check_auth(resp: aiohttp.ClientResponse) -> None:
                nonlocal refused
                refused = resp.status in AUTH_STATUSES

            try:
                await post(
                    self._session,
                    self.id,
                    self.url,
                    body,
                    {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
                    on_status=check_auth,
                )
                return
            except PermanentDeliveryError:
                if not refused or attempt == 2:
                    raise
                # The token expired or was revoked early: fetch a new one and try once more.
                self.tokens.invalidate(token)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
