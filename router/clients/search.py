"""`event-router query 'QUERY' PATH...`: search file-target archives with the query language.

A PATH is an archive as the `file` target writes it: `events.ndjson`, and with it its rotated
files `events.ndjson.1` ... (the higher the number, the older), each of which may have been
gzip-compressed afterwards (`events.ndjson.3.gz`; gzip is recognised by its magic bytes, not
its name). A directory stands for every archive in it. Files are read oldest first, so events
come out in the order they were written, and `--limit` keeps the first matches.

`--since` / `--until` bound `eventTime` (since inclusive, until exclusive); an event whose
`eventTime` cannot be read is left out when either bound is given. A line that is not JSON is
counted and reported at the end, never silently skipped. On a terminal, archives larger than
LARGE_ARCHIVE_BYTES get a progress bar on stderr, by bytes read from disk.

`cos://TARGET[/PREFIX]` reads the objects a cloud_object_storage target of the config wrote
instead (`search_bucket`), with the target's own endpoint and credentials.
"""

from __future__ import annotations

import gzip
import re
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

from router.deadletter import parse_since
from router.errors import QueryError
from router.events import crn_location, parse_event_time
from router.evidence.checkpoint import is_checkpoint
from router.observe.logformat import counted
from router.query import Query

LARGE_ARCHIVE_BYTES = 64 * 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
# `events.ndjson.3` or `events.ndjson.3.gz`: a rotation of `events.ndjson`
_ROTATED = re.compile(r"^(?P<base>.+?)(?:\.(?P<n>\d+))?(?P<gz>\.gz)?$")
TABLE_COLUMNS = (
    ("eventTime", 29),
    ("location", 10),
    ("action", 38),
    ("outcome", 8),
    ("code", 4),
    ("initiator", 26),
    ("target", 0),
)


def describe_query_error(text: str, error: QueryError) -> str:
    """The query, and a caret under the column the error names."""
    line = text.replace("\n", " ").replace("\t", " ")
    return f"bad query: {error.message}\n  {line}\n  {' ' * (error.column - 1)}^"


def archive_files(paths: Sequence[Path]) -> list[Path]:
    """Every file to read, oldest first; rotations of a named archive are included."""
    found: dict[Path, tuple[str, int, str]] = {}
    for path in paths:
        if path.is_dir():
            candidates = [p for p in path.iterdir() if _ARCHIVE_NAME.match(p.name)]
        else:
            escaped = re.sub(r"([*?\[])", r"[\1]", path.name)
            candidates = [
                p
                for p in [path, *path.parent.glob(escaped + ".*")]
                if _rotation(p.name)[0] == path.name
            ]
        for candidate in candidates:
            if candidate.is_file():
                base, n = _rotation(candidate.name)
                # Per archive, the oldest rotation (highest n) first, the live file last.
                found[candidate.resolve()] = (base, -n, candidate.name)
    return sorted(found, key=lambda p: found[p])


_ARCHIVE_NAME = re.compile(r".+\.ndjson(\.\d+)?(\.gz)?$")


def _rotation(name: str) -> tuple[str, int]:
    """`events.ndjson.3.gz` -> (`events.ndjson`, 3); `events.ndjson` -> (`events.ndjson`, 0)."""
    match = _ROTATED.match(name)
    assert match is not None  # the pattern matches every name
    return match["base"], int(match["n"]) if match["n"] else 0


def parse_time(text: str, what: str) -> datetime:
    """`--since/--until`: ISO 8601; a bare date is midnight UTC, a naive time is UTC."""
    try:
        return parse_since(text)
    except ValueError as exc:
        raise ValueError(f"{what}: {text!r} is not an ISO 8601 time") from exc


def event_time(event: dict[str, Any]) -> datetime | None:
    return parse_event_time(event.get("eventTime"))


@dataclass(slots=True)
class SearchStats:
    """What a search went through: shown at the end, so nothing is skipped silently."""

    files: int = 0
    lines: int = 0
    matched: int = 0
    not_json: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Progress:
    """A bar on stderr, by bytes read from disk (compressed bytes for a .gz file)."""

    total: int
    out: TextIO
    done: int = 0
    _drawn: int = -1

    def advance(self, to: int) -> None:
        self.done = to
        percent = 100 * to // self.total if self.total else 100
        if percent != self._drawn:
            self._drawn = percent
            width = 40
            filled = width * percent // 100
            self.out.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {to / 2**20:8.1f}/"
                f"{self.total / 2**20:.1f} MiB {percent:3d}%"
            )
            self.out.flush()

    def finish(self) -> None:
        self.advance(self.total)
        self.out.write("\n")
        self.out.flush()


def _lines(path: Path, progress: Progress | None, base: int) -> Iterator[bytes]:
    """The lines of one archive file, plain or gzip; moves the bar by raw bytes read."""
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        stream: Iterable[bytes] = gzip.GzipFile(fileobj=raw) if magic == GZIP_MAGIC else raw
        for number, line in enumerate(stream, start=1):
            if progress is not None and number % 1024 == 0:
                progress.advance(base + raw.tell())
            yield line


