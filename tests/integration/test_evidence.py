"""Evidence: the file target's hash chain, signed checkpoints, and `event-router verify`.

Every archive here is written by a real daemon; tampering with it is then reported at the exact
place, and an untouched one verifies.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import hashlib
import io
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from router.config import EvidenceConfig, StorageConfig, parse_config
from router.daemon import Daemon
from router.events import Event
from router.evidence.canonical import split_line
from router.evidence.chain import Chain
from router.evidence.checkpoint import PREFIX, SIG_MEMBER, is_checkpoint
from router.evidence.keys import generate, load_public
from router.evidence.registry import Evidence
from router.evidence.verify import (
    EN_DASH,
    Broken,
    Report,
    Verifier,
    VerifyOptions,
    verify_files,
)
from router.journal.sqlite import SqliteJournal
from router.server.api import ConfigSource
from router.targets.file import FileEndpointConfig, FileTarget
from tests.conftest import FAST_DELIVERY, StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import (
    Load,
    assert_books_balance,
    drained,
    everything_to,
    free_port,
    post,
    reap,
    serve,
    settled,
    terminate,
)
from tests.integration.test_metrics import scrape, value

HINT = " (dead letters: give their file too)"


def chained_file_target(path: Path, **endpoint: Any) -> dict[str, Any]:
    return {
        "id": "us",
        "target_type": "file",
        "file_endpoint": {"path": str(path), "fsync": False, **endpoint},
    }


def verify(paths: list[Path], key: Path | None = None, **kwargs: Any) -> Report:
    public = load_public(key) if key is not None else None
    return verify_files(paths, Verifier(VerifyOptions(public_key=public, **kwargs)))


def archive_files(directory: Path, name: str = "us.ndjson") -> list[Path]:
    return sorted(directory.glob(name + "*"))


async def write_archive(
    start_daemon: StartDaemon,
    tmp_path: Path,
    *,
    events: int = 60,
    per_post: int = 10,
    **endpoint: Any,
) -> tuple[Daemon, Path, Path]:
    """A daemon with one chained, signed file target took `events` events (and its start-up
    test write) and stopped: returns it, the archive directory and the public key."""
    key, public = generate(tmp_path / "signing.key")
    directory = tmp_path / "archive"
    daemon = await start_daemon(
        {
            "targets": [chained_file_target(directory / "us.ndjson", **endpoint)],
            "routes": everything_to("us"),
            "startup": {"validate_targets": True},
            "evidence": {"signing_key_file": str(key), "checkpoint_every_events": 7},
        }
    )
    for start in range(0, events, per_post):
        batch = [make_event(id=f"e-{n}") for n in range(start, start + per_post)]
        status, _ = await post(daemon, batch)
        assert status == 202
        await wait_for(lambda: settled(daemon), what="delivery")
    assert_books_balance(daemon)
    await daemon.stop()
    return daemon, directory, public


def event_places(path: Path) -> list[tuple[int, int]]:
    """(line number, seq) of every chained line of a file."""
    places = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        found = split_line(line) if line and not is_checkpoint(line) else None
        if found is not None:
            places.append((number, found[1].seq))
    return places


def middle_run(path: Path) -> tuple[int, int]:
    """A chained line in the middle of the file whose neighbours are chained lines too."""
    places = event_places(path)
    for i in range(len(places) // 2, len(places) - 1):
        (before, _), (number, seq), (after, _) = places[i - 1], places[i], places[i + 1]
        if before == number - 1 and after == number + 1:
            return number, seq
    raise AssertionError("no run of three chained lines")


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


async def test_the_daemon_writes_a_chain_that_verifies_with_signed_checkpoints(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _, directory, public = await write_archive(start_daemon, tmp_path)
    lines = lines_of(directory / "us.ndjson")
    first = orjson.loads(lines[0])
    assert first["action"] == "event-router.target.validate", "the test write is in the chain"
    assert set(first["_chain"]) == {"seq", "prev", "hash"} and first["_chain"]["seq"] == 1
    assert any(is_checkpoint(line) for line in lines)
    report = verify(archive_files(directory), public)
    assert report.ok, report.broken
    assert (report.events, report.dead_letters, report.resent) == (61, 0, 0)
    assert report.signed_checkpoints == report.checkpoints >= 6  # one per batch of 10, at least
    assert report.head_seq == report.last_checkpoint_seq == 61, "the shutdown checkpoint"
    assert not report.warnings


TAMPERINGS = [
    "line deleted",
    "field edited",
    "lines swapped",
    "file truncated",
    "line inserted",
]


@pytest.mark.parametrize("tampering", TAMPERINGS)
async def test_tampering_is_reported_at_its_exact_place(
    start_daemon: StartDaemon, tmp_path: Path, tampering: str
) -> None:
    _, directory, public = await write_archive(start_daemon, tmp_path)
    path = directory / "us.ndjson"
    number, seq = middle_run(path)
    lines = lines_of(path)
    i = number - 1
    if tampering == "line deleted":
        del lines[i]
        expected = f"gap: seq {seq} missing between {path}:{number - 1} and {path}:{number}{HINT}"
    elif tampering == "field edited":
        lines[i] = lines[i].replace(b'"id":"e-', b'"id":"x-', 1)
        expected = f"{path}:{number}: hash does not match the chain (the line was changed)"
    elif tampering == "lines swapped":
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
        expected = (
            f"{path}:{number}: swapped with {path}:{number + 1} (seq {seq + 1} and seq {seq} are "
            "in each other's places)"
        )
    elif tampering == "file truncated":
        cut = len(b"".join(lines[:i])) + len(lines[i]) // 2
        path.write_bytes(b"".join(lines)[:cut])
        lines = []
        expected = f"{path}:{number}: torn last line (the file was cut)"
    else:  # a copy of the line before, inserted
        lines.insert(i, lines[i - 1])
        expected = (
            f"{path}:{number}: seq {seq - 1} out of order: seq {seq} was expected after "
            f"{path}:{number - 1} (a line inserted, moved or repeated)"
        )
    if lines:
        path.write_bytes(b"".join(lines))
    report = verify(archive_files(directory), public)
    assert report.broken == expected


async def test_a_removed_rotated_file_is_a_gap_naming_both_sides(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _, directory, public = await write_archive(
        start_daemon, tmp_path, per_post=2, max_bytes=8192, max_files=100
    )
    files = archive_files(directory)
    assert len(files) >= 4, files
    assert verify(files, public).ok
    older, removed, newer = (directory / f"us.ndjson.{n}" for n in (3, 2, 1))
    first_gone, last_gone = event_places(removed)[0][1], event_places(removed)[-1][1]
    removed.unlink()
    report = verify(archive_files(directory), public)
    assert report.broken == (
        f"gap: seq {first_gone}{EN_DASH}{last_gone} missing between "
        f"{older}:{event_places(older)[-1][0]} and {newer}:{event_places(newer)[0][0]}{HINT}"
    )


async def test_gzipped_rotations_verify_and_a_missing_oldest_needs_partial(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _, directory, public = await write_archive(
        start_daemon, tmp_path, per_post=2, max_bytes=8192, max_files=100
    )
    for path in archive_files(directory):
        if path.name != "us.ndjson":
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
    assert verify(archive_files(directory), public).ok
    rotated = [path for path in archive_files(directory) if path.name != "us.ndjson"]
    oldest = max(rotated, key=lambda path: int(path.name.split(".")[2]))
    oldest.unlink()
    assert verify(archive_files(directory), public).broken.startswith(f"gap: seq 1{EN_DASH}")
    assert verify(archive_files(directory), public, partial=True).ok


async def test_a_checkpoint_re_signed_with_another_key_is_reported(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    _, directory, public = await write_archive(start_daemon, tmp_path)
    path = directory / "us.ndjson"
    lines = lines_of(path)
    i = next(i for i, line in enumerate(lines) if is_checkpoint(line))
    payload = lines[i][len(PREFIX) : lines[i].rfind(SIG_MEMBER)]
    forged = base64.b64encode(Ed25519PrivateKey.generate().sign(payload))
    lines[i] = PREFIX + payload + SIG_MEMBER + b'"' + forged + b'"}\n'
    path.write_bytes(b"".join(lines))
    report = verify(archive_files(directory), public)
    assert report.broken == (
        f"{path}:{i + 1}: checkpoint signature does not verify with the public key"
    )
    # Without the public key the chain still verifies, and says what it could not check.
    unchecked = verify(archive_files(directory))
    assert unchecked.ok
    assert any("give --public-key" in warning for warning in unchecked.warnings)


async def test_without_a_key_checkpoints_are_unsigned_and_verify_warns(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    path = tmp_path / "us.ndjson"
    daemon = await start_daemon(
        {"targets": [chained_file_target(path)], "routes": everything_to("us")}
    )
    await post(daemon, [make_event() for _ in range(5)])
    await wait_for(lambda: settled(daemon), what="delivery")
    await daemon.stop()
    report = verify([path])
    assert report.ok and report.events == 5
    assert report.warnings == ["1 checkpoints are unsigned (no signing key)"]
    _, public = generate(tmp_path / "k")
    assert verify([path], public).broken == (
        f"{path}:6: checkpoint is unsigned, but a public key was given"
    )


async def test_dead_letters_take_their_places_and_the_chain_survives_a_reload(
    tmp_path: Path,
) -> None:
    """A file target that cannot write (its path is a directory) dead-letters 3 events; a
    reload points it at a file, which takes 4 more and the reload's own audit event. The
    archive and the dead-letter file together are one chain, and account for every event the
    target received."""
    broken = tmp_path / "not-yet-a-directory"
    retry = {"max_attempts": 1, "initial_backoff_s": 0.01}
    data: dict[str, Any] = {
        "targets": [{**chained_file_target(broken), "retry": retry}],
        "routes": everything_to("us"),
    }
    full = {
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": str(tmp_path / "var")},
        "delivery": FAST_DELIVERY,
        "startup": {"validate_targets": False},
        **data,
    }
    daemon = Daemon(parse_config(full), ConfigSource(None, full))
    broken.mkdir()  # after the config check, before the start: every write fails
    await daemon.start()
    try:
        await dead_letters_then_reload(daemon, full, tmp_path)
    finally:
        if daemon.ready:
            await daemon.stop()


async def dead_letters_then_reload(daemon: Daemon, data: dict[str, Any], tmp_path: Path) -> None:
    await post(daemon, [make_event() for _ in range(3)])
    await wait_for(lambda: settled(daemon), what="dead letters")
    archive = tmp_path / "us.ndjson"
    await daemon.reload(parse_config({**data, "targets": [chained_file_target(archive)]}))
    await post(daemon, [make_event() for _ in range(4)])
    await wait_for(lambda: settled(daemon), what="delivery")
    row = daemon.status()["targets"]["us"]
    # 4 events and the router's own audit event of the reload.
    assert (row["received"], row["delivered"], row["dead_lettered"]) == (8, 5, 3)
    assert row["evidence"]["chain_seq"] == 8
    await daemon.stop()
    letters = tmp_path / "var" / "deadletter" / "us.ndjson"
    report = verify([archive, letters])
    assert report.ok, report.broken
    assert (report.events, report.dead_letters) == (5, 3)
    assert report.events + report.dead_letters == row["received"]
    # The archive alone misses the dead letters' places, and says where to find them.
    alone = verify([archive])
    assert alone.broken == (
        f"gap: seq 1{EN_DASH}3 missing between the start of the chain and {archive}:1"
        " (dead letters: give their file too)"
    )


# -- the property: any single-byte change fails verify ------------------------------------------


@functools.cache
def sample_archive() -> tuple[bytes, bytes]:
    """A small signed archive from a real daemon, and its public key (PEM)."""
    import tempfile

    async def run(tmp: Path) -> tuple[bytes, bytes]:
        key, public = generate(tmp / "k")
        data = {
            "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
            "storage": {"path": str(tmp / "var")},
            "delivery": FAST_DELIVERY,
            "targets": [chained_file_target(tmp / "us.ndjson")],
            "routes": everything_to("us"),
            "evidence": {"signing_key_file": str(key), "checkpoint_every_events": 3},
            "startup": {"validate_targets": True},
        }
        daemon = Daemon(parse_config(data), ConfigSource(None, data))
        await daemon.start()
        for n in range(3):
            await post(daemon, [make_event(id=f"p-{n}-{i}") for i in range(3)])
            await wait_for(lambda: settled(daemon), what="delivery")
        await daemon.stop()
        return (tmp / "us.ndjson").read_bytes(), public.read_bytes()

    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(run(Path(tmp)))


def verify_bytes(data: bytes, public_pem: bytes, tmp: Path) -> Report:
    pub = tmp / "k.pub"
    pub.write_bytes(public_pem)
    verifier = Verifier(VerifyOptions(public_key=load_public(pub)))
    try:
        verifier.archive("us.ndjson", io.BytesIO(data))
        return verifier.finish()
    except Broken as exc:
        verifier.report.broken = str(exc)
        return verifier.report


def test_the_sample_archive_verifies(tmp_path: Path) -> None:
    data, public = sample_archive()
    report = verify_bytes(data, public, tmp_path)
    assert report.ok and report.events == 10 and report.signed_checkpoints >= 3


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.floats(min_value=0, max_value=1, exclude_max=True), new=st.integers(0, 255))
def test_any_single_byte_change_fails_verify(tmp_path: Path, position: float, new: int) -> None:
    data, public = sample_archive()
    i = int(position * len(data))
    if data[i] == new:
        new = (new + 1) % 256
    changed = data[:i] + bytes([new]) + data[i + 1 :]
    assert not verify_bytes(changed, public, tmp_path).ok, (i, data[i], new)


# -- the command line ---------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router", *args], capture_output=True, text=True, timeout=60
    )


def test_keygen_writes_a_private_key_0600_and_its_public_key(tmp_path: Path) -> None:
    out = tmp_path / "signing.key"
    done = run_cli("keygen", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in (tmp_path / "signing.key.pub").read_bytes()
    again = run_cli("keygen", "--out", str(out))
    assert again.returncode == 2 and "never overwrites" in again.stderr


async def test_verify_command_exit_codes(start_daemon: StartDaemon, tmp_path: Path) -> None:
    _, directory, public = await write_archive(start_daemon, tmp_path, events=20)
    files = [str(p) for p in archive_files(directory)]
    ok = run_cli("verify", "--public-key", str(public), *files)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK: 21 events and 0 dead letters verified")
    path = directory / "us.ndjson"
    number, _ = middle_run(path)
    lines = lines_of(path)
    lines[number - 1] = lines[number - 1].replace(b'"id":"e-', b'"id":"y-', 1)
    path.write_bytes(b"".join(lines))
    broken = run_cli("verify", "--public-key", str(public), *files)
    assert broken.returncode == 1
    assert broken.stdout.splitlines()[0] == (
        f"BROKEN: {path}:{number}: hash does not match the chain (the line was changed)"
    )
    assert "before the break:" in broken.stdout
    assert run_cli("verify", str(tmp_path / "nope.ndjson")).returncode == 2
    assert run_cli("verify").returncode == 2
    shutil.rmtree(directory)


# -- real daemon processes: SIGTERM restart, kill -9 under load, SIGHUP reload ------------------


async def post_ids(port: int, ids: list[str]) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/v1/events",
            data=orjson.dumps([make_event(id=i) for i in ids]),
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        return resp.status


async def test_the_chain_survives_restart_kill_9_and_sighup_reload(tmp_path: Path) -> None:
    """Three real daemons on one archive: stopped by SIGTERM, killed by kill -9 under load,
    reloaded by SIGHUP with the target changed. The archive verifies as one chain, signed
    throughout, and holds every acknowledged event; the batch re-sent after kill -9 is at new
    places, counted as re-sent."""
    port = free_port()
    archive = tmp_path / "archive" / "us.ndjson"
    key, public = generate(tmp_path / "signing.key")
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"path": str(tmp_path / "var"), "fsync": "always"},
        "startup": {"validate_targets": True},
        "targets": [chained_file_target(archive, max_bytes=256 * 1024)],
        "routes": everything_to("us"),
        "evidence": {"signing_key_file": str(key), "checkpoint_every_events": 50},
    }
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(data))
    acked: list[str] = []
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(config, port)  # 1: events, then SIGTERM
        ids = [f"first-{n}" for n in range(20)]
        assert await post_ids(port, ids) == 202
        acked += ids
        await wait_for(lambda: drained(port), what="the first run to deliver")
        assert await terminate(proc) == 0

        proc = await serve(config, port)  # 2: kill -9 under load
        load = Load(port, posters=4, for_at_most_s=30)
        await wait_for(lambda: len(load.acked) >= 600, timeout_s=30, what="load acknowledged")
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        acked += await load.stop()

        proc = await serve(config, port)  # 3: drain, SIGHUP with the target changed, SIGTERM
        await wait_for(lambda: drained(port), timeout_s=30, what="the backlog after kill -9")
        data["targets"] = [chained_file_target(archive, max_bytes=128 * 1024)]
        config.write_text(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        await wait_for(
            lambda: any(
                e.get("action") == "event-router.config.reload" for e in read_ndjson(archive)
            ),
            what="the reload to be applied",
        )
        ids = [f"last-{n}" for n in range(20)]
        assert await post_ids(port, ids) == 202
        acked += ids
        await wait_for(lambda: drained(port), what="the last events")
        assert await terminate(proc) == 0
    finally:
        await reap(proc)

    files = archive_files(archive.parent)
    report = verify(files, public)
    assert report.ok, report.broken
    archived = [
        orjson.loads(line)["id"]
        for path in files
        for line in path.read_bytes().splitlines()
        if not is_checkpoint(line)
    ]
    assert not set(acked) - set(archived), "an acknowledged event is missing"
    assert report.events == len(archived)
    assert report.resent == len(archived) - len(set(archived))
    assert report.head_seq == report.last_checkpoint_seq, "the last stop wrote a checkpoint"
    assert report.signed_checkpoints == report.checkpoints
    print(f"{report.summary()}; {len(files)} files")


async def test_a_torn_last_line_is_cut_at_start_and_the_chain_goes_on(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """What kill -9 in the middle of a write leaves: a last line without its newline. The next
    start cuts it (it was never reported written; its batch is sent again) and the chain goes
    on from the last whole line."""
    daemon, directory, public = await write_archive(start_daemon, tmp_path, events=10)
    path = directory / "us.ndjson"
    whole = path.read_bytes()
    path.write_bytes(whole + lines_of(path)[0][:300])  # the start of an event line
    torn = len(lines_of(path))
    assert verify([path], public).broken == f"{path}:{torn}: torn last line (the file was cut)"
    again = await start_daemon(daemon.source.data)
    await wait_for(lambda: path.stat().st_size > len(whole), what="the start-up test write")
    after = path.read_bytes()
    assert after.startswith(whole), "the torn line was cut before anything was written"
    found = split_line(after[len(whole) :].split(b"\n")[0])
    assert found is not None and found[1].seq == 12, "the chain goes on from the last whole line"
    await post(again, [make_event(id=f"later-{n}") for n in range(5)])
    await wait_for(lambda: settled(again), what="delivery")
    await again.stop()
    report = verify([path], public)
    assert report.ok, report.broken
    assert report.head_seq == 1 + 10 + 1 + 5, "two start-up test writes, 15 events"


async def test_status_and_metrics_show_each_chain_head_and_last_checkpoint(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {
            "targets": [chained_file_target(tmp_path / "us.ndjson")],
            "routes": everything_to("us"),
            "evidence": {"checkpoint_every_events": 4},
        }
    )
    before = time.time()
    await post(daemon, [make_event() for _ in range(5)])
    await wait_for(lambda: settled(daemon), what="delivery")
    evidence = daemon.status()["targets"]["us"]["evidence"]
    assert (evidence["chain_seq"], evidence["checkpoint_seq"]) == (5, 5)
    samples = await scrape(daemon)
    assert value(samples, "event_router_chain_head_seq", target="us") == 5
    assert value(samples, "event_router_chain_checkpoint_seq", target="us") == 5
    at = value(samples, "event_router_chain_last_checkpoint_timestamp_seconds", target="us")
    assert before <= at <= time.time()
    assert evidence["last_checkpoint_at"].startswith(time.strftime("%Y-", time.gmtime(at)))
    assert value(samples, "event_router_chain_checkpoint_errors_total") == 0


async def test_validate_target_on_the_command_line_leaves_a_chained_archive_intact(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Only the daemon holds the chain's head: `event-router validate-target` opens a chained
    archive for appending but writes no test line, which would break the chain."""
    daemon, directory, public = await write_archive(start_daemon, tmp_path, events=10)
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(daemon.source.data))
    before = (directory / "us.ndjson").read_bytes()
    done = await asyncio.to_thread(run_cli, "validate-target", "--config", str(config), "us")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no test event" in done.stdout
    assert (directory / "us.ndjson").read_bytes() == before
    assert verify(archive_files(directory), public).ok


