"""GET /metrics from a real daemon, parsed with prometheus-client's own parser."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.daemon import Daemon
from tests.conftest import StartDaemon
from tests.fakes import ScriptedReceiver, make_event, wait_for
from tests.helpers import everything_to, file_target, http_target, post, settled
from tests.integration.test_auth import ADMIN_TOKEN, INGEST_TOKEN, auth_config

ReceiverFactory = Callable[..., Awaitable[ScriptedReceiver]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(daemon: Daemon, token: str | None = None) -> Samples:
    """Every sample of /metrics, keyed by (sample name, labels)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}/metrics", headers=headers) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_metrics_count_deliveries_retries_dead_letters_and_rejections(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    ok = await receiver_factory([200])
    flaky = await receiver_factory([503, 200])
    refusing = await receiver_factory([400])
    daemon = await start_daemon(
        {
            "targets": [
                http_target("ok", ok.url),
                http_target("flaky", flaky.url),
                http_target("refusing", refusing.url),
            ],
            "routes": everything_to("ok", "flaky", "refusing"),
        }
    )
    status, _ = await post(daemon, [make_event(), make_event(), make_event(severity="high")])
    assert status == 202
    status, _ = await post(daemon, b"{not json")
    assert status == 400
    await wait_for(lambda: settled(daemon), what="every target settled")

    samples = await scrape(daemon)

    assert value(samples, "event_router_ingest_requests_total") == 2
    assert value(samples, "event_router_ingest_requests_refused_total", code="malformed_json") == 1
    assert value(samples, "event_router_events_received_total") == 3
    assert value(samples, "event_router_events_accepted_total") == 2
    assert value(samples, "event_router_events_rejected_total") == 1
    for target in ("ok", "flaky", "refusing"):
        assert value(samples, "event_router_target_received_total", target=target) == 2
        assert value(samples, "event_router_target_pending", target=target) == 0
        assert value(samples, "event_router_target_oldest_pending_age_seconds", target=target) == 0
    assert value(samples, "event_router_target_delivered_total", target="ok") == 2
    assert value(samples, "event_router_target_delivered_total", target="flaky") == 2
    assert value(samples, "event_router_target_retries_total", target="flaky") == 1
    assert value(samples, "event_router_target_delivered_total", target="refusing") == 0
    assert value(samples, "event_router_target_dead_lettered_total", target="refusing") == 2
    assert (
        value(
            samples, "event_router_dead_letters_total", target="refusing", reason="permanent_status"
        )
        == 2
    )
    assert value(samples, "event_router_target_failing", target="refusing") == 1
    assert value(samples, "event_router_target_failing", target="ok") == 0

    def sends(target: str, outcome: str) -> float:
        return value(
            samples, "event_router_batch_send_seconds_count", target=target, outcome=outcome
        )

    assert sends("flaky", "failed") == 1
    assert sends("flaky", "delivered") == 1
    assert sends("refusing", "failed") == 1
    assert sends("ok", "delivered") == len(ok.requests)
    assert value(
        samples,
        "event_router_batch_send_seconds_bucket",
        target="ok",
        outcome="delivered",
        le="+Inf",
    ) == len(ok.requests)
    assert value(samples, "event_router_journal_used_bytes") > 0
    assert value(samples, "event_router_journal_quarantined_records_total") == 0
    assert value(samples, "event_router_journal_checkpoint_errors_total") == 0
    assert value(samples, "event_router_journal_healthy") == 1
    assert value(samples, "event_router_ready") == 1


async def test_two_daemons_in_one_process_keep_their_own_metrics(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    ok = await receiver_factory([200])
    down = await receiver_factory([503])
    first = await start_daemon(
        {
            "storage": {"path": str(tmp_path / "first")},
            "targets": [http_target("siem", ok.url)],
            "routes": everything_to("siem"),
        }
    )
    second = await start_daemon(
        {
            "storage": {"path": str(tmp_path / "second")},
            "shutdown": {"drain_timeout_s": 0.1},  # its target never recovers
            "targets": [
                {
                    **http_target("siem", down.url),
                    "retry": {"max_attempts": 1000, "max_age_s": 300, "max_backoff_s": 0.05},
                }
            ],
            "routes": everything_to("siem"),
        }
    )
    await post(first, [make_event()])
    await post(second, [make_event(), make_event(), make_event()])
    await wait_for(lambda: settled(first), what="the first daemon to deliver")
    await wait_for(lambda: len(down.requests) >= 2, what="the second daemon to retry")

    one, two = await scrape(first), await scrape(second)

    assert value(one, "event_router_events_accepted_total") == 1
    assert value(two, "event_router_events_accepted_total") == 3
    assert value(one, "event_router_target_delivered_total", target="siem") == 1
    assert value(one, "event_router_target_pending", target="siem") == 0
    assert value(two, "event_router_target_delivered_total", target="siem") == 0
    assert value(two, "event_router_target_pending", target="siem") == 3
    assert value(two, "event_router_target_oldest_pending_age_seconds", target="siem") > 0
    assert value(two, "event_router_target_failing", target="siem") == 1
    assert (
        "event_router_batch_send_seconds_count",
        frozenset({("target", "siem"), ("outcome", "delivered")}),
    ) not in two


async def test_metrics_need_an_admin_token_and_count_auth_refusals(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_INGEST_TOKEN", INGEST_TOKEN)
    daemon = await start_daemon(
        {
            "auth": auth_config(tmp_path),
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": everything_to("archive"),
        }
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{daemon.port}/metrics") as resp:
            assert resp.status == 401
        async with session.get(
            f"http://127.0.0.1:{daemon.port}/metrics",
            headers={"Authorization": f"Bearer {INGEST_TOKEN}"},
        ) as resp:
            assert resp.status == 403
    status, _ = await post(daemon, [make_event()], headers={"Authorization": "Bearer wrong"})
    assert status == 401

    samples = await scrape(daemon, ADMIN_TOKEN)

    assert value(samples, "event_router_auth_refusals_total", reason="Unauthorized") == 2
    assert value(samples, "event_router_auth_refusals_total", reason="Forbidden") == 1
    # Nothing a producer sent was accepted; each refusal is the router's own audit event.
    refusal_events = daemon.status()["auth"]["refusal_events"]
    assert value(samples, "event_router_events_accepted_total") == refusal_events == 3
