"""The JetStream journal's dead letters: a stream per target, shared by every router.

Dead letters go to a stream per target, `<stream>_DLQ_<target>` (StreamDeadLetters), with
Nats-Msg-Id = the event's sequence in the target's stream, so a batch dead-lettered by a router
that died before its ack, and dead-lettered again by the next, is one letter. Reading them
(GET /v1/deadletters, a redrive, `event-router dlq`) goes through an ephemeral consumer of the
reader's own (stream_letters); all_letters is the CLI's way in, with a connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import orjson
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamState
from nats.js.errors import NotFoundError

from router.config import JetStreamConfig
from router.deadletter import (
    DeadLetters,
    Failure,
    Letter,
    LetterFilter,
    LetterPage,
    LetterTally,
    Taken,
    letter_bytes,
    page_answer,
    unredrivable,
)
from router.errors import StorageUnavailableError
from router.journal import Entry
from router.journal.jetstream.streams import (
    READ_TRY_S,
    STREAM_ERRORS,
    connect,
    letters_stream,
    letters_subject,
    publish_until_acked,
    target_of_token,
)

if TYPE_CHECKING:
    from router.journal.jetstream.journal import JetStreamJournal

# A redriven event is published again under its id plus this and the letter's sequence, so
# that the stream's de-duplication (which remembers the id) does not drop it.
REDRIVE_SEP = "#redrive-"
# Letters a dead-letter read takes per fetch, and how long its consumer outlives a reader that
# died before deleting it (the server removes it then).
LETTERS_PER_FETCH = 256
LETTER_READER_IDLE_S = 30.0


class StreamDeadLetters(DeadLetters):
    """Dead letters in a stream per target, shared by every router: `write` publishes one
    message per letter (Nats-Msg-Id = the event's sequence in the target's stream, so a batch
    dead-lettered twice, by a router that died before its ack and by the next, is one letter);
    `take` reads them for a redrive and deletes those put back on the journal."""

    def __init__(self, journal: JetStreamJournal, directory: Path) -> None:
        super().__init__(directory)
        self.journal = journal
        # Per dead-letter stream: its letters summed up (GET /v1/deadletters), and the last
        # sequence they include.
        self._tallies: dict[str, tuple[int, LetterTally]] = {}

    async def write(self, target_id: str, entries: Sequence[Entry], failure: Failure) -> None:
        config = self.journal.js_config
        subject = letters_subject(config, target_id)
        js = self.journal.js
        results = await asyncio.gather(
            *(
                publish_until_acked(
                    js,
                    subject,
                    letter_bytes(target_id, entry, failure),
                    {"Nats-Msg-Id": str(entry.seq)},
                    timeout_s=config.publish_timeout_s,
                )
                for entry in entries
            ),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            # OSError: delivery keeps the batch pending and tries again, as for a full disk.
            raise OSError(f"cannot write dead letters to JetStream: {failed[0]!r}")
        key = (target_id, failure.reason)
        self.written[key] = self.written.get(key, 0) + len(entries)

    async def every_target(self) -> dict[str, list[Letter]]:
        """Every target's letters from its dead-letter stream (a removed target's too),
        whichever router wrote them: what `find` searches."""
        try:
            return await letters_by_target(self.journal.js, self.journal.js_config)
        except STREAM_ERRORS as exc:
            raise StorageUnavailableError(f"JetStream did not answer: {exc!r}") from exc

    async def summary(self) -> dict[str, Any]:
        """GET /v1/deadletters from the dead-letter streams (a removed target's too), whichever
        router wrote them: per target, the count from the stream's state; the reasons and the
        time span from its letters, each read once: a request reads the letters written since
        the one before (all of them again only after some were deleted: a redrive). Every
        read waits READ_TRY_S: NATS away is StorageUnavailableError (503), at once."""
        js = self.journal.reads
        prefix = f"{self.journal.js_config.stream}_DLQ_"
        targets: dict[str, Any] = {}
        try:
            streams = [
                (info.config.name, info.state)
                for info in await js.streams_info()
                if info.config.name is not None and info.config.name.startswith(prefix)
            ]
            for name, state in streams:
                if not state.messages:
                    self._tallies.pop(name, None)
                    continue
                tally = await self._tally(js, name, state)
                targets[target_of_token(name.removeprefix(prefix))] = tally.row(state.messages)
        except STREAM_ERRORS as exc:
            raise StorageUnavailableError(f"JetStream did not answer: {exc!r}") from exc
        return {"targets": dict(sorted(targets.items()))}

    async def _tally(self, js: JetStreamContext, name: str, state: StreamState) -> LetterTally:
        """The stream's letters up to `state.last_seq` summed up: the last tally and the
        letters written since, or, if that does not give the stream's count (letters were
        deleted), all of them read again."""
        last_seq, tally = self._tallies.get(name, (0, LetterTally()))
        if last_seq > state.last_seq:  # the stream was made again
            last_seq, tally = 0, LetterTally()
        async for _, letter in stream_letters(js, name, last_seq + 1, state.last_seq):
            tally.add(letter)
        if tally.letters != state.messages:
            tally = LetterTally()
            async for _, letter in stream_letters(js, name, state.first_seq, state.last_seq):
                tally.add(letter)
        self._tallies[name] = (state.last_seq, tally)
        return tally

    async def page(
        self, target_id: str, wanted: LetterFilter, offset: int, limit: int
    ) -> dict[str, Any]:
        """A page of one target's letters from its dead-letter stream, read a letter at a time
        and kept a page at a time, as from a file. Unfiltered, the total is the stream's
        count and the page is read from its sequence (from the first letter, skipping
        `offset`, where letters were deleted in between); filtered, every letter is read to
        count the matches, as a file is. The id comes from a URL: it is looked for among the
        streams' names before it becomes a subject, as a subject past the server's line
        limit has it close the connection."""
        name = letters_stream(self.journal.js_config, target_id)
        js = self.journal.reads
        try:
            states = {info.config.name: info.state for info in await js.streams_info()}
            state = states.get(name)
            if state is None or not state.messages:
                return page_answer([], offset, limit, 0)
            if wanted.reason is None and wanted.since is None:
                return await self._plain_page(js, name, state, offset, limit)
            found = LetterPage(wanted, offset, limit)
            async for _, letter in stream_letters(js, name, state.first_seq, state.last_seq):
                found.add(letter)
            return found.answer()
        except STREAM_ERRORS as exc:
            raise StorageUnavailableError(f"JetStream did not answer: {exc!r}") from exc

    async def _plain_page(
        self, js: JetStreamContext, name: str, state: StreamState, offset: int, limit: int
    ) -> dict[str, Any]:
        """`limit` letters from the `offset`th, of every letter in the stream."""
        if offset >= state.messages:
            return page_answer([], offset, limit, state.messages)
        skip = offset
        first = state.first_seq
        if not state.num_deleted:  # no gaps: the offset-th letter's sequence is known
            first, skip = state.first_seq + offset, 0
        kept = [
            letter
            async for _, letter in stream_letters(
                js, name, first, state.last_seq, limit=skip + limit
            )
        ]
        return page_answer(kept[skip:], offset, limit, state.messages)

    async def letters(self, target_id: str) -> list[tuple[int, Letter]]:
        """Every letter of the target, with its sequence in the dead-letter stream."""
        return await read_stream_letters(
            self.journal.js, letters_stream(self.journal.js_config, target_id)
        )

    async def find(self, event_id: str) -> dict[str, dict[str, Any]]:
        """Receipts' lookup: per target, the event's dead letter and its reason, from every
        dead-letter stream of the journal (whichever router wrote it; a removed target's
        too). A scan of the letters: an auditor's question, not the hot path."""
        found: dict[str, dict[str, Any]] = {}
        for target_id, letters in (await self.every_target()).items():
            for letter in letters:
                event = letter.get("event")
                if isinstance(event, dict) and event.get("id") == event_id:
                    found[target_id] = {
                        "state": "dead_lettered",
                        "reason": letter.get("reason"),
                        "message": letter.get("message"),
                        "seq": None,  # letters take no places on JetStream
                    }
                    break
        return found

    @asynccontextmanager
    async def take(
        self,
        target_id: str,
        wanted: Callable[[Letter], bool],
        refuse: Callable[[Letter], str | None] = lambda _: None,
    ) -> AsyncIterator[Taken]:
        async with self._lock(target_id):
            stored = await self.letters(target_id)
            taken = Taken([])
            seqs: dict[int, int] = {}
            for seq, letter in stored:
                if not wanted(letter):
                    continue
                why = unredrivable(letter) or refuse(letter)
                if why is None:
                    seqs[id(letter)] = seq
                    # The redriven event is published under a message id of its own.
                    event_id = str(letter["event"].get("id"))
                    self.journal.redriving[event_id] = f"{event_id}{REDRIVE_SEP}{seq}"
                    taken.letters.append(letter)
                else:
                    taken.skipped[why] = taken.skipped.get(why, 0) + 1
            try:
                yield taken
            finally:
                for letter in taken.letters:
                    self.journal.redriving.pop(str(letter["event"].get("id")), None)
                stream = letters_stream(self.journal.js_config, target_id)
                for letter in taken.letters[: taken.done]:
                    with contextlib.suppress(*STREAM_ERRORS):
                        await self.journal.js.delete_msg(stream, seqs[id(letter)])

    def close(self) -> None:
        return None


