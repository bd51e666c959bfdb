"""The console (/console) driven in a real headless browser: Playwright for Python with
Debian's chromium (.ci/run installs it), against a real daemon on 127.0.0.1 and real
receivers. What an operator does: sign in, watch a target's backlog, tail with a seed query
or a saved view, search an archive, redrive a dead letter, watch an alert fire; and what an
attacker cannot: read data with a wrong token, run script through an event, frame the page."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, Request, async_playwright, expect

from router.daemon import Daemon
from router.selfevent import ALERT_TRIGGER_ACTION
from tests.conftest import StartDaemon
from tests.fakes import make_event, wait_for
from tests.helpers import (
    ReceiverFactory,
    assert_books_balance,
    everything_to,
    file_target,
    http_target,
    patient,
    post,
    settled,
)

ADMIN_TOKEN = "console-admin-token-0123456789abcdef"
INGEST_TOKEN = "console-ingest-token-0123456789abcdef"
SEED_QUERY = "host:secrets-manager reason.reasonType:Unauthorized"
SECRET = "hunter2-in-the-clear"
CREATES_QUERY = "host:secrets-manager action:secrets-manager.secret.create"
# Playwright's expectations poll the page until this many milliseconds have passed.
WAIT_MS = 15_000


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def auth() -> dict[str, Any]:
    def digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    return {
        "ingest_tokens": [{"name": "producer", "sha256": digest(INGEST_TOKEN)}],
        "admin_tokens": [{"name": "ops", "sha256": digest(ADMIN_TOKEN)}],
    }


def archived(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """A daemon's config with every event routed to one file target, `archive`."""
    return {
        "targets": [file_target("archive", tmp_path / "archive.ndjson")],
        "routes": everything_to("archive"),
        **extra,
    }


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    # Chromium's sandbox needs user namespaces that a root shell in a container lacks.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium(), args=args)
        yield launched
        await launched.close()


async def ingest(daemon: Daemon, events: list[dict[str, Any]]) -> None:
    status, answer = await post(daemon, events, headers={"Authorization": f"Bearer {INGEST_TOKEN}"})
    assert status == 202 and answer["rejected"] == 0, answer


# What each page logged as an error: a script or style the Content-Security-Policy blocked
# shows up here, so the tests would see the page break its own policy.
CONSOLE_ERRORS: weakref.WeakKeyDictionary[Page, list[str]] = weakref.WeakKeyDictionary()


def csp_violations(page: Page) -> list[str]:
    return [text for text in CONSOLE_ERRORS.get(page, []) if "Content Security Policy" in text]


async def signed_in(browser: Browser, daemon: Daemon, token: str = ADMIN_TOKEN) -> Page:
    page = await browser.new_page()
    errors = CONSOLE_ERRORS.setdefault(page, [])
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    await page.goto(f"http://127.0.0.1:{daemon.port}/console")
    await page.fill("#token", token)
    await page.click("#login-form button[type=submit]")
    return page


def unauthorized(reason_type: str = "Unauthorized", **fields: Any) -> dict[str, Any]:
    code = 401 if reason_type == "Unauthorized" else 201
    return make_event(
        reason={"reasonCode": code, "reasonType": reason_type},
        outcome="failure" if code == 401 else "success",
        **fields,
    )


async def test_a_wrong_token_shows_the_refusal_and_no_data(
    start_daemon: StartDaemon, browser: Browser, tmp_path: Path
) -> None:
    daemon = await start_daemon(archived(tmp_path, auth=auth()))
    requests: list[Request] = []
    page = await browser.new_page()
    page.on("request", lambda request: requests.append(request))
    await page.goto(f"http://127.0.0.1:{daemon.port}/console")
    await page.fill("#token", "not-the-admin-token")
    await page.click("#login-form button[type=submit]")

    await expect(page.locator("#login-error")).to_contain_text("401", timeout=WAIT_MS)
    await expect(page.locator("#targets")).to_be_hidden()
    assert await page.locator("#targets-table tbody tr").count() == 0
    assert await page.evaluate("sessionStorage.length") == 0  # a refused token is not kept
    # The token went in a header, never into a URL (logs, history, Referer).
    assert requests and all("not-the-admin-token" not in r.url for r in requests)
    status_calls = [r for r in requests if r.url.endswith("/v1/status")]
    assert [await r.header_value("authorization") for r in status_calls] == [
        "Bearer not-the-admin-token"
    ]


