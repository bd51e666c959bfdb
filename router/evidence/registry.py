"""The evidence of all targets in one place: their chains, checkpoints and the signing key.

The daemon builds one Evidence; a chained target (file, cloud_object_storage, and
event_streams with `evidence.event_streams`) attaches to it
(its chain, and how a checkpoint line is written into its archive); dead letters ask it for
the chain a letter takes a place in.

A bucket (or a topic) is not read back for its chain's head at start, so a target attached with
`head_in_journal` has its head saved in the journal after every write, with its last
checkpoint (an empty one, b"", before the first).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from router.config import EvidenceConfig
from router.deadletter import letters_path, redriven_path
from router.errors import ConfigError, RouterError
from router.evidence.canonical import Link
from router.evidence.chain import Chain, Planned, cut_torn_tail, last_link, same_head
from router.evidence.checkpoint import CheckpointError, checkpoint_line, parse_checkpoint
from router.evidence.keys import SigningKeyError, load_private
from router.observe.metrics import utc_iso

log = logging.getLogger(__name__)

# A stored row: seq, head hash, the last checkpoint line, when it was written.
StoredChain = tuple[int, bytes, bytes | None, float | None]
# A stored plan: batch key, object name, base (seq, hash), head (seq, prev, hash), body, md5.
StoredPlan = tuple[str, str, int, bytes, int, bytes, bytes, bytes, str]


class ChainStore(Protocol):
    """Where chain heads and checkpoints are kept across restarts (the journal)."""

    async def chain_heads(self) -> dict[str, StoredChain]: ...

    async def save_chain(
        self, target_id: str, seq: int, head_hash: bytes, checkpoint: bytes, at: float
    ) -> None: ...

    # Optional (a store without them keeps no plans): the object a bucket target is about to
    # PUT, one per target, kept before the PUT.
    #   async def planned_objects(self) -> dict[str, StoredPlan]
    #   async def save_planned(self, target_id: str, plan: StoredPlan) -> None
    #   async def drop_planned(self, target_id: str) -> None


class Evidence:
    """The chains of all targets, their checkpoints, and the signing key."""

    def __init__(self, config: EvidenceConfig, store: ChainStore, dead_letter_dir: Path) -> None:
        self.config = config
        self.store = store
        self.dead_letter_dir = dead_letter_dir
        try:
            key_file = config.signing_key_file
            self.key = load_private(Path(key_file)) if key_file else None
        except SigningKeyError as exc:
            raise ConfigError("config", [f"evidence.signing_key_file: {exc}"]) from exc
        self.chains: dict[str, Chain] = {}
        self._stored: dict[str, StoredChain] = {}
        self._plans: dict[str, StoredPlan] = {}
        self._writers: dict[str, Callable[[bytes], Awaitable[None]]] = {}
        self._timer: asyncio.Task[None] | None = None
        self.checkpoint_errors = 0

    async def open(self) -> None:
        """Read the stored heads (after the journal opened) and start the checkpoint timer."""
        if not self.config.enabled:
            return
        self._stored = await self.store.chain_heads()
        planned_objects = getattr(self.store, "planned_objects", None)
        if planned_objects is not None:
            self._plans = await planned_objects()
        self._timer = asyncio.create_task(self._checkpoint_every_interval(), name="checkpoints")

    async def close(self) -> None:
        """Checkpoint every chain that moved since its last checkpoint, then stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
            self._timer = None
        for target_id in list(self._writers):
            await self.checkpoint(target_id)

    def chain(self, target_id: str) -> Chain | None:
        """The target's chain (None when evidence is off), created on first use from the
        journal's stored head and the tail of the target's dead-letter file."""
        if not self.config.enabled:
            return None
        chain = self.chains.get(target_id)
        if chain is None:
            chain = self.chains[target_id] = Chain(target_id)
            stored = self._stored.get(target_id)
            if stored is not None:
                seq, head_hash, line, at = stored
                chain.journal_head = Link(seq, b"", head_hash)
                chain.observe(chain.journal_head)
                if line == b"":  # a head kept before the chain's first checkpoint
                    line, at = None, None
                chain.checkpointed_seq = _checkpoint_seq(line, seq) if line is not None else 0
                chain.checkpointed_at = at
                chain.checkpoint = line
            letters = letters_path(self.dead_letter_dir, target_id)
            cut_torn_tail(letters)  # before the first letter is appended after it
            chain.found_in_files(last_link(letters))
            # Letters a redrive moved keep their places there (the newest may be among them).
            redriven = redriven_path(self.dead_letter_dir, target_id)
            chain.found_in_files(last_link(redriven, furthest=True))
            plan = self._plans.pop(target_id, None)
            if plan is not None:
                _take_planned_places(chain, _planned(plan))
            chain.after_write = self._after_write
        return chain

    def missing_to_announce(self) -> list[tuple[str, dict[str, object]]]:
        """The chains found cut at start (Chain.check_files) and not announced yet, each
        once: the daemon records an event of its own for each, so alerting on the router's
        events sees a cut archive, not only the log and /v1/status."""
        found = []
        for target_id, chain in self.chains.items():
            if chain.missing_at_start is not None and not chain.missing_announced:
                chain.missing_announced = True
                found.append((target_id, chain.missing_at_start))
        return found

    def head_of(self, target_id: str) -> tuple[int, bytes] | None:
        """The head the journal keeps with each of this target's acks (its `chain_head`):
        a file target's, whose head is otherwise kept only at checkpoints."""
        chain = self.chains.get(target_id)
        if chain is None or chain.head is None or chain.head_in_journal:
            return None
        return chain.seq, chain.head.hash

    def letters_chain(self, target_id: str) -> Chain | None:
        """The chain a dead letter for this target takes a place in: a chained (file) target's,
        also once it left the config (retired); None for other targets, whose deliveries take
        no places, so their dead letters alone would look like a whole chain."""
        if target_id in self.chains or target_id in self._stored:
            return self.chain(target_id)
        return None

    def attach(
        self,
        target_id: str,
        write_line: Callable[[bytes], Awaitable[None]],
        *,
        head_in_journal: bool = False,
    ) -> Chain | None:
        """A chained target registers how a checkpoint line is written into its archive;
        `head_in_journal`: its archive cannot give the head back (a bucket), so the journal
        keeps it after every write."""
        chain = self.chain(target_id)
        if chain is not None:
            self._writers[target_id] = write_line
            chain.head_in_journal = head_in_journal
            if head_in_journal and hasattr(self.store, "save_planned"):
                chain.keep_plan = functools.partial(self._keep_plan, target_id)
                chain.drop_plan = functools.partial(self.store.drop_planned, target_id)  # type: ignore[attr-defined]
        return chain

    async def _keep_plan(self, target_id: str, plan: Planned) -> None:
        """Keep the object about to be PUT in the journal (router/evidence/chain.Planned)."""
        base_seq, base_hash = (plan.base.seq, plan.base.hash) if plan.base else (0, b"")
        head = plan.head
        row = (plan.key, plan.name, base_seq, base_hash, head.seq, head.prev, head.hash)
        await self.store.save_planned(target_id, (*row, plan.body, plan.md5))  # type: ignore[attr-defined]

    def detach(self, target_id: str) -> None:
        self._writers.pop(target_id, None)

    async def checkpoint(self, target_id: str) -> None:
        """Write a checkpoint now if the chain moved since the last one (a target stopping)."""
        chain = self.chains.get(target_id)
        if chain is not None:
            async with chain.lock:
                await self._checkpoint_locked(chain)

    def _due(self, chain: Chain) -> bool:
        moved = chain.seq - chain.checkpointed_seq
        if moved <= 0:
            return False
        if moved >= self.config.checkpoint_every_events:
            return True
        last = chain.checkpointed_at or chain.opened_at
        return time.time() - last >= self.config.checkpoint_every_s

    async def _after_write(self, chain: Chain) -> None:
        """Called by a chained write, under the chain's lock, once its lines are written."""
        if self._due(chain):
            await self._checkpoint_locked(chain)
        if chain.head_in_journal and chain.head is not None:
            # The places are taken whether or not this row is written: a failure here is the
            # journal's, and the next write saves the head again. Before the first checkpoint
            # the row holds an empty one (b"", time 0).
            try:
                await self.store.save_chain(
                    chain.target_id,
                    chain.seq,
                    chain.head.hash,
                    chain.checkpoint or b"",
                    chain.checkpointed_at or 0.0,
                )
            except (RouterError, OSError):
                log.exception("target %s: cannot keep the chain head", chain.target_id)

    async def _checkpoint_locked(self, chain: Chain) -> None:
        write = self._writers.get(chain.target_id)
        if write is None or chain.head is None or chain.seq <= chain.checkpointed_seq:
            return
        if chain.in_flight or chain.held:
            # The head is past places a PUT (or a Kafka message) under way has not filled
            # yet, or that a message not acknowledged holds: later.
            return
        now = time.time()
        line = checkpoint_line(chain.target_id, chain.seq, chain.head.hash, utc_iso(now), self.key)
        try:
            await write(line)
            await self.store.save_chain(chain.target_id, chain.seq, chain.head.hash, line, now)
        except Exception:
            # A task boundary of its own: a checkpoint that cannot be written now is tried at
            # the next write or tick; the events it would cover are written and chained.
            self.checkpoint_errors += 1
            log.exception("target %s: cannot write a checkpoint", chain.target_id)
            return
        chain.checkpointed_seq = chain.seq
        chain.checkpointed_at = now
        chain.checkpoint = line

    async def _checkpoint_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_every_s)
            for target_id in list(self._writers):
                chain = self.chains.get(target_id)
                if chain is not None and self._due(chain):
                    async with chain.lock:
                        await self._checkpoint_locked(chain)


def _take_planned_places(chain: Chain, planned: Planned) -> None:
    """At start: an object planned before a crash whose head the journal never kept may be
    in the bucket, so its places are its own again before anything (a dead letter, a test
    write) can take them; the target's first chained write sends it again (CosTarget), and no
    checkpoint is written until then. Dead letters found after its places were chained after
    them while its PUT was under way."""
    if not same_head(planned.base, chain.journal_head):
        return  # its PUT succeeded and the journal kept the head, or its places went back
    chain.planned = planned
    chain.in_flight += 1
    if same_head(chain.head, planned.base):
        chain.advance(planned.head)


def _planned(row: StoredPlan) -> Planned:
    key, name, base_seq, base_hash, head_seq, head_prev, head_hash, body, md5 = row
    base = Link(base_seq, b"", base_hash) if base_seq else None
    return Planned(key, name, base, Link(head_seq, head_prev, head_hash), body, md5)


def _checkpoint_seq(line: bytes, head_seq: int) -> int:
    """The seq a stored checkpoint covers: the head's for a target whose row moves at each
    checkpoint, possibly less for one whose head is kept after every write."""
    try:
        return parse_checkpoint(line).seq
    except CheckpointError:
        return head_seq
