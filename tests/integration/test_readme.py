"""The README's shell examples run as written, so the README cannot drift from the code.

Every ```sh block of README.md either runs here or is listed in NOT_RUN with the reason. The
Quick start runs in a fresh copy of the checkout (the files git tracks, as a clone would have
them): `make run` creates the venv, installs and serves (on a free port written into the
copy's config/router.yaml: the only substitution), then the curl example posts to it and the
other examples run against what it archived. `make run` must print nothing but the daemon's
own log lines.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from router.server.workercount import resolve_workers
from tests.fakes import read_ndjson, wait_for
from tests.helpers import free_port, ready

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DAEMON_LINE = re.compile(r'\{"time":"[^"]+","level":"\w+","logger":"router[."\w]*",.*\}')

# The first line of a block that does not run here -> why.
NOT_RUN = {
    "make run": "runs first, as the fixture (it serves until stopped); its second line, "
    "`make test`, is this test suite",
    "sudo python3 -m venv /opt/event-router": "installs into /opt and /etc with sudo and needs "
    "systemd as PID 1; its config is checked by test_the_systemd_example_config_passes_check, "
    "the unit by test_systemd.py",
    "podman build -f deploy/container/Containerfile -t event-router .": "needs a container "
    "engine; test_container.py builds and runs the image's contents without one",
}


@dataclass(frozen=True)
class Block:
    line: int  # where it starts in README.md
    text: str

    @property
    def first(self) -> str:
        return self.text.splitlines()[0].split("  #")[0].strip()


def sh_blocks() -> list[Block]:
    blocks = []
    lines = README.read_text(encoding="utf-8").splitlines()
    start: int | None = None
    for number, line in enumerate(lines, start=1):
        if start is None and line.strip() == "```sh":
            start = number
        elif start is not None and line.strip() == "```":
            blocks.append(Block(start, "\n".join(lines[start : number - 1]) + "\n"))
            start = None
    return blocks


def test_every_sh_block_runs_or_says_why_not() -> None:
    runnable = [b for b in sh_blocks() if b.first not in NOT_RUN]
    assert {b.first for b in sh_blocks()} >= set(NOT_RUN), "NOT_RUN names a block that is gone"
    # The Quick start's curl, the query examples and the .env.example check.
    assert [b.first.split()[0] for b in runnable] == ["curl", "event-router", "set"], runnable


def checkout_copy(destination: Path) -> Path:
    """The files a clone would have: tracked ones plus new ones not ignored (this branch's
    work in progress), without the venv, caches or var/ of this checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@dataclass
class QuickStart:
    """A fresh copy serving through `make run` on `port`."""

    checkout: Path
    port: int
    make: asyncio.subprocess.Process
    output: Path

    def env(self) -> dict[str, str]:
        """The environment of a user who activated the venv `make run` made."""
        env = dict(os.environ)
        env["PATH"] = f"{self.checkout / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
        env.pop("VIRTUAL_ENV", None)
        return env

    async def sh(self, script: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-euo",
            "pipefail",
            "-c",
            script,
            cwd=self.checkout,
            env=self.env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def quick_start(tmp_path: Path) -> AsyncIterator[QuickStart]:
    checkout = checkout_copy(tmp_path / "event-router")
    port = free_port()
    config = checkout / "config" / "router.yaml"
    text = config.read_text(encoding="utf-8")
    assert "port: 8080" in text
    config.write_text(text.replace("port: 8080", f"port: {port}"), encoding="utf-8")
    output = tmp_path / "make-run.out"
    # A user's shell: not inside this suite's venv, nor inside `make test` (a sub-make would
    # announce the directories it enters).
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "VIRTUAL_ENV" and not k.startswith(("MAKE", "MFLAGS"))
    }
    sink = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        make = await asyncio.create_subprocess_exec(
            "make",
            "run",
            cwd=checkout,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: make and the daemon it runs
        )
    finally:
        os.close(sink)
    started = QuickStart(checkout, port, make, output)
    try:
        await wait_for(
            lambda: ready(port) if make.returncode is None else True,
            timeout_s=300,
            what="make run to install and serve",
        )
        assert make.returncode is None, output.read_text()
        yield started
    finally:
        if make.returncode is None:
            os.killpg(make.pid, signal.SIGTERM)  # Ctrl-C's way: the whole group
            try:
                await asyncio.wait_for(make.wait(), 30)
            except TimeoutError:
                os.killpg(make.pid, signal.SIGKILL)
                await make.wait()


@pytest.mark.timeout(420)
async def test_the_quick_start_and_the_examples_run_as_written(quick_start: QuickStart) -> None:
    blocks = {b.first.split()[0]: b for b in sh_blocks() if b.first not in NOT_RUN}
    port = str(quick_start.port)
    archive = quick_start.checkout / "var" / "events.ndjson"

    # Quick start: post the example event, then (once the file target has it) tail the archive.
    post, _, tail = (
        blocks["curl"]
        .text.replace("localhost:8080", f"localhost:{port}")
        .partition("\ntail -1 var/events.ndjson")
    )
    code, out, err = await quick_start.sh(post)
    assert code == 0, err
    answer = orjson.loads(out)
    assert (answer["accepted"], answer["rejected"], answer["results"][0]["status"]) == (
        1,
        0,
        "accepted",
    )
    await wait_for(lambda: len(read_ndjson(archive)) == 1, what="the event in the archive")
    code, out, err = await quick_start.sh("tail -1 var/events.ndjson" + tail)
    assert code == 0, err
    assert orjson.loads(out)["id"] == answer["results"][0]["id"]

    # Configuration: both examples pass check with .env.example exported.
    code, out, err = await quick_start.sh(blocks["set"].text)
    assert code == 0, err
    assert out.startswith("config/examples/production.yaml: OK (")

    # Searching archives: the archive the Quick start wrote.
    code, out, err = await quick_start.sh(blocks["event-router"].text)
    assert code == 0, err
    assert "(0 events in 1 file)" in out, "the event is not an unauthorized attempt"

    # Everything make run printed, from creating the venv to now, is the daemon's own lines.
    lines = quick_start.output.read_text().splitlines()
    not_the_daemons = [line for line in lines if not DAEMON_LINE.fullmatch(line)]
    assert not_the_daemons == [], "\n".join(lines)
    messages = [orjson.loads(line)["message"] for line in lines]
    # The default config says no server.workers: auto, one worker per usable CPU.
    workers = resolve_workers("auto").describe()
    assert (
        f"event-router 0.1.0 ready on http://127.0.0.1:{port} with 1 target and 1 route; {workers}"
        in messages
    )
    assert not any("test event" in m for m in messages), "no start-up test write by default"

    # Ctrl-C: the daemon drains and stops (make adds its own "Interrupt" line then).
    os.killpg(quick_start.make.pid, signal.SIGINT)
    await asyncio.wait_for(quick_start.make.wait(), 30)
    lines = quick_start.output.read_text().splitlines()
    messages = [orjson.loads(line)["message"] for line in lines if DAEMON_LINE.fullmatch(line)]
    assert "event-router stopped: this run: accepted 1 event; all-time (the journal's books): " in (
        " ".join(messages)
    )


async def test_the_systemd_example_config_passes_check(tmp_path: Path) -> None:
    [block] = [b for b in sh_blocks() if b.first == "sudo python3 -m venv /opt/event-router"]
    config = re.search(r"<<'EOF'\n(.*?)\nEOF\n", block.text, re.DOTALL)
    assert config is not None
    path = tmp_path / "router.yaml"
    path.write_text(config.group(1) + "\n", encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        "check",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert b"OK (1 target, 1 route" in out