async def test_the_page_is_static_and_locked_down(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {
            "auth": auth(),
            "targets": [file_target("vault-7", tmp_path / "archive.ndjson")],
            "routes": everything_to("vault-7"),
        }
    )
    base = f"http://127.0.0.1:{daemon.port}"
    async with aiohttp.ClientSession() as session:
        for path in ("/console", "/console/app.js", "/console/console.css"):
            async with session.get(base + path) as resp:
                assert resp.status == 200, path
                csp = resp.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
                assert "unsafe-inline" not in csp
                assert resp.headers["X-Frame-Options"] == "DENY"
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                body = await resp.text()
                assert "vault-7" not in body  # no data in the page itself
        async with session.get(base + "/console/index.html") as resp:
            assert "<script>" not in await resp.text()  # no inline script
        for path in ("/console/..%2Fconsole.py", "/console/console.py", "/console/nothing.js"):
            async with session.get(base + path) as resp:
                assert resp.status == 404, path
        # The data the page shows stays behind the admin token.
        for path in ("/v1/status", "/v1/deadletters", "/v1/search?target=vault-7"):
            async with session.get(base + path) as resp:
                assert resp.status == 401, path


async def test_the_targets_panel_shows_a_backlog_grow_and_drain(
    start_daemon: StartDaemon, browser: Browser, receiver_factory: ReceiverFactory
) -> None:
    siem = await receiver_factory([503])
    daemon = await start_daemon(
        {
            "auth": auth(),
            "targets": [patient(http_target("siem", siem.url))],
            "routes": everything_to("siem"),
        }
    )
    page = await signed_in(browser, daemon)
    row = page.locator("#targets-table tr[data-target=siem]")
    await expect(row.locator("td.backlog")).to_have_text("0", timeout=WAIT_MS)

    await ingest(daemon, [make_event(id=f"held-{i}") for i in range(3)])
    await wait_for(lambda: len(siem.requests) > 0, what="the target to refuse a batch")
    await expect(row.locator("td.backlog")).to_have_text("3", timeout=WAIT_MS)
    await expect(row.locator("td.failure")).to_contain_text("503", timeout=WAIT_MS)
    # Validate: a real test write through the target, refused as well.
    probes = len(siem.requests)
    await row.locator("button.validate").click()
    await expect(row.locator("td.failure")).to_contain_text("validate failed", timeout=WAIT_MS)
    await expect(row.locator("td.failure")).to_contain_text("503")
    assert len(siem.requests) > probes

    siem.statuses = [200]
    await expect(row.locator("td.backlog")).to_have_text("0", timeout=WAIT_MS)
    await wait_for(lambda: settled(daemon))
    # The three events, and the validation's own audit event (routed like any event).
    delivered = siem.delivered_events
    assert {e["id"] for e in delivered} >= {f"held-{i}" for i in range(3)}
    assert [e["action"] for e in delivered].count("event-router.target.validate") == 1
    await expect(row.locator("td.delivered")).to_have_text(str(len(delivered)), timeout=WAIT_MS)
    assert_books_balance(daemon)


async def test_the_tail_shows_what_a_seed_query_matches_and_nothing_else(
    start_daemon: StartDaemon, browser: Browser, tmp_path: Path
) -> None:
    daemon = await start_daemon(archived(tmp_path, auth=auth()))
    page = await signed_in(browser, daemon)
    await page.click("#tabs button[data-panel=tail]")
    await page.fill("#tail-query", SEED_QUERY)
    await page.click("#tail-start")
    await expect(page.locator("#tail-status")).to_contain_text(
        "tailing host:secrets-manager", timeout=WAIT_MS
    )

    # In one request, so the daemon matches both in the same round: when the match shows,
    # the other one has been decided too.
    hostile = '<img src=x onerror="window.owned=1">'
    await ingest(
        daemon,
        [
            unauthorized("Created", id="created-1"),
            unauthorized(
                id="denied-1",
                target=make_event()["target"] | {"name": hostile},
                requestData={"secret_type": "arbitrary", "password": SECRET},
            ),
        ],
    )
    match = page.locator("#tail-table tbody tr[data-id=denied-1]")
    await expect(match).to_have_count(1, timeout=WAIT_MS)
    assert await page.locator("#tail-table tbody tr").count() == 1
    assert await page.locator("#tail-table tbody tr[data-id=created-1]").count() == 0
    # A producer's value is shown as text, never run.
    await expect(match).to_contain_text(hostile)
    assert await page.evaluate("window.owned") is None
    await match.click()
    await expect(page.locator("#tail-detail")).to_contain_text('"reasonType": "Unauthorized"')
    # What redaction took out at ingest never reaches the page.
    await expect(page.locator("#tail-detail")).to_contain_text('"password": "[REDACTED]"')
    assert SECRET not in await page.content()

    await page.fill("#tail-query", "host:(")
    await page.click("#tail-start")
    await expect(page.locator("#tail-error")).to_contain_text("bad query at column")
    assert csp_violations(page) == []


