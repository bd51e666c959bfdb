"""`event-router tail 'QUERY'`: follow a running daemon's live tail (GET /v1/tail, served by
router/server/tail.py) and print each matching event as NDJSON.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlencode

import aiohttp
import orjson

from router.observe.logformat import counted


@dataclass(frozen=True, slots=True)
class SseMessage:
    """One Server-Sent Event: its type and its (joined) data."""

    event: str
    data: str


async def sse_messages(content: aiohttp.StreamReader) -> AsyncIterator[SseMessage]:
    """Parse an SSE stream (the subset the tail sends: event, id, data, comments)."""
    kind, data = "message", list[str]()
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield SseMessage(kind, "\n".join(data))
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)


async def follow(
    base_url: str,
    query: str,
    *,
    limit: int | None = None,
    token: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    view: str | None = None,
) -> int:
    """`event-router tail`: print matching events as NDJSON until interrupted (or `limit`
    events); `view`: the daemon's saved view of that name (narrowed by `query`, if any).
    The exit code: 0, 1 when the daemon cannot be reached, 2 for a bad query or view."""
    out = out or sys.stdout
    err = err or sys.stderr
    params = {"query": query, **({"view": view} if view is not None else {})}
    url = f"{base_url.rstrip('/')}/v1/tail?{urlencode(params)}"
    shown = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(
                url,
                headers={
                    "Accept": "text/event-stream",
                    **({"Authorization": f"Bearer {token}"} if token else {}),
                },
            ) as resp,
        ):
            if resp.status != 200:
                body = await resp.json(content_type=None)
                error = body.get("error", {})
                if error.get("code") == "unknown_view":
                    print(f"tail: {error['message']} in the running daemon's config", file=err)
                    return 2
                if error.get("code") == "bad_query":
                    column = int(error["column"])
                    print(f"bad query: {error['message']}\n  {query}", file=err)
                    print(f"  {' ' * (column - 1)}^", file=err)
                    return 2
                print(f"tail refused: {resp.status} {error.get('message', '')}", file=err)
                return 1
            async for message in sse_messages(resp.content):
                if message.event == "ready":
                    shown_query = orjson.loads(message.data)["query"]
                    what = f"view {view} ({shown_query})" if view else query or "every event"
                    print(f"tailing {base_url} for {what}", file=err)
                elif message.event == "dropped":
                    dropped = orjson.loads(message.data)["dropped"]
                    print(f"(too slow: {counted(dropped, 'event')} dropped so far)", file=err)
                elif message.event == "event":
                    print(message.data, file=out, flush=True)
                    shown += 1
                    if limit is not None and shown >= limit:
                        return 0
    except aiohttp.ClientError as exc:
        print(f"cannot reach the daemon at {base_url}: {exc}", file=err)
        return 1
    print("the daemon ended the stream", file=err)
    return 0
