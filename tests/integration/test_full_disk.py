"""A full disk under the archive and the dead letters: no torn line, no line twice.

On a real, small tmpfs: appends fail part-way with ENOSPC while batches are retried, then the
mount grows and everything drains. Needs root (mount); skipped with the reason otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from router.config import parse_config
from router.daemon import Daemon
from router.evidence.verify import Verifier, verify_files
from router.server.api import ConfigSource
from tests.conftest import StartDaemon
from tests.fakes import ScriptedReceiver, make_event, read_ndjson, wait_for
from tests.helpers import (
    assert_books_balance,
    everything_to,
    file_target,
    free_port,
    http_target,
    patient,
    post,
    reap,
    serve,
    settled,
    terminate,
)
from tests.integration.test_api import INGEST
from tests.integration.test_api import Client as ApiClient
from tests.integration.test_api import auth as api_auth

ReceiverFactory = Callable[..., Awaitable[ScriptedReceiver]]
Mount = Callable[[Path, str], Path]


@pytest.fixture
def tmpfs() -> Iterator[Mount]:
    """Mount a tmpfs of a given size (`mount(path, "2m")`); unmounted at the end."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") is None:
            pytest.skip("no mount command: the full-disk test needs a real small tmpfs")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def fill_up(directory: Path) -> Path:
    """A file that takes every byte left on the file system of `directory`."""
    filler = directory / "filler"
    with pytest.raises(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"x" * 4096)
            f.flush()
    return filler


def lines_by_id(path: Path, key: Callable[[Any], object]) -> Counter[object]:
    """How often each id occurs; every line must be one whole JSON object. Checkpoint lines of
    the evidence chain are not events and have no id."""
    counts: Counter[object] = Counter()
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if line.startswith(b'{"_checkpoint":'):
            continue
        try:
            counts[key(orjson.loads(line))] += 1
        except orjson.JSONDecodeError:
            raise AssertionError(f"{path.name} line {number} is not JSON: {line[:120]!r}") from None
    return counts


async def test_a_full_disk_neither_tears_nor_repeats_archive_lines_or_dead_letters(
    tmpfs: Mount,  # first, so that it is unmounted after the daemon stops
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    archive_disk = tmpfs(tmp_path / "archive-disk", "2m")
    letters_disk = tmpfs(tmp_path / "var" / "deadletter", "1m")
    refuses = await receiver_factory([400])  # every batch of this target is a dead letter
    archive = archive_disk / "archive.ndjson"
    daemon = await start_daemon(
        {
            "targets": [
                patient(file_target("archive", archive)),
                patient(http_target("refuses", refuses.url)),
            ],
            "routes": everything_to("archive", "refuses"),
        }
    )
    posted: list[str] = []
    for n in range(60):
        ids = [f"e{n}-{i}" for i in range(50)]
        status, _ = await post(daemon, [make_event(id=i, message="x" * 2500) for i in ids])
        assert status == 202
        posted += ids
    # Both disks fill part-way through a batch, and the appends are retried while full.
    await wait_for(
        lambda: daemon.target_stats["archive"].retries >= 3, what="the archive disk to fill"
    )
    await wait_for(
        lambda: sum("cannot write dead letters" in r.getMessage() for r in caplog.records) >= 2,
        what="the dead-letter disk to fill",
    )
    grow(archive_disk, "64m")
    grow(letters_disk, "64m")
    await wait_for(lambda: settled(daemon), timeout_s=30, what="everything to drain")

    archived = lines_by_id(archive, lambda event: event["id"])
    assert sorted(archived) == sorted(posted)
    assert {count for count in archived.values()} == {1}, "an archive line was written twice"
    letters = lines_by_id(
        letters_disk / "refuses.ndjson",
        lambda letter: letter["event"]["id"],
    )
    assert sorted(letters) == sorted(posted)
    assert {count for count in letters.values()} == {1}, "a dead letter was written twice"
    assert_books_balance(daemon)
    # Appends cut back on a full disk took no place in the chain: the archive verifies.
    await daemon.stop()
    report = verify_files([archive], Verifier())
    assert report.ok, report.broken
    assert report.events == len(posted)


async def test_a_full_journal_disk_answers_503_journal_unavailable_counted_then_recovers(
    tmpfs: Mount, start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    storage = tmpfs(tmp_path / "var", "1m")
    siem = await receiver_factory([503])  # down: the backlog stays in the journal and grows
    daemon = await start_daemon(
        {
            "storage": {"path": str(storage)},
            "targets": [patient(http_target("siem", siem.url))],
            "routes": everything_to("siem"),
            "shutdown": {"drain_timeout_s": 0.2},
        }
    )
    accepted: list[str] = []
    answer = None
    for n in range(100):
        ids = [f"e{n}-{i}" for i in range(20)]
        status, answer = await post(daemon, [make_event(id=i, message="x" * 2500) for i in ids])
        if status == 503:
            break
        assert status == 202
        accepted += ids
    assert answer is not None and answer["error"]["code"] == "journal_unavailable"
    assert daemon.status()["ingest"]["refused_requests"]["journal_unavailable"] == 1
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.port}/metrics") as resp,
    ):
        metrics = await resp.text()
    assert 'event_router_ingest_requests_refused_total{code="journal_unavailable"} 1.0' in metrics

    grow(storage, "64m")
    status, _ = await post(daemon, make_event(id="after"))
    assert status == 202
    siem.statuses = [200]
    await wait_for(lambda: settled(daemon), what="the backlog to drain")
    delivered = [e["id"] for e in siem.delivered_events]
    assert sorted(delivered) == sorted([*accepted, "after"]), "the refused request left nothing"
    assert_books_balance(daemon)


