"""`GET /metrics`: the daemon's counters and books in Prometheus' text format, read at scrape time.

One source of truth: a custom collector reads what /v1/status shows (IngestStats, TargetStats,
the journal's Books, the dead-letter counts) when Prometheus scrapes, so nothing is counted
twice and the books that survive restarts stay the journal's. The one number only metrics
need, how long a batch send takes, is a Histogram that delivery.py observes. Every Daemon has
its own CollectorRegistry, so several daemons in one process (the tests) never mix.

Counters that come from the journal's books (`*_received_total`, `*_delivered_total`,
`*_dead_lettered_total`) count since the journal was created, not since the process started;
Prometheus only needs them never to go down, and they do not.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router import __version__

if TYPE_CHECKING:
    from router.journal import Books
    from router.observe.metrics import IngestStats, TargetStats

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

# A batch send is one HTTP request or file append: milliseconds when healthy, up to the
# target's timeout (10 s for http, 30 s for cloud_logs) when not.
SEND_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class JournalGauges(Protocol):
    """What the collector reads of the journal."""

    @property
    def healthy(self) -> bool: ...
    @property
    def used_bytes(self) -> int: ...
    @property
    def quarantined(self) -> int: ...
    @property
    def lost_records(self) -> int: ...
    @property
    def checkpoint_errors(self) -> int: ...
    def books(self, target_id: str) -> Books: ...


class ChainGauges(Protocol):
    """One target's hash chain: its head and its last checkpoint."""

    @property
    def seq(self) -> int: ...
    @property
    def checkpointed_seq(self) -> int: ...
    @property
    def checkpointed_at(self) -> float | None: ...
    @property
    def missing_at_start(self) -> Mapping[str, object] | None: ...


class EvidenceGauges(Protocol):
    """The evidence chains, by target, and the checkpoints that failed."""

    @property
    def chains(self) -> Mapping[str, ChainGauges]: ...
    @property
    def checkpoint_errors(self) -> int: ...


class LetterCounts(Protocol):
    """Dead letters written by this process, by (target, reason)."""

    @property
    def written(self) -> Mapping[tuple[str, str], int]: ...


class RefusalCounts(Protocol):
    """Requests refused for their token, by reason, and refusal events suppressed."""

    @property
    def refused(self) -> Mapping[str, int]: ...
    @property
    def suppressed_total(self) -> int: ...


class AlertGauges(Protocol):
    """The alerts (router/alerts): each one's state and counters, and failed saves."""

    @property
    def save_errors(self) -> int: ...
    def snapshot(self) -> dict[str, dict[str, Any]]: ...


class Observed(Protocol):
    """What the collector reads of a running daemon at scrape time; it never writes, and it
    never names the daemon, so observe/ stays below the layer that composes it."""

    @property
    def ready(self) -> bool: ...
    @property
    def ingest_stats(self) -> IngestStats: ...
    @property
    def target_stats(self) -> Mapping[str, TargetStats]: ...
    @property
    def journal(self) -> JournalGauges: ...
    @property
    def journal_max_bytes(self) -> int: ...
    @property
    def dead_letters(self) -> LetterCounts: ...
    @property
    def evidence(self) -> EvidenceGauges: ...
    @property
    def refusals(self) -> RefusalCounts: ...
    @property
    def alerts(self) -> AlertGauges: ...
    def failing_workers(self) -> list[str]: ...


