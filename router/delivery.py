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
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import replace
from typing import Any

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


class Unrecorded:
    """Per target, what a worker settled (delivered, or wrote as dead letters) but left its
    batch pending in the journal: a stop (the drain timeout, a reload) came while it was still
    sending the batch's other requests (a COS batch is an object per account), or while the
    journal could not take the ack (its write lock held past SQLite's busy timeout, a full
    disk). The daemon keeps one for all its workers, so that the target's next worker (a
    changed target's, or the same one restarted after an error) neither sends those events
    again nor writes their dead letters twice, and the retire of a removed target counts them
    as what they were instead of dead-lettering them as target_removed. Kept in memory: a
    process that stops with some (the journal still unwritable at the stop) sends them again
    at its next start, at least once, as after a crash.

    Nothing is noted on the hot path: only a batch left without its ack is, and an ack that
    lands past a target's notes forgets them."""

    def __init__(self) -> None:
        # target id -> seq -> True if dead-lettered, False if the target took it
        self._by_target: dict[str, dict[int, bool]] = {}

    def note(self, target_id: str, parts: Iterable[tuple[Sequence[Entry], bool]]) -> None:
        """These parts of a batch were settled (each: its entries, and whether as dead
        letters), and the batch is left pending."""
        known: dict[int, bool] | None = None
        for entries, dead in parts:
            if known is None:
                known = self._by_target.setdefault(target_id, {})
            for entry in entries:
                known[entry.seq] = dead
        if known is not None and not known:
            del self._by_target[target_id]

    def of(self, target_id: str) -> dict[int, bool] | None:
        """The target's settled seqs (True: dead-lettered), or None (nearly always)."""
        return self._by_target.get(target_id)

    def forget(self, target_id: str, through: int | None = None) -> None:
        """The journal recorded the target's batches through seq `through` (None: the target
        is retired): their notes go."""
        known = self._by_target.get(target_id)
        if known is None:
            return
        if through is not None:
            for seq in [seq for seq in known if seq <= through]:
                del known[seq]
        if through is None or not known:
            del self._by_target[target_id]


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
        unrecorded: Unrecorded | None = None,
    ) -> None:
        self.probe_first = probe_first
        # What this target's workers settled and left pending (the daemon's, shared by all).
        self.unrecorded = unrecorded if unrecorded is not None else Unrecorded()
        self.send_seconds = send_seconds  # labelled (target, outcome); /metrics shows it
        self.target = target
        self.config = config
        self.journal = journal
        self.dead_letters = dead_letters
        self.stats = stats
        self.stopping = asyncio.Event()
        # Set when the worker was cancelled (the drain timeout, a reload) while a send was
        # under way: that attempt finishes and its batch is settled first (see _attempt).
        self._cancelled = False
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
            await self._settle_batch(batch)
            if self._cancelled:  # its attempt finished and the batch is settled: stop now
                raise asyncio.CancelledError

    async def _settle_batch(self, batch: Sequence[Entry]) -> None:
        """Send the batch (or dead-letter what cannot be sent) and record the outcome. What an
        earlier worker of the target settled of it already (Unrecorded) is neither sent nor
        dead-lettered again, only recorded; what this one settles and leaves without an ack
        (a stop, an error) is noted there for the next."""
        target_id = self.config.id
        dead = 0
        sendable: list[Entry] = []
        refused: dict[str, list[Entry]] = {}
        unsendable = self.target.unsendable  # looked up once a batch, not per event
        known = self.unrecorded.of(target_id)
        unsettled = batch
        if known is not None:  # rarely: the loop below stays the same for every other batch
            unsettled = []
            for entry in batch:
                settled = known.get(entry.seq)
                if settled is None:
                    unsettled.append(entry)
                elif settled:
                    dead += 1
        for entry in unsettled:
            event = entry.event
            reason = "journal_corrupt" if event.corrupt else unsendable(event)
            if reason is None:
                sendable.append(entry)
            else:
                refused.setdefault(reason, []).append(entry)
        done: list[tuple[Sequence[Entry], bool]] = []  # settled so far: (entries, dead letters)
        try:
            for reason, entries in refused.items():
                await self._dead_letter(entries, unsendable_failure(reason))
                done.append((entries, True))
                dead += len(entries)
            dead += await self._send_each_request(sendable, done)
            await self._ack(batch, dead)
        except BaseException:
            self.unrecorded.note(target_id, done)
            raise
        if known is not None:
            self.unrecorded.forget(target_id, through=batch[-1].seq)
        self.stats.worker_errors_in_a_row = 0

    async def _uncut(self, work: Coroutine[Any, Any, None]) -> None:
        """A send or a dead-letter write. A cancellation that comes while it runs (the drain
        timeout, a reload) does not cut it off: what the target took (or the dead-letter file)
        cannot be taken back, so a write cut off would leave its batch pending and a later
        worker would send it again (a changed target's, after a reload) or dead-letter it too
        (a removed one's). It finishes (bounded by the target's own timeouts), and so does
        the rest of its batch (its other requests, its dead letters), each without a retry
        (`_pause`): a batch that went out whole is settled as usual, and the worker stops
        then; one that did not stays pending, to be sent again (at least once)."""
        running = asyncio.ensure_future(work)
        while not running.done():
            try:
                await asyncio.shield(running)
            except asyncio.CancelledError:
                if running.cancelled():
                    raise
                self._cancelled = True
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # raised again once the batch is settled
        running.result()

    async def _pause(self, seconds: float) -> None:
        """A wait before trying again (a send, a dead-letter write, an ack): cancellable as
        ever, and none once a cancellation came during a write (`_uncut`): the worker stops
        there, and what it could not settle stays pending, to be sent again."""
        if self._cancelled:
            raise asyncio.CancelledError
        await asyncio.sleep(seconds)

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
                await self._pause(ACK_RETRY_S)  # a stop cut short ends here (resent later)
                continue
            return

    async def _send_each_request(
        self, sendable: Sequence[Entry], done: list[tuple[Sequence[Entry], bool]]
    ) -> int:
        """Send the batch in the requests the target cuts it into, each retried and settled on
        its own: a failure of one request neither sends an earlier one again nor dead-letters
        events an earlier one delivered. Each part settled is added to `done` as it is (what
        the target took, then its dead letters once written), so a stop between requests
        leaves them noted (Unrecorded). Returns how many events were dead-lettered."""
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
            failures = await self._send(entries, request)
            if not failures:
                done.append((entries, False))
                continue
            given_up = {entry.seq for failed, _ in failures for entry in failed}
            done.append(([entry for entry in entries if entry.seq not in given_up], False))
            for failed, failure in failures:
                await self._dead_letter(failed, failure)
                done.append((failed, True))
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
            sleep=self._pause,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    started = time.monotonic()
                    try:
                        await self._uncut(self.target.send(events))
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
                await self._uncut(self.dead_letters.write(self.config.id, batch, failure))
            except OSError as exc:
                log.error(
                    "target %s: cannot write dead letters (%s); the batch stays pending",
                    self.config.id,
                    exc,
                )
                await self._pause(DEAD_LETTER_RETRY_S)
                continue
            return
