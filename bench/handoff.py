"""What the worker -> journal owner hand-off alone costs per event, on both sides.

`python -m bench.handoff [--calls N] [--repeat R] [--concurrency C] [--one-process]` hands
N calls of 100 routed events (bench.compare's 1,088-byte event, each with its own id) from a
worker's HandoffJournal to an owner's Channel over a socketpair, as `server.workers` does
(router/intake/handoff.py), `--concurrency` calls in flight as a worker's requests are. The
owner's `append` makes the routed events the journal would get (handoff.events) and answers at
once: the journal's own cost is bench.journal_owner's. Printed per run: CPU microseconds per
event of the worker process and of the owner process (the lowest of the runs is the figure:
the machine is shared).

`--one-process` runs both ends on one event loop of one process, for an instruction count
that does not move with the machine's load:
`valgrind --tool=callgrind --zero-before=os_sched_yield --dump-before=os_getpgrp
python -m bench.handoff --one-process --repeat 1` (the first dump, `.1`, is the measured part).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson
import uvloop

from bench.compare import BATCH_SIZE, bench_event
from router.events import Event, new_event_id, with_id
from router.intake.handoff import Channel, HandoffJournal, Records, events

TARGETS: Mapping[str, str] = {"archive": "all"}


def offers(calls: int) -> list[list[tuple[Event, Mapping[str, str]]]]:
    """`calls` offers of BATCH_SIZE routed events, each with its bytes as intake made them."""
    base = orjson.dumps(bench_event())
    out = []
    for _ in range(calls):
        routed = []
        for _ in range(BATCH_SIZE):
            event_id = new_event_id()
            event = Event.stored(event_id, with_id(base, event_id), time.time())
            routed.append((event, TARGETS))
        out.append(routed)
    return out


async def owner_channel(sock: socket.socket) -> tuple[Channel, list[int]]:
    got = [0]

    async def append(handed: Records, data: list[bytes]) -> None:
        got[0] += len(events(handed, data))

    channel = await Channel.over(sock, {"append": append}, name="owner")
    channel.start()
    return channel, got


async def worker_side(sock: socket.socket, calls: int, concurrency: int) -> float:
    """Hand `calls` offers over; the worker's CPU seconds per event."""
    channel = await Channel.over(sock, {}, name="worker")
    channel.start()
    journal = HandoffJournal(channel)
    work = offers(calls)
    gc.collect()
    os.sched_yield()  # marks the start for callgrind (--zero-before=os_sched_yield)
    cpu = time.process_time()

    async def sender() -> None:
        while work:
            await journal.append(work.pop())

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    spent = time.process_time() - cpu
    os.getpgrp()  # and the end (--dump-before=os_getpgrp)
    await channel.close()
    return spent / (calls * BATCH_SIZE)


def run_owner(sock: socket.socket, pipe: int) -> None:
    """The owner process: serve appends until the worker closes; write its CPU to `pipe`."""

    async def serve() -> None:
        channel, got = await owner_channel(sock)
        gc.collect()
        gc.freeze()
        cpu = time.process_time()
        await channel.closed.wait()
        spent = time.process_time() - cpu
        os.write(pipe, f"{spent} {got[0]}".encode())

    uvloop.run(serve())


def two_processes(calls: int, concurrency: int) -> tuple[float, float]:
    owner_sock, worker_sock = socket.socketpair()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        worker_sock.close()
        os.close(read_end)
        try:
            run_owner(owner_sock, write_end)
        finally:
            os._exit(0)
    owner_sock.close()
    os.close(write_end)
    gc.freeze()
    worker_us = uvloop.run(worker_side(worker_sock, calls, concurrency))
    os.waitpid(pid, 0)
    spent, got = os.read(read_end, 100).decode().split()
    os.close(read_end)
    assert int(got) == calls * BATCH_SIZE, got
    return worker_us, float(spent) / (calls * BATCH_SIZE)


def one_process(calls: int, concurrency: int) -> float:
    async def both() -> float:
        owner_sock, worker_sock = socket.socketpair()
        owner, got = await owner_channel(owner_sock)
        per_event = await worker_side(worker_sock, calls, concurrency)
        await owner.closed.wait()
        await owner.close()
        assert got[0] == calls * BATCH_SIZE, got
        return per_event

    return uvloop.run(both())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.handoff")
    parser.add_argument("--calls", type=int, default=400, help="calls of 100 events (400)")
    parser.add_argument("--repeat", type=int, default=5, help="runs (5)")
    parser.add_argument("--concurrency", type=int, default=25, help="calls in flight (25)")
    parser.add_argument("--one-process", action="store_true", help="both ends in one loop")
    args: Any = parser.parse_args(argv)
    for _ in range(args.repeat):
        if args.one_process:
            both = one_process(args.calls, args.concurrency)
            print(f"handoff one process: {1e6 * both:.2f} us CPU/event", flush=True)
        else:
            worker, owner = two_processes(args.calls, args.concurrency)
            print(
                f"handoff: worker {1e6 * worker:.2f}, owner {1e6 * owner:.2f}, "
                f"sum {1e6 * (worker + owner):.2f} us CPU/event",
                flush=True,
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