async def test_search_pages_through_a_file_archive_with_the_query_language(
    start_daemon: StartDaemon, browser: Browser, tmp_path: Path
) -> None:
    daemon = await start_daemon(archived(tmp_path, auth=auth()))
    events = [
        unauthorized(id=f"denied-{i:03d}", requestData={"password": SECRET})
        if i % 2
        else unauthorized("Created", id=f"ok-{i:03d}")
        for i in range(120)
    ]
    await ingest(daemon, events)
    await wait_for(lambda: settled(daemon), what="the archive to be written")

    page = await signed_in(browser, daemon)
    await page.click("#tabs button[data-panel=search]")
    await expect(page.locator("#search-target option")).to_have_text(["archive"], timeout=WAIT_MS)
    await page.fill("#search-query", SEED_QUERY)
    await page.click("#search-form button[type=submit]")
    rows = page.locator("#search-table tbody tr")
    await expect(rows).to_have_count(50, timeout=WAIT_MS)
    await expect(page.locator("#search-status")).to_contain_text("more follow")
    await expect(rows.first).to_have_attribute("data-id", "denied-001")
    await page.click("#search-next")
    await expect(rows).to_have_count(10, timeout=WAIT_MS)
    await expect(page.locator("#search-status")).to_contain_text("end of the archive")
    await expect(rows.last).to_have_attribute("data-id", "denied-119")
    await rows.last.click()
    await expect(page.locator("#search-detail")).to_contain_text('"password": "[REDACTED]"')
    assert SECRET not in await page.content()
    assert csp_violations(page) == []
    assert_books_balance(daemon)


async def test_a_dead_letter_is_shown_and_redriven_from_the_console(
    start_daemon: StartDaemon, browser: Browser, receiver_factory: ReceiverFactory
) -> None:
    siem = await receiver_factory([400])
    daemon = await start_daemon(
        {
            "auth": auth(),
            "targets": [http_target("siem", siem.url) | {"retry": {"max_attempts": 1}}],
            "routes": everything_to("siem"),
        }
    )
    await ingest(daemon, [unauthorized(id="refused-1")])
    await wait_for(lambda: daemon.status()["targets"]["siem"]["dead_lettered"] == 1)

    page = await signed_in(browser, daemon)
    await page.click("#tabs button[data-panel=letters]")
    row = page.locator("#letters-table tr[data-target=siem]")
    await expect(row.locator("td.letters")).to_have_text("1", timeout=WAIT_MS)
    await row.locator("button.chip[data-reason=permanent_status]").click()
    letter = page.locator("#letter-list tbody tr.letter")
    await expect(letter).to_have_count(1, timeout=WAIT_MS)
    await expect(letter).to_contain_text("refused-1")
    await letter.click()
    await expect(page.locator("#letter-detail")).to_contain_text('"status": 400')

    siem.statuses = [200]
    await row.locator("button.redrive").click()
    await expect(page.locator("#redrive-status")).to_contain_text(
        "redriven: 1 of 1", timeout=WAIT_MS
    )
    await expect(page.locator("#redrive-progress")).to_have_attribute("value", "1")
    await wait_for(lambda: settled(daemon), what="the redriven letter to be delivered")
    assert [e["id"] for e in siem.delivered_events] == ["refused-1"]
    await expect(page.locator("#letters-table tbody")).to_contain_text("no dead letters")
    # The targets panel tells the same story.
    await page.click("#tabs button[data-panel=targets]")
    await expect(page.locator("#targets-table tr[data-target=siem] td.delivered")).to_have_text(
        "1", timeout=WAIT_MS
    )
    assert csp_violations(page) == []
    assert_books_balance(daemon)