# -- receipts -------------------------------------------------------------------------------------


async def get_json(daemon: Daemon, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}{path}") as resp,
    ):
        return resp.status, await resp.json()


async def test_receipts_name_each_event_and_say_where_it_is(
    start_daemon: StartDaemon, receiver_factory: Any, tmp_path: Path
) -> None:
    """Each accepted event gets a receipt whose digest is the SHA-256 of its archive line's
    canonical bytes; GET /v1/receipts/{id} says where it is for each target: delivered at a
    chain place, dead-lettered with the reason, or pending."""
    refuses = await receiver_factory([400])
    down = await receiver_factory([503])
    archive = tmp_path / "us.ndjson"
    daemon = await start_daemon(
        {
            "targets": [
                chained_file_target(archive),
                {"id": "refuses", "target_type": "http", "http_endpoint": {"url": refuses.url}},
                {
                    "id": "down",
                    "target_type": "http",
                    "http_endpoint": {"url": down.url},
                    "retry": {"max_attempts": 1000, "max_age_s": 600},
                },
            ],
            "routes": everything_to("us", "refuses", "down"),
            "evidence": {"receipts": True},
            "shutdown": {"drain_timeout_s": 0.2},  # "down" never takes its events
        }
    )
    status, answer = await post(daemon, [make_event(id="r-1"), make_event(id="r-2")])
    assert status == 202
    receipts = [result["receipt"] for result in answer["results"]]
    assert [r["id"] for r in receipts] == ["r-1", "r-2"]
    assert all(daemon.acceptor.receipts and daemon.acceptor.receipts.genuine(r) for r in receipts)
    assert daemon.acceptor.receipts is not None
    assert not daemon.acceptor.receipts.genuine({**receipts[0], "digest": receipts[1]["digest"]})
    await wait_for(
        lambda: (
            daemon.status()["targets"]["us"]["delivered"] == 2
            and daemon.status()["targets"]["refuses"]["dead_lettered"] == 2
        ),
        what="the archive and the dead letters",
    )
    code, where = await get_json(daemon, "/v1/receipts/r-2")
    assert code == 200, where
    targets = where["targets"]
    assert targets["down"] == {"state": "pending"}
    assert targets["refuses"]["state"] == "dead_lettered"
    assert targets["refuses"]["reason"] == "permanent_status"
    delivered = targets["us"]
    assert (delivered["state"], delivered["seq"], delivered["file"]) == (
        "delivered",
        2,
        str(archive),
    )
    assert delivered["digest"] == receipts[1]["digest"], "the receipt names the archive line"
    line = lines_of(archive)[delivered["line"] - 1].rstrip(b"\n")
    found = split_line(line)
    assert found is not None
    assert "sha256:" + hashlib.sha256(found[0]).hexdigest() == receipts[1]["digest"]
    code, missing = await get_json(daemon, "/v1/receipts/nobody")
    assert code == 404 and missing["error"]["code"] == "not_found"


