"""One exit-code convention for every command: 0 done, 1 failed (nothing could be done), 2 a
usage or config error. Each row runs the real command line as its own process."""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from router.daemon import Daemon
from router.deadletter import DeadLetters, Failure
from router.delivery import unsendable_failure
from router.events import Event
from router.journal import Entry
from tests.conftest import StartDaemon
from tests.fakes import make_event
from tests.helpers import everything_to, file_target, free_port, http_target, run_cli

DONE, FAILED, USAGE = 0, 1, 2


@dataclass(frozen=True)
class Row:
    command: str  # split as a shell would, after the placeholders are filled in
    code: int
    says: str = ""  # a fragment the output (stdout + stderr) must hold


# {config}: a clean config (targets archive and broken), the running daemon's storage.path;
# {own}: the same with a storage.path of its own; {bad}: a config with an unknown key;
# {url}: a running daemon; {dead_url}: a port nobody listens on; {busy}: a port in use;
# {archive}: an archive file with one event; {tmp}: the test's directory.
CONFIG = "--config {config}"
REDRIVE = "dlq redrive --config {config} --url {url} --target"
TABLE: dict[str, Row] = {
    "no command": Row("", USAGE, "required: COMMAND"),
    "unknown command": Row("frobnicate", USAGE, "invalid choice"),
    "--version": Row("--version", DONE, "event-router"),
    # serve exits 0 after a drain: tests/integration/test_process.py (SIGTERM drains)
    "serve: unknown option": Row("serve --bogus", USAGE),
    "serve: bad config": Row("serve --config {bad}", USAGE, "1 problem"),
    "serve: port in use": Row("serve --config {own} --port {busy}", FAILED, "cannot start"),
    "serve: storage.path held by the running daemon": Row(
        f"serve {CONFIG}", USAGE, "in use by another event-router"
    ),
    "check: clean": Row(f"check {CONFIG}", DONE, "OK (2 targets"),
    "check: bad config": Row("check --config {bad}", USAGE, "1 problem"),
    "check: missing file": Row("check --config {tmp}/absent.yaml", USAGE),
    "validate-target": Row(f"validate-target {CONFIG} archive", DONE, "OK: "),
    "validate-target: the target fails": Row(f"validate-target {CONFIG} broken", FAILED, "FAILED"),
    "validate-target: unknown target": Row(f"validate-target {CONFIG} nope", USAGE, "'nope'"),
    "dlq list": Row(f"dlq list {CONFIG}", DONE, "archive"),
    "dlq list: bad config": Row("dlq list --config {bad}", USAGE),
    "dlq show": Row(f"dlq show {CONFIG} --target archive", DONE, "(2 letters)"),
    "dlq show: a removed target's letters": Row(f"dlq show {CONFIG} --target gone", DONE),
    "dlq show: unknown target": Row(f"dlq show {CONFIG} --target nope", USAGE, "'nope'"),
    "dlq show: negative limit": Row(f"dlq show {CONFIG} --target archive --limit -5", USAGE),
    "dlq show: bad time": Row(f"dlq show {CONFIG} --target archive --since soon", USAGE),
    "dlq redrive": Row(
        f"{REDRIVE} archive --reason permanent_status", DONE, "redrove 1 dead letter "
    ),
    "dlq redrive: nothing matches": Row(
        f"{REDRIVE} archive --reason retries_exhausted", DONE, "no dead letters"
    ),
    "dlq redrive: only journal_corrupt letters": Row(
        f"{REDRIVE} archive --reason journal_corrupt", FAILED, "checksum"
    ),
    "dlq redrive: unknown target": Row(f"{REDRIVE} nope", USAGE, "no target 'nope'"),
    "dlq redrive: daemon unreachable": Row(
        f"dlq redrive {CONFIG} --url {{dead_url}} --target archive", FAILED, "cannot reach"
    ),
    "dlq redrive: unreadable token file": Row(
        f"{REDRIVE} archive --token-file {{tmp}}/absent.token", USAGE, "token file"
    ),
    "query": Row("query id:only {archive}", DONE, "only"),
    "query: bad query": Row("query '(id:only' {archive}", USAGE, "bad query"),
    "query: negative limit": Row("query id:only {archive} --limit -5", USAGE, "--limit"),
    "query: zero limit": Row("query id:only {archive} --limit 0", USAGE, "--limit"),
    "query: bad time": Row("query id:only {archive} --since soon", USAGE),
    "query: no archives": Row("query id:only {tmp}/absent.ndjson", FAILED),
    # tail exits 0 after --limit events: tests/integration/test_tail.py
    "tail: bad query": Row("tail '(x' --url {url}", USAGE, "bad query"),
    "tail: negative limit": Row("tail --url {url} --limit -5", USAGE, "--limit"),
    "tail: daemon unreachable": Row("tail --url {dead_url}", FAILED, "cannot reach"),
    "tail: unreadable token file": Row(
        "tail --url {url} --token-file {tmp}/absent.token", USAGE, "token file"
    ),
    "completion bash": Row("completion bash", DONE, "complete -F"),
    "completion zsh": Row("completion zsh", DONE, "#compdef event-router"),
    "completion: unknown shell": Row("completion fish", USAGE, "invalid choice"),
}


@pytest.fixture
async def busy_port() -> AsyncIterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


async def write_letters(var: Path) -> None:
    """archive: one redrivable letter and one journal_corrupt; gone (a removed target): one."""
    letters = DeadLetters(var / "deadletter")
    await letters.write(
        "archive",
        [Entry(1, Event.from_body(make_event(id="bounced")), "all")],
        Failure(reason="permanent_status", message="400", status=400),
    )
    await letters.write(
        "archive",
        [Entry(2, Event.corrupt_record(2, b'{"tampered": true}'), "all")],
        unsendable_failure("journal_corrupt"),
    )
    await letters.write(
        "gone",
        [Entry(3, Event.from_body(make_event(id="orphan")), "all")],
        unsendable_failure("target_removed"),
    )
    letters.close()


async def run_cli_without_token(argv: list[str]) -> tuple[int, str]:
    """The command's exit code and its whole output, with no token from the environment."""
    env = {k: v for k, v in os.environ.items() if k != "EVENT_ROUTER_TOKEN"}
    code, out, err = await run_cli(*argv, env=env)
    return code, out + err


@pytest.mark.parametrize("case", list(TABLE), ids=list(TABLE))
async def test_every_command_follows_the_exit_code_convention(
    case: str, start_daemon: StartDaemon, tmp_path: Path, busy_port: int
) -> None:
    expected = TABLE[case]
    var = tmp_path / "var"
    dead_url = f"http://127.0.0.1:{free_port()}"
    data = {
        "storage": {"path": str(var)},
        "targets": [
            file_target("archive", tmp_path / "events.ndjson"),
            http_target("broken", dead_url + "/ingest"),
        ],
        "routes": everything_to("archive"),
    }
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({**data, "storage": {"path": str(tmp_path / "own")}}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**data, "surprise": 1}), encoding="utf-8")
    archive = tmp_path / "events.ndjson"
    archive.write_bytes(Event.from_body(make_event(id="only")).encoded() + b"\n")
    await write_letters(var)
    daemon: Daemon = await start_daemon(data)
    values = {
        "config": str(config),
        "own": str(own),
        "bad": str(bad),
        "url": f"http://127.0.0.1:{daemon.port}",
        "dead_url": dead_url,
        "busy": str(busy_port),
        "archive": str(archive),
        "tmp": str(tmp_path),
    }
    code, output = await run_cli_without_token(shlex.split(expected.command.format(**values)))
    assert code == expected.code, output
    assert expected.says in output
