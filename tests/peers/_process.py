"""One real server as a child process: free ports, start, wait until ready, stop, restart.

The peers run as processes of their own (not threads in the test) so that a test can do to
them what happens in production: SIGTERM, kill -9, SIGSTOP (a hung peer), and start again on
the same ports and the same data. Readiness is a condition polled against a deadline, checked
together with "has the process died?", so a broken start fails in seconds with the end of the
server's log instead of running into the test timeout.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import ClassVar, NoReturn, Self

import pytest

POLL_S = 0.05
"""How often a readiness condition is checked: often enough that waiting adds little."""

BIND_ATTEMPTS = 3
"""First starts tried with fresh ports when a port was taken between picking and binding."""

_RUNNING: set[subprocess.Popen[bytes]] = set()


class PeerError(RuntimeError):
    """A peer did not start or stop as it should (the message carries the end of its log)."""


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports nobody listens on now (bound together, so all differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Does something accept TCP connections on host:port?"""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    check: Callable[[], None] = lambda: None,
) -> None:
    """Poll `condition` until true; `check` may raise to give up early; PeerError at deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        check()
        if time.monotonic() > deadline:
            raise PeerError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(POLL_S)


def missing(what: str, install: str) -> NoReturn:
    """Skip the test because a peer's software is missing; fail it in CI, which installs it."""
    message = f"{what} is missing: {install}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (.ci/run installs it)")
    pytest.skip(message)


class ServerProcess:
    """A server run as a child process in its own directory, on ports chosen once.

    Subclasses say how to prepare (once: configuration, storage), what to run, and when it is
    ready. Ports and data stay the same across stop/start, so clients reconnect to the same
    address and find what they wrote (a restart is an outage, not a new server).
    """

    name: ClassVar[str] = "server"
    start_timeout_s: ClassVar[float] = 30.0
    stop_timeout_s: ClassVar[float] = 20.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.start_seconds: list[float] = []
        """How long each start took until ready (for the reports in tests and bench)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepared = False
        self._log_offset = 0
        self._began = 0.0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.workdir}>"

    # What a subclass provides.

    def choose_ports(self) -> None:
        """Pick the server's ports (in `__init__`, and again after a lost bind race)."""

    def prepare(self) -> None:
        """Before the first start (again after new ports): write configuration, storage."""

    def command(self) -> list[str]:
        """The server's argv."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Environment variables added to the test's own for the server."""
        return {}

    def ready(self) -> bool:
        """Is the server ready for clients now? Polled until true."""
        raise NotImplementedError

    def after_start(self) -> None:
        """After each start, once ready (a peer can restore state here)."""

    # The lifecycle.

    @property
    def running(self) -> bool:
        """Is the process alive (it may be paused)?"""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise PeerError(f"{self} was never started")
        return self._proc.pid

    def start(self) -> Self:
        """Start the server and wait until it is ready; a no-op when it runs.

        A port picked by `free_ports` is free when picked, not when the server binds it: a
        process elsewhere on the machine can take it in between. A first start that lost that
        race picks new ports and tries again; a restart keeps its ports (clients know them).
        """
        if self.running:
            return self
        for attempt in range(1, BIND_ATTEMPTS + 1):
            self.spawn()
            try:
                return self.wait_ready()
            except PeerError:
                if self.start_seconds or attempt == BIND_ATTEMPTS or not self.lost_bind_race():
                    raise
                self.choose_ports()
                self.ports_changed()
        raise AssertionError("unreachable")

    def ports_changed(self) -> None:
        """New ports were chosen: the next start prepares (writes its configuration) again."""
        self._prepared = False

    def lost_bind_race(self) -> bool:
        """Did the latest start fail because one of its ports was taken?"""
        return "address already in use" in self.log_since_start().lower()

    def spawn(self) -> None:
        """Start the process without waiting (servers that become ready together, a cluster)."""
        if not self._prepared:
            self.prepare()
            self._prepared = True
        self._began = time.monotonic()
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                env={**os.environ, **self.environment()},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for pytest does not stop the peer under a test.
                start_new_session=True,
            )
        _RUNNING.add(self._proc)

    def wait_ready(self) -> Self:
        """Wait until the spawned server is ready; kill it and raise PeerError if it is not."""
        try:
            wait_until(
                self.ready,
                timeout_s=self.start_timeout_s,
                what=f"{self} to be ready",
                check=self._check_alive,
            )
            self.after_start()
        except BaseException as exc:
            self.kill()
            if isinstance(exc, PeerError):
                raise PeerError(f"{exc}\n--- {self.log_path} ---\n{self.log_tail()}") from None
            raise
        self.start_seconds.append(time.monotonic() - self._began)
        return self

    def stop(self) -> None:
        """SIGTERM and wait for a clean exit (SIGKILL after `stop_timeout_s`)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash or a lost machine."""
        self._end(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung peer)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        os.kill(self.pid, signal.SIGCONT)

    def restart(self) -> Self:
        """Stop cleanly and start again on the same ports and data."""
        self.stop()
        return self.start()

    async def astart(self) -> Self:
        """`start()` in a thread, so the test's event loop (and a daemon on it) keeps running."""
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def arestart(self) -> Self:
        return await asyncio.to_thread(self.restart)

    def log_since_start(self) -> str:
        """What the server logged since its latest start."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode("utf-8", "replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_since_start().splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise PeerError(
                f"{self} exited with status {self._proc.returncode} before it was ready"
            )

    def _end(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused server must run to act on SIGTERM
        try:
            proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(self.stop_timeout_s)
        _RUNNING.discard(proc)


@atexit.register
def _kill_leftovers() -> None:
    """A test run that dies between start and stop leaves no server behind."""
    for proc in list(_RUNNING):
        if proc.poll() is None:
            proc.kill()