async def test_an_api_change_whose_config_file_cannot_be_written_changes_nothing(
    tmp_path: Path, tmpfs: Mount
) -> None:
    """The config file's disk is full: the change was applied (the target created and
    running), then writing the file failed: a 500, with the change live but not in the file
    (gone at the next restart) and never audited. Now the file is written (to its temp file)
    before anything is applied: a 503 naming the file and why, nothing changed, the refusal
    audited; once there is room, the same request is applied and written."""
    etc = tmpfs(tmp_path / "etc", "64k")
    path = etc / "router.yaml"
    data = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "auth": api_auth(),
        "targets": [file_target("archive", tmp_path / "archive.ndjson")],
        "routes": everything_to("archive"),
    }
    text = "# the operator's config\n" + yaml.safe_dump(data)
    path.write_text(text)
    filler = fill_up(etc)
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        api = ApiClient(daemon)
        new_target = {"target_type": "file", "file_endpoint": {"path": str(tmp_path / "b.ndjson")}}
        status, answer = await api.call("POST", "/api/v2/targets", new_target)
        assert status == 503, answer
        error = answer["errors"][0]
        assert error["code"] == "config_not_written", error
        assert str(path) in error["message"] and "No space left" in error["message"]
        assert [t.id for t in daemon.config.targets] == ["archive"]
        assert [t["id"] for t in (await api.call("GET", "/api/v2/targets"))[1]["targets"]] == [
            "archive"
        ]
        assert path.read_text() == text
        assert sorted(p.name for p in etc.iterdir()) == ["filler", "router.yaml"]

        def refusals() -> list[dict[str, Any]]:
            return [
                e
                for e in read_ndjson(tmp_path / "archive.ndjson")
                if e["action"] == "event-router.target.create" and e["outcome"] == "failure"
            ]

        await wait_for(lambda: len(refusals()) == 1, what="the refusal audited")
        filler.unlink()
        status, answer = await api.call("POST", "/api/v2/targets", new_target)
        assert status == 201, answer
        assert answer["id"] in [t["id"] for t in yaml.safe_load(path.read_text())["targets"]]
        assert_books_balance(daemon)
    finally:
        await daemon.stop()


