"""Take docs/console*.png, the README's pictures of the console: a real daemon on 127.0.0.1
with a file archive, a SIEM that answers 503 (a backlog and a last failure) and one that
refuses (dead letters), a saved view and two alerts, some traffic, and the page in Debian's
chromium through Playwright.

    .venv/bin/python -m docs.console_screenshot [DIRECTORY]
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from playwright.async_api import async_playwright, expect

from router.config import parse_config
from router.daemon import Daemon
from router.server.api import ConfigSource
from tests.fakes import ScriptedReceiver, make_event, wait_for
from tests.helpers import file_target, http_target, patient, post

SEED_QUERY = "host:secrets-manager reason.reasonType:Unauthorized"
TOKEN = "screenshot-admin-token"
INGEST = "screenshot-ingest-token"
DOCS = Path(__file__).parent


async def main(out: Path) -> None:
    """`out`/console.png (the targets), console-tail.png (a saved view's tail) and
    console-alerts.png."""
    held = await ScriptedReceiver(statuses=[503]).start()
    refusing = await ScriptedReceiver(statuses=[200] * 40 + [400]).start()
    with tempfile.TemporaryDirectory() as tmp:
        data = {
            "server": {"host": "127.0.0.1", "port": 0},
            "storage": {"path": f"{tmp}/var"},
            "startup": {"validate_targets": False},
            "delivery": {"batch": {"max_wait_s": 0.01}, "retry": {"max_attempts": 1}},
            "auth": {
                "admin_tokens": [{"name": "ops", "sha256": _digest(TOKEN)}],
                "ingest_tokens": [{"name": "producer", "sha256": _digest(INGEST)}],
            },
            "targets": [
                file_target("archive", Path(tmp) / "events.ndjson"),
                patient(http_target("siem-eu", held.url)),
                http_target("siem-us", refusing.url) | {"batch": {"max_events": 5}},
            ],
            "views": [{"name": "unauthorized", "query": SEED_QUERY}],
            "alerts": [
                {
                    "name": "unauthorized-burst",
                    "view": "unauthorized",
                    "threshold": {"count": 5, "window_s": 60},
                    "target_ids": ["archive"],
                    "cooldown_s": 300,
                },
                {
                    "name": "secrets-manager-silent",
                    "query": "host:secrets-manager",
                    "absence": {"window_s": 900},
                    "target_ids": ["archive"],
                },
            ],
            "routes": [
                {
                    "name": "all",
                    "rules": [
                        {"locations": ["*"], "target_ids": ["archive", "siem-eu", "siem-us"]}
                    ],
                }
            ],
        }
        daemon = Daemon(parse_config(data), ConfigSource(None, data))
        await daemon.start()
        try:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(
                    executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                    args=["--no-sandbox"] if os.geteuid() == 0 else [],
                )
                page = await browser.new_page(viewport={"width": 1280, "height": 320})
                await page.goto(f"http://127.0.0.1:{daemon.port}/console")
                await page.fill("#token", TOKEN)
                await page.click("#login-form button[type=submit]")
                tail = await browser.new_page(viewport={"width": 1280, "height": 420})
                await tail.goto(f"http://127.0.0.1:{daemon.port}/console")
                await tail.fill("#token", TOKEN)  # sessionStorage: one tab's, not the browser's
                await tail.click("#login-form button[type=submit]")
                await tail.click("#tabs button[data-panel=tail]")
                await tail.select_option("#tail-view", "unauthorized")
                await tail.click("#tail-start")
                for second in range(12):
                    events = [
                        make_event(
                            id=f"e{second}-{i}",
                            eventTime=_now(),
                            action="secrets-manager.secret.read",
                            reason={"reasonCode": 401, "reasonType": "Unauthorized"},
                            outcome="failure",
                        )
                        if i % 7 == 0
                        else make_event(id=f"e{second}-{i}", eventTime=_now())
                        for i in range(5 + 3 * second)
                    ]
                    await post(daemon, events, headers={"Authorization": f"Bearer {INGEST}"})
                    await asyncio.sleep(1)  # traffic over time, for the sparklines
                await wait_for(lambda: daemon.status()["targets"]["siem-us"]["pending"] == 0)
                row = page.locator("#targets-table tr[data-target=siem-eu] td.backlog")
                await expect(row).not_to_have_text("0", timeout=10_000)
                await page.screenshot(path=str(out / "console.png"))
                await tail.screenshot(path=str(out / "console-tail.png"))
                await tail.set_viewport_size({"width": 1280, "height": 200})
                await tail.click("#tabs button[data-panel=alerts]")
                firing = tail.locator("#alerts-table tr[data-alert=unauthorized-burst] td.state")
                await expect(firing).to_have_text("firing", timeout=10_000)
                await tail.screenshot(path=str(out / "console-alerts.png"))
                await browser.close()
        finally:
            await daemon.stop()
            await held.stop()
            await refusing.stop()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS))
