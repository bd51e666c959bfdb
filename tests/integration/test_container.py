"""The container image, proved without a container engine: the wheel is built from exactly what
the Containerfile's build stage copies and installed into a fresh venv as the runtime stage
does, then the image's ENTRYPOINT + CMD runs (its paths mapped to a temp dir) and its
HEALTHCHECK command is run against it."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "deploy" / "container" / "Containerfile"
STATE = "/var/lib/event-router"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """A Containerfile's instructions, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    result = []
    for line in joined:
        keyword, _, args = line.partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
    return result


def stages(text: str) -> list[list[Instruction]]:
    found: list[list[Instruction]] = []
    for instruction in instructions(text):
        if instruction.keyword == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def only(stage: list[Instruction], keyword: str) -> str:
    matches = [i.args for i in stage if i.keyword == keyword]
    assert matches, f"the runtime stage has no {keyword}"
    return matches[-1]  # as in a real build, the last one counts


def exec_form(args: str) -> list[str]:
    """`["a", "b"]`: the exec form, which the image must use (no shell in between)."""
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


@dataclass(frozen=True)
class Runtime:
    """What the runtime stage would hold: a venv with the wheel installed."""

    wheel: Path
    venv: Path


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    """Build the wheel from a context holding only what the build stage COPYs, and install it
    into a new venv (its dependencies are taken from this environment, to stay offline)."""
    build = stages(CONTAINERFILE.read_text())[-2]
    context = tmp_path_factory.mktemp("context")
    for instruction in build:
        if instruction.keyword != "COPY" or instruction.args.startswith("--from"):
            continue
        *sources, _ = shlex.split(instruction.args)
        for source in sources:
            path = REPO / source
            if path.is_dir():
                shutil.copytree(
                    path, context / source, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(path, context / source)
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), "."],
        cwd=context,
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("event_router-*.whl")
    venv = tmp_path_factory.mktemp("opt") / "event-router"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies (aiohttp, orjson, ...) come from this environment's site-packages; a
    # plain path line does not run this environment's .pth hooks, so its editable install of
    # router stays out and the venv imports the installed wheel.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    return Runtime(wheel=wheel, venv=venv)


@pytest.mark.timeout(300)
def test_wheel_carries_the_schemas_and_the_default_config(runtime: Runtime) -> None:
    names = zipfile.ZipFile(runtime.wheel).namelist()
    data = "event_router-0.1.0.data/data/share/event-router/"
    for relative in (
        "schemas/event.schema.json",
        "schemas/config.schema.json",
        "schemas/catalog.schema.json",
        "schemas/catalog/secrets-manager.json",
        "config/router.yaml",
    ):
        assert data + relative in names, relative
    assert "router/resources.py" in names


@pytest.mark.timeout(300)
def test_installed_wheel_finds_its_schemas_and_default_config(
    runtime: Runtime, tmp_path: Path
) -> None:
    python = runtime.venv / "bin" / "python"
    # Away from the checkout: `python -c` puts the working directory first on sys.path.
    found = subprocess.run(
        [
            str(python),
            "-c",
            "import router, router.resources as r; "
            "print(router.__file__, r.schemas_dir(), r.default_config_path(), sep='\\n')",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.split()
    share = runtime.venv / "share" / "event-router"
    assert found == [
        str(
            runtime.venv
            / "lib"
            / f"python{sys.version_info[0]}.{sys.version_info[1]}"
            / "site-packages"
            / "router"
            / "__init__.py"
        ),
        str(share / "schemas"),
        str(share / "config" / "router.yaml"),
    ]
    check = subprocess.run(
        [str(runtime.venv / "bin" / "event-router"), "check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert "OK (1 target," in check.stdout


async def healthcheck(command: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 15)


@pytest.mark.timeout(300)
async def test_image_entrypoint_serves_on_the_volume_and_passes_its_healthcheck(
    runtime: Runtime, tmp_path: Path
) -> None:
    all_stages = stages(CONTAINERFILE.read_text())
    assert len(all_stages) >= 2, "multi-stage: the runtime stage has no build tools or sources"
    final = all_stages[-1]
    user = only(final, "USER").split(":")[0]
    assert user not in ("", "0", "root"), "the image runs as a non-root user"
    assert STATE in exec_form(only(final, "VOLUME"))
    assert only(final, "WORKDIR") == STATE
    config_copy = [i.args for i in final if i.keyword == "COPY" and "router.yaml" in i.args]
    assert config_copy == ["deploy/container/router.yaml /etc/event-router/router.yaml"]
    shipped = yaml.safe_load((REPO / "deploy/container/router.yaml").read_text())
    assert shipped["server"]["host"] == "0.0.0.0"
    assert shipped["storage"]["path"] == STATE
    assert shipped["auth"]["ingest_tokens"] and shipped["auth"]["admin_tokens"], (
        "a config that listens on the network is not open to everyone"
    )
    assert all(
        t["file_endpoint"]["path"].startswith(STATE + "/")
        for t in shipped["targets"]
        if t["target_type"] == "file"
    ), "every archive lives on the volume"

    # Map the image's paths to a temp dir, its port to a free one, and listen on loopback only.
    port = free_port()
    state = tmp_path / "var-lib-event-router"
    etc = tmp_path / "etc-event-router"
    state.mkdir()
    etc.mkdir()
    mapping = {
        STATE: str(state),
        "/etc/event-router": str(etc),
        ":8080": f":{port}",
        "port: 8080": f"port: {port}",
        "host: 0.0.0.0": "host: 127.0.0.1",
    }

    def mapped(text: str) -> str:
        for image_path, here in mapping.items():
            text = text.replace(image_path, here)
        return text

    (etc / "router.yaml").write_text(mapped((REPO / "deploy/container/router.yaml").read_text()))
    bin_dir = runtime.venv / "bin"
    command = [
        mapped(a) for a in exec_form(only(final, "ENTRYPOINT")) + exec_form(only(final, "CMD"))
    ]
    assert "PATH=/opt/event-router/bin:" in only(final, "ENV")
    command[0] = str(bin_dir / command[0])  # ENV PATH puts the venv's bin first

    health = only(final, "HEALTHCHECK")
    options, _, probe = health.partition("CMD ")
    assert "--interval" in options
    probe_command = [mapped(a) for a in exec_form(probe)]
    probe_command[0] = str(bin_dir / probe_command[0])
    assert await healthcheck(probe_command) != 0, "the healthcheck fails with nothing listening"

    async def healthy() -> bool:
        return await healthcheck(probe_command) == 0

    tokens = {
        "EVENT_ROUTER_INGEST_TOKEN": "ingest-token-for-the-container-test",
        "EVENT_ROUTER_ADMIN_TOKEN": "admin-token-for-the-container-test",
    }
    proc = await asyncio.create_subprocess_exec(*command, cwd=state, env={**os.environ, **tokens})
    try:
        await wait_for(healthy, timeout_s=30, what="the HEALTHCHECK command to pass")
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/v1/events",
                data=orjson.dumps(make_event(id="in-the-container")),
                headers={
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {tokens['EVENT_ROUTER_INGEST_TOKEN']}",
                },
            ) as resp,
        ):
            assert resp.status == 202
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (state / "journal.db").exists(), "the journal lives on the volume"
    assert [e["id"] for e in read_ndjson(state / "events.ndjson")][-1] == "in-the-container"
