"""The hand-off channel's framing as the journal owner reads it (router/intake/handoff.py),
against a real process on the other end of the socket pair: frames that arrive in pieces of
any size (a header, a payload or a blob cut anywhere), several in one read, larger than the
read buffer; and a sender killed (SIGKILL) in the middle of a frame, whose finished frames are
handled and whose unfinished one never is. On uvloop (as `serve` runs) and asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
import pytest
import uvloop

from router.intake.handoff import ANSWER, CALL, HEADER, READ_BYTES, Channel, frame
from tests.fakes import make_event, wait_for

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "uvloop": uvloop.run,
    "asyncio": asyncio.run,
}

# The sender: writes the bytes it reads from stdin to the inherited socket in pieces of the
# sizes named on its command line, over and over (0: the rest at once), prints "sent", then
# reads the answers until the other side closes (printing how many bytes came back), or waits
# to be killed when told to `hang`.
SENDER = r"""
import os, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
sizes = [int(n) for n in sys.argv[2].split(",")]
hang = sys.argv[3] == "hang"
data = sys.stdin.buffer.read()
at = turn = 0
while at < len(data):
    size = sizes[turn % len(sizes)] or len(data)
    sock.sendall(data[at : at + size])
    at += size
    turn += 1
    if turn < 50:
        time.sleep(0.002)  # the first pieces arrive in reads of their own
print("sent", flush=True)
if hang:
    time.sleep(3600)
got = 0
while chunk := sock.recv(65536):
    got += len(chunk)
print(got, flush=True)
"""


def blobs(count: int, seed: int) -> list[bytes]:
    return [orjson.dumps(make_event(id=f"event-{seed}-{n:05d}")) for n in range(count)]


def call_bytes(call_id: int, records: list[Any], data: list[bytes]) -> bytes:
    return b"".join(frame(CALL, call_id, ("append", (records,)), data))


async def start_sender(
    sock: socket.socket, sizes: str, payload: bytes, *, hang: bool = False
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SENDER,
        str(sock.fileno()),
        sizes,
        "hang" if hang else "read",
        pass_fds=(sock.fileno(),),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(payload)
    proc.stdin.close()
    sock.close()  # the child's copy is the sender now
    return proc


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    "sizes",
    [
        "1",  # byte by byte at first (a header and a payload cut at every byte)
        "5,3,4093,1",  # cut inside headers, lengths and blobs
        "0",  # every frame in one write: several in one read
    ],
)
def test_frames_in_pieces_of_any_size_arrive_whole_and_in_order(loop: str, sizes: str) -> None:
    """Three calls, the second larger than the read buffer (1,000 events, ~1.1 MB: the buffer
    grows for it and shrinks back after), from a process that writes them in pieces: each
    reaches the handler once, with its records and blobs intact, and each is answered."""
    calls = [(1, 3), (2, 1000), (3, 5)]  # call id, events
    sent = {call_id: blobs(count, call_id) for call_id, count in calls}
    assert sum(map(len, sent[2])) > READ_BYTES
    payload = b"".join(
        call_bytes(call_id, [f"records-{call_id}"], sent[call_id]) for call_id, _ in calls
    )
    got: list[tuple[str, list[str]]] = []

    async def append(records: list[str], data: list[bytes]) -> int:
        got.append((records[0], [hashlib.sha256(blob).hexdigest() for blob in data]))
        return len(data)

    async def run() -> None:
        owner_side, sender_side = socket.socketpair()
        owner = await Channel.over(owner_side, {"append": append}, name="owner")
        owner.start()
        proc = await start_sender(sender_side, sizes, payload)
        try:
            async with asyncio.timeout(60):
                assert proc.stdout is not None
                assert await proc.stdout.readline() == b"sent\n"
                await wait_for(lambda: len(got) == len(calls), timeout_s=60, what="every call")
                await owner.settle()
                await owner.close()  # the sender sees the end of its answers
                answered = int((await proc.stdout.readline()).decode())
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await owner.close()
        assert got == [
            (f"records-{call_id}", [hashlib.sha256(blob).hexdigest() for blob in sent[call_id]])
            for call_id, _ in calls
        ]
        answers = b"".join(b"".join(frame(ANSWER, call_id, count)) for call_id, count in calls)
        assert answered == len(answers)
        assert len(owner._buffer) == READ_BYTES, "the buffer shrank back after the large frame"

    LOOPS[loop](run())


def cut_points() -> dict[str, int]:
    """Where a frame of a call with 100 events is cut: into its header, its payload, its
    blob lengths, its first blob and its last blob."""
    records = ["records-2"]
    head = HEADER.size + len(frame(CALL, 2, ("append", (records,)))[1])
    lengths = head + 100 * 4
    return {
        "header": 5,
        "payload": HEADER.size + 3,
        "lengths": head + 7,
        "first blob": lengths + 10,
        "last blob": len(call_bytes(2, records, blobs(100, 2))) - 1,
    }


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("cut", list(cut_points()))
def test_a_sender_killed_in_the_middle_of_a_frame_leaves_only_its_finished_frames(
    loop: str, cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker killed with SIGKILL while the owner has part of a frame: the frames it
    finished are handled (their records journaled), the part is never handed to a handler,
    and the channel closes as when the other side goes away, without an error logged."""
    first = call_bytes(1, ["records-1"], blobs(3, 1))
    partial = call_bytes(2, ["records-2"], blobs(100, 2))[: cut_points()[cut]]
    got: list[str] = []

    async def append(records: list[str], data: list[bytes]) -> None:
        got.append(records[0])

    async def run() -> None:
        owner_side, sender_side = socket.socketpair()
        owner = await Channel.over(owner_side, {"append": append}, name="owner")
        owner.start()
        proc = await start_sender(sender_side, "0", first + partial, hang=True)
        try:
            async with asyncio.timeout(60):
                assert proc.stdout is not None
                assert await proc.stdout.readline() == b"sent\n"
                await wait_for(lambda: bool(got), timeout_s=60, what="the finished frame")
                proc.send_signal(signal.SIGKILL)
                assert await proc.wait() == -signal.SIGKILL
                await owner.closed.wait()
                await owner.settle()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await owner.close()
        assert got == ["records-1"]

    with caplog.at_level(logging.WARNING, logger="router.intake.handoff"):
        LOOPS[loop](run())
    assert not caplog.records, [r.getMessage() for r in caplog.records]
