"""A management API change and its config file: the file is written (staged, then renamed
into place) before the change is applied, so a file that cannot take it changes nothing, and a
change refused when applied leaves the file as it was."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from router.config import parse_config
from router.daemon import Daemon
from router.server.api import ConfigSource
from tests.fakes import read_ndjson, wait_for
from tests.helpers import (
    assert_books_balance,
    everything_to,
    file_target,
    free_port,
    reap,
    serve,
    terminate,
)
from tests.integration.test_api import ADMIN
from tests.integration.test_api import Client as ApiClient
from tests.integration.test_api import auth as api_auth


@pytest.fixture
def bind_mounted() -> Iterator[list[Path]]:
    """Files bind-mounted over themselves (as a container mounts one config file); each is
    unmounted at the end."""
    mounted: list[Path] = []
    yield mounted
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=False)


def bind_mount(path: Path, mounted: list[Path]) -> None:
    """`path` mounted over itself: it can be read and written in place, but not renamed over
    or away (EBUSY), as a config file a container runtime mounts on its own."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the test needs a file bind-mounted over itself")
    done = subprocess.run(
        ["mount", "--bind", str(path), str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        pytest.skip(f"cannot bind-mount a file here (needs root): {done.stderr.strip()}")
    mounted.append(path)


def unmount(path: Path, mounted: list[Path]) -> None:
    subprocess.run(["umount", str(path)], check=True)
    mounted.remove(path)


def operator_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "auth": api_auth(),
        "targets": [file_target("archive", tmp_path / "archive.ndjson")],
        "routes": everything_to("archive"),
    }


def failed_creates(archive: Path) -> list[dict[str, Any]]:
    return [
        e
        for e in read_ndjson(archive)
        if e["action"] == "event-router.target.create" and e["outcome"] == "failure"
    ]


async def test_a_config_file_that_cannot_be_renamed_over_changes_nothing_and_is_audited(
    tmp_path: Path, bind_mounted: list[Path]
) -> None:
    """The write-back's rename failed after the change was applied: a 500, the change live
    but not in the file (gone at the next restart). Now the file is put in place before the
    change is applied: 503 config_not_written naming the file and why, nothing changed, the
    refusal audited, no temp file left behind."""
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "router.yaml"
    data = operator_config(tmp_path)
    text = "# the operator's config\n" + yaml.safe_dump(data)
    path.write_text(text)
    bind_mount(path, bind_mounted)
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        api = ApiClient(daemon)
        new_target = {"target_type": "file", "file_endpoint": {"path": str(tmp_path / "b.ndjson")}}
        status, answer = await api.call("POST", "/api/v2/targets", new_target)
        assert status == 503, answer
        error = answer["errors"][0]
        assert error["code"] == "config_not_written", error
        assert str(path) in error["message"] and "busy" in error["message"], error
        assert [t.id for t in daemon.config.targets] == ["archive"]
        assert list(daemon.targets) == ["archive"]
        assert path.read_text() == text
        assert sorted(p.name for p in etc.iterdir()) == ["router.yaml"]
        await wait_for(
            lambda: len(failed_creates(tmp_path / "archive.ndjson")) == 1,
            what="the refusal audited",
        )
        # Once the file can be replaced, the same request is applied and written.
        unmount(path, bind_mounted)
        status, answer = await api.call("POST", "/api/v2/targets", new_target)
        assert status == 201, answer
        assert answer["id"] in [t["id"] for t in yaml.safe_load(path.read_text())["targets"]]
        assert (etc / "router.yaml.prev").read_text() == text
        assert_books_balance(daemon)
    finally:
        await daemon.stop()


async def test_a_change_refused_as_it_is_applied_leaves_the_config_file_as_it_was(
    tmp_path: Path,
) -> None:
    """The file is in place before the change is applied; a change the apply refuses (here
    the running server section differs from the file's, as `serve --port` makes it, which the
    API must not take for a change) puts the previous file back."""
    path = tmp_path / "router.yaml"
    data = operator_config(tmp_path)
    text = yaml.safe_dump(data)
    path.write_text(text)
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        # What a reload's plan refuses: a section that needs a restart, changed in the data.
        daemon.source.data["shutdown"] = {"drain_timeout_s": 1}
        status, answer = await ApiClient(daemon).call(
            "POST", "/api/v2/views", {"name": "v", "query": "x"}
        )
        assert status == 400, answer
        assert "shutdown" in answer["errors"][0]["message"]
        assert daemon.config.views == ()
        assert path.read_text() == text
        assert not (tmp_path / "router.yaml.tmp").exists()
    finally:
        await daemon.stop()


async def test_api_changes_apply_when_the_command_line_overrides_the_port(tmp_path: Path) -> None:
    """`serve --port P` (or --host) runs a server section that differs from the file's: every
    management API change was refused, "server: changes here need a restart", since the
    edited config was built from the file's data without the command line's overrides."""
    port = free_port()
    path = tmp_path / "router.yaml"
    data = operator_config(tmp_path)
    data["server"]["port"] = free_port()  # not where it listens
    path.write_text(yaml.safe_dump(data))
    proc = await serve(path, port, "--port", str(port))
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/api/v2/views",
                json={"name": "failures", "query": "outcome:failure"},
                headers={"Authorization": f"Bearer {ADMIN}"},
            ) as resp,
        ):
            answer = await resp.json()
            assert resp.status == 201, answer
        written = yaml.safe_load(path.read_text())
        assert [v["name"] for v in written["views"]] == ["failures"]
        assert written["server"]["port"] == data["server"]["port"], "the override stays out"
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


async def test_a_symlinked_config_file_is_written_where_it_points(tmp_path: Path) -> None:
    """/etc/event-router/router.yaml as a link into the operator's checkout: the write-back
    renamed its new file over the link, so the link became a copy, the file the operator
    edits (and versions) never got the change, and their later edits there were no longer
    the daemon's config. The change goes to the file the link points to; the link stays."""
    real = tmp_path / "checkout" / "router.yaml"
    real.parent.mkdir()
    link = tmp_path / "etc" / "router.yaml"
    link.parent.mkdir()
    link.symlink_to(real)
    data = operator_config(tmp_path)
    text = yaml.safe_dump(data)
    real.write_text(text)
    daemon = Daemon(parse_config(data), ConfigSource(link, data))
    await daemon.start()
    try:
        api = ApiClient(daemon)
        status, answer = await api.call("POST", "/api/v2/views", {"name": "v", "query": "x"})
        assert status == 201, answer
        assert link.is_symlink() and link.resolve() == real
        assert [v["name"] for v in yaml.safe_load(real.read_text())["views"]] == ["v"]
        assert (real.parent / "router.yaml.prev").read_text() == text
        assert sorted(p.name for p in link.parent.iterdir()) == ["router.yaml"]
        # The API may not put an archive over the write-back's files where they now are.
        status, answer = await api.call(
            "POST",
            "/api/v2/targets",
            {"target_type": "file", "file_endpoint": {"path": str(real) + ".prev"}},
        )
        assert status == 400, answer
    finally:
        await daemon.stop()