async def read_stream_letters(js: JetStreamContext, stream: str) -> list[tuple[int, Letter]]:
    """Every message of a dead-letter stream, decoded, in order."""
    try:
        state = (await js.stream_info(stream)).state
    except NotFoundError:
        return []
    if not state.messages:
        return []
    return [found async for found in stream_letters(js, stream, state.first_seq, state.last_seq)]


async def stream_letters(
    js: JetStreamContext, stream: str, first: int, last: int, *, limit: int | None = None
) -> AsyncIterator[tuple[int, Letter]]:
    """The letters of a dead-letter stream from sequence `first` to `last` (at most `limit`),
    decoded, with their sequences, skipping the deleted ones. An ephemeral consumer of its own
    (no acks, in memory) fetches them LETTERS_PER_FETCH at a time: read one request per letter,
    a filtered page of a 5,000-letter stream took 2.2 s, a 100,000-letter one minutes. The
    generator ends by itself at `last` or `limit`, so its consumer is deleted at once (a
    caller that stops early leaves it to LETTER_READER_IDLE_S)."""
    wanted = last - first + 1 if limit is None else min(limit, last - first + 1)
    if wanted <= 0:
        return
    info = await js.add_consumer(
        stream,
        ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=first,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=LETTER_READER_IDLE_S,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    assert info.name is not None
    try:
        pending = info.num_pending or 0
        sub = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
        try:
            while pending and wanted:
                try:
                    msgs = await sub.fetch(min(LETTERS_PER_FETCH, pending, wanted), READ_TRY_S)
                except nats.errors.TimeoutError:
                    # Nothing came: the rest was deleted meanwhile (a redrive), or NATS is
                    # away, in which case asking the consumer raises for the caller.
                    if not (await sub.consumer_info()).num_pending:
                        return
                    raise
                for msg in msgs:
                    seq, pending = msg.metadata.sequence.stream, msg.metadata.num_pending
                    if seq > last:
                        return
                    try:
                        letter = orjson.loads(msg.data or b"")
                    except orjson.JSONDecodeError:
                        letter = {"reason": "unreadable_line", "line": seq}
                    yield seq, letter
                    wanted -= 1
                    if seq == last or not wanted:
                        return
        finally:
            await sub.unsubscribe()
    finally:
        with contextlib.suppress(*STREAM_ERRORS):
            await js.delete_consumer(stream, info.name)


async def all_letters(config: JetStreamConfig) -> dict[str, list[Letter]]:
    """Every target's dead letters (`event-router dlq list | show`), by target id in id order:
    each dead-letter stream of `config.stream`, also a removed target's."""
    nc = await connect(config, name="event-router dlq")
    try:
        return await letters_by_target(nc.jetstream(timeout=config.publish_timeout_s), config)
    finally:
        await nc.close()


async def letters_by_target(
    js: JetStreamContext, config: JetStreamConfig
) -> dict[str, list[Letter]]:
    """Every dead-letter stream of `config.stream`, by target id in id order."""
    prefix = f"{config.stream}_DLQ_"
    names = [info.config.name for info in await js.streams_info()]
    found = {
        target_of_token(name.removeprefix(prefix)): [
            letter for _, letter in await read_stream_letters(js, name)
        ]
        for name in names
        if name is not None and name.startswith(prefix)
    }
    return dict(sorted(found.items()))