async def test_an_api_change_when_the_storage_is_full_changes_nothing_and_reads_still_answer(
    tmp_path: Path, tmpfs: Mount
) -> None:
    """The storage (journal, the API's metadata) is full: a change was applied and written to
    the config file, then saving its metadata failed: a 500, never audited; and a read that
    first showed a YAML target (saving its creation time) was a 500 too. Now a change's
    metadata is written before it is applied (503 naming the file, nothing changed), and a
    read answers, its metadata kept in memory."""
    var = tmpfs(tmp_path / "var", "1m")
    path = tmp_path / "router.yaml"
    data = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"path": str(var)},
        "startup": {"validate_targets": False},
        "auth": api_auth(),
        "targets": [file_target("archive", tmp_path / "archive.ndjson")],
        "routes": everything_to("archive"),
    }
    path.write_text(yaml.safe_dump(data))
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    api = ApiClient(daemon)
    filler = fill_up(var)
    text = path.read_text()
    status, answer = await api.call("POST", "/api/v2/views", {"name": "failures", "query": "x"})
    assert status == 503, answer
    error = answer["errors"][0]
    assert error["code"] == "config_not_written", error
    assert "api-metadata.json" in error["message"] and "No space left" in error["message"]
    assert daemon.config.views == () and path.read_text() == text
    status, answer = await api.call("GET", "/api/v2/targets")  # first sight of the YAML's
    assert status == 200, answer
    assert [t["id"] for t in answer["targets"]] == ["archive"]
    assert not list(var.glob("*.tmp"))
    filler.unlink()
    status, answer = await api.call("POST", "/api/v2/views", {"name": "failures", "query": "x"})
    assert status == 201, answer
    assert [v.name for v in daemon.config.views] == ["failures"]
    await daemon.stop()


async def test_sigterm_with_the_storage_full_stops_cleanly(tmp_path: Path, tmpfs: Mount) -> None:
    """The alert store's last checkpoint at close failed on a full disk and the stop ended
    there, exit 1 with a traceback: targets and the journal never closed. A checkpoint that
    cannot be written leaves the WAL, replayed at the next start, as the journal's does."""
    var = tmpfs(tmp_path / "var", "1m")
    port = free_port()
    config = tmp_path / "router.yaml"
    archive = tmp_path / "archive.ndjson"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "storage": {"path": str(var)},
                "startup": {"validate_targets": False},
                "targets": [file_target("archive", archive)],
                "routes": everything_to("archive"),
            }
        )
    )
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as stderr:
        proc = await serve(config, port, stderr=stderr)
    try:
        url = f"http://127.0.0.1:{port}/v1/events"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=[make_event(id="before")]) as resp:
                assert resp.status == 202
            await wait_for(lambda: [e["id"] for e in read_ndjson(archive)] == ["before"])
            fill_up(var)
            async with session.post(url, json=[make_event(id="refused")]) as resp:
                assert resp.status == 503
        assert await terminate(proc) == 0
        err = log_path.read_text()
        assert "event-router stopped" in err  # the summary, after the journal closed
        assert "alert store checkpoint at close failed" in err
    finally:
        await reap(proc)


async def fill_the_journal(daemon: Daemon) -> None:
    """Producers' events until the journal's file cannot grow: its write fails (503), and it
    stays unhealthy until one succeeds. (A full disk alone may leave room in the WAL.)"""
    for n in range(200):
        status, answer = await post(
            daemon,
            [make_event(id=f"fill-{n}-{i}", message="x" * 2500) for i in range(20)],
            headers={"Authorization": f"Bearer {INGEST}"},
        )
        if status == 503:
            assert not daemon.journal.healthy
            return
        assert status == 202, answer
    raise AssertionError("the journal never filled up")


def audited(archive: Path, action: str, outcome: str) -> list[dict[str, Any]]:
    return [
        e
        for e in read_ndjson(archive)
        if e["action"] == f"event-router.{action}" and e["outcome"] == outcome
    ]


