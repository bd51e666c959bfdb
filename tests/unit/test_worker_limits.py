"""server.workers: what each worker holds of the limits, the counters summed over processes,
and the port the journal owner holds for its workers."""

from __future__ import annotations

import socket

import pytest

from router.config import ServerConfig
from router.observe.metrics import IngestStats
from router.server.worker import share
from router.server.workers import merged, reserve

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("configured", "count", "expected"),
    [
        # (concurrent requests, bytes in flight, bodies per client) -> one worker's share
        ((16, 64 * MiB, 8), 1, (16, 64 * MiB, 8)),
        ((16, 64 * MiB, 8), 2, (8, 32 * MiB, 4)),
        ((16, 64 * MiB, 8), 3, (5, 64 * MiB // 3, 2)),
        # Never below one turn, one body's bytes (5 MiB), one body per client.
        ((1, 6 * MiB, 1), 2, (1, 5 * MiB, 1)),
    ],
)
def test_the_workers_together_hold_no_more_than_one_process(
    configured: tuple[int, int, int], count: int, expected: tuple[int, int, int]
) -> None:
    concurrent, in_flight, per_client = configured
    server = ServerConfig(
        max_concurrent_requests=concurrent,
        max_body_bytes_in_flight=in_flight,
        max_bodies_per_client=per_client,
    )
    part = share(server, count)
    assert (
        part.max_concurrent_requests,
        part.max_body_bytes_in_flight,
        part.max_bodies_per_client,
    ) == expected
    assert part.max_body_bytes == server.max_body_bytes


def test_counters_are_summed_over_processes_key_by_key() -> None:
    a = IngestStats(requests=3, accepted=10, refused_requests={"malformed_json": 1})
    b = IngestStats(requests=2, rejected=4, refused_requests={"malformed_json": 2, "x": 1})
    total = merged(a, b)
    assert (total.requests, total.accepted, total.rejected) == (5, 10, 4)
    assert total.refused_requests == {"malformed_json": 3, "x": 1}
    assert a.refused_requests == {"malformed_json": 1}  # the parts are left as they were


def test_the_owner_refuses_a_port_another_process_listens_on_even_with_so_reuseport() -> None:
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            reserve("127.0.0.1", other.getsockname()[1])


def test_workers_listen_beside_the_owners_reservation() -> None:
    with reserve("127.0.0.1", 0) as held, socket.socket() as worker:
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", held.getsockname()[1]))
        worker.listen()
        with socket.create_connection(("127.0.0.1", held.getsockname()[1]), timeout=5):
            pass


def test_the_owner_refuses_a_port_another_process_listens_on_with_so_reuseaddr_too() -> None:
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            reserve("127.0.0.1", other.getsockname()[1])
