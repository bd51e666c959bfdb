"""Evidence's chain records on JetStream: router/evidence keeps its chains' records in the KV
bucket `<stream>_CHAIN` (ChainRecords).

Per chain and target, `<chain id>.<target>` holds the head, the last checkpoint and the
planned object. A file target's archive is local to one router, so each router's file is a
chain of its own, named by the router's chain id (`<storage.path>/chain-id`, made at its first
start: read_chain_id). Every write is a compare-and-set on the key's revision by the process
that holds it (it took the key at start): a process whose key another one took since (the same
chain id started elsewhere) is refused from then on (ChainFencedError), so two writers never
fork one record. A chain written by several routers at once (one bucket, one topic) needs a
lease on top of this: not supported yet (router/config/crosscheck.py refuses it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from router.errors import StorageUnavailableError
from router.journal import ChainFencedError, JournalUnavailableError
from router.journal.jetstream.streams import STREAM_ERRORS, open_bucket, stream_token

if TYPE_CHECKING:
    from router.journal.jetstream.journal import JetStreamJournal

log = logging.getLogger(__name__)

CHAIN_ID_FILE = "chain-id"
# The receipt key's name in the chain bucket (no `.`: never a chain's key).
RECEIPT_KEY = "receipt-key"


def read_chain_id(directory: Path) -> str:
    """This router's chain id: made at its first start (random), kept in storage.path, which
    one daemon holds at a time (its lock), so a router started again goes on with its chains."""
    path = directory / CHAIN_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        found = path.read_text().strip()
        if found and stream_token(found) == found:
            return found
        log.warning("%s holds no chain id (%r): a new one is made", path, found[:40])
    made = uuid.uuid4().hex[:16]
    partial = path.with_name(CHAIN_ID_FILE + ".new")
    with open(partial, "w") as f:
        f.write(made + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return made


def chain_key(chain_id: str, target_id: str) -> str:
    """The key of a chain's record in `<stream>_CHAIN`."""
    return f"{chain_id}.{stream_token(target_id)}"


@dataclass(slots=True)
class _Record:
    """A chain's record as this process last wrote or read it, and the key's revision then
    (0: no record yet)."""

    value: dict[str, Any] | None = None
    revision: int = 0
    taken: bool = False  # this process took the key (heads) or made it
    unsure: bool = False  # a write got no answer: it may have landed; read it back first
    fenced: bool = False  # another process took the key since: no more writes
    announced: bool = False  # the fencing was logged
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


# A record before its first checkpoint (as a SQLite row kept with an ack).
_EMPTY: dict[str, Any] = {"seq": 0, "hash": "", "checkpoint": "", "at": 0.0, "plan": None}


