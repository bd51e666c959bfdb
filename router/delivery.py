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
from dataclasses import replace

from prometheus_client import Histogram
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from router.config import TargetConfig
from router.deadletter import DeadLetters, Failure, unsendable_failure
from router.errors import (
    DeliveryError,
    PermanentDeliveryError,
    RetryableDeliveryError,
    UnexpectedDeliveryError,
)
from router.events import Event
from router.journal import Entry, Journal, JournalUnavailableError
from router.observe.logformat import counted
from router.observe.metrics import TargetStats
from router.probe import probe
from router.targets import Target

log = logging.getLogger(__name__)

# When even the dead-letter file cannot be written (disk full), wait this long and try again:
# the batch stays in the journal, nothing is acknowledged, nothing is lost.
DEAD_LETTER_RETRY_S = 1.0
# When the journal cannot record a settled batch (locked, disk full), wait this long and record
# it again; the batch is never sent (or dead-lettered) a second time for it.
ACK_RETRY_S = 1.0

WORKER_RESTART_S = 1.0


def _retry_after(state: RetryCallState) -> float | None:
    """The Retry-After of the attempt that just failed, if the target sent one."""
    error = state.outcome.exception() if state.outcome else None
    if isinstance(error, RetryableDeliveryError):
        return error.retry_after_s
    return None


