"""`serve`: the daemon's process (signals, systemd notify, reload on SIGHUP or a changed
file, the collector frozen after start-up), and the hidden command a worker process of
`server.workers` runs."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import uvloop

from router.cli.common import EXIT_CONFIG, EXIT_RUNTIME
from router.config import Config
from router.errors import (
    ConfigError,
    JournalFormatError,
    StorageLockedError,
    StorageUnavailableError,
)
from router.observe.logformat import counted, setup_logging
from router.observe.sdnotify import notify
from router.server import WORKER_COMMAND
from router.server.collector import settle

log = logging.getLogger("router")


def serve(args: argparse.Namespace, config_path: Path, config: Config, data: dict[str, Any]) -> int:
    """`serve`: run the daemon until SIGTERM or SIGINT; the exit code."""

    def overrides(loaded: Config) -> Config:
        """--host/--port/--workers win over the file, at start and at every reload (where
        the file's server.workers alone changing is then no change)."""
        return replace(
            loaded,
            server=replace(
                loaded.server,
                host=args.host or loaded.server.host,
                port=loaded.server.port if args.port is None else args.port,
                workers=loaded.server.workers if args.workers is None else args.workers,
            ),
        )

    server = overrides(config).server
    setup_logging(args.log_format, args.log_level)
    try:
        # uvloop: the event loop's socket and timer work in C. Measured with bench.compare
        # (two A/B runs on one invocation each): 0.59x and 0.94x the CPU per event of asyncio's
        # loop with one event per POST, no difference beyond noise with 100 per POST.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve_daemon(config_path, data, replace(config, server=server), overrides))
    except (ConfigError, JournalFormatError, StorageLockedError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    except (OSError, StorageUnavailableError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_RUNTIME
    return 0


def worker(argv: Sequence[str]) -> int:
    """A worker process of `server.workers` (router/server/workers.py starts it; not a command
    for people, so not in --help): its setup comes over the inherited socket `--fd`."""
    from router.server.worker import run_worker

    parser = argparse.ArgumentParser(prog=f"event-router {WORKER_COMMAND}")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--log-format", choices=["json", "text"], default="json")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_worker(args.fd))


async def serve_daemon(
    path: Path, data: dict[str, Any], config: Config, overrides: Callable[[Config], Config]
) -> None:
    from router.daemon import Daemon
    from router.server.api import ConfigSource

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    daemon = Daemon(config, ConfigSource(path, data))
    reloads: set[asyncio.Task[bool]] = set()

    async def reload() -> bool:
        notify("RELOADING=1", "STATUS=reloading the config")
        applied = await daemon.reload_from(path, initiator="signal", adjust=overrides)
        notify("READY=1", f"STATUS={'reloaded' if applied else 'reload refused; see the log'}")
        return applied

    def reload_requested() -> None:
        """SIGHUP (systemd's ExecReload): reload the config file; reloads run one at a time."""
        task = asyncio.create_task(reload(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_requested)
    watcher: asyncio.Task[None] | None = None
    if config.reload.watch:
        # The file as it is now, before start-up yields: a change made while the daemon starts
        # (say, just after /readyz turned 200) is one the watch must see.
        seen = fingerprint(path)
        watcher = asyncio.create_task(
            watch(path, config.reload.watch_interval_s, reload_requested, seen),
            name="config-watch",
        )
    try:
        await daemon.start()
        settle()  # the collector, once start-up is done (router/server/collector.py)
        # READY=1 exactly when /readyz turns 200: systemd starts dependent units only then.
        notify(
            "READY=1",
            f"STATUS=serving on port {daemon.port} with {counted(len(daemon.targets), 'target')}",
        )
        await stop.wait()
        log.info("stop requested; draining")
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.gather(*reloads, return_exceptions=True)
        notify("STOPPING=1", "STATUS=draining: delivering what the workers hold, then stopping")
        await daemon.stop()


def fingerprint(path: Path) -> tuple[float, int, str] | None:
    """The file's mtime, size and content digest; None while it is being replaced."""
    try:
        stat = path.stat()
        return stat.st_mtime, stat.st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def watch(
    path: Path,
    interval_s: float,
    changed: Callable[[], None],
    last: tuple[float, int, str] | None,
) -> None:
    """reload.watch: call `changed` when the file's content changes from `last` (checked by
    mtime and size first, then by digest, so a touch alone does not reload)."""
    while True:
        await asyncio.sleep(interval_s)
        current = await asyncio.to_thread(fingerprint, path)
        if current is None or last is None or current[:2] == last[:2]:
            last = current or last
            continue
        if current[2] != last[2]:
            log.info("config file %s changed; reloading", path)
            changed()
        last = current
