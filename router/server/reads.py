"""Threads of their own for operator reads: archive search, receipt lookups, dead letters.

These reads scan files for as long as the files are long, whenever an admin asks and as often
as it asks. On asyncio's default pool they would take the threads where deliveries append to
archives and dead-letter files (and the management API checks a config), so a flood of reads
held up delivery: 60 lookups over a 145 MB archive made one event's delivery to a file target
wait 27 s instead of 0.2 s. Here they take turns on READ_THREADS threads of their own: a flood
makes reads wait for each other, and nothing else.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, ParamSpec, TypeVar

READ_THREADS: Final = 2

P = ParamSpec("P")
T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None


async def in_read_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """`asyncio.to_thread`, on the operator reads' own threads."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="operator-read")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool, functools.partial(fn, *args, **kwargs))
