"""The `syslog` target: RFC 5424 messages over TCP with octet counting, or over TLS.

SIEMs ingest syslog. Each event becomes one message:

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID [SD-ID id=".." action=".." ...] BOM{event JSON}

PRI = facility (default 13, log audit) * 8 + the event's severity (normal -> 6 informational,
warning -> 4 warning, critical -> 2 critical); TIMESTAMP is the eventTime; APP-NAME the event's
service; MSGID its action (cut to RFC 5424's 32 characters; the whole action is in the
structured data and the JSON). Frames are `<length> <message>` (RFC 6587 octet counting), so a
message may hold any byte, newlines included.

The connection is kept open between batches, with its reader: a receiver that restarts or
closes an idle connection shows as end-of-file there, and the next batch then goes on a new
connection instead of into the closed one (where the kernel would take it and the peer answer
with a reset, after we had counted it delivered).

TCP acknowledges bytes, not messages: a batch counts as delivered once the kernel took it, and
a receiver that dies after that (or closes the connection while the batch is on its way) loses
it without either side noticing. That is syslog's own limit (only RELP acknowledges messages);
an audit trail that must be provable end to end should prefer the http or cloud_logs targets,
and use syslog as a feed for a SIEM.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from router.errors import RetryableDeliveryError
from router.events import Event
from router.targets._net import (
    TLS_SCHEMA,
    AddressBound,
    TlsClientConfig,
    bound_address,
    tls_context,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SyslogEndpointConfig:
    """A syslog receiver (a SIEM, rsyslog, syslog-ng): RFC 5424 messages over TCP with octet
    counting (RFC 6587), or over TLS (RFC 5425)."""

    host: str
    port: int | None = None  # default: 514 for tcp, 6514 for tls
    transport: Literal["tcp", "tls"] = "tcp"
    tls_verify: bool = True
    tls: TlsClientConfig | None = None
    facility: int = 13  # log audit
    app_name: str | None = None  # default: the event's service (logSourceCRN)
    hostname: str | None = None  # default: this host's name
    sd_id: str = "audit@32473"
    bom: bool = True  # RFC 5424: a UTF-8 MSG starts with a BOM
    timeout_s: float = 10.0
    max_message_bytes: int = 64 * 1024


# The JSON Schema of `syslog_endpoint` (the config loader puts it in the target section).
ENDPOINT_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["host"],
    "properties": {
        "host": {"type": "string", "minLength": 1},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "transport": {"enum": ["tcp", "tls"]},
        "tls_verify": {"type": "boolean"},
        "tls": TLS_SCHEMA,
        "facility": {"type": "integer", "minimum": 0, "maximum": 23},
        "app_name": {"type": "string", "pattern": "^[!-~]{1,48}$"},
        "hostname": {"type": "string", "pattern": "^[!-~]{1,255}$"},
        "sd_id": {
            "type": "string",
            "pattern": "^[!#-<>-\\\\^-~]{1,32}$",
            "description": 'RFC 5424 SD-ID: printable ASCII except = ] " and space',
        },
        "bom": {"type": "boolean"},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "max_message_bytes": {"type": "integer", "minimum": 480},
    },
}

SEVERITY = {"normal": 6, "warning": 4, "critical": 2}
BOM = b"\xef\xbb\xbf"
DEFAULT_PORTS = {"tcp": 514, "tls": 6514}
MSGID_MAX = 32
APP_NAME_MAX = 48


def sd_escape(value: str) -> str:
    """RFC 5424 PARAM-VALUE: `"`, `\\` and `]` are escaped with a backslash."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def header_token(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, `-` when empty, cut to its limit."""
    cleaned = "".join(c for c in value if "!" <= c <= "~")[:limit]
    return cleaned or "-"


def timestamp(event: Event) -> str:
    """The eventTime as RFC 5424 wants it: RFC 3339, at most 6 fraction digits, Z or +hh:mm."""
    when = event.event_time or datetime.fromtimestamp(event.received_at, UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


class SyslogTarget:
    """Writes octet-counted RFC 5424 frames on one kept-open connection."""

    def __init__(self, target_id: str, endpoint: SyslogEndpointConfig) -> None:
        self.id = target_id
        self.endpoint = endpoint
        self.port = endpoint.port or DEFAULT_PORTS[endpoint.transport]
        self.hostname = header_token(endpoint.hostname or socket.gethostname(), 255)
        self._ssl: bool | ssl.SSLContext = (
            tls_context(endpoint.tls_verify, endpoint.tls) if endpoint.transport == "tls" else False
        )
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.bound: AddressBound | None = None  # set by build_target (targets/__init__.py)

    async def start(self) -> None:
        """Connections are opened on first send, so a receiver that is down delays nothing."""

    def message(self, event: Event) -> bytes:
        """One RFC 5424 message (without its frame)."""
        body = event.body
        pri = self.endpoint.facility * 8 + SEVERITY.get(body.get("severity", ""), 6)
        app = header_token(self.endpoint.app_name or event.service or "event-router", APP_NAME_MAX)
        params = {
            "id": event.id,
            "action": event.action,
            "outcome": str(body.get("outcome", "")),
            "location": event.location,
        }
        sd = " ".join(f'{name}="{sd_escape(value)}"' for name, value in params.items())
        head = (
            f"<{pri}>1 {timestamp(event)} {self.hostname} {app} - "
            f"{header_token(event.action, MSGID_MAX)} [{self.endpoint.sd_id} {sd}] "
        )
        return head.encode() + (BOM if self.endpoint.bom else b"") + event.encoded()

    def unsendable(self, event: Event) -> str | None:
        if len(self.message(event)) > self.endpoint.max_message_bytes:
            return "too_large"
        return None

    def requests(self, batch: Sequence[Event]) -> Iterator[Sequence[Event]]:
        yield batch  # one request (one write) takes the whole batch

    async def send(self, batch: Sequence[Event]) -> None:
        frames = b"".join(
            str(len(message)).encode() + b" " + message
            for message in (self.message(event) for event in batch)
        )
        try:
            writer = await self._connection()
            writer.write(frames)
            await asyncio.wait_for(writer.drain(), self.endpoint.timeout_s)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            await self.close()  # the next attempt starts on a fresh connection
            where = f"{self.endpoint.host}:{self.port}"
            raise RetryableDeliveryError(
                self.id, f"syslog {self.endpoint.transport} to {where}: {exc or type(exc).__name__}"
            ) from exc

    def _peer_gone(self) -> bool:
        """Has the receiver closed the connection? Syslog receivers send nothing, so end of
        file on the reader is the only sign of a peer that closed (a restart, an idle
        timeout); a write into that connection would be taken by our kernel and lost."""
        writer, reader = self._writer, self._reader
        if writer is None or reader is None:
            return False
        return writer.is_closing() or reader.at_eof() or reader.exception() is not None

    async def _connection(self) -> asyncio.StreamWriter:
        if self._peer_gone():
            await self.close()  # what the receiver had before it closed is out of our hands
        writer = self._writer
        if writer is None:
            host = await bound_address(self.endpoint.host, self.port, self.bound)
            self._reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    self.port,
                    ssl=self._ssl or None,
                    server_hostname=self.endpoint.host if self._ssl else None,
                ),
                self.endpoint.timeout_s,
            )
            self._writer = writer
        assert writer is not None
        return writer

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
