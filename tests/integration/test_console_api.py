"""The small JSON endpoints the console reads (GET /v1/search, /v1/deadletters): pages that
neither repeat nor miss an event when the archive rotates between them, a bounded read per
page, and errors with the place of the problem."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from router.errors import QueryError
from router.query import parse
from router.server.search import Cursor, CursorExpiredError, SearchRequest, search_page
from tests.conftest import StartDaemon
from tests.fakes import make_event, wait_for
from tests.helpers import ReceiverFactory, file_target, http_target, post, settled

ADMIN_TOKEN = "console-api-admin-token-0123456789"
INGEST_TOKEN = "console-api-ingest-token-0123456789"
SEED_QUERY = "host:secrets-manager reason.reasonType:Unauthorized"


def write_events(path: Path, ids: list[str], *, tail: bytes = b"") -> None:
    lines = [
        orjson.dumps(make_event(id=i, reason={"reasonCode": 401, "reasonType": "Unauthorized"}))
        for i in ids
    ]
    path.write_bytes(b"".join(line + b"\n" for line in lines) + tail)


def ids(page: dict[str, Any]) -> list[str]:
    return [event["id"] for event in page["events"]]


def test_search_pages_continue_across_a_rotation_without_repeats_or_gaps(tmp_path: Path) -> None:
    archive = tmp_path / "events.ndjson"
    write_events(archive, [f"a{i}" for i in range(5)])
    query = parse(SEED_QUERY)
    first = search_page(archive, SearchRequest(query=query, limit=3))
    assert ids(first) == ["a0", "a1", "a2"] and first["next"]

    # The file target rotates: the live file becomes .1 (same inode) and a new one starts.
    archive.rename(tmp_path / "events.ndjson.1")
    write_events(archive, ["b0", "b1"])
    cursor = Cursor.parse(first["next"])
    second = search_page(archive, SearchRequest(query=query, limit=3, cursor=cursor))
    assert ids(second) == ["a3", "a4", "b0"]
    third = search_page(
        archive, SearchRequest(query=query, limit=3, cursor=Cursor.parse(second["next"]))
    )
    assert ids(third) == ["b1"] and third["next"] is None


def test_a_cursor_into_a_file_compressed_since_has_expired(tmp_path: Path) -> None:
    archive = tmp_path / "events.ndjson"
    write_events(archive, [f"a{i}" for i in range(4)])
    first = search_page(archive, SearchRequest(query=None, limit=2))
    rotated = tmp_path / "events.ndjson.1.gz"
    rotated.write_bytes(gzip.compress(archive.read_bytes()))
    archive.unlink()
    with pytest.raises(CursorExpiredError):
        search_page(archive, SearchRequest(query=None, cursor=Cursor.parse(first["next"])))
    # A cursor no page gave (past any file offset) is refused before any file is read.
    for made_up in ("1-99999999999999999999999", "x-1", "1"):
        with pytest.raises(ValueError):
            Cursor.parse(made_up)
    # From the start, the compressed rotation is read like any other.
    assert ids(search_page(archive, SearchRequest(query=None))) == ["a0", "a1", "a2", "a3"]


def test_a_page_reads_a_bounded_number_of_lines_and_leaves_a_partial_one(tmp_path: Path) -> None:
    archive = tmp_path / "events.ndjson"
    write_events(archive, [f"a{i}" for i in range(25)], tail=b'{"id": "being-writ')
    nothing = parse("action:no.such.action")
    page = search_page(archive, SearchRequest(query=nothing, scan_lines=10))
    assert page["events"] == [] and page["scanned_lines"] == 10 and page["next"]
    # Every page goes on where the last stopped; the line still being written is not read.
    scanned, cursor = 10, Cursor.parse(page["next"])
    while True:
        page = search_page(archive, SearchRequest(query=None, scan_lines=10, cursor=cursor))
        scanned += page["scanned_lines"]
        if page["next"] is None:
            break
        cursor = Cursor.parse(page["next"])
    assert scanned == 25 and page["not_json"] == 0
    assert ids(page)[-1] == "a24"


async def test_search_and_dead_letter_endpoints_answer_with_pages_and_errors(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    siem = await receiver_factory([400])

    def digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    daemon = await start_daemon(
        {
            "auth": {
                "admin_tokens": [{"name": "ops", "sha256": digest(ADMIN_TOKEN)}],
                "ingest_tokens": [{"name": "producer", "sha256": digest(INGEST_TOKEN)}],
            },
            "targets": [
                file_target("archive", tmp_path / "events.ndjson"),
                http_target("siem", siem.url) | {"retry": {"max_attempts": 1}},
            ],
            "routes": [
                {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive", "siem"]}]}
            ],
        }
    )
    events = [make_event(id=f"e{i}") for i in range(7)]
    await post(daemon, events, headers={"Authorization": f"Bearer {INGEST_TOKEN}"})
    await wait_for(lambda: settled(daemon))
    base = f"http://127.0.0.1:{daemon.port}"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def get(path: str, **params: str) -> tuple[int, Any]:
            async with session.get(base + path, params=params) as resp:
                return resp.status, await resp.json()

        status, summary = await get("/v1/deadletters")
        assert status == 200
        assert summary["targets"]["siem"]["letters"] == 7
        assert summary["targets"]["siem"]["reasons"] == {"permanent_status": 7}
        status, page = await get("/v1/deadletters/siem", limit="5")
        assert [letter["event"]["id"] for letter in page["letters"]] == [f"e{i}" for i in range(5)]
        assert (page["total"], page["next_offset"]) == (7, 5)
        status, page = await get("/v1/deadletters/siem", offset="5", limit="5")
        assert [letter["event"]["id"] for letter in page["letters"]] == ["e5", "e6"]
        assert page["next_offset"] is None
        status, page = await get("/v1/deadletters/siem", reason="retries_exhausted")
        assert (status, page["total"]) == (200, 0)
        status, page = await get("/v1/deadletters/nobody")
        assert (status, page["letters"]) == (200, [])
        status, error = await get("/v1/deadletters/siem", limit="0")
        assert (status, error["error"]["code"]) == (400, "bad_filter")
        # An offset past any file (and past what JSON numbers hold exactly): refused, not a 500
        # (found by the fuzz test).
        status, error = await get("/v1/deadletters/siem", offset=str(10**27))
        assert (status, error["error"]["code"]) == (400, "bad_filter")

        status, found = await get("/v1/search", target="archive", query="id:e3")
        assert status == 200 and [e["id"] for e in found["events"]] == ["e3"]
        assert found["next"] is None and found["scanned_lines"] == 7
        bad = "host:secrets-manager ("
        with pytest.raises(QueryError) as refused:
            parse(bad)
        status, error = await get("/v1/search", target="archive", query=bad)
        assert status == 400 and error["error"]["code"] == "bad_query"
        assert error["error"]["column"] == refused.value.column
        status, error = await get("/v1/search", target="siem")
        assert status == 404 and "archive" in error["error"]["message"]
        status, error = await get("/v1/search", target="archive", since="yesterday")
        assert (status, error["error"]["code"]) == (400, "bad_filter")
