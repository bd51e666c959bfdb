"""`server.workers` > 1: worker processes take the port, this process owns the journal.

Python runs one core per process, and a batched ingest spends most of its CPU before the
journal (decode, limits, validation, redaction, routing, serialisation). With N workers the
daemon is N + 1 processes: N workers (router/server/worker.py) that share the listening port
(SO_REUSEPORT: the kernel spreads connections among them) and do that work, and this process,
the journal owner, which alone holds the journal, the targets and their delivery, the books,
the tail, the evidence and the config. A worker hands each offer's finished records to the
owner over its socketpair (router/intake/handoff.py), the owner group-commits them with every
other worker's and answers once they are durable, and only then does the worker answer 2xx.

One daemon, however many processes: the owner listens on a unix socket of its own (in a 0700
directory) for everything but ingest, and each worker passes such requests there with the
caller's address and scheme (`WorkerPool.middleware` restores them, on that socket only). The
owner's status and metrics sum the workers' ingest counters, asked for at that moment. A
refused attempt is recorded by the owner (one set of rate limits). A reload reaches every
worker (`configure`: validator, redactor, routes) before the owner's reload returns; auth and
the server limits are restart-only. Each worker holds its share of the in-flight limits
(worker.share), so all of them together hold what one process would.

A worker that dies is started again (what it was answering was never acknowledged: its
records were durable or its producer saw the connection fail). When the owner dies, its
workers see their channel close and stop at once. SIGTERM: the owner tells each worker to
stop (SIGTERM), they finish what is in flight (the owner still journals it), report their
counters and exit; then the owner drains as one process does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

import router
from router.config import Config
from router.intake.accept import Acceptor
from router.intake.handoff import Channel, ChannelError, Records, events, max_handoff_bytes
from router.intake.redaction import run_hash_key
from router.observe.logformat import JsonFormatter
from router.observe.metrics import IngestStats
from router.server import WORKER_COMMAND
from router.server.auth import Caller, Refusals
from router.server.worker import NO_HOST_HEADER, PEER_HEADER, SCHEME_HEADER, WorkerSetup

log = logging.getLogger(__name__)

# A worker that died is started again after this (a worker that cannot start does not spin).
RESPAWN_DELAY_S: Final = 1.0
# How long a worker gets to answer for its counters before a status shows the last ones.
STATS_TIMEOUT_S: Final = 5.0
# On stop, beyond shutdown.drain_timeout_s, before a worker still running is killed.
STOP_MARGIN_S: Final = 5.0
# Paths whose answers show the ingest counters: the workers' are fetched first.
COUNTED_PATHS: Final = frozenset({"/v1/status", "/metrics"})
# The owner's socket directory: `event-router-<owner pid>-<random>` under the temporary
# directory; one whose owner is gone (kill -9 removes nothing) is removed at the next start.
SOCKET_DIR_PREFIX: Final = "event-router-"
# glibc's malloc in a worker process (the operator's own settings win): blocks of 128 KiB and
# more (a request's body, the joins and copies of it) are mapped on their own and unmapped when
# freed, and free memory at the top of the heap goes back to the system past 128 KiB. Left to
# itself, glibc raises both thresholds to the largest block a process has freed (up to 32 MiB
# and twice that), so a worker kept the high-water mark of its bursts: in the backlog bench
# (1,000-event requests) each worker's heap held 12-13 MB free at its top, never given back.
# Pinned (bench/backlog.py --workers 2, 1,000,000 events): the two workers' summed peak RSS
# 123 to 125 MB against 126 to 127, the daemon's RSS at the end of the ingest 185 to 188 MB
# against 195 to 196.
WORKER_MALLOC_ENV: Final = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def merged(*parts: IngestStats) -> IngestStats:
    """Counters summed over processes (dicts key by key)."""
    total = IngestStats()
    for part in parts:
        for f in fields(IngestStats):
            mine, theirs = getattr(total, f.name), getattr(part, f.name)
            if isinstance(mine, dict):
                for key, value in theirs.items():
                    mine[key] = mine.get(key, 0) + value
            else:
                setattr(total, f.name, mine + theirs)
    return total


def reserve(host: str, port: int) -> socket.socket:
    """A socket bound to the port, never listening: it picks the port when the config says 0,
    and holds it while workers come and go; the workers listen beside it. It binds without
    SO_REUSEPORT, so a port anyone holds (another daemon's workers too) is refused as one
    process would refuse it, and allows the workers' SO_REUSEPORT only once it holds the port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR as any listener has it (connections of a previous run in TIME_WAIT do
        # not hold the port); on Linux it never lets two sockets bind a port one listens on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class _Handle:
    """One running worker process, its channel and the counters it last reported; the events
    this process journaled for it, and how many of them the worker had counted when it last
    reported (a worker killed between reports took the rest of its counters with it)."""

    index: int
    proc: asyncio.subprocess.Process
    channel: Channel
    stats: IngestStats | None = None
    journaled: int = 0
    handed: int = 0

    def reported(self, stats: IngestStats, handed: int) -> None:
        self.stats, self.handed = stats, handed

    def last_counters(self) -> IngestStats:
        """What it reported, and what it accepted since: every event this process journaled
        for it that its report did not count yet."""
        stats = self.stats if self.stats is not None else IngestStats()
        stats.accepted += max(0, self.journaled - self.handed)
        return stats


def for_workers(config: Config) -> Config:
    """The config a worker process is sent: all but the targets. A worker validates, redacts
    and routes (a route names its targets by id) and builds no target, so it holds none of
    their endpoints: no target's credentials in a process that faces the network, and no
    endpoint class it could not import (a target type registered at run time in the owner
    only, tests/integration/test_toy_target.py: a fresh process knows the shipped types)."""
    return replace(config, targets=())


class WorkerPool:
    """The owner's side: starts, watches, reconfigures and stops the workers, and serves their
    hand-offs; see the module docstring."""

    def __init__(
        self,
        *,
        count: int,
        config: Callable[[], Config],
        acceptor: Acceptor,
        refusals: Refusals,
        drain_timeout_s: float,
    ) -> None:
        self.count = count
        self._config = config
        self._acceptor = acceptor
        self._refusals = refusals
        self._drain_timeout_s = drain_timeout_s
        self._dir: str | None = None
        self.port = 0
        self.restarts = 0
        self._handles: dict[int, _Handle] = {}
        self._banked = IngestStats()  # the counters of workers that have exited
        self._stopping = False
        self._reservation: socket.socket | None = None
        self._watches: set[asyncio.Task[None]] = set()

    @property
    def owner_socket(self) -> str:
        """The owner's unix socket: the workers pass it every request but ingest."""
        if self._dir is None:
            # A directory only this user can enter: whoever reaches the socket is trusted with
            # the caller headers. Short, under the system's temporary directory: a unix
            # socket's path has a limit of 107 bytes.
            remove_orphaned_socket_dirs()
            self._dir = tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-")
        return os.path.join(self._dir, "owner.sock")

    async def start(self, host: str, port: int) -> int:
        """Hold the port, start every worker and wait until each one listens; the port."""
        self._reservation = reserve(host, port)
        self.port = int(self._reservation.getsockname()[1])
        await asyncio.gather(*(self._spawn(index) for index in range(self.count)))
        return self.port

    async def _spawn(self, index: int) -> None:
        parent, child = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "router",
                WORKER_COMMAND,
                "--fd",
                str(child.fileno()),
                *_log_options(),
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=_worker_env(),
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        mine: list[_Handle] = []  # the handle its channel's calls are counted for
        channel = await Channel.over(
            parent,
            self._handlers(mine),
            name=f"worker-{index}",
            max_frame_bytes=max_handoff_bytes(self._config().server),
            on_fault=lambda _: _kill(proc),
        )
        handle = self._handles[index] = _Handle(index, proc, channel)
        mine.append(handle)
        channel.start()
        watch = asyncio.create_task(self._watch(handle), name=f"worker-watch-{index}")
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        setup = WorkerSetup(
            for_workers(self._config()),
            self.port,
            self.owner_socket,
            index,
            self.count,
            run_hash_key(),
        )
        try:
            await channel.call("setup", setup)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        if self._stopping:  # started again while the daemon began to stop: stop it too
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def _handlers(self, mine: list[_Handle]) -> dict[str, Callable[..., Any]]:
        async def drained(stats: IngestStats, handed: int) -> None:
            for handle in mine:
                handle.reported(stats, handed)

        async def append(handed: Records, data: list[bytes]) -> None:
            await self._acceptor.commit(events(handed, data))
            for handle in mine:
                handle.journaled += len(data)

        return {"append": append, "refused": self._refused, "drained": drained}

    async def _refused(self, caller: Caller, status: int, why: str) -> None:
        await self._refusals.record(caller, status, why)

    async def _watch(self, handle: _Handle) -> None:
        """Bank an exited worker's counters and, unless the daemon is stopping, start another
        in its place."""
        code = await handle.proc.wait()
        with contextlib.suppress(TimeoutError):  # its last records: journaled, then counted
            async with asyncio.timeout(STATS_TIMEOUT_S):
                await handle.channel.settle()
        await handle.channel.close()
        if self._handles.get(handle.index) is handle:
            del self._handles[handle.index]
        self._banked = merged(self._banked, handle.last_counters())
        if self._stopping:
            return
        self.restarts += 1
        log.error(
            "worker %d (pid %d) exited with %s; starting another",
            handle.index + 1,
            handle.proc.pid,
            code,
        )
        await asyncio.sleep(RESPAWN_DELAY_S)
        if self._stopping:
            return
        try:
            await self._spawn(handle.index)
        except Exception:
            log.exception("worker %d could not start; trying again", handle.index + 1)

    async def configure(self, config: Config) -> None:
        """A reload: every worker validates, redacts and routes with `config` before this
        returns. A worker that cannot is stopped (its replacement starts with `config`)."""

        sent = for_workers(config)

        async def one(handle: _Handle) -> None:
            try:
                await handle.channel.call("configure", sent)
            except ChannelError:
                if handle.channel.closed.is_set():
                    return  # gone: its replacement is set up with the running config
                log.exception("worker %d refused the reload; restarting it", handle.index + 1)
                with contextlib.suppress(ProcessLookupError):
                    handle.proc.kill()
                await handle.proc.wait()

        await asyncio.gather(*(one(handle) for handle in list(self._handles.values())))

    async def refresh(self) -> None:
        """Ask every worker for its counters (a status shows them as of its request)."""

        async def one(handle: _Handle) -> None:
            try:
                async with asyncio.timeout(STATS_TIMEOUT_S):
                    handle.reported(*await handle.channel.call("stats"))
            except (ChannelError, TimeoutError):
                pass  # gone or stuck: its last counters stand

        await asyncio.gather(*(one(handle) for handle in list(self._handles.values())))

    async def modules(self) -> dict[int, list[str]]:
        """Each running worker's imported modules, by process id (Worker.modules)."""
        handles = list(self._handles.values())
        found = await asyncio.gather(*(h.channel.call("modules") for h in handles))
        return {h.proc.pid: names for h, names in zip(handles, found, strict=True)}

    async def frozen(self) -> dict[int, int]:
        """How many objects each running worker froze after its setup (Worker.frozen), by
        process id."""
        handles = list(self._handles.values())
        found = await asyncio.gather(*(h.channel.call("frozen") for h in handles))
        return {h.proc.pid: count for h, count in zip(handles, found, strict=True)}

    def ingest_stats(self, own: IngestStats) -> IngestStats:
        """The daemon's ingest counters: the owner's own (its events, sheds, reloads), the
        exited workers' and the running workers' as last reported."""
        running = [h.stats for h in self._handles.values() if h.stats is not None]
        return merged(own, self._banked, *running)

    def status(self) -> dict[str, Any]:
        """For /v1/status: how many workers run of how many, and how often one was replaced."""
        return {
            "configured": self.count,
            "running": sum(1 for h in self._handles.values() if h.proc.returncode is None),
            "restarts": self.restarts,
        }

    async def stop(self) -> None:
        """Stop every worker (they finish what is in flight), then free the port."""
        self._stopping = True
        procs = [handle.proc for handle in self._handles.values()]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if procs:
            waits = [asyncio.ensure_future(proc.wait()) for proc in procs]
            await asyncio.wait(waits, timeout=self._drain_timeout_s + STOP_MARGIN_S)
            for proc in procs:
                if proc.returncode is None:
                    log.error("worker pid %d did not stop in time; killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*waits)
        while self._watches:  # a worker started again meanwhile is stopped by its _spawn
            await asyncio.gather(*list(self._watches), return_exceptions=True)
        if self._reservation is not None:
            self._reservation.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """On the owner's unix socket: the caller's address and scheme as the worker saw
        them, and the workers' counters fetched before an answer that shows them."""
        if PEER_HEADER in request.headers:
            sent = request.headers.copy()
            peer = sent.pop(PEER_HEADER)
            scheme = sent.pop(SCHEME_HEADER, request.scheme)
            if sent.pop(NO_HOST_HEADER, None) is not None:
                sent.pop("Host", None)  # the worker's client library's, not the caller's
            request = request.clone(remote=peer, scheme=scheme, headers=sent)
        if request.path in COUNTED_PATHS:
            await self.refresh()
        return await handler(request)


def remove_orphaned_socket_dirs(base: str | None = None) -> None:
    """Remove the socket directories of owners that are gone: this user's own, named after a
    process id that no longer runs (one whose id runs again is left: it is harmless)."""
    base = base or tempfile.gettempdir()
    with contextlib.suppress(OSError), os.scandir(base) as entries:
        for entry in entries:
            owner, _, rest = entry.name.removeprefix(SOCKET_DIR_PREFIX).partition("-")
            if not (entry.name.startswith(SOCKET_DIR_PREFIX) and owner.isdigit() and rest):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not entry.is_dir(follow_symlinks=False) or info.st_uid != os.getuid():
                continue
            if not _running(int(owner)):
                shutil.rmtree(entry.path, ignore_errors=True)


def _kill(proc: asyncio.subprocess.Process) -> None:
    """Stop a worker that broke the hand-off's protocol at once: its watch starts another,
    as after a crash (what it was answering was never acknowledged)."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _log_options() -> list[str]:
    """The owner's log format and level, for its workers' command line."""
    root = logging.getLogger()
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    level = logging.getLevelName(root.getEffectiveLevel()).lower()
    if level not in ("debug", "info", "warning", "error"):
        level = "info"
    return ["--log-format", "json" if json_lines else "text", "--log-level", level]


def _worker_env() -> dict[str, str]:
    """The owner's environment, without systemd's notify socket (the owner alone speaks to
    the service manager), with this very checkout first on the path, and with malloc's
    thresholds pinned unless the operator set them (WORKER_MALLOC_ENV)."""
    env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
    for key, value in WORKER_MALLOC_ENV.items():
        env.setdefault(key, value)
    package_root = str(Path(router.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (package_root, env.get("PYTHONPATH", "")) if part
    )
    return env