class DaemonMetrics:
    """The registry behind one daemon's /metrics and the send-latency histogram it feeds."""

    def __init__(self, daemon: Observed) -> None:
        self.registry = CollectorRegistry()
        self.send_seconds = Histogram(
            "event_router_batch_send_seconds",
            "Time one attempt to send a batch to a target took, by outcome (delivered, failed).",
            ["target", "outcome"],
            buckets=SEND_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(DaemonCollector(daemon))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DaemonCollector(Collector):
    """Reads the daemon's counters at scrape time."""

    def __init__(self, daemon: Observed) -> None:
        self.daemon = daemon

    def describe(self) -> Iterable[Metric]:
        # Nothing to check at registration: the names below are fixed and unique.
        return []

    def collect(self) -> Iterable[Metric]:
        yield from self._process()
        yield from self._ingest()
        yield from self._targets()
        yield from self._journal()
        yield from self._auth()
        yield from self._evidence()
        yield from self._alerts()

    def _alerts(self) -> Iterable[Metric]:
        alerts = self.daemon.alerts
        snapshot = alerts.snapshot()
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "matches": CounterMetricFamily(
                "event_router_alert_matches",
                "Accepted events that matched the alert's query since it was first watched "
                "(a changed query, kind or window starts again).",
                labels=["alert"],
            ),
            "firings": CounterMetricFamily(
                "event_router_alert_firings",
                "Times the alert triggered (event-router.alert.trigger events).",
                labels=["alert"],
            ),
            "state": GaugeMetricFamily(
                "event_router_alert_firing", "1 while the alert is firing.", labels=["alert"]
            ),
            "matches_in_window": GaugeMetricFamily(
                "event_router_alert_window_matches",
                "Matches in the alert's current window.",
                labels=["alert"],
            ),
        }
        for name, state in snapshot.items():
            for key, family in families.items():
                value = state[key]
                family.add_metric([name], int(value == "firing") if key == "state" else value)
        yield from families.values()
        yield CounterMetricFamily(
            "event_router_alert_save_errors",
            "Alert states that could not be saved (a full disk); kept for the next save.",
            value=alerts.save_errors,
        )

    def _process(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "event_router_build_info", "The running event-router version.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "event_router_ready",
            "1 while /readyz answers 200 (started, not stopping, journal healthy, no delivery "
            "worker failing).",
            value=int(
                self.daemon.ready
                and self.daemon.journal.healthy
                and not self.daemon.failing_workers()
            ),
        )

    def _ingest(self) -> Iterable[Metric]:
        stats = self.daemon.ingest_stats
        yield CounterMetricFamily(
            "event_router_ingest_requests", "POST /v1/events requests.", value=stats.requests
        )
        refused = CounterMetricFamily(
            "event_router_ingest_requests_refused",
            "Requests refused as a whole, by error code (malformed_json, body_too_large, "
            "journal_full, ...); none of their events was accepted.",
            labels=["code"],
        )
        for code, count in sorted(
            {**stats.refused_requests, "journal_full": stats.journal_full}.items()
        ):
            refused.add_metric([code], count)
        yield refused
        yield CounterMetricFamily(
            "event_router_events_received",
            "Events decoded from requests that were not refused (accepted + rejected).",
            value=stats.accepted + stats.rejected,
        )
        yield CounterMetricFamily(
            "event_router_events_accepted",
            "Events accepted: durable in the journal before the answer.",
            value=stats.accepted,
        )
        yield CounterMetricFamily(
            "event_router_events_rejected",
            "Events rejected one by one (schema, catalogue or an NDJSON line that is not JSON); "
            "the answer lists each problem.",
            value=stats.rejected,
        )
        by_reason = CounterMetricFamily(
            "event_router_events_rejected_by_reason",
            "Rejected events by reason: malformed (not JSON), limits (depth, string length), "
            "schema, catalogue (an action the service does not have), forbidden (another "
            "service's event for a limited token), reserved (an action of the router itself).",
            labels=["reason"],
        )
        for reason, count in sorted(stats.rejected_by_reason.items()):
            by_reason.add_metric([reason], count)
        yield by_reason
        reloads = CounterMetricFamily(
            "event_router_config_reloads",
            "Config reloads (SIGHUP or the management API), by outcome: applied or refused.",
            labels=["outcome"],
        )
        for outcome, count in sorted(stats.reloads.items()):
            reloads.add_metric([outcome], count)
        yield reloads
        yield CounterMetricFamily(
            "event_router_events_unrouted",
            "Accepted events that no rule and no default target sent anywhere.",
            value=stats.unrouted,
        )

    def _targets(self) -> Iterable[Metric]:
        daemon = self.daemon
        families = {
            name: CounterMetricFamily(f"event_router_target_{name}", doc, labels=["target"])
            for name, doc in (
                ("received", "Events the journal owes the target (since the journal was created)."),
                ("delivered", "Events the target took."),
                ("dead_lettered", "Events written to the target's dead-letter file."),
                ("lost", "Events a damaged journal's salvage could not recover (books)."),
                ("retries", "Failed send attempts that were retried."),
                ("batches", "Batches sent (each with its retries)."),
                ("worker_errors", "Unexpected errors the target's delivery worker survived."),
            )
        }
        pending = GaugeMetricFamily(
            "event_router_target_pending", "Events waiting in the journal.", labels=["target"]
        )
        oldest = GaugeMetricFamily(
            "event_router_target_oldest_pending_age_seconds",
            "Age of the oldest event waiting for the target; 0 with nothing pending.",
            labels=["target"],
        )
        failing = GaugeMetricFamily(
            "event_router_target_failing",
            "1 while the target's latest send attempt failed (atracker's write_status).",
            labels=["target"],
        )
        worker_failing = GaugeMetricFamily(
            "event_router_target_worker_failing",
            "1 while the target's delivery worker keeps failing without settling a batch "
            "(/readyz answers 503).",
            labels=["target"],
        )
        now = time.time()
        failing_workers = daemon.failing_workers()
        for target_id, stats in daemon.target_stats.items():
            books = daemon.journal.books(target_id)
            values = {
                "received": books.received,
                "delivered": books.delivered,
                "dead_lettered": books.dead_lettered,
                "lost": books.lost,
                "retries": stats.retries,
                "batches": stats.batches,
                "worker_errors": stats.worker_errors,
            }
            for name, value in values.items():
                families[name].add_metric([target_id], value)
            pending.add_metric([target_id], books.pending)
            age = now - books.oldest_received_at if books.oldest_received_at else 0.0
            oldest.add_metric([target_id], max(age, 0.0))
            failing.add_metric([target_id], int(stats.write_status.status != "success"))
            worker_failing.add_metric([target_id], int(target_id in failing_workers))
        yield from families.values()
        yield pending
        yield oldest
        yield failing
        yield worker_failing
        letters = CounterMetricFamily(
            "event_router_dead_letters",
            "Dead letters written by this process, by target and reason (permanent_status, "
            "retries_exhausted, target_removed, dropped_buffer_full, journal_corrupt, ...).",
            labels=["target", "reason"],
        )
        for (target_id, reason), count in sorted(daemon.dead_letters.written.items()):
            letters.add_metric([target_id, reason], count)
        yield letters

    def _journal(self) -> Iterable[Metric]:
        journal = self.daemon.journal
        yield GaugeMetricFamily(
            "event_router_journal_used_bytes",
            "Bytes the journal's pages hold.",
            value=journal.used_bytes,
        )
        yield GaugeMetricFamily(
            "event_router_journal_max_bytes",
            "storage.max_bytes: past it ingest answers 503 journal_full.",
            value=self.daemon.journal_max_bytes,
        )
        yield GaugeMetricFamily(
            "event_router_journal_healthy",
            "1 while the journal can be written.",
            value=int(journal.healthy),
        )
        yield CounterMetricFamily(
            "event_router_journal_quarantined_records",
            "Journal records that failed their checksum (dead-lettered as journal_corrupt).",
            value=journal.quarantined,
        )
        yield CounterMetricFamily(
            "event_router_journal_lost_records",
            "Deliveries a damaged journal's salvage could not recover: their records did not "
            "survive (the books count them as lost).",
            value=journal.lost_records,
        )
        yield CounterMetricFamily(
            "event_router_journal_checkpoint_errors",
            "fsync: interval checkpoints that failed (each is tried again the next interval).",
            value=journal.checkpoint_errors,
        )

    def _evidence(self) -> Iterable[Metric]:
        evidence = self.daemon.evidence
        head = GaugeMetricFamily(
            "event_router_chain_head_seq",
            "The last place taken in the target's hash chain (archive lines and dead letters).",
            labels=["target"],
        )
        checkpointed = GaugeMetricFamily(
            "event_router_chain_checkpoint_seq",
            "The chain place the target's last checkpoint covers.",
            labels=["target"],
        )
        checkpoint_time = GaugeMetricFamily(
            "event_router_chain_last_checkpoint_timestamp_seconds",
            "When the target's last checkpoint was written (Unix time); 0 before the first.",
            labels=["target"],
        )
        missing = GaugeMetricFamily(
            "event_router_chain_missing_at_start",
            "Places of the target's chain that the journal's head covers but its files lacked "
            "at start (cut off the archive while the daemon was down); 0 when none.",
            labels=["target"],
        )
        for target_id, chain in sorted(evidence.chains.items()):
            head.add_metric([target_id], chain.seq)
            checkpointed.add_metric([target_id], chain.checkpointed_seq)
            checkpoint_time.add_metric([target_id], chain.checkpointed_at or 0.0)
            missing.add_metric([target_id], _missing_places(chain.missing_at_start))
        yield head
        yield checkpointed
        yield checkpoint_time
        yield missing
        yield CounterMetricFamily(
            "event_router_chain_checkpoint_errors",
            "Checkpoints that could not be written (each is tried again at the next write).",
            value=evidence.checkpoint_errors,
        )

    def _auth(self) -> Iterable[Metric]:
        refusals = self.daemon.refusals
        refused = CounterMetricFamily(
            "event_router_auth_refusals",
            "Requests refused for their token: Unauthorized (401, none or unknown) or "
            "Forbidden (403, the wrong kind or service).",
            labels=["reason"],
        )
        for reason in ("Unauthorized", "Forbidden"):
            refused.add_metric([reason], refusals.refused.get(reason, 0))
        yield refused
        yield CounterMetricFamily(
            "event_router_auth_refusal_events_suppressed",
            "Refusals the rate limits kept out of the journal (counted in summary events).",
            value=refusals.suppressed_total,
        )


def _missing_places(missing: Mapping[str, object] | None) -> int:
    """How many places a chain's `missing_at_start` report names (first_seq ... last_seq)."""
    if missing is None:
        return 0
    first, last = missing["first_seq"], missing["last_seq"]
    assert isinstance(first, int) and isinstance(last, int)
    return last - first + 1
