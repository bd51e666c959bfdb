"""`event-router completion bash|zsh`: scripts written from the parser, run in real shells."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from router.cli import build_parser
from router.completion import commands


def completion_script(shell: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "router", "completion", shell],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "event-router.bash"
    path.write_text(completion_script("bash"), encoding="utf-8")
    return path


def complete(script: Path, line: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for `line` (the cursor at its end), as `complete -F` would ask."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    program = "\n".join(
        [
            f"source {shlex.quote(str(script))}",
            f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})",
            f"COMP_CWORD={len(words) - 1}",
            f"COMP_LINE={shlex.quote(line)}",
            f"COMP_POINT={len(line)}",
            '"$(complete -p event-router | sed -E "s/.*-F ([^ ]+) .*/\\1/")"',
            'printf "%s\\n" "${COMPREPLY[@]}"',
        ]
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return [word for word in done.stdout.splitlines() if word]


def test_the_bash_script_is_valid_bash(bash_script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(bash_script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_bash_completes_every_command_of_the_parser(bash_script: Path) -> None:
    top = commands(build_parser())[0]
    offered = complete(bash_script, "event-router ")
    assert set(top.subcommands) <= set(offered)
    assert {"serve", "check", "validate-target", "dlq", "query", "tail", "completion"} <= set(
        offered
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("event-router se", ["serve"]),
        ("event-router dl", ["dlq"]),
        ("event-router dlq ", ["list", "show", "redrive", "-h", "--help"]),
        ("event-router dlq re", ["redrive"]),
        ("event-router dlq show --fo", ["--format"]),
        ("event-router dlq show --format ", ["ndjson", "table"]),
        ("event-router dlq show --target x --format t", ["table"]),
        ("event-router serve --log-level w", ["warning"]),
        ("event-router serve --log-", ["--log-format", "--log-level"]),
        ("event-router completion ", ["-h", "--help", "bash", "zsh"]),
        ("event-router tail --limit ", []),
    ],
)
def test_bash_completes_sub_commands_options_and_choices(
    bash_script: Path, line: str, expected: list[str]
) -> None:
    assert complete(bash_script, line) == expected


def test_bash_completes_files_where_a_path_goes(bash_script: Path, tmp_path: Path) -> None:
    (tmp_path / "events.ndjson").write_text("")
    (tmp_path / "router.yaml").write_text("")
    assert complete(bash_script, "event-router query x ev", cwd=tmp_path) == ["events.ndjson"]
    assert complete(bash_script, "event-router check --config ro", cwd=tmp_path) == ["router.yaml"]


zsh = shutil.which("zsh")


@pytest.mark.skipif(zsh is None, reason="zsh is not installed (.ci/run installs it)")
def test_the_zsh_script_is_valid_and_registers_its_function(tmp_path: Path) -> None:
    assert zsh is not None
    path = tmp_path / "_event-router"
    path.write_text(completion_script("zsh"), encoding="utf-8")
    checked = subprocess.run([zsh, "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    loaded = subprocess.run(
        [
            zsh,
            "-f",
            "-c",
            f"autoload -U compinit && compinit -u -d {tmp_path}/zcompdump && "
            f"source {shlex.quote(str(path))} && print -r -- $_comps[event-router] && "
            "whence -w _event_router_dlq_redrive",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.splitlines() == [
        "_event_router",
        "_event_router_dlq_redrive: function",
    ]


# An interactive zsh on a pseudo-terminal: type the line and a Tab, then read what zsh lists
# until it holds the expected pattern (zpty -r -m waits for it; the process timeout is the
# deadline).
ZSH_TYPE_TAB = r"""
zmodload zsh/zpty
zpty z 'zsh -f -i'
zpty -w z "PS1='PROMPT> '; autoload -U compinit; compinit -u -d $1/dump; source $2; echo LOADED"
zpty -r -m z out '*LOADED*'
zpty -r -m z out '*PROMPT> *'
zpty -w -n z "$3"$'\t'
zpty -r -m z out "$4"
print -r -- "$out"
zpty -d z
"""


@pytest.mark.skipif(zsh is None, reason="zsh is not installed (.ci/run installs it)")
@pytest.mark.parametrize(
    ("line", "listed"),
    [
        ("event-router dlq ", "*list*-- letters per target*redrive*--*show*-- print a target*"),
        ("event-router serve --log-level ", "*debug*error*info*warning*"),
        ("event-router dlq show --for", "*--format*"),
    ],
)
def test_zsh_completes_sub_commands_and_choices(tmp_path: Path, line: str, listed: str) -> None:
    assert zsh is not None
    path = tmp_path / "_event-router"
    path.write_text(completion_script("zsh"), encoding="utf-8")
    typed = subprocess.run(
        [zsh, "-f", "-c", ZSH_TYPE_TAB, "zsh", str(tmp_path), str(path), line, listed],
        capture_output=True,
        timeout=30,
    )
    assert typed.returncode == 0, typed.stderr