@pytest.mark.parametrize("length", [0, 5])
async def test_a_receipt_key_file_of_the_wrong_length_stops_the_start_naming_it(
    start_daemon: StartDaemon, tmp_path: Path, length: int
) -> None:
    """The receipt key was made by creating its file, then writing it: a crash or a full disk
    in between left an empty receipts.key, which the next start took as the key. Receipts
    MACed with an empty key are receipts anyone can make. A key file that does not hold a key
    (as a receipt-key of the wrong length in a JetStream bucket) stops the start, naming it;
    a new key file is written whole (a temp file, fsynced, linked in place) or not at all."""
    storage = tmp_path / "var"
    storage.mkdir()
    (storage / "receipts.key").write_bytes(b"k" * length)
    config = {
        "targets": [chained_file_target(tmp_path / "us.ndjson")],
        "routes": everything_to("us"),
        "evidence": {"receipts": True},
    }
    config_file = tmp_path / "router.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "storage": {"path": str(storage)},
                "startup": {"validate_targets": False},
                **config,
            }
        )
    )
    refused = run_cli("serve", "--config", str(config_file))
    assert refused.returncode == 1, refused.stderr
    assert f"receipts.key holds {length} bytes" in refused.stderr
    assert "Traceback" not in refused.stderr
    (storage / "receipts.key").unlink()
    daemon = await start_daemon(config)
    assert len((storage / "receipts.key").read_bytes()) == 32
    assert not list(storage.glob("receipts.key.*"))
    status, answer = await post(daemon, [make_event(id="k-1")])
    assert status == 202
    assert daemon.acceptor.receipts is not None
    assert daemon.acceptor.receipts.genuine(answer["results"][0]["receipt"])


