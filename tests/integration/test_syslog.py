"""The syslog target against a real rsyslog (RFC 5424 over TCP, octet counting) and a TLS peer."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import StartDaemon
from tests.fakes import make_event, wait_for
from tests.helpers import everything_to, free_port, post, settled

RSYSLOG_CONF = """
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
template(name="fields" type="string"
  string="%pri%|%timereported:::date-rfc3339%|%hostname%|%app-name%|%procid%|%msgid%|%structured-data%|%msg%\\n")
ruleset(name="audit") {{ action(type="omfile" file="{out}" template="fields") }}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="audit")
"""


def rsyslogd() -> str:
    path = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail("rsyslogd is missing: .ci/run installs Debian's rsyslog")
        pytest.skip("rsyslogd is not installed (apt-get install rsyslog)")
    return path


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A real rsyslogd listening on 127.0.0.1, writing each message's parsed fields to a file."""
    port, work, out = free_port(), tmp_path / "rsyslog", tmp_path / "received.log"
    work.mkdir()
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(RSYSLOG_CONF.format(work=work, out=out, port=port))
    proc = subprocess.Popen(
        [rsyslogd(), "-n", "-f", str(conf), "-i", str(tmp_path / "rsyslog.pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield port, out
    proc.terminate()
    proc.wait(10)


def syslog_target(port: int, **endpoint: Any) -> dict[str, Any]:
    return {
        "id": "siem",
        "target_type": "syslog",
        "syslog_endpoint": {"host": "127.0.0.1", "port": port, "hostname": "router-1", **endpoint},
        "retry": {"max_attempts": 1000},
    }


async def listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


async def test_rsyslog_parses_every_field_of_our_rfc5424_messages(
    start_daemon: StartDaemon, rsyslog: tuple[int, Path]
) -> None:
    port, out = rsyslog
    await wait_for(lambda: listening(port), what="rsyslogd to listen")
    daemon = await start_daemon({"targets": [syslog_target(port)], "routes": everything_to("siem")})
    events = [
        make_event(id="e-normal", severity="normal"),
        make_event(
            id="e-critical",
            severity="critical",
            outcome="failure",
            reason={"reasonCode": 401, "reasonType": "Unauthorized"},
            message='Secrets Manager: "quoted"]\nnew line ünïcode',
        ),
    ]
    await post(daemon, events)
    await wait_for(lambda: settled(daemon) and len(lines(out)) >= 2, what="rsyslog to write both")
    received = {}
    for line in lines(out):
        pri, when, host, app, procid, msgid, sd, msg = line.split("|", 7)
        event = orjson.loads(msg.lstrip("\ufeff"))
        received[event["id"]] = (int(pri), when, host, app, procid, msgid, sd, event)
    pri, when, host, app, procid, msgid, sd, event = received["e-normal"]
    assert pri == 13 * 8 + 6
    assert when.startswith("2024-05-01T12:00:00.12")
    assert (host, app, procid) == ("router-1", "secrets-manager", "-")
    assert msgid == "secrets-manager.secret.create"
    assert sd.startswith('[audit@32473 id="e-normal" action="secrets-manager.secret.create"')
    assert 'location="us-south"' in sd
    assert event == {**events[0], "id": "e-normal"}
    pri, *_, sd, event = received["e-critical"]
    assert pri == 13 * 8 + 2
    assert event["message"] == 'Secrets Manager: "quoted"]\nnew line ünïcode'
    assert 'outcome="failure"' in sd


async def test_a_receiver_that_is_down_is_retried_until_it_comes_up(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    port = free_port()
    frames: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while length := await reader.readuntil(b" ") if not reader.at_eof() else b"":
            frames.append(await reader.readexactly(int(length[:-1])))

    daemon = await start_daemon(
        {
            "targets": [syslog_target(port)],
            "routes": everything_to("siem"),
            "shutdown": {"drain_timeout_s": 0.2},
        }
    )
    await post(daemon, make_event(id="late"))
    await wait_for(lambda: daemon.status()["targets"]["siem"]["retries"] >= 2)
    assert daemon.status()["targets"]["siem"]["write_status"]["status"] == "failed"
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        await wait_for(lambda: len(frames) == 1)
        assert b'id="late"' in frames[0]
        # The receiver has the frame before the daemon has settled its batch: wait for that.
        await wait_for(
            lambda: daemon.status()["targets"]["siem"]["write_status"]["status"] == "success",
            what="the target's write status to turn to success",
        )
    finally:
        server.close()


@pytest.fixture
async def tls_receiver(pki: Path) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TLS syslog peer (RFC 5425 framing) with the test CA's server certificate."""
    frames: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = await reader.readuntil(b" ")
                frames.append(await reader.readexactly(int(length[:-1])))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    yield server.sockets[0].getsockname()[1], frames
    server.close()


async def test_tls_transport_with_a_custom_ca(
    start_daemon: StartDaemon,
    tls_receiver: tuple[int, list[bytes]],
    pki: Path,
) -> None:
    port, frames = tls_receiver
    target = syslog_target(port, transport="tls", tls={"ca_file": str(pki / "ca.pem")}, bom=False)
    daemon = await start_daemon({"targets": [target], "routes": everything_to("siem")})
    await post(daemon, [make_event(id=f"t{i}") for i in range(3)])
    await wait_for(lambda: len(frames) == 3)
    head, _, body = frames[0].partition(b"] ")
    assert head.startswith(b"<110>1 2024-05-01T12:00:00.120000Z router-1 secrets-manager - ")
    assert orjson.loads(body)["id"] == "t0"
    # The receiver holds the frames before the worker's ack lands: wait for the books.
    await wait_for(lambda: daemon.status()["targets"]["siem"]["delivered"] == 3)


async def test_a_message_over_the_limit_is_dead_lettered_as_too_large(
    start_daemon: StartDaemon,
    tls_receiver: tuple[int, list[bytes]],
    pki: Path,
    tmp_path: Path,
) -> None:
    port, frames = tls_receiver
    target = syslog_target(
        port, transport="tls", tls={"ca_file": str(pki / "ca.pem")}, max_message_bytes=4096
    )
    daemon = await start_daemon({"targets": [target], "routes": everything_to("siem")})
    await post(daemon, [make_event(id="small"), make_event(id="big", message="x" * 5000)])
    await wait_for(lambda: settled(daemon))
    assert len(frames) == 1 and b'id="small"' in frames[0]
    letter = orjson.loads((tmp_path / "var" / "deadletter" / "siem.ndjson").read_bytes())
    assert (letter["event"]["id"], letter["reason"]) == ("big", "too_large")


async def test_a_receiver_that_closed_its_side_between_batches_gets_every_event(
    start_daemon: StartDaemon,
) -> None:
    """A receiver restart or idle timeout closes the connection between batches; the next
    batch must go on a new connection, not into the half-closed one (counted, never read)."""
    frames: list[bytes] = []
    closed = asyncio.Event()

    async def take_one_frame_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        length = await reader.readuntil(b" ")
        frames.append(await reader.readexactly(int(length[:-1])))
        writer.close()
        await writer.wait_closed()
        closed.set()

    server = await asyncio.start_server(take_one_frame_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        daemon = await start_daemon(
            {"targets": [syslog_target(port)], "routes": everything_to("siem")}
        )
        for n in range(1, 4):
            closed.clear()
            await post(daemon, make_event(id=f"b{n}"))
            await wait_for(lambda: settled(daemon), what=f"batch {n} to settle")
            await wait_for(lambda n=n: len(frames) == n, what=f"the receiver to hold {n} events")
            await asyncio.wait_for(closed.wait(), 10)  # the receiver closed before the next
        assert [f.split(b'id="')[1][:2] for f in frames] == [b"b1", b"b2", b"b3"]
        row = daemon.status()["targets"]["siem"]
        assert (row["received"], row["delivered"], row["pending"]) == (3, 3, 0)
        assert row["received"] == row["delivered"] + row["dead_lettered"] + row["pending"]
    finally:
        server.close()
        await server.wait_closed()