class RetryAfterOutlastsAgeStop(stop_base):
    """Stop now when the target asks to be left alone for longer than the batch may still wait
    (retry.max_age_s): a retry before its Retry-After would only be refused again, and waiting
    for it would hold the batch past its age. `fired` says this stop, not another, ended it."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self.fired = False

    def __call__(self, retry_state: RetryCallState) -> bool:
        retry_after = _retry_after(retry_state)
        left = self.max_age_s - (retry_state.seconds_since_start or 0.0)
        self.fired = retry_after is not None and retry_after > left
        return self.fired


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

        This is a task boundary: an unexpected error is logged, counted and shown in the
        target's write_status, and the worker carries on after a pause (the batch stays in the
        journal), rather than dying silently and leaving the target's backlog to grow unseen.
        A worker that keeps failing turns /readyz to 503 (TargetStats.worker_failing)."""
        while True:
            try:
                await self._deliver_until_stopped()
                return
            except Exception as exc:
                self.stats.record_worker_error(
                    f"target {self.config.id}: delivery worker failed: {type(exc).__name__}: {exc}",
                    time.time(),
                )
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
            unsendable = self.target.unsendable  # looked up once a batch, not per event
            for entry in batch:
                event = entry.event
                reason = "journal_corrupt" if event.corrupt else unsendable(event)
                if reason is None:
                    sendable.append(entry)
                else:
                    refused.setdefault(reason, []).append(entry)
            for reason, entries in refused.items():
                await self._dead_letter(entries, unsendable_failure(reason))
                dead += len(entries)
            dead += await self._send_each_request(sendable)
            await self._ack(batch, dead)
            self.stats.worker_errors_in_a_row = 0

    async def _ack(self, batch: Sequence[Entry], dead: int) -> None:
        """Record the batch's known outcome, retrying until the journal takes it. Letting the
        error restart the worker would read the batch again from the old cursor and send it
        (and write its dead letters) a second time."""
        while True:
            try:
                await self.journal.ack(self.config.id, batch, dead_lettered=dead)
            except (JournalUnavailableError, OSError) as exc:
                log.error(
                    "target %s: cannot record a settled batch of %d events in the journal (%s); "
                    "retrying the record, not the send",
                    self.config.id,
                    len(batch),
                    exc,
                )
                await asyncio.sleep(ACK_RETRY_S)
                continue
            return

    async def _send_each_request(self, sendable: Sequence[Entry]) -> int:
        """Send the batch in the requests the target cuts it into, each retried and settled on
        its own: a failure of one request neither sends an earlier one again nor dead-letters
        events an earlier one delivered. Returns how many events were dead-lettered."""
        if not sendable:
            return 0
        dead = 0
        covered = 0
        events = [entry.event for entry in sendable]
        entry_of: dict[int, Entry] | None = None
        for request in self.target.requests(events):
            if request is events:  # the whole batch in one request (`yield batch`): as it is
                entries: Sequence[Entry] = sendable
            else:
                # A request may group events from anywhere in the batch (the COS target writes
                # one object per account), so its entries are found by event, not by position.
                if entry_of is None:
                    entry_of = {id(entry.event): entry for entry in sendable}
                entries = [entry_of[id(event)] for event in request]
            covered += len(entries)
            for failed, failure in await self._send(entries, request):
                await self._dead_letter(failed, failure)
                dead += len(failed)
        assert covered == len(sendable), "a target's requests() must cover the batch once"
        return dead

    async def _send(
        self, batch: Sequence[Entry], events: Sequence[Event]
    ) -> list[tuple[Sequence[Entry], Failure]]:
        """Send `events` (the batch's, in its order) with retries; what was given up and why
        (nothing when all was delivered). A target that refused only some events names them
        (PermanentDeliveryError.refused): only those are given up, each with its own reason,
        and the rest were delivered."""
        retry = self.config.retry
        first_attempt = time.time()
        attempts = 0
        self.stats.batches += 1
        outlasted = RetryAfterOutlastsAgeStop(retry.max_age_s)
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(RetryableDeliveryError),
            stop=stop_any(
                stop_after_attempt(retry.max_attempts),
                stop_after_delay(retry.max_age_s),
                outlasted,
            ),
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
                    except Exception as exc:
                        # The boundary of the target's code: what it raises here is no delivery
                        # outcome it classified, so it is permanent (a restarting worker would
                        # send the same batch into the same error for ever).
                        log.exception("target %s: unexpected error in send", self.config.id)
                        error = UnexpectedDeliveryError(
                            self.config.id, f"{type(exc).__name__}: {exc}"
                        )
                        self._observe_send(started, "failed")
                        self.stats.record_failure(str(error), time.time())
                        raise error from exc
                    self._observe_send(started, "delivered")
            self.stats.record_success()
            return []
        except DeliveryError as exc:
            permanent = isinstance(exc, PermanentDeliveryError)
            reason = "retries_exhausted"
            message = str(exc)
            if outlasted.fired and isinstance(exc, RetryableDeliveryError):
                reason = "retry_after_exceeds_max_age"
                message += (
                    f"; Retry-After asks for {exc.retry_after_s:.0f}s, longer than "
                    f"retry.max_age_s ({retry.max_age_s:g}s) lets the batch wait"
                )
            if permanent:
                reason = "permanent_status" if exc.status is not None else "permanent_error"
            if isinstance(exc, UnexpectedDeliveryError):
                reason = "unexpected_error"
            refused = exc.refused if isinstance(exc, PermanentDeliveryError) else None
            log.warning(
                "target %s: %s dead-lettered (%s) after %s: %s",
                self.config.id,
                counted(len(batch) if refused is None else len(refused), "event"),
                reason,
                counted(attempts, "attempt"),
                message,
            )
            failure = Failure(
                reason=reason,
                message=message,
                status=exc.status,
                response_excerpt=exc.response_excerpt,
                attempts=attempts,
                first_attempt_at=first_attempt,
                last_attempt_at=time.time(),
            )
            if refused is None:
                return [(batch, failure)]
            by_reason: dict[str, list[Entry]] = {}
            for entry in batch:
                if entry.event.id in refused:
                    by_reason.setdefault(refused[entry.event.id], []).append(entry)
            return [
                (entries, replace(failure, message=f"{message}: {why}"))
                for why, entries in by_reason.items()
            ]

    def _observe_send(self, started: float, outcome: str) -> None:
        if self.send_seconds is not None:
            self.send_seconds.labels(self.config.id, outcome).observe(time.monotonic() - started)

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with full jitter, or the target's Retry-After if longer; never
        longer than max_backoff_s nor past max_age_s, so a server's Retry-After cannot hold a
        batch beyond the limits the operator set."""
        retry = self.config.retry
        wait = self._backoff(state)
        retry_after = _retry_after(state)
        if retry_after is not None:
            wait = max(wait, retry_after)
        left = retry.max_age_s - (state.seconds_since_start or 0.0)
        return max(0.0, min(wait, retry.max_backoff_s, left))

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
