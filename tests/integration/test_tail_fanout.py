"""The tail's fan-out against hostile queries: matching a round of events for many clients
with large queries runs on the event loop, so it must let the loop serve everything else
meanwhile (ingest, probes, the other clients), a slice at a time."""

from __future__ import annotations

from router.events import Event
from router.query import parse
from router.server.tail import TailHub
from tests.fakes import make_event, wait_for


async def test_the_fan_out_lets_the_loop_run_while_it_matches_heavy_queries() -> None:
    """32 clients, each with a query of 850 terms that every event matches (~2.5 ms an
    event), and 60 events: the round took ~5 s during which the daemon answered nothing,
    not even /healthz. Now some clients have their share while the others' are still being
    matched: this test's own polling ran in between."""
    hub = TailHub()
    subscribers = [
        hub.subscribe(parse(" ".join(f"-{chr(97 + c % 26)}{c}q{i}" for i in range(850))))
        for c in range(32)
    ]
    hub.start()
    try:
        hub.publish([Event.from_body(make_event(id=f"e{i}")) for i in range(60)])
        await wait_for(lambda: any(s.pending for s in subscribers), timeout_s=60, what="a share")
        served = [s for s in subscribers if s.pending]
        assert all(len(s.pending) == 60 for s in served)
        assert len(served) < len(subscribers), "the whole round ran without letting the loop run"
        await wait_for(
            lambda: all(len(s.pending) == 60 for s in subscribers),
            timeout_s=120,
            what="every share",
        )
    finally:
        await hub.stop()
