"""Log lines as JSON objects (for journald, containers and log shippers) or plain text.

Log calls use %-style arguments and name things by id; no event body is ever logged, so an
event's content cannot leak through the logs. Counts in log lines and command output read as
English does (`1 target`, `2 targets`) through `counted`.
"""

from __future__ import annotations

import logging
import sys

import orjson

from router.observe.metrics import utc_iso


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": utc_iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 target`, `0 targets`, `2 entries` (with `plural` for a noun that is not just +s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def setup_logging(fmt: str = "json", level: str = "info") -> None:
    """Send the router's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per request: too much for an ingest endpoint.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
