"""What the journal owner alone spends per event on the batched path: the serial part of a
design where worker processes do all the intake work and hand one owner finished records.

`python -m bench.journal_owner [--requests N] [--repeat R]` runs an in-process Daemon (fsync
always, one file target with evidence, as bench.compare's router) and plays the owner's part
only: each request is a frame of 100 records (id, arrival time, the event's bytes) as a worker
would send it over a socket; the owner decodes the frame into stored events, appends them (group
commit over 50 concurrent requests: `SqliteJournal.append`, the entry point the workers call)
and its delivery worker writes them to the file with their chain links and acks them. Printed
per run: the process's CPU per event (all threads, from the first append to the drained
archive) and per thread (the event loop, the journal's thread, the file writes' threads).
With enough workers, ingest cannot be cheaper than this per event, nor faster than one core
divided by it. The figures of one invocation compare (several `--repeat`s: take the lowest;
the machine is shared); see the README's Performance section.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import struct
import tempfile
import threading
import time
from typing import Any

import orjson

from bench.compare import bench_event
from router.config import parse_config
from router.daemon import Daemon
from router.events import Event, new_event_id
from router.server.api import ConfigSource
from router.server.collector import settle
from tests.fakes import wait_for

PER_REQUEST = 100
CONCURRENCY = 50
HEADER = struct.Struct("!HdI")  # id length, received_at, body length
CLK_TCK = os.sysconf("SC_CLK_TCK")


def frame(records: list[tuple[str, float, bytes]]) -> bytes:
    return b"".join(
        HEADER.pack(len(eid), at, len(body)) + eid.encode() + body for eid, at, body in records
    )


def unframe(data: bytes) -> list[Event]:
    events, at_byte = [], 0
    while at_byte < len(data):
        id_len, received_at, body_len = HEADER.unpack_from(data, at_byte)
        at_byte += HEADER.size
        event_id = data[at_byte : at_byte + id_len].decode()
        at_byte += id_len
        events.append(Event.stored(event_id, data[at_byte : at_byte + body_len], received_at))
        at_byte += body_len
    return events


def time_journal_thread(journal: object, spent: dict[str, float]) -> None:
    """Wrap the journal's blocking methods (run on its thread) to add up their thread CPU."""
    for name in ("_write_sync", "_read_sync", "_ack_sync"):
        method = getattr(journal, name)

        def timed(*args: object, _method: Any = method, _name: str = name) -> Any:
            before = time.thread_time()
            try:
                return _method(*args)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.thread_time() - before

        setattr(journal, name, timed)


class GcTime:
    """CPU the cyclic garbage collector spends (on any thread), and its collections."""

    def __init__(self) -> None:
        self.spent = 0.0
        self.collections = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.spent += time.thread_time() - self._started
            self.collections += 1


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each live thread of this process, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), "other").rstrip("_0123456789") or "other"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


async def run_once(requests: int, rate: float) -> None:
    workdir = tempfile.mkdtemp(prefix="journal-owner-")
    data = {
        # One process: the owner's part is what is measured, not worker processes beside it.
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": f"{workdir}/var", "fsync": "always"},
        "startup": {"validate_targets": False},
        "targets": [
            {
                "id": "archive",
                "target_type": "file",
                "file_endpoint": {"path": f"{workdir}/archive.ndjson", "max_files": 100},
            }
        ],
        "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
    }
    daemon = Daemon(parse_config(data), ConfigSource(None, data))
    await daemon.start()
    settle()  # the collector as `serve` and each worker set it after start
    base = orjson.dumps(bench_event())
    frames = []
    for _ in range(requests):
        records = []
        for _ in range(PER_REQUEST):
            event_id = new_event_id()
            body = base[:-1] + b',"id":"' + event_id.encode() + b'"}'
            records.append((event_id, time.time(), body))
        frames.append(frame(records))
    targets = {"archive": "all"}
    books = daemon.journal.books
    journal_spent: dict[str, float] = {}
    time_journal_thread(daemon.journal, journal_spent)

    async def owner_side() -> None:
        while frames:
            events = unframe(frames.pop())
            await daemon.journal.append([(event, targets) for event in events])
            if rate:  # each of CONCURRENCY senders: one frame per CONCURRENCY*PER_REQUEST/rate s
                await asyncio.sleep(CONCURRENCY * PER_REQUEST / rate)

    gc_time = GcTime()
    gc.callbacks.append(gc_time)
    threads_before = thread_cpu()
    cpu_before, started = time.process_time(), time.monotonic()
    await asyncio.gather(*(owner_side() for _ in range(CONCURRENCY)))
    appended = time.monotonic()
    await wait_for(lambda: books("archive").pending == 0, timeout_s=300)
    cpu, wall = time.process_time() - cpu_before, time.monotonic() - started
    threads = thread_cpu()
    gc.callbacks.remove(gc_time)
    count = requests * PER_REQUEST
    from_memory, from_disk = daemon.journal.batch_sources("archive")
    per_thread = ", ".join(
        f"{name} {1e6 * (spent - threads_before.get(name, 0.0)) / count:.1f}"
        for name, spent in sorted(threads.items())
        if spent - threads_before.get(name, 0.0) > 0
    )
    print(
        f"owner: {count} events, append {count / (appended - started):.0f} ev/s, written "
        f"{count / wall:.0f} ev/s, {1e6 * cpu / count:.1f} us CPU/event ({per_thread}); "
        f"batches from memory {from_memory}, from the journal {from_disk}; garbage collector "
        f"{1e6 * gc_time.spent / count:.1f} ({gc_time.collections} collections); journal thread: "
        + ", ".join(f"{k} {1e6 * v / count:.1f}" for k, v in sorted(journal_spent.items())),
        flush=True,
    )
    await daemon.stop()
    gc.unfreeze()  # the next run starts as this one did


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.journal_owner")
    parser.add_argument("--requests", type=int, default=300, help="frames of 100 (300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs (3)")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="events/s the senders aim at (default: as fast as the owner appends)",
    )
    args = parser.parse_args()
    for _ in range(args.repeat):
        asyncio.run(run_once(args.requests, args.rate))


if __name__ == "__main__":
    main()