class ChainRecords:
    """router/evidence's chain records in the KV bucket `<stream>_CHAIN`, one key per chain
    and target (`chain_key`), each a JSON object: the head (`seq`, `hash`), the last
    checkpoint and when, the planned object (`plan`), and the process that holds it
    (`holder`: the journal's instance).

    Fencing: the first read takes the key for this process (an update that names it holder,
    on the revision read), and every write is a compare-and-set on the revision this process
    last wrote. A write refused there means another process took the key since: the record
    is then theirs and this process's writes to it are refused from then on
    (ChainFencedError). A write that got no answer (it may have landed) is read back before
    the next: still held by this process, it goes on from the revision found."""

    def __init__(self, journal: JetStreamJournal) -> None:
        self.journal = journal
        self.bucket = f"{journal.js_config.stream}_CHAIN"
        self._kv: KeyValue | None = None
        self._records: dict[str, _Record] = {}

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_bucket(
                self.journal.js, self.journal.js_config, self.bucket, history=1
            )
        return self._kv

    def _key(self, target_id: str) -> str:
        assert self.journal.chain_id, "the journal is not open"
        return chain_key(self.journal.chain_id, target_id)

    async def heads(
        self, target_ids: Iterable[str]
    ) -> dict[str, tuple[int, bytes, bytes | None, float | None]]:
        """Per target: the head, the last checkpoint (b"" before the first) and when."""
        found: dict[str, tuple[int, bytes, bytes | None, float | None]] = {}
        for target_id in target_ids:
            value = await self._taken(target_id)
            if value is not None and value["seq"]:
                checkpoint = base64.b64decode(value["checkpoint"])
                found[target_id] = (
                    int(value["seq"]),
                    bytes.fromhex(value["hash"]),
                    checkpoint,
                    float(value["at"]),
                )
        return found

    async def plans(
        self, target_ids: Iterable[str]
    ) -> dict[str, tuple[str, str, int, bytes, int, bytes, bytes, bytes, str]]:
        """Per target: the object planned before its last PUT."""
        found = {}
        for target_id in target_ids:
            value = await self._taken(target_id)
            plan = value.get("plan") if value is not None else None
            if plan is not None:
                b = base64.b64decode
                found[target_id] = (
                    str(plan["key"]),
                    str(plan["name"]),
                    int(plan["base_seq"]),
                    b(plan["base_hash"]),
                    int(plan["head_seq"]),
                    b(plan["head_prev"]),
                    b(plan["head_hash"]),
                    b(plan["body"]),
                    str(plan["md5"]),
                )
        return found

    async def keep_head(self, target_id: str, seq: int, head_hash: bytes) -> None:
        """Move the head forward (never back), keeping the last checkpoint."""

        def change(value: dict[str, Any]) -> dict[str, Any] | None:
            if value["seq"] >= seq:
                return None
            return {**value, "seq": seq, "hash": head_hash.hex()}

        await self._write(target_id, change)

    async def save(
        self, target_id: str, seq: int, head_hash: bytes, checkpoint: bytes, at: float
    ) -> None:
        """The head and the checkpoint just written for it."""
        kept = {"seq": seq, "hash": head_hash.hex()}
        kept |= {"checkpoint": base64.b64encode(checkpoint).decode(), "at": at}
        await self._write(target_id, lambda value: {**value, **kept})

    async def save_plan(
        self,
        target_id: str,
        plan: tuple[str, str, int, bytes, int, bytes, bytes, bytes, str] | None,
    ) -> None:
        """Keep (or, None, drop) the object a bucket target is about to PUT."""
        kept = None
        if plan is not None:
            key, name, base_seq, base_hash, head_seq, head_prev, head_hash, body, md5 = plan
            e = base64.b64encode
            kept = {
                "key": key,
                "name": name,
                "base_seq": base_seq,
                "base_hash": e(base_hash).decode(),
                "head_seq": head_seq,
                "head_prev": e(head_prev).decode(),
                "head_hash": e(head_hash).decode(),
                "body": e(body).decode(),
                "md5": md5,
            }

        def change(value: dict[str, Any]) -> dict[str, Any] | None:
            return None if value.get("plan") == kept else {**value, "plan": kept}

        await self._write(target_id, change)

    async def shared_key(self, proposed: bytes) -> bytes:
        """The receipt key every router of the stream issues with (router/evidence/receipt):
        the first one put in the bucket, `proposed` if none is yet."""
        kv = await self._bucket()
        with _unavailable("share", RECEIPT_KEY):
            try:
                await kv.create(RECEIPT_KEY, proposed)
                return proposed
            except KeyWrongLastSequenceError:
                shared = bytes((await kv.get(RECEIPT_KEY)).value or b"")
        if len(shared) != len(proposed):
            raise StorageUnavailableError(
                f"storage.jetstream: {self.bucket} holds a {RECEIPT_KEY} of {len(shared)} bytes, "
                f"not a receipt key of {len(proposed)}"
            )
        return shared

    def where(self, target_id: str) -> dict[str, Any]:
        """For /v1/status: the chain's record (`bucket:key`), and whether this process lost
        it to another one (fenced)."""
        record = self._records.get(target_id)
        return {
            "chain_record": f"{self.bucket}:{self._key(target_id)}",
            "chain_fenced": record is not None and record.fenced,
        }

    def announce_fenced(self, target_id: str) -> bool:
        """True the first time it is asked about a fenced record (log it once)."""
        record = self._records.get(target_id)
        if record is None or not record.fenced or record.announced:
            return False
        record.announced = True
        return True

    async def _taken(self, target_id: str) -> dict[str, Any] | None:
        """The record, taken for this process (once: later calls answer what it holds)."""
        record = self._records.setdefault(target_id, _Record())
        async with record.lock:
            if not record.taken:
                await self._take(target_id, record)
            return record.value

    async def _take(self, target_id: str, record: _Record) -> None:
        """Read the record and name this process its holder; the caller holds its lock."""
        kv = await self._bucket()
        key = self._key(target_id)
        with _unavailable("read", key):
            while True:
                try:
                    entry = await kv.get(key)
                except KeyNotFoundError:
                    record.value, record.revision = None, 0
                    break
                value = {**_EMPTY, **orjson.loads(entry.value or b"{}")}
                try:
                    revision = await kv.update(
                        key, _dump(value, self.journal.instance), last=entry.revision
                    )
                except KeyWrongLastSequenceError:
                    continue  # another process wrote it meanwhile: read it again
                record.value, record.revision = value, revision
                break
        record.taken = True
        record.unsure = False

    async def _write(
        self, target_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> None:
        """A compare-and-set of the record on the revision this process last wrote."""
        record = self._records.setdefault(target_id, _Record())
        async with record.lock:
            if record.fenced:
                raise ChainFencedError(self._fenced(target_id))
            if not record.taken:
                await self._take(target_id, record)
            elif record.unsure:
                await self._read_back(target_id, record)
            value = change(record.value or _EMPTY)
            if value is None:
                return
            kv = await self._bucket()
            key = self._key(target_id)
            data = _dump(value, self.journal.instance)
            try:
                if record.revision == 0:
                    revision = await kv.create(key, data)
                else:
                    revision = await kv.update(key, data, last=record.revision)
            except KeyWrongLastSequenceError as exc:
                record.fenced = True
                raise ChainFencedError(self._fenced(target_id)) from exc
            except STREAM_ERRORS as exc:
                record.unsure = True
                raise JournalUnavailableError(f"chain record {key}: no answer: {exc!r}") from exc
            record.value, record.revision = value, revision

    async def _read_back(self, target_id: str, record: _Record) -> None:
        """After a write without an answer: the record as it is, if this process still holds
        it (its write landed or not); fenced if another one took it."""
        kv = await self._bucket()
        key = self._key(target_id)
        with _unavailable("read", key):
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                record.value, record.revision = None, 0
            else:
                found = orjson.loads(entry.value or b"{}")
                if found.get("holder") != self.journal.instance:
                    record.fenced = True
                    raise ChainFencedError(self._fenced(target_id))
                record.value, record.revision = {**_EMPTY, **found}, entry.revision or 0
        record.unsure = False

    def _fenced(self, target_id: str) -> str:
        return (
            f"chain {self.journal.chain_id}: its record {self._key(target_id)} in "
            f"{self.bucket} was taken by another process (the same chain id, "
            f"{self.journal.directory / CHAIN_ID_FILE}, started elsewhere); this one no longer "
            "writes it"
        )


def _dump(value: Mapping[str, Any], holder: str) -> bytes:
    return orjson.dumps({**value, "holder": holder})


@contextlib.contextmanager
def _unavailable(what: str, key: str) -> Iterator[None]:
    """NATS away while reading a chain record: the journal's JournalUnavailableError."""
    try:
        yield
    except STREAM_ERRORS as exc:
        if isinstance(exc, KeyWrongLastSequenceError):
            raise
        raise JournalUnavailableError(f"chain record {key}: cannot {what}: {exc!r}") from exc
