"""What `--help` tells a new user: every option explained, with its default, and the exit
codes on every command."""

from __future__ import annotations

import pytest

from router.cli import EXIT_CODES, build_parser, main
from router.completion import commands


def help_of(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*words, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width


def test_serve_help_explains_the_log_options_and_their_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = help_of(capsys, "serve")
    assert "--log-format {json,text} log lines on stderr as JSON objects" in text
    assert "plain text (default: json)" in text
    assert "--log-level {debug,info,warning,error} the least severe level logged" in text
    assert "(default: info)" in text


@pytest.mark.parametrize(
    "path", [c.path for c in commands(build_parser())], ids=lambda p: p or "event-router"
)
def test_every_help_ends_with_the_exit_codes(capsys: pytest.CaptureFixture[str], path: str) -> None:
    text = help_of(capsys, *path.split())
    assert text.endswith(" ".join(EXIT_CODES.split()))


@pytest.mark.parametrize(
    "path", [c.path for c in commands(build_parser())], ids=lambda p: p or "event-router"
)
def test_every_option_has_help_text(path: str) -> None:
    [command] = [c for c in commands(build_parser()) if c.path == path]
    unexplained = [s for strings, text, *_ in command.options if not text for s in strings]
    assert unexplained == []
