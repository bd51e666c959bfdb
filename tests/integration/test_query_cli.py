"""`event-router query`: search archives on disk, rotated and gzip-compressed ones too."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from router.cli import main
from router.query import MAX_NESTING
from tests.fakes import make_event
from tests.helpers import file_target


def ndjson(events: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


def at(hour: int, **fields: Any) -> dict[str, Any]:
    """An event at 2024-05-01 <hour>:00 UTC, in the producer's +0000 spelling."""
    return make_event(eventTime=f"2024-05-01T{hour:02d}:00:00.5+0000", **fields)


def denied(hour: int, event_id: str) -> dict[str, Any]:
    return at(
        hour,
        id=event_id,
        action="secrets-manager.secret.read",
        outcome="failure",
        reason={"reasonCode": 401, "reasonType": "Unauthorized"},
    )


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """`events.ndjson` with its rotations, as the file target leaves them after an operator
    gzipped the oldest: .3.gz (oldest), .2.gz, .1, then the live file. Plus a bystander."""
    d = tmp_path / "var"
    d.mkdir()
    base = d / "events.ndjson"
    (d / "events.ndjson.3.gz").write_bytes(gzip.compress(ndjson([at(1, id="c1"), denied(2, "d2")])))
    (d / "events.ndjson.2.gz").write_bytes(gzip.compress(ndjson([at(3, id="c3")])))
    (d / "events.ndjson.1").write_bytes(ndjson([denied(4, "d4"), at(5, id="c5", location="eu-de")]))
    base.write_bytes(ndjson([at(6, id="c6"), denied(7, "d7")]))
    (d / "events.ndjson.tmp").write_bytes(ndjson([denied(8, "not-an-archive")]))
    return base


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["query", *argv])
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def ids(out: str) -> list[str]:
    return [orjson.loads(line)["id"] for line in out.splitlines()]


def test_query_reads_rotations_and_gzip_oldest_first(
    archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "host:secrets-manager reason.reasonType:Unauthorized", str(archive)
    )
    assert (code, err) == (0, "")
    assert ids(out) == ["d2", "d4", "d7"]


def test_every_event_line_is_printed_as_it_was_archived(
    archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run(capsys, "id:===c5", str(archive))
    assert out.encode() == ndjson([at(5, id="c5", location="eu-de")])


def test_a_directory_stands_for_its_archives(
    archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--` ends the options, so that a query may start with `-`
    code, out, _ = run(capsys, "--", "-outcome:failure", str(archive.parent))
    assert code == 0
    assert ids(out) == ["c1", "c3", "c5", "c6"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--since", "2024-05-01T04:00:00Z"], ["d4", "c5", "c6", "d7"]),
        (["--until", "2024-05-01T04:00:00Z"], ["c1", "d2", "c3"]),
        (
            ["--since", "2024-05-01T02:00:00+00:00", "--until", "2024-05-01T06:00"],
            ["d2", "c3", "d4", "c5"],
        ),
        (["--since", "2024-05-02"], []),
        (["--limit", "2"], ["c1", "d2"]),
        (["--limit", "4", "--since", "2024-05-01T03:00:00Z"], ["c3", "d4", "c5", "c6"]),
    ],
)
def test_time_bounds_and_limit(
    archive: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: list[str]
) -> None:
    code, out, _ = run(capsys, "host:secrets-manager", str(archive), *args)
    assert code == 0
    assert ids(out) == expected


def test_table_format(archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "location:eu-de OR id:==d7", str(archive), "--format", "table")
    lines = out.splitlines()
    assert lines[0].split() == [
        "eventTime",
        "location",
        "action",
        "outcome",
        "code",
        "initiator",
        "target",
    ]
    assert lines[1].split() == [
        "2024-05-01T05:00:00.5+0000",
        "eu-de",
        "secrets-manager.secret.create",
        "success",
        "201",
        "alice@example.com",
        "db-password",
    ]
    assert lines[2].split()[:5] == [
        "2024-05-01T07:00:00.5+0000",
        "us-south",
        "secrets-manager.secret.read",
        "failure",
        "401",
    ]
    assert lines[3] == "(2 events in 4 files)"


def test_the_summary_says_one_event_in_one_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "events.ndjson"
    path.write_bytes(ndjson([at(1, id="only")]))
    code, out, _ = run(capsys, "id:only", str(path), "--format", "table")
    assert code == 0
    assert out.splitlines()[-1] == "(1 event in 1 file)"


@pytest.mark.parametrize(
    ("query", "caret_line"),
    [
        ("host:secrets-manager reason.reasonCode:>=4xx", "  " + " " * 41 + "^"),
        ("(outcome:failure", "  ^"),
        ("outcome:failure AND", "  " + " " * 19 + "^"),
    ],
)
def test_bad_query_exits_2_with_a_caret_under_the_column(
    archive: Path, capsys: pytest.CaptureFixture[str], query: str, caret_line: str
) -> None:
    code, out, err = run(capsys, query, str(archive))
    assert code == 2 and out == ""
    first, echoed, caret = err.splitlines()
    assert first.startswith("bad query: ")
    assert echoed == f"  {query}"
    assert caret == caret_line


def test_a_query_nested_too_deep_exits_2_with_a_caret_under_the_column(
    archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It used to overflow the parser's stack: a traceback and exit 1.
    query = "(" * 10_000 + "outcome:failure" + ")" * 10_000
    code, out, err = run(capsys, query, str(archive))
    assert code == 2 and out == ""
    first, _, caret = err.splitlines()
    assert first == f"bad query: parentheses and NOT nested deeper than {MAX_NESTING} levels"
    assert caret == "  " + " " * MAX_NESTING + "^"


def test_check_refuses_a_route_filter_nested_too_deep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "router.yaml"
    deep = "NOT " * 10_000 + "outcome:failure"
    rule = {"locations": ["*"], "target_ids": ["archive"], "filter": deep}
    config = {
        "targets": [file_target("archive", tmp_path / "archive.ndjson")],
        "routes": [{"name": "all", "rules": [rule]}],
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(SystemExit) as exited:
        main(["check", "--config", str(path)])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    column = 4 * MAX_NESTING + 1
    assert err.splitlines()[1:] == [
        f"  routes[0].rules[0].filter: column {column}: parentheses and NOT nested deeper than "
        f"{MAX_NESTING} levels in ...{'NOT ' * 20!r}..."
    ]


def test_bad_time_exits_2(archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "x", str(archive), "--since", "yesterday")
    assert code == 2
    assert "--since: 'yesterday' is not an ISO 8601 time" in err


def test_progress_bar_counts_bytes_to_the_end(
    archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "id:c1", str(archive), "--progress")
    assert code == 0 and ids(out) == ["c1"]
    total = sum(
        p.stat().st_size for p in archive.parent.glob("events.ndjson*") if "tmp" not in p.name
    )
    assert err.endswith(f"{total / 2**20:.1f} MiB 100%\n")
    assert err.startswith("\r[")


def test_without_a_terminal_there_is_no_progress_bar(
    archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, err = run(capsys, "id:c1", str(archive))
    assert err == ""


def test_lines_that_are_not_json_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "torn.ndjson"
    path.write_bytes(ndjson([at(1, id="a")]) + b'{"action": "x\n' + ndjson([at(2, id="b")]))
    code, out, err = run(capsys, "host:secrets-manager", str(path))
    assert code == 0 and ids(out) == ["a", "b"]
    assert err == f"1 line was not JSON and was skipped: {path}:2\n"


def test_a_path_without_archives_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "x", str(tmp_path / "absent.ndjson"))
    assert code == 1 and out == ""
    assert "no archive files under" in err