async def test_without_receipts_the_ingest_answer_is_unchanged(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {"targets": [chained_file_target(tmp_path / "us.ndjson")], "routes": everything_to("us")}
    )
    _, answer = await post(daemon, [make_event(id="plain")])
    assert answer["results"] == [{"index": 0, "id": "plain", "status": "accepted"}]


def test_query_never_matches_a_checkpoint_line(tmp_path: Path) -> None:
    data, _ = sample_archive()
    archive = tmp_path / "us.ndjson"
    archive.write_bytes(data)
    done = run_cli("query", "NOT id:nobody", str(archive))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 10 and not any(line.startswith('{"_checkpoint":') for line in lines)


async def test_only_chained_targets_dead_letters_take_places(
    start_daemon: StartDaemon, receiver_factory: Any, tmp_path: Path
) -> None:
    """An http target's deliveries take no places, so its dead letters carry no _chain: alone
    they would look like a whole chain."""
    refuses = await receiver_factory([400])
    daemon = await start_daemon(
        {
            "targets": [
                chained_file_target(tmp_path / "us.ndjson"),
                {"id": "refuses", "target_type": "http", "http_endpoint": {"url": refuses.url}},
            ],
            "routes": everything_to("us", "refuses"),
        }
    )
    await post(daemon, [make_event() for _ in range(3)])
    await wait_for(lambda: settled(daemon), what="delivery and dead letters")
    letters = read_ndjson(tmp_path / "var" / "deadletter" / "refuses.ndjson")
    assert len(letters) == 3 and not any("_chain" in letter for letter in letters)
    assert "evidence" not in daemon.status()["targets"]["refuses"]
    assert daemon.status()["targets"]["us"]["evidence"]["chain_seq"] == 3


