"""The example configs pass `check` once the variables they document are exported, exactly
as each example's header says to; without them, each missing variable is named once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))
ENV_EXAMPLE = ROOT / "config" / "examples" / ".env.example"


def referenced(path: Path) -> set[str]:
    return set(re.findall(r"\$\{env:([^}]+)\}", path.read_text(encoding="utf-8")))


def documented_commands(path: Path) -> str:
    """The indented comment lines after "Check it with" in the example's header."""
    header = path.read_text(encoding="utf-8").split("\n\n")[0].splitlines()
    start = next(i for i, line in enumerate(header) if "Check it with" in line)
    lines = []
    for line in header[start + 1 :]:
        if not line.startswith("#   "):
            break
        lines.append(line.removeprefix("#   "))
    assert lines, f"{path.name} does not say how to check it"
    return "\n".join(lines)


def clean_env() -> dict[str, str]:
    """This environment without any variable an example references, and with the venv's
    event-router first on PATH, as after `make run` and `. .venv/bin/activate`."""
    names = set().union(*(referenced(p) for p in EXAMPLES))
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def bash(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_env_example_has_every_variable_the_examples_reference() -> None:
    names = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert names == set().union(*(referenced(p) for p in EXAMPLES))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_passes_check_after_the_exports_its_header_documents(path: Path) -> None:
    done = bash(documented_commands(path))
    assert done.returncode == 0, done.stderr
    assert f"config/examples/{path.name}: OK (" in done.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_without_the_exports_each_missing_variable_is_reported_once(path: Path) -> None:
    done = bash(f"event-router check --config config/examples/{path.name}")
    assert done.returncode == 2
    problems = done.stderr.splitlines()[1:]
    assert len(problems) == len(referenced(path)), done.stderr
    for name in referenced(path):
        assert sum(f"environment variable '{name}' is not set" in p for p in problems) == 1
