"""`event-router dlq list | show | redrive`: what operators do with dead letters.

`list` and `show` read the dead-letter files directly (the daemon need not run). `redrive` asks
the running daemon, which owns the journal, to put the letters back on it for one target; the
daemon streams its progress and this module draws it as a bar on stderr.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import aiohttp
import orjson

from router.clients import base_url
from router.config import Config
from router.deadletter import Letter, LetterFilter, letter_files, letters_path, read_letters
from router.observe.logformat import counted

TABLE_COLUMNS = ("last_attempt_at", "reason", "status", "event_id", "action", "route")
# Why letters the daemon skipped in a redrive stay where they are (the daemon names the why).
SKIPPED_BECAUSE = {
    "journal_corrupt": "the journal record failed its checksum, so there is no event to send",
    "invalid_event": "the event does not pass the daemon's validation now",
    "unreadable_line": "the line in the dead-letter file is not JSON",
}
# Answers of the daemon that mean the command was wrong, not that the redrive failed.
USAGE_REFUSALS = frozenset({"unknown_target", "bad_filter"})


def deadletter_dir(config: Config) -> Path:
    return config.storage.dead_letter_dir()


def list_letters(
    config: Config, out: TextIO | None = None, *, stored: Mapping[str, list[Letter]] | None = None
) -> int:
    """One line per target: how many letters, by reason, and the time span they cover.
    `stored`: the letters of storage.backend jetstream (read from their streams), by target."""
    out = out or sys.stdout
    letters_of: dict[str, Iterable[Letter]]
    if stored is None:
        where = str(deadletter_dir(config))
        files = letter_files(deadletter_dir(config)).values()
        letters_of = {path.stem: read_letters(path) for path in files}
    else:  # a stream emptied by a redrive stays: a target with no letters is not shown
        where = f"the JetStream streams {config.storage.jetstream.stream}_DLQ_*"
        letters_of = {target_id: letters for target_id, letters in stored.items() if letters}
    if not letters_of:
        print(f"no dead letters under {where}", file=out)
        return 0
    print(f"{'target':<24} {'letters':>8}  {'first':<24} {'last':<24} reasons", file=out)
    for target_id, letters in letters_of.items():
        reasons: Counter[str] = Counter()
        times = []
        for letter in letters:
            reasons[str(letter.get("reason"))] += 1
            if at := letter.get("last_attempt_at") or letter.get("received_at"):
                times.append(at)
        by_reason = ", ".join(f"{reason}={n}" for reason, n in reasons.most_common())
        first, last = (min(times), max(times)) if times else ("-", "-")
        print(
            f"{target_id:<24} {sum(reasons.values()):>8}  {first:<24} {last:<24} {by_reason}",
            file=out,
        )
    return 0


def show_letters(
    config: Config,
    target_id: str,
    wanted: LetterFilter,
    *,
    limit: int | None,
    fmt: str,
    out: TextIO | None = None,
    stored: Mapping[str, list[Letter]] | None = None,
) -> int:
    """The target's letters that match, as NDJSON or a readable table. A target that is
    neither in the config nor has a dead-letter file (a removed target's letters still show)
    is a usage error: exit 2."""
    out = out or sys.stdout
    path = letters_path(deadletter_dir(config), target_id)
    known = [t.id for t in config.targets]
    kept = target_id in stored if stored is not None else path.exists()
    if target_id not in known and not kept:
        print(
            f"no target {target_id!r} in the config and no dead letters for it "
            f"(targets: {', '.join(known) or 'none'})",
            file=sys.stderr,
        )
        return 2
    shown = 0
    if fmt == "table":
        print("  ".join(f"{c:<24}" for c in TABLE_COLUMNS).rstrip(), file=out)
    letters = stored.get(target_id, []) if stored is not None else read_letters(path)
    for letter in letters:
        if not wanted(letter):
            continue
        if limit is not None and shown >= limit:
            break
        shown += 1
        if fmt == "table":
            print("  ".join(f"{_cell(letter, c):<24}" for c in TABLE_COLUMNS).rstrip(), file=out)
        else:
            print(orjson.dumps(letter).decode(), file=out)
    if fmt == "table":
        print(f"({counted(shown, 'letter')})", file=out)
    return 0


def _cell(letter: dict[str, Any], column: str) -> str:
    event = letter.get("event") or {}
    value = {"event_id": event.get("id"), "action": event.get("action")}.get(
        column, letter.get(column)
    )
    return "-" if value is None else str(value)


async def redrive(
    config: Config,
    target_id: str,
    query: dict[str, str],
    *,
    url: str | None,
    token: str | None = None,
    err: TextIO | None = None,
) -> int:
    """Ask the daemon to redrive (with an admin token when it has auth on); draw its
    progress. Exit code 0 when it finished (nothing matching is nothing to do), 1 when it
    failed or when letters matched but none could be redriven, 2 for an unknown target."""
    err = err or sys.stderr
    base = base_url(config, url)
    endpoint = f"{base.rstrip('/')}/v1/deadletters/{target_id}/redrive"
    if query:
        endpoint += "?" + urlencode(query)
    done = total = 0
    skipped: dict[str, int] = {}
    stopped_by = ""  # the daemon's reason for ending a redrive early (a full journal)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(endpoint, headers=headers) as resp,
        ):
            if resp.status != 200:
                body = await resp.json(content_type=None)
                print(f"redrive refused: {resp.status} {body['error']['message']}", file=err)
                return 2 if body["error"].get("code") in USAGE_REFUSALS else 1
            async for line in resp.content:
                if line.strip():
                    progress = orjson.loads(line)
                    done, total = progress["done"], progress["total"]
                    skipped = progress.get("skipped", skipped)
                    if "error" in progress:
                        stopped_by = f": {progress['error']['message']}"
                    if total:
                        draw_progress(done, total, err)
    except aiohttp.ClientError as exc:
        print(f"cannot reach the daemon at {base}: {exc}", file=err)
        return 1
    if total:
        print(file=err)
    if done < total:
        print(f"redrive stopped after {done} of {counted(total, 'letter')}{stopped_by}", file=err)
        return 1
    for why, count in sorted(skipped.items()):
        because = SKIPPED_BECAUSE.get(why, "it cannot be redriven")
        print(f"{counted(count, 'letter')} left in the file, {why}: {because}", file=err)
    if not total:
        if skipped:
            print(
                f"nothing redriven: none of the matching letters of target {target_id} "
                "can be redriven",
                file=err,
            )
            return 1
        print(f"no dead letters of target {target_id} match; nothing to redrive", file=err)
        return 0
    print(
        f"redrove {counted(done, 'dead letter')} of target {target_id} back onto the journal",
        file=err,
    )
    return 0


def draw_progress(done: int, total: int, out: TextIO, width: int = 40) -> None:
    """`[#########.........]  450/1000  45%`, redrawn in place."""
    filled = width * done // total if total else width
    percent = 100 * done // total if total else 100
    out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done:>8}/{total:<8} {percent:3d}%")
    out.flush()