async def test_a_send_cancelled_mid_write_keeps_the_chain_until_the_write_is_done(
    tmp_path: Path,
) -> None:
    """A worker cancelled at the drain timeout while its write runs in a thread: the write
    goes on, so the chain's lock and head must wait for it, or the shutdown checkpoint is
    written with the old head among (or between) the new lines."""
    storage = tmp_path / "var"
    journal = SqliteJournal(StorageConfig(path=str(storage)), ["us"])
    await journal.open()
    evidence = Evidence(EvidenceConfig(), journal, storage / "deadletter")
    await evidence.open()
    path = tmp_path / "us.ndjson"
    target = FileTarget("us", FileEndpointConfig(path=str(path)))
    target.chain = evidence.attach("us", target.write_line)
    await target.start()
    try:
        await target.send([Event.from_body(make_event(id="first"))])
        batch = [Event.from_body(make_event(id=f"c-{n}")) for n in range(3000)]
        send = asyncio.create_task(target.send(batch))
        await wait_for(lambda: path.stat().st_size > 100_000, what="the write to be under way")
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)
        await evidence.close()  # the shutdown checkpoint
    finally:
        await target.close()
        await journal.close()
    report = verify([path])
    assert report.ok, report.broken
    assert report.head_seq == report.last_checkpoint_seq == 3001


async def test_a_file_targets_batches_are_the_lines_linked_one_by_one_and_verify(
    tmp_path: Path,
) -> None:
    """The file target links a batch into one buffer (Chain.link_block) for its one write:
    the archive holds exactly the lines Chain.link makes event by event, a batch that follows
    goes on from the head the first left, and verify accepts the file."""
    storage = tmp_path / "var"
    journal = SqliteJournal(StorageConfig(path=str(storage)), ["us"])
    await journal.open()
    evidence = Evidence(EvidenceConfig(), journal, storage / "deadletter")
    await evidence.open()
    path = tmp_path / "us.ndjson"
    target = FileTarget("us", FileEndpointConfig(path=str(path)))
    target.chain = evidence.attach("us", target.write_line)
    await target.start()
    batches = [
        [Event.from_body(make_event(id=f"b{b}-{n}")) for n in range(size)]
        for b, size in enumerate((1, 250, 3))
    ]
    try:
        for batch in batches:
            await target.send(batch)
    finally:
        await target.close()
        await evidence.close()
        await journal.close()
    expected = Chain("us").link([event.encoded() for batch in batches for event in batch])[0]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert [line for line in lines[:-1] if not is_checkpoint(line)] == expected
    report = verify([path])
    assert report.ok, report.broken
    assert report.events == report.head_seq == 254