async def test_the_page_samples_a_busy_daemon_and_keeps_its_tail_bounded(
    start_daemon: StartDaemon, browser: Browser, tmp_path: Path
) -> None:
    daemon = await start_daemon(archived(tmp_path, auth=auth()))
    page = await signed_in(browser, daemon)
    await page.click("#tabs button[data-panel=tail]")
    await page.click("#tail-start")  # an empty query: every event, the most a tail can take
    await expect(page.locator("#tail-status")).to_contain_text("tailing", timeout=WAIT_MS)

    batches = [[make_event(id=f"busy-{b}-{i}") for i in range(100)] for b in range(100)]
    for start in range(0, len(batches), 10):
        await asyncio.gather(*(ingest(daemon, batch) for batch in batches[start : start + 10]))
    await expect(page.locator("#tail-status")).to_contain_text("events", timeout=WAIT_MS)
    # The page keeps the newest MAX_ROWS (200) rows, however many arrived.
    rows = page.locator("#tail-table tbody tr")
    await expect(rows).to_have_count(200, timeout=WAIT_MS)
    shown = await rows.evaluate_all("rows => rows.map(row => row.dataset.id)")
    assert set(shown) <= {event["id"] for batch in batches for event in batch}
    # And the targets panel still samples the daemon.
    await page.click("#tabs button[data-panel=targets]")
    await expect(page.locator("#ingest-line")).to_contain_text("10,000 accepted", timeout=WAIT_MS)
    await wait_for(lambda: settled(daemon))
    assert daemon.status()["ingest"]["accepted"] == 10_000
    assert_books_balance(daemon)


async def test_without_an_auth_section_an_empty_token_signs_in(
    start_daemon: StartDaemon, browser: Browser, tmp_path: Path
) -> None:
    daemon = await start_daemon(archived(tmp_path))
    requests: list[Request] = []
    page = await signed_in(browser, daemon, token="")
    page.on("request", lambda request: requests.append(request))
    await expect(page.locator("#targets-table tr[data-target=archive]")).to_have_count(
        1, timeout=WAIT_MS
    )
    await expect(page.locator("#login")).to_be_hidden()
    await page.click("#tabs button[data-panel=letters]")
    await expect(page.locator("#letters-table tbody")).to_contain_text("no dead letters")
    sent = [await r.header_value("authorization") for r in requests]
    assert sent and sent == [None] * len(sent)


async def test_a_saved_view_filters_the_tail_and_the_alerts_panel_shows_an_alert_fire(
    start_daemon: StartDaemon,
    browser: Browser,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
) -> None:
    webhook = await receiver_factory()
    daemon = await start_daemon(
        {
            "auth": auth(),
            "targets": [
                file_target("archive", tmp_path / "archive.ndjson"),
                http_target("alerts-webhook", webhook.url),
            ],
            "routes": everything_to("archive"),
            "views": [
                {"name": "secret-creates", "query": CREATES_QUERY},
                {"name": "unauthorized", "query": SEED_QUERY},
            ],
            "alerts": [
                {
                    "name": "unauthorized-burst",
                    "view": "unauthorized",
                    "threshold": {"count": 2, "window_s": 600},
                    "target_ids": ["alerts-webhook"],
                    "cooldown_s": 300,
                }
            ],
        }
    )
    page = await signed_in(browser, daemon)
    await page.click("#tabs button[data-panel=tail]")
    await expect(page.locator("#tail-view option")).to_have_text(
        ["(no saved view)", "secret-creates", "unauthorized"], timeout=WAIT_MS
    )
    await page.select_option("#tail-view", "unauthorized")
    await page.click("#tail-start")
    # The daemon runs the view's query (sent by name), and says which.
    await expect(page.locator("#tail-status")).to_contain_text(
        f"tailing {SEED_QUERY}", timeout=WAIT_MS
    )
    await ingest(daemon, [unauthorized("Created", id="created-1"), unauthorized(id="denied-1")])
    await expect(page.locator("#tail-table tbody tr[data-id=denied-1]")).to_have_count(
        1, timeout=WAIT_MS
    )
    assert await page.locator("#tail-table tbody tr").count() == 1

    await page.click("#tabs button[data-panel=alerts]")
    row = page.locator("#alerts-table tr[data-alert=unauthorized-burst]")
    await expect(row.locator("td.state")).to_have_text("ok", timeout=WAIT_MS)
    await expect(row.locator("td.window-matches")).to_have_text("1 / 2")
    await expect(row).to_contain_text(SEED_QUERY)
    await expect(row.locator("td.last-fired")).to_have_text("-")

    await ingest(daemon, [unauthorized(id="denied-2")])
    await expect(row.locator("td.state")).to_have_text("firing", timeout=WAIT_MS)
    await expect(row.locator("td.window-matches")).to_have_text("2 / 2")
    await expect(row.locator("td.firings")).to_have_text("1")
    await expect(row.locator("td.last-fired")).not_to_have_text("-")
    # The firing is an event of the router, delivered to the alert's target.
    await wait_for(lambda: bool(webhook.delivered_events), what="the alert's event")
    assert [e["action"] for e in webhook.delivered_events] == [ALERT_TRIGGER_ACTION]
    assert csp_violations(page) == []
    await wait_for(lambda: settled(daemon))
    assert_books_balance(daemon)
