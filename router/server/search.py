"""GET /v1/search (admin): a file target's archive searched with the query language, a page at
a time, for the console (what `event-router query` does on the command line).

    /v1/search?target=ID&query=Q[&since=T][&until=T][&limit=N][&cursor=C]

The archive is read as the command reads it (router/clients/search.py: rotations oldest
first, gzip known by its magic bytes, evidence checkpoints skipped; an empty query keeps every
event). A page ends at `limit` matches (at most MAX_PAGE) or after SCAN_LINES lines, whichever
comes first, and names where the next one starts (`next`; null at the end of the archive as
it is now): the file's inode and the byte offset, so the next page reads nothing twice and
misses nothing even if the live file was rotated meanwhile (a rename keeps the inode). A cursor
whose file is gone (removed, or compressed into a new file) is 410 `cursor_expired`; a file
renamed away between listing and reading it is 409 `archive_changed` (ask again). A last
line of the live file that is still being written is left for a later page.

Each page is read in a thread and is bounded by SCAN_LINES, so a search holds the process for
a bounded time; the console asks only when the operator does (it never polls a search). The
archive holds events as journaled, after redaction.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web

from router.clients.search import GZIP_MAGIC, archive_files, parse_time, wanted
from router.errors import QueryError, RequestError, StorageUnavailableError
from router.evidence.checkpoint import is_checkpoint
from router.intake.http import error_response, json_response
from router.query import Query, parse
from router.server.reads import in_read_thread

DEFAULT_PAGE: Final = 50
MAX_PAGE: Final = 200
# Lines read per page at most, matching or not: ~0.1-0.3 s of one core.
SCAN_LINES: Final = 50_000


class CursorExpiredError(Exception):
    """The file a cursor points into is no longer part of the archive."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page stopped: a file (by inode) and a byte offset into its (gunzipped) lines."""

    inode: int
    offset: int

    def __str__(self) -> str:
        return f"{self.inode}-{self.offset}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        inode, _, offset = text.partition("-")
        if not (inode.isascii() and inode.isdigit() and offset.isascii() and offset.isdigit()):
            raise ValueError(f"cursor: {text!r} is not one this endpoint gave")
        if int(inode) >= 2**64 or int(offset) >= 2**63:  # what a file offset can be
            raise ValueError(f"cursor: {text!r} is not one this endpoint gave")
        return cls(int(inode), int(offset))


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """What to look for in one archive, and from where."""

    query: Query | None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = DEFAULT_PAGE
    cursor: Cursor | None = None
    scan_lines: int = SCAN_LINES


def search_page(archive: Path, wanted_events: SearchRequest) -> dict[str, Any]:
    """One page of matching events of `archive` (with its rotations), from the cursor."""
    files = archive_files([archive])
    start, offset = 0, 0
    if wanted_events.cursor is not None:
        inodes = [path.stat().st_ino for path in files]
        if wanted_events.cursor.inode not in inodes:
            raise CursorExpiredError
        start, offset = inodes.index(wanted_events.cursor.inode), wanted_events.cursor.offset
    found: list[dict[str, Any]] = []
    scanned = not_json = 0
    for path in files[start:]:
        inode = path.stat().st_ino
        with open(path, "rb") as raw:
            magic = raw.read(2)
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw) if magic == GZIP_MAGIC else raw
            try:
                stream.seek(offset)
                position, offset = offset, 0
                for line in _complete_lines(stream):
                    if len(found) >= wanted_events.limit or scanned >= wanted_events.scan_lines:
                        return _page(found, Cursor(inode, position), scanned, not_json)
                    position += len(line)
                    scanned += 1
                    if not line.strip() or is_checkpoint(line):
                        continue
                    try:
                        event = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        not_json += 1
                        continue
                    if isinstance(event, dict) and wanted(
                        event, wanted_events.query, wanted_events.since, wanted_events.until
                    ):
                        found.append(event)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                # A rotation gzipped by hand and cut short (or being gzipped now).
                raise StorageUnavailableError(f"cannot read {path}: {exc}") from exc
    return _page(found, None, scanned, not_json)


def _complete_lines(stream: Iterable[bytes]) -> Iterable[bytes]:
    """The lines that end in a newline (a last one still being written is not yet a line)."""
    for line in stream:
        if not line.endswith(b"\n"):
            return
        yield line


def _page(
    events: list[dict[str, Any]], following: Cursor | None, scanned: int, not_json: int
) -> dict[str, Any]:
    return {
        "events": events,
        "next": str(following) if following is not None else None,
        "scanned_lines": scanned,
        "not_json": not_json,
    }


@dataclass(slots=True)
class SearchEndpoint:
    """The handler, over the running config's file archives (they change on reload)."""

    archives: Callable[[], Mapping[str, Path]]  # file target id -> its live archive

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/search", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        target_id = request.query.get("target", "")
        archives = self.archives()
        archive = archives.get(target_id)
        if archive is None:
            known = ", ".join(sorted(archives)) or "none"
            return error_response(
                RequestError(
                    404,
                    "unknown_target",
                    f"no file target {target_id!r}: search reads the archives of file "
                    f"targets ({known})",
                )
            )
        text = request.query.get("query", "")
        try:
            query = parse(text) if text.strip() else None
        except QueryError as exc:
            error = {"code": "bad_query", "message": exc.message, "column": exc.column}
            return json_response({"error": error}, status=400)
        try:
            wanted_events = _search_request(request, query)
        except ValueError as exc:
            return error_response(RequestError(400, "bad_filter", str(exc)))
        try:
            found = await in_read_thread(search_page, archive, wanted_events)
        except FileNotFoundError:
            return error_response(
                RequestError(
                    409,
                    "archive_changed",
                    "the file target rotated its archive while this page was read; ask again",
                )
            )
        except StorageUnavailableError as exc:
            return error_response(RequestError(503, "archive_unreadable", str(exc)))
        except CursorExpiredError:
            return error_response(
                RequestError(
                    410,
                    "cursor_expired",
                    "the file this page continued is no longer in the archive (removed or "
                    "compressed since); search again from the start",
                )
            )
        return json_response({"target": target_id, "query": str(query or ""), **found})


def _search_request(request: web.Request, query: Query | None) -> SearchRequest:
    since, until = request.query.get("since"), request.query.get("until")
    limit_text = request.query.get("limit", str(DEFAULT_PAGE))
    # isascii: str.isdigit() also takes '²' (which int() refuses) and other scripts' digits.
    if not (limit_text.isascii() and limit_text.isdigit()) or not 1 <= int(limit_text) <= MAX_PAGE:
        raise ValueError(f"limit: {limit_text!r} must be a number from 1 to {MAX_PAGE}")
    cursor = request.query.get("cursor")
    return SearchRequest(
        query=query,
        since=parse_time(since, "since") if since else None,
        until=parse_time(until, "until") if until else None,
        limit=int(limit_text),
        cursor=Cursor.parse(cursor) if cursor else None,
    )