# -- a redrive keeps the letters' places ----------------------------------------------------------


async def test_a_redrive_keeps_the_letters_places_and_the_archive_still_verifies(
    tmp_path: Path,
) -> None:
    """A chained file target dead-letters 3 events (its path is a directory), then can write
    again; `dlq redrive` (the real CLI against the daemon) puts the letters back. The letters
    keep their places (moved to the redriven file), the redriven events take new ones, and the
    archive with both letter files verifies and reconciles with the books."""
    archive = tmp_path / "us.ndjson"
    retry = {"max_attempts": 1, "initial_backoff_s": 0.01}
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": str(tmp_path / "var")},
        "delivery": FAST_DELIVERY,
        "startup": {"validate_targets": False},
        "targets": [{**chained_file_target(archive), "retry": retry}],
        "routes": everything_to("us"),
    }
    daemon = Daemon(parse_config(data), ConfigSource(None, data))
    archive.mkdir()  # after the config check: every write fails until it is removed
    await daemon.start()
    try:
        await redrive_then_verify(daemon, data, tmp_path)
    finally:
        if daemon.ready:
            await daemon.stop()


async def redrive_then_verify(daemon: Daemon, data: dict[str, Any], tmp_path: Path) -> None:
    archive = tmp_path / "us.ndjson"
    await post(daemon, [make_event(id=f"d-{n}") for n in range(3)])
    await wait_for(lambda: settled(daemon), what="dead letters")
    archive.rmdir()
    await post(daemon, [make_event(id=f"ok-{n}") for n in range(2)])
    await wait_for(lambda: settled(daemon), what="delivery")
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(data))
    done = await asyncio.to_thread(
        run_cli,
        "dlq",
        "redrive",
        "--config",
        str(config),
        "--target",
        "us",
        "--url",
        f"http://127.0.0.1:{daemon.port}",
    )
    assert done.returncode == 0, done.stderr
    await wait_for(lambda: settled(daemon), what="the redriven events")
    row = daemon.status()["targets"]["us"]
    assert (row["received"], row["delivered"], row["dead_lettered"]) == (8, 5, 3)
    assert_books_balance(daemon)
    await daemon.stop()

    letters = tmp_path / "var" / "deadletter" / "us.ndjson"
    redriven = tmp_path / "var" / "deadletter" / "redriven" / "us.ndjson"
    assert read_ndjson(letters) == [], "the letters left the dead-letter file"
    assert [r["event"]["id"] for r in read_ndjson(redriven)] == ["d-0", "d-1", "d-2"]
    report = verify([archive, letters, redriven])
    assert report.ok, report.broken
    assert (report.events, report.dead_letters, report.redriven, report.redelivered) == (5, 3, 3, 3)
    assert report.events + report.dead_letters == row["received"], "the books, from the files"
    assert not report.warnings or all("unsigned" in w for w in report.warnings), report.warnings
    cli = await asyncio.to_thread(run_cli, "verify", str(archive), str(letters), str(redriven))
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "3 dead letters (3 redriven, 3 of them delivered again) verified" in cli.stdout


# -- the end of the chain: what the daemon reports as its head ------------------------------------


