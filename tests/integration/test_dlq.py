"""Dead letters an operator can list, show and redrive, for one target only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from router.cli import main
from tests.conftest import StartDaemon
from tests.fakes import ScriptedReceiver, incompressible, make_event, read_ndjson, wait_for
from tests.helpers import (
    assert_books_balance,
    file_target,
    http_target,
    patient,
    post,
    run_cli,
    settled,
)

ReceiverFactory = Callable[..., Awaitable[ScriptedReceiver]]


async def test_redrive_sends_dead_letters_again_to_their_target_only(
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    siem = await receiver_factory([400, 400, 500])
    archive = tmp_path / "archive.ndjson"
    config = {
        "targets": [
            http_target("siem", siem.url)
            | {"retry": {"max_attempts": 1}, "batch": {"max_events": 2}},
            file_target("archive", archive),
        ],
        "routes": [
            {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["siem", "archive"]}]}
        ],
    }
    daemon = await start_daemon(config)
    await post(daemon, [make_event(id=f"e{i}") for i in range(6)])
    await wait_for(lambda: settled(daemon))
    letters = read_ndjson(tmp_path / "var" / "deadletter" / "siem.ndjson")
    assert [letter["reason"] for letter in letters] == ["permanent_status"] * 4 + [
        "retries_exhausted"
    ] * 2

    # list and show read the files; the daemon need not be asked.
    config_file = tmp_path / "router.yaml"
    config_file.write_text(yaml.safe_dump({**config, "storage": {"path": str(tmp_path / "var")}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["dlq", "list", "--config", str(config_file)])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    assert (
        "siem" in listing and "permanent_status=4" in listing and "retries_exhausted=2" in listing
    )
    with pytest.raises(SystemExit):
        main(
            [
                "dlq",
                "show",
                "--config",
                str(config_file),
                "--target",
                "siem",
                "--reason",
                "retries_exhausted",
                "--format",
                "ndjson",
            ]
        )
    shown = [yaml.safe_load(line) for line in capsys.readouterr().out.splitlines()]
    assert [letter["event"]["id"] for letter in shown] == ["e4", "e5"]

    # Redrive only the permanent failures, through the real CLI against the running daemon.
    siem.statuses = [200]
    before = len(siem.requests)
    code, _, err = await run_cli(
        "dlq",
        "redrive",
        "--config",
        str(config_file),
        "--target",
        "siem",
        "--reason",
        "permanent_status",
        "--url",
        f"http://127.0.0.1:{daemon.port}",
    )
    assert code == 0, err
    assert "4/4" in err and "redrove 4 dead letters" in err
    await wait_for(lambda: settled(daemon))
    redelivered = [e["id"] for r in siem.requests[before:] for e in r.body]
    assert redelivered == ["e0", "e1", "e2", "e3"]
    assert len(read_ndjson(archive)) == 6, "the other target gets nothing again"
    remaining = read_ndjson(tmp_path / "var" / "deadletter" / "siem.ndjson")
    assert [letter["event"]["id"] for letter in remaining] == ["e4", "e5"]
    row = daemon.status()["targets"]["siem"]
    assert (row["received"], row["delivered"], row["dead_lettered"]) == (10, 4, 6)
    assert_books_balance(daemon)


async def test_redrive_of_an_unknown_target_is_refused(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {"targets": [file_target("archive", tmp_path / "a.ndjson")], "routes": []}
    )
    code, _, err = await run_cli(
        "dlq", "redrive", "--target", "nope", "--url", f"http://127.0.0.1:{daemon.port}"
    )
    assert code == 2, "an unknown target is a usage error, as for dlq show and validate-target"
    assert "404" in err and "no target 'nope'" in err


async def test_a_redrive_the_journal_cannot_take_stops_with_the_reason_and_loses_no_letter(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    """With the journal at storage.max_bytes, a redrive's append is refused: the answer (200,
    already streaming) was cut off mid-stream with a traceback in the log, and the CLI said it
    could not reach the daemon. Now the stream ends with a line naming the reason, the CLI
    says it, and every letter stays in the file."""
    siem = await receiver_factory([400])
    slow = await receiver_factory([503])
    daemon = await start_daemon(
        {
            "storage": {"path": str(tmp_path / "var"), "max_bytes": 512 * 1024},
            "targets": [
                http_target("siem", siem.url) | {"retry": {"max_attempts": 1}},
                patient(http_target("slow", slow.url)),
            ],
            "routes": [
                {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["siem"]}]},
                {"name": "east", "rules": [{"locations": ["us-east"], "target_ids": ["slow"]}]},
            ],
        }
    )
    await post(daemon, [make_event(id=f"d{i}") for i in range(20)])
    await wait_for(lambda: daemon.status()["targets"]["siem"]["dead_lettered"] == 20)
    for n in range(100):  # the slow target's backlog fills the journal (packed frames: bytes
        # deflate hardly shrinks)
        padded = [{"pad": incompressible(2000)} for _ in range(20)]
        events = [
            make_event(id=f"f{n}-{i}", location="us-east", requestData=padded[i]) for i in range(20)
        ]
        status, _ = await post(daemon, events)
        if status == 503:
            break
    assert status == 503
    await wait_for(lambda: daemon.status()["targets"]["siem"]["pending"] == 0)
    letters = tmp_path / "var" / "deadletter" / "siem.ndjson"
    before = read_ndjson(letters)
    assert len(before) == daemon.status()["targets"]["siem"]["dead_lettered"]

    url = f"http://127.0.0.1:{daemon.port}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/deadletters/siem/redrive") as resp,
    ):
        assert resp.status == 200
        lines = [orjson.loads(line) for line in (await resp.read()).splitlines()]
    assert lines[-1]["error"]["code"] == "journal_full", lines
    assert "storage.max_bytes" in lines[-1]["error"]["message"]
    code, _, err = await run_cli("dlq", "redrive", "--target", "siem", "--url", url)
    assert code == 1, err
    assert "redrive stopped after 0 of" in err and "storage.max_bytes" in err, err
    assert read_ndjson(letters) == before
    assert daemon.ready
    assert_books_balance(daemon)
