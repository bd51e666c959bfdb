"""The garbage collector of a process that serves: the journal owner's (`serve`) and each
worker's of `server.workers`, set once its start-up is done, the same way in both.

What start-up built (modules, config, schemas, validators, routes, aiohttp) lives as long as
the process: frozen out of the collector's sight (gc.freeze, after a collection so that no
garbage is frozen), a full collection walks only what came after. Measured with
bench.compare's load and gc callbacks: the one-process daemon's collector 19-23 -> 9-12 us per
event with 100 events per POST (full collections each walked ~82,000 objects, ~50 ms), each
worker's 2.0-2.2 -> 0.9 us.

Then the youngest generation is collected once YOUNG_THRESHOLD more containers were made
than freed (Python's default: 700). Both kinds of process hold thousands of young objects
under load that are not garbage: a worker's requests waiting for the owner's durable answer (an
Event, a result and a routed pair per event: 7,500 objects for 25 requests of 100), the owner's
committed entries waiting for delivery (an Entry and an Event each). At 700 the young
collection ran every ~70 events, walking and promoting them, and the older generations walked
them again. At 10,000: a worker's collector 1.35-3.14 -> 0.01-0.04 us per event (25 requests
of 100 in flight over bench.intake's acceptor, 60,000 events), the owner's 1.3-2.1 -> 0.02-0.12
(bench.compare's batch100, two workers). Cycles, rare on the hot path, wait at most that many
objects longer.
"""

from __future__ import annotations

import gc
from typing import Final

YOUNG_THRESHOLD: Final = 10_000


def settle() -> None:
    """Collect, freeze what is left, and raise the youngest generation's threshold."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