async def test_lines_cut_after_the_last_checkpoint_fail_verify_given_the_daemons_head(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """The last checkpoint covers seq 5; seq 6-8 follow it. Cut from a copy of the archive,
    they leave a chain that is whole as far as it goes: only the head the running daemon
    reports (/v1/status) shows that it stops short."""
    path = tmp_path / "us.ndjson"
    daemon = await start_daemon(
        {
            "targets": [chained_file_target(path)],
            "routes": everything_to("us"),
            "evidence": {"checkpoint_every_events": 5, "checkpoint_every_s": 3600},
        }
    )
    for batch in ([f"a-{n}" for n in range(5)], [f"b-{n}" for n in range(3)]):
        await post(daemon, [make_event(id=i) for i in batch])
        await wait_for(lambda: settled(daemon), what="delivery")
    code, status = await get_json(daemon, "/v1/status")
    assert code == 200
    evidence = status["targets"]["us"]["evidence"]
    assert (evidence["chain_seq"], evidence["checkpoint_seq"]) == (8, 5)
    head = f"{evidence['chain_seq']}:{evidence['chain_hash']}"

    copy = tmp_path / "copy" / "us.ndjson"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    whole = await asyncio.to_thread(run_cli, "verify", "--expect-head", head, str(copy))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    lines = lines_of(copy)
    copy.write_bytes(b"".join(lines[:-2]))  # seq 7 and 8 cut off the end
    alone = await asyncio.to_thread(run_cli, "verify", str(copy))
    assert alone.returncode == 0, "without the head, the cut is only a warning"
    assert "seq 6 come after the last checkpoint" in alone.stderr
    cut = await asyncio.to_thread(run_cli, "verify", "--expect-head", head, str(copy))
    assert cut.returncode == 1
    assert cut.stdout.splitlines()[0] == (
        f"BROKEN: seq 7{EN_DASH}8 missing at the end: the chain ends at seq 6 "
        f"({copy}:{len(lines) - 2}) but the daemon's head is seq 8 (places cut off the end)"
    )
    # The last line rewritten from there on (another event at seq 8) has another hash.
    other = await asyncio.to_thread(run_cli, "verify", "--expect-head", f"8:{'0' * 64}", str(path))
    assert other.returncode == 1
    assert "seq 8 does not hold the daemon's head (its hash differs)" in other.stdout


# -- signed receipts: an auditor checks them with the public key alone ---------------------------


async def test_signed_receipts_verify_with_the_public_key_and_name_archive_lines(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """With a signing key, each receipt carries an Ed25519 signature: `verify --receipts`
    checks it with the public key (no router secret) and finds each event in the chain; a
    receipt changed after it was issued is named at its place."""
    key, public = generate(tmp_path / "signing.key")
    archive = tmp_path / "us.ndjson"
    daemon = await start_daemon(
        {
            "targets": [chained_file_target(archive)],
            "routes": everything_to("us"),
            "evidence": {"signing_key_file": str(key), "receipts": True},
        }
    )
    answers = []
    for n in range(2):
        status, answer = await post(daemon, [make_event(id=f"r-{n}-{i}") for i in range(3)])
        assert status == 202
        answers.append(answer)
    await wait_for(lambda: settled(daemon), what="delivery")
    await daemon.stop()
    receipt = answers[0]["results"][0]["receipt"]
    assert set(receipt) == {"id", "digest", "received_at", "mac", "sig", "key"}
    kept = tmp_path / "answers.ndjson"
    kept.write_bytes(b"".join(orjson.dumps(answer) + b"\n" for answer in answers))

    args = ("verify", "--public-key", str(public), "--receipts", str(kept), str(archive))
    ok = await asyncio.to_thread(run_cli, *args)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "; 6 signed receipts, 6 of them for events in the chain" in ok.stdout

    # A receipt whose digest was changed after it was issued (its signature kept): refused.
    forged = dict(receipt, digest="sha256:" + "0" * 64)
    kept.write_bytes(kept.read_bytes() + orjson.dumps(forged) + b"\n")
    refused = await asyncio.to_thread(run_cli, *args)
    assert refused.returncode == 1
    assert refused.stdout.splitlines()[0] == (
        f"BROKEN: {kept}:3: the receipt of 'r-0-0' is not signed by the public key (forged, "
        "changed, or issued without a signing key)"
    )
    assert (await asyncio.to_thread(run_cli, *args[3:])).returncode == 2, "needs the key"


# -- kill -9, then lines cut while the daemon is down ---------------------------------------------


async def status_of(port: int) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/v1/status") as resp,
    ):
        assert resp.status == 200
        return await resp.json()


def process_config(tmp_path: Path, port: int, archive: Path, routes: list[Any]) -> Path:
    """The config file of a daemon process with one chained file target and no checkpoint
    while it runs (only at a stop)."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"path": str(tmp_path / "var"), "fsync": "always"},
        "targets": [chained_file_target(archive)],
        "routes": routes,
        "evidence": {"checkpoint_every_events": 1000, "checkpoint_every_s": 3600},
    }
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


async def test_lines_cut_while_the_daemon_was_down_after_kill_9_are_reported_at_start(
    tmp_path: Path,
) -> None:
    """A daemon process writes 3 batches past its last checkpoint and is killed with kill -9
    (no shutdown checkpoint). While it is down, the last two lines are cut off the archive.
    The next daemon knows the head it wrote (the journal keeps it with every batch): its
    /v1/status reports the places missing at start, and `verify --expect-head` with the head
    it reports names the cut; no --expect-head taken before the crash is needed. (The router's
    own events, global, go nowhere here: its event about the cut would otherwise take seq 13
    and leave the cut a gap in the middle, the next test's case.)"""
    port = free_port()
    archive = tmp_path / "archive" / "us.ndjson"
    not_global = [{"locations": ["global"], "target_ids": []}, *everything_to("us")[0]["rules"]]
    config = process_config(tmp_path, port, archive, [{"name": "all", "rules": not_global}])
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(config, port)
        for n in range(3):
            assert await post_ids(port, [f"c-{n}-{i}" for i in range(4)]) == 202
            await wait_for(lambda: drained(port), what="delivery")
        before = (await status_of(port))["targets"]["us"]["evidence"]
        assert (before["chain_seq"], before["checkpoint_seq"]) == (12, 0)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        lines = lines_of(archive)
        assert len(lines) == 12
        archive.write_bytes(b"".join(lines[:-2]))  # seq 11 and 12 cut while it is down

        proc = await serve(config, port)
        evidence = (await status_of(port))["targets"]["us"]["evidence"]
        assert (evidence["chain_seq"], evidence["chain_hash"]) == (12, before["chain_hash"])
        assert evidence["missing_at_start"] == {
            "first_seq": 11,
            "last_seq": 12,
            "found_seq": 10,
            "message": f"seq 11{EN_DASH}12 missing at the end of {archive} (and its dead "
            "letters) at start: the journal's head is seq 12, the files end at seq 10 (places "
            "cut off the end while the daemon was down)",
        }
        head = f"{evidence['chain_seq']}:{evidence['chain_hash']}"
        cli = await asyncio.to_thread(run_cli, "verify", "--expect-head", head, str(archive))
        assert cli.returncode == 1
        assert cli.stdout.splitlines()[0] == (
            f"BROKEN: seq 11{EN_DASH}12 missing at the end: the chain ends at seq 10 "
            f"({archive}:10) but the daemon's head is seq 12 (places cut off the end)"
        )
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


async def metrics_of(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a daemon process's /metrics, keyed by (name, labels)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_an_archive_cut_while_stopped_is_a_metric_and_an_event_of_the_router(
    tmp_path: Path,
) -> None:
    """A daemon process writes 12 events and stops (SIGTERM: a shutdown checkpoint). While it
    is down, the checkpoint and the last three events are cut off the archive. The next start
    reports the cut where an operator's alerting looks: the gauge
    event_router_chain_missing_at_start{target} (3 places), and an event of the router itself,
    event-router.chain.missing, routed like any other (here into the very archive, after the
    journal's head), with the numbers."""
    port = free_port()
    archive = tmp_path / "archive" / "us.ndjson"
    config = process_config(tmp_path, port, archive, everything_to("us"))
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(config, port)
        assert await post_ids(port, [f"m-{i}" for i in range(12)]) == 202
        await wait_for(lambda: drained(port), what="delivery")
        samples = await metrics_of(port)
        assert samples[("event_router_chain_missing_at_start", frozenset({("target", "us")}))] == 0
        assert await terminate(proc) == 0
        lines = lines_of(archive)
        assert len(lines) == 13 and is_checkpoint(lines[-1])
        archive.write_bytes(b"".join(lines[:9]))  # seq 10-12 and the checkpoint cut

        proc = await serve(config, port)
        samples = await metrics_of(port)
        assert samples[("event_router_chain_missing_at_start", frozenset({("target", "us")}))] == 3
        await wait_for(lambda: drained(port), what="the router's own event delivered")
        [own] = [e for e in read_ndjson(archive) if e["action"] == "event-router.chain.missing"]
        assert own["_chain"]["seq"] == 13, "after the journal's head, not in the cut places"
        assert own["outcome"] == "failure" and own["severity"] == "critical"
        assert own["target"]["name"] == "us"
        message = (
            f"seq 10{EN_DASH}12 missing at the end of {archive} (and its dead letters) at "
            "start: the journal's head is seq 12, the files end at seq 9 (places cut off the "
            "end while the daemon was down)"
        )
        assert own["requestData"] == {
            "target_id": "us",
            "first_seq": 10,
            "last_seq": 12,
            "found_seq": 9,
            "reasonForFailure": message,
        }
        status = await status_of(port)
        assert status["targets"]["us"]["evidence"]["missing_at_start"]["message"] == message
        assert status["targets"]["us"]["received"] == 13  # 12 events and the router's own
        assert await terminate(proc) == 0
        # Announced once: a later clean start finds the files at the journal's head.
        proc = await serve(config, port)
        samples = await metrics_of(port)
        assert samples[("event_router_chain_missing_at_start", frozenset({("target", "us")}))] == 0
        books = (await status_of(port))["targets"]["us"]
        assert books["received"] == books["delivered"] + books["dead_lettered"] + books["pending"]
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
    actions = [e["action"] for e in read_ndjson(archive)]
    assert actions.count("event-router.chain.missing") == 1
    # The archive itself shows the cut: the router's event about it came after the places.
    cli = await asyncio.to_thread(run_cli, "verify", str(archive))
    assert cli.returncode == 1
    assert cli.stdout.startswith(
        f"BROKEN: gap: seq 10{EN_DASH}12 missing between {archive}:9 and {archive}:10"
    ), cli.stdout


async def test_a_clean_restart_and_a_kill_9_report_nothing_missing(tmp_path: Path) -> None:
    """No false alarm: after kill -9 with nothing cut (and a torn last line, which was never
    acknowledged), the files reach the journal's head and nothing is reported missing."""
    port = free_port()
    archive = tmp_path / "archive" / "us.ndjson"
    config = process_config(tmp_path, port, archive, everything_to("us"))
    proc: asyncio.subprocess.Process | None = None
    try:
        proc = await serve(config, port)
        assert await post_ids(port, [f"k-{i}" for i in range(4)]) == 202
        await wait_for(lambda: drained(port), what="delivery")
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        with archive.open("ab") as f:
            f.write(lines_of(archive)[0][:100])  # a torn write: cut at start, no alarm
        proc = await serve(config, port)
        evidence = (await status_of(port))["targets"]["us"]["evidence"]
        assert evidence["chain_seq"] == 4 and evidence["missing_at_start"] is None
        assert await post_ids(port, [f"l-{i}" for i in range(4)]) == 202
        await wait_for(lambda: drained(port), what="delivery after the restart")
        assert await terminate(proc) == 0
        proc = await serve(config, port)
        evidence = (await status_of(port))["targets"]["us"]["evidence"]
        assert evidence["chain_seq"] == 8 and evidence["missing_at_start"] is None
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
    report = verify([archive])
    assert report.ok, report.broken
    assert report.head_seq == 8


async def test_letters_moved_by_a_redrive_are_not_reported_missing_at_start(
    tmp_path: Path,
) -> None:
    """The newest places are dead letters, which a redrive moves (byte for byte) to the
    redriven file: at the next start the files still reach the journal's head, no alarm."""
    archive = tmp_path / "us.ndjson"
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": str(tmp_path / "var")},
        "delivery": FAST_DELIVERY,
        "startup": {"validate_targets": False},
        "targets": [{**chained_file_target(archive), "retry": {"max_attempts": 1}}],
        "routes": everything_to("us"),
        "evidence": {"checkpoint_every_events": 1000, "checkpoint_every_s": 3600},
    }
    daemon = Daemon(parse_config(data), ConfigSource(None, data))
    await daemon.start()
    try:
        await post(daemon, [make_event(id=f"ok-{n}") for n in range(2)])
        await wait_for(lambda: settled(daemon), what="delivery")
        moved = {**chained_file_target(tmp_path / "dir"), "retry": {"max_attempts": 1}}
        changed = parse_config({**data, "targets": [moved]})
        (tmp_path / "dir").mkdir()  # after the config check: every write fails
        await daemon.reload(changed)
        await post(daemon, [make_event(id=f"d-{n}") for n in range(3)])
        await wait_for(lambda: settled(daemon), what="dead letters")
        head = daemon.status()["targets"]["us"]["evidence"]["chain_seq"]
    finally:
        await daemon.stop()
    letters = tmp_path / "var" / "deadletter" / "us.ndjson"
    assert [orjson.loads(x)["_chain"]["seq"] for x in lines_of(letters)][-1] == head
    redriven = letters.parent / "redriven" / "us.ndjson"
    redriven.parent.mkdir()
    redriven.write_bytes(b"".join(reversed(lines_of(letters))))  # in a redrive's order
    letters.write_bytes(b"")

    again = Daemon(parse_config(data), ConfigSource(None, data))
    await again.start()
    try:
        evidence = again.status()["targets"]["us"]["evidence"]
        assert (evidence["chain_seq"], evidence["missing_at_start"]) == (head, None)
    finally:
        await again.stop()