def search(
    query: Query,
    paths: Sequence[Path],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    fmt: str = "ndjson",
    progress: bool | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the events of the archives under `paths` that match; the exit code (0, or 1 when
    a PATH holds no archive). `progress` None means: a bar when err is a terminal and the
    archives are large."""
    # Looked up now, not at import: tests and callers may have replaced them.
    out = out or sys.stdout
    err = err or sys.stderr
    files = archive_files(paths)
    if not files:
        print(f"no archive files under {', '.join(map(str, paths))}", file=err)
        return 1
    total = sum(f.stat().st_size for f in files)
    show = progress if progress is not None else err.isatty() and total >= LARGE_ARCHIVE_BYTES
    bar = Progress(total, err) if show else None
    stats = SearchStats()
    if fmt == "table":
        print(_row({name: name for name, _ in TABLE_COLUMNS}), file=out)
    base = 0
    for path in files:
        if limit is not None and stats.matched >= limit:
            break
        stats.files += 1
        scan(_lines(path, bar, base), str(path), query, stats, since, until, limit, fmt, out)
        base += path.stat().st_size
    if bar is not None:
        bar.finish()
    finish(stats, fmt, out, err)
    return 0


def scan(
    lines: Iterable[bytes],
    name: str,
    query: Query,
    stats: SearchStats,
    since: datetime | None,
    until: datetime | None,
    limit: int | None,
    fmt: str,
    out: TextIO,
) -> None:
    """Print the matching lines of one archive file or object, up to `limit` in all."""
    for number, line in enumerate(lines, start=1):
        # An evidence checkpoint (router/evidence) is no event: no query may match it.
        if not line.strip() or is_checkpoint(line):
            continue
        stats.lines += 1
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            stats.not_json.append(f"{name}:{number}")
            continue
        if not isinstance(event, dict) or not wanted(event, query, since, until):
            continue
        stats.matched += 1
        if fmt == "table":
            print(_row(_cells(event)), file=out)
        else:
            out.write(line.decode("utf-8", "replace").rstrip("\n") + "\n")
        if limit is not None and stats.matched >= limit:
            return


def finish(stats: SearchStats, fmt: str, out: TextIO, err: TextIO) -> None:
    """The table's count line, and what was skipped (never silently)."""
    if fmt == "table":
        print(f"({counted(stats.matched, 'event')} in {counted(stats.files, 'file')})", file=out)
    if stats.not_json:
        shown = ", ".join(stats.not_json[:5]) + (" ..." if len(stats.not_json) > 5 else "")
        were = "was" if len(stats.not_json) == 1 else "were"
        lines = counted(len(stats.not_json), "line")
        print(f"{lines} {were} not JSON and {were} skipped: {shown}", file=err)


async def search_bucket(
    query: Query,
    objects: AsyncIterator[tuple[str, bytes]],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    fmt: str = "ndjson",
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`search` over the objects of a bucket (key, body; gzip or plain), in key order, which
    for the COS target's names is time order within each account and region. The exit code:
    0, or 1 when the prefix holds no object."""
    out = out or sys.stdout
    err = err or sys.stderr
    stats = SearchStats()
    if fmt == "table":
        print(_row({name: name for name, _ in TABLE_COLUMNS}), file=out)
    async for key, body in objects:
        stats.files += 1
        data = gzip.decompress(body) if body[:2] == GZIP_MAGIC else body
        scan(data.splitlines(), key, query, stats, since, until, limit, fmt, out)
        if limit is not None and stats.matched >= limit:
            break
    if stats.files == 0:
        print("no objects under that bucket prefix", file=err)
        return 1
    finish(stats, fmt, out, err)
    return 0


def wanted(
    event: dict[str, Any], query: Query | None, since: datetime | None, until: datetime | None
) -> bool:
    """Whether a search keeps `event`: within the bounds on `eventTime` (when given) and
    matching `query` (None: every event, as the console's search with an empty query box)."""
    if since is not None or until is not None:
        when = event_time(event)
        if when is None:
            return False
        if since is not None and when < since:
            return False
        if until is not None and when >= until:
            return False
    return query is None or query.matches(event)


def _cells(event: dict[str, Any]) -> dict[str, str]:
    def get(*path: str) -> str:
        value: Any = event
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return "-" if value is None else str(value)

    crn = event.get("logSourceCRN")
    return {
        "eventTime": get("eventTime"),
        "location": crn_location(crn) if isinstance(crn, str) else "-",
        "action": get("action"),
        "outcome": get("outcome"),
        "code": get("reason", "reasonCode"),
        "initiator": get("initiator", "name"),
        "target": get("target", "name"),
    }


def _row(cells: dict[str, str]) -> str:
    return "  ".join(
        f"{cells[name]:<{width}}" if width else cells[name] for name, width in TABLE_COLUMNS
    ).rstrip()
