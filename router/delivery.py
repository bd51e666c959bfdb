"""One worker per target: take a batch from the journal, send it with retries, settle it.

This is the only module that imports tenacity. A batch ends in exactly one of two ways: the
target took it (delivered), or it is written to the target's dead-letter file with the reason
(permanent failure, retries exhausted by attempts or by age, or a journal record that failed its
checksum). Only then does the target's cursor move, so a slow or failing target holds up nobody
but itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from prometheus_client import Histogram
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from router.config import TargetConfig
from router.deadletter import DeadLetters, Failure
from router.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError
from router.journal import Entry, Journal
from router.logformat import counted
from router.metrics import TargetStats
from router.probe import probe
from router.targets import Target

log = logging.getLogger(__name__)

# When even the dead-letter file cannot be written (disk full), wait this long and try again:
# the batch stays in the journal, nothing is acknowledged, nothing is lost.
DEAD_LETTER_RETRY_S = 1.0

WORKER_RESTART_S = 1.0

UNSENDABLE_MESSAGES = {
    "journal_corrupt": "the journal record failed its checksum; its raw bytes are an excerpt",
    "too_large": "the event is larger than the target takes, so retrying cannot help",
    "too_old": "the event is older than the target accepts, so it would be dropped silently",
    "too_far_in_future": "the event time is further ahead than the target accepts",
}


def unsendable_failure(reason: str) -> Failure:
    """The dead-letter record for events refused before any attempt."""
    return Failure(reason=reason, message=UNSENDABLE_MESSAGES.get(reason, reason))


class DeliveryWorker:
    """Delivers one target's backlog until told to stop and the backlog is empty."""

    def __init__(
        self,
        target: Target,
        config: TargetConfig,
        journal: Journal,
        dead_letters: DeadLetters,
        stats: TargetStats,
        *,
        probe_first: bool = False,
        send_seconds: Histogram | None = None,
    ) -> None:
        self.probe_first = probe_first
        self.send_seconds = send_seconds  # labelled (target, outcome); /metrics shows it
        self.target = target
        self.config = config
        self.journal = journal
        self.dead_letters = dead_letters
        self.stats = stats
        self.stopping = asyncio.Event()
        retry = config.retry
        self._backoff = wait_random_exponential(
            multiplier=retry.initial_backoff_s, max=retry.max_backoff_s
        )

    async def run(self) -> None:
        """Deliver batches until `stopping` is set and nothing is left for this target.

        This is a task boundary: an unexpected error is logged and counted, and the worker
        carries on after a pause (the batch stays in the journal), rather than dying silently
        and leaving the target's backlog to grow unseen."""
        while True:
            try:
                await self._deliver_until_stopped()
                return
            except Exception:
                self.stats.worker_errors += 1
                log.exception("target %s: delivery worker failed; restarting", self.config.id)
                await asyncio.sleep(WORKER_RESTART_S)

    async def _deliver_until_stopped(self) -> None:
        if self.probe_first:
            # The test write goes first, from this task, so it never races a batch.
            self.probe_first = False
            result = await probe(self.target, self.stats)
            if result.ok:
                log.info("%s", result.message)
            else:
                log.error("target validation failed: %s", result.message)
        batch_config = self.config.batch
        while True:
            batch = await self.journal.next_batch(
                self.config.id,
                max_events=batch_config.max_events,
                max_bytes=batch_config.max_bytes,
                max_wait_s=batch_config.max_wait_s,
                stopping=self.stopping,
            )
            if not batch:
                return
            dead = 0
            sendable: list[Entry] = []
            refused: dict[str, list[Entry]] = {}
            for entry in batch:
                reason = (
                    "journal_corrupt"
                    if entry.event.corrupt
                    else (self.target.unsendable(entry.event))
                )
                if reason is None:
                    sendable.append(entry)
                else:
                    refused.setdefault(reason, []).append(entry)
            for reason, entries in refused.items():
                await self._dead_letter(entries, unsendable_failure(reason))
                dead += len(entries)
            if sendable and (failure := await self._send(sendable)) is not None:
                await self._dead_letter(sendable, failure)
                dead += len(sendable)
            await self.journal.ack(self.config.id, batch, dead_lettered=dead)

    async def _send(self, batch: Sequence[Entry]) -> Failure | None:
        """Send with retries; None when delivered, else why it was given up."""
        events = [entry.event for entry in batch]
        retry = self.config.retry
        first_attempt = time.time()
        attempts = 0
        self.stats.batches += 1
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(RetryableDeliveryError),
            stop=stop_after_attempt(retry.max_attempts) | stop_after_delay(retry.max_age_s),
            wait=self._wait,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    started = time.monotonic()
                    try:
                        await self.target.send(events)
                    except DeliveryError as exc:
                        self._observe_send(started, "failed")
                        self.stats.record_failure(str(exc), time.time())
                        raise
                    self._observe_send(started, "delivered")
            self.stats.record_success()
            return None
        except DeliveryError as exc:
            permanent = isinstance(exc, PermanentDeliveryError)
            reason = "retries_exhausted"
            if permanent:
                reason = "permanent_status" if exc.status is not None else "permanent_error"
            log.warning(
                "target %s: %s dead-lettered (%s) after %s: %s",
                self.config.id,
                counted(len(batch), "event"),
                reason,
                counted(attempts, "attempt"),
                exc,
            )
            return Failure(
                reason=reason,
                message=str(exc),
                status=exc.status,
                response_excerpt=exc.response_excerpt,
                attempts=attempts,
                first_attempt_at=first_attempt,
                last_attempt_at=time.time(),
            )

    def _observe_send(self, started: float, outcome: str) -> None:
        if self.send_seconds is not None:
            self.send_seconds.labels(self.config.id, outcome).observe(time.monotonic() - started)

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with full jitter, or the target's Retry-After if longer."""
        backoff = self._backoff(state)
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RetryableDeliveryError) and error.retry_after_s is not None:
            return max(backoff, error.retry_after_s)
        return backoff

    def _before_sleep(self, state: RetryCallState) -> None:
        self.stats.retries += 1
        error = state.outcome.exception() if state.outcome else None
        log.info(
            "target %s: attempt %d failed (%s); retrying in %.2fs",
            self.config.id,
            state.attempt_number,
            error,
            state.next_action.sleep if state.next_action else 0.0,
        )

    async def _dead_letter(self, batch: Sequence[Entry], failure: Failure) -> None:
        while True:
            try:
                await self.dead_letters.write(self.config.id, batch, failure)
            except OSError as exc:
                log.error(
                    "target %s: cannot write dead letters (%s); the batch stays pending",
                    self.config.id,
                    exc,
                )
                await asyncio.sleep(DEAD_LETTER_RETRY_S)
                continue
            return