async def test_a_refused_change_on_a_full_storage_disk_is_audited_once_there_is_room(
    tmp_path: Path, tmpfs: Mount, caplog: pytest.LogCaptureFixture
) -> None:
    """The storage is full: a change is refused (503, its metadata cannot be written) and so
    is its own audit event by the journal: it was only logged as an error, without the event,
    and never journaled. Now the whole event goes to the log at once, is kept, counted in
    /v1/status, and journaled (with the time of the refusal) as soon as the journal takes
    writes again."""
    var = tmpfs(tmp_path / "var", "1m")
    path = tmp_path / "router.yaml"
    archive = tmp_path / "archive.ndjson"
    data = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"path": str(var)},
        "startup": {"validate_targets": False},
        "auth": api_auth(),
        "targets": [file_target("archive", archive)],
        "routes": everything_to("archive"),
    }
    path.write_text(yaml.safe_dump(data))
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        api = ApiClient(daemon)
        filler = fill_up(var)
        await fill_the_journal(daemon)
        status, answer = await api.call("POST", "/api/v2/views", {"name": "v", "query": "x"})
        assert status == 503, answer
        assert daemon.status()["own_events"]["unrecorded"] == 1
        logged = [
            r.getMessage() for r in caplog.records if "kept to be journaled" in r.getMessage()
        ]
        assert len(logged) == 1 and "event-router.view.create" in logged[0], logged
        assert "ops-alice" in logged[0], "the log line holds the whole event"
        filler.unlink()
        await wait_for(
            lambda: len(audited(archive, "view.create", "failure")) == 1,
            what="the refusal journaled once the disk has room",
        )
        assert daemon.status()["own_events"] == {"unrecorded": 0, "lost": 0}
        assert_books_balance(daemon)
    finally:
        await daemon.stop()


async def test_no_change_is_applied_while_the_journal_cannot_record_its_audit(
    start_daemon: StartDaemon, tmp_path: Path, tmpfs: Mount
) -> None:
    """Without a config file no metadata is staged, so nothing stopped a change on a full
    storage disk: it was applied (201) and its audit event lost. While the journal cannot
    write (its last write failed), a change is refused before anything is applied, 503
    journal_unavailable, as ingest is; both the refusal and, once there is room, the change
    are audited."""
    var = tmpfs(tmp_path / "var", "1m")
    archive = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {
            "storage": {"path": str(var)},
            "auth": api_auth(),
            "targets": [file_target("archive", archive)],
            "routes": everything_to("archive"),
        }
    )
    api = ApiClient(daemon)
    filler = fill_up(var)
    await fill_the_journal(daemon)
    status, answer = await api.call("POST", "/api/v2/views", {"name": "v", "query": "x"})
    assert status == 503, answer
    assert answer["errors"][0]["code"] == "journal_unavailable", answer
    assert daemon.config.views == ()
    filler.unlink()
    await wait_for(lambda: daemon.journal.healthy, what="the journal to take writes again")
    status, answer = await api.call("POST", "/api/v2/views", {"name": "v", "query": "x"})
    assert status == 201, answer
    await wait_for(
        lambda: (
            len(audited(archive, "view.create", "failure")) == 1
            and len(audited(archive, "view.create", "success")) == 1
        ),
        what="the refusal and the change audited",
    )
    assert_books_balance(daemon)


async def test_an_own_event_past_the_string_limit_is_cut_to_fit_and_blocks_no_change(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """An operator's server.max_string_chars below what a refused change's audit event quotes
    (here the 400-character id it names) rejected the event: the refusal went unaudited (one
    error line). It is journaled with its strings cut to fit. And only what the journal could
    not take waits for it: a rejected event, kept, would hold every later change at 503."""
    daemon = await start_daemon(
        {
            "server": {"host": "127.0.0.1", "port": 0, "max_string_chars": 256},
            "auth": api_auth(),
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": everything_to("archive"),
        }
    )
    api = ApiClient(daemon)
    status, answer = await api.call("DELETE", "/api/v2/targets/" + "x" * 400)
    assert status == 404, answer  # its audit event names the 400-character id
    for name in ("first", "second"):
        status, answer = await api.call("POST", "/api/v2/views", {"name": name, "query": "x"})
        assert status == 201, answer
    # The refusal is on the record, its long strings cut to the operator's limit.
    await wait_for(
        lambda: any(
            e["action"] == "event-router.target.delete" and e["outcome"] == "failure"
            for e in read_ndjson(tmp_path / "archive.ndjson")
        ),
        what="the refusal audited",
    )
    assert daemon.status()["own_events"] == {"unrecorded": 0, "lost": 0}
