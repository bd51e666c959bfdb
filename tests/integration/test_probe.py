"""Target validation: a real test event at start-up and from `event-router validate-target`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.cli import main
from router.config import parse_config
from router.daemon import Daemon
from router.intake.validation import EventValidator
from router.resources import schemas_dir
from router.selfevent import VALIDATE_ACTION as ACTION
from router.selfevent import validation_event
from router.server.api import ConfigSource
from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import ReceiverFactory, everything_to, file_target, http_target, post


def test_the_test_event_passes_the_routers_own_validation() -> None:
    event = validation_event("siem")
    assert EventValidator(schemas_dir()).validate(event.body) == []
    assert event.action == ACTION and event.body["target"]["name"] == "siem"


async def test_start_up_validation_reports_a_failing_target_and_blocks_nothing(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    broken = await receiver_factory([404])
    archive = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {
            "targets": [http_target("broken", broken.url), file_target("archive", archive)],
            "routes": everything_to("broken", "archive"),
            "startup": {"validate_targets": True},
        }
    )
    assert daemon.ready
    await wait_for(lambda: len(broken.requests) == 1 and len(read_ndjson(archive)) == 1)
    [test_event] = read_ndjson(archive)
    assert test_event["action"] == ACTION
    assert [e["action"] for e in broken.requests[0].body] == [ACTION]
    await wait_for(
        lambda: daemon.status()["targets"]["broken"]["write_status"]["status"] == "failed"
    )
    status = daemon.status()["targets"]
    assert "404" in status["broken"]["write_status"]["reason_for_last_failure"]
    assert status["archive"]["write_status"] == {"status": "success"}
    # A test write is not an accepted event: the books do not count it.
    assert status["archive"]["received"] == 0


async def test_by_default_a_start_writes_no_test_event_into_the_targets(tmp_path: Path) -> None:
    """startup.validate_targets is off unless asked for: an archive holds only what producers
    sent (the probe, when on, goes before the backlog, so it would be the first line)."""
    archive = tmp_path / "archive.ndjson"
    data = {
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": str(tmp_path / "var")},
        "targets": [file_target("archive", archive)],
        "routes": everything_to("archive"),
    }
    daemon = Daemon(parse_config(data), ConfigSource(None, data))
    await daemon.start()
    try:
        assert (await post(daemon, make_event(id="first-real-event")))[0] == 202
        await wait_for(lambda: len(read_ndjson(archive)) >= 1, what="the event in the archive")
        assert [e["id"] for e in read_ndjson(archive)] == ["first-real-event"]
    finally:
        await daemon.stop()


def write_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "storage": {"path": str(tmp_path / "var")},
                "targets": [http_target("siem", url)],
                "routes": everything_to("siem"),
            }
        )
    )
    return path


@pytest.mark.parametrize(("statuses", "code", "word"), [([200], 0, "OK"), ([400], 1, "FAILED")])
async def test_validate_target_command(
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    statuses: list[int],
    code: int,
    word: str,
) -> None:
    import asyncio

    siem = await receiver_factory(statuses)
    config = write_config(tmp_path, siem.url)
    with pytest.raises(SystemExit) as exit_info:
        # main() calls asyncio.run, which cannot nest: run it in a worker thread.
        await asyncio.to_thread(main, ["validate-target", "--config", str(config), "siem"])
    assert exit_info.value.code == code
    out = capsys.readouterr().out
    assert out.startswith(f"{word}: ")
    assert [e["action"] for e in siem.requests[0].body] == [ACTION]
    assert not (tmp_path / "var" / "journal.db").exists(), "validation never touches the journal"
