"""Hot reload: routes and targets change while the daemon runs, and nothing is lost."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from router.app import Daemon
from router.config import parse_config
from router.errors import ConfigError
from tests.conftest import StartDaemon
from tests.fakes import free_port, make_event, read_ndjson, reap, serve, terminate, wait_for
from tests.integration.test_delivery import (
    ReceiverFactory,
    assert_books_balance,
    everything_to,
    http_target,
    settled,
)
from tests.integration.test_ingest import file_target, post
from tests.unit.test_config import alias_bomb


def with_base(daemon: Daemon, data: dict[str, Any]) -> dict[str, Any]:
    """A new config for a running test daemon: same server, storage and shutdown sections."""
    running = daemon.config
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"path": running.storage.path},
        "delivery": {
            "batch": {"max_wait_s": 0.01},
            "retry": {"initial_backoff_s": 0.01, "max_backoff_s": 0.05, "max_attempts": 5},
        },
        "shutdown": {"drain_timeout_s": running.shutdown.drain_timeout_s},
        "startup": {"validate_targets": False},
        **data,
    }


async def test_a_reload_adds_a_target_and_a_route(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    archive, extra = tmp_path / "archive.ndjson", tmp_path / "extra.ndjson"
    daemon = await start_daemon(
        {"targets": [file_target("archive", archive)], "routes": everything_to("archive")}
    )
    await post(daemon, make_event(id="before"))
    plan = await daemon.reload(
        parse_config(
            with_base(
                daemon,
                {
                    "targets": [file_target("archive", archive), file_target("extra", extra)],
                    "routes": everything_to("archive", "extra"),
                },
            )
        )
    )
    assert (plan.added, plan.removed, plan.changed) == (("extra",), (), ())
    assert daemon.ingest_stats.reloads == {"applied": 1}
    await post(daemon, make_event(id="after"))
    await wait_for(lambda: settled(daemon))

    def audit_free(path: Path) -> list[str]:
        return [e["id"] for e in read_ndjson(path) if e["action"] != "event-router.config.reload"]

    assert audit_free(extra) == ["after"]
    assert audit_free(archive) == ["before", "after"]
    reloads = [e for e in read_ndjson(archive) if e["action"] == "event-router.config.reload"]
    assert len(reloads) == 1 and reloads[0]["outcome"] == "success"
    assert reloads[0]["requestData"]["targetsAdded"] == ["extra"]
    assert_books_balance(daemon)


async def test_a_removed_target_with_a_backlog_is_dead_lettered_target_removed(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    down = await receiver_factory([503])
    archive = tmp_path / "archive.ndjson"
    config = {
        "targets": [
            http_target("down", down.url) | {"retry": {"max_attempts": 100_000, "max_age_s": 3600}},
            file_target("archive", archive),
        ],
        "routes": everything_to("down", "archive"),
        "shutdown": {"drain_timeout_s": 0.2},
    }
    daemon = await start_daemon(config)
    await post(daemon, [make_event(id=f"e{i}") for i in range(5)])
    await wait_for(lambda: len(down.requests) >= 1)
    await daemon.reload(
        parse_config(
            with_base(
                daemon,
                {"targets": [file_target("archive", archive)], "routes": everything_to("archive")},
            )
        )
    )
    letters = read_ndjson(tmp_path / "var" / "deadletter" / "down.ndjson")
    assert sorted(letter["event"]["id"] for letter in letters) == [f"e{i}" for i in range(5)]
    assert {letter["reason"] for letter in letters} == {"target_removed"}
    assert "down" not in daemon.status()["targets"]
    await post(daemon, make_event(id="later"))
    await wait_for(lambda: settled(daemon))
    assert "later" in [e["id"] for e in read_ndjson(archive)]


async def test_a_changed_target_keeps_its_backlog(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    old, new = await receiver_factory([503]), await receiver_factory([200])
    daemon = await start_daemon(
        {
            "targets": [
                http_target("siem", old.url)
                | {"retry": {"max_attempts": 100_000, "max_age_s": 3600}}
            ],
            "routes": everything_to("siem"),
            "shutdown": {"drain_timeout_s": 0.2},
        }
    )
    await post(daemon, [make_event(id=f"e{i}") for i in range(3)])
    await wait_for(lambda: len(old.requests) >= 1)
    plan = await daemon.reload(
        parse_config(
            with_base(
                daemon, {"targets": [http_target("siem", new.url)], "routes": everything_to("siem")}
            )
        )
    )
    assert plan.changed == ("siem",)
    await wait_for(lambda: settled(daemon))
    delivered = [
        e["id"] for e in new.delivered_events if e["action"] != "event-router.config.reload"
    ]
    assert delivered == ["e0", "e1", "e2"]
    assert_books_balance(daemon)


async def test_a_reload_that_changes_the_listener_is_refused_and_nothing_changes(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    archive = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {"targets": [file_target("archive", archive)], "routes": everything_to("archive")}
    )
    new = with_base(daemon, {"targets": [], "routes": []})
    new["server"] = {"host": "127.0.0.1", "port": 0, "max_body_bytes": 2048}
    with pytest.raises(ConfigError) as error:
        await daemon.reload(parse_config(new))
    assert error.value.problems == ["server: changes here need a restart"]
    assert daemon.ingest_stats.reloads == {"refused": 1}
    assert [t.id for t in daemon.config.targets] == ["archive"]
    await wait_for(
        lambda: any(e["action"] == "event-router.config.reload" for e in read_ndjson(archive))
    )
    [audit] = [e for e in read_ndjson(archive) if e["action"] == "event-router.config.reload"]
    assert audit["outcome"] == "failure"
    assert "server" in audit["requestData"]["reasonForFailure"]


async def test_reloads_under_load_lose_nothing(start_daemon: StartDaemon, tmp_path: Path) -> None:
    archive, side = tmp_path / "archive.ndjson", tmp_path / "side.ndjson"
    with_side = {
        "targets": [file_target("archive", archive), file_target("side", side)],
        "routes": everything_to("archive", "side"),
    }
    without_side = {
        "targets": [file_target("archive", archive)],
        "routes": everything_to("archive"),
    }
    daemon = await start_daemon(with_side)
    acked: list[str] = []
    stop_at = time.monotonic() + 30

    async def load(worker: int) -> None:
        n = 0
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < stop_at and not done.is_set():
                ids = [f"w{worker}-{n}-{i}" for i in range(10)]
                n += 1
                async with session.post(
                    f"http://127.0.0.1:{daemon.port}/v1/events",
                    data=orjson.dumps([make_event(id=i) for i in ids]),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    assert resp.status == 202
                    acked.extend(ids)

    done = asyncio.Event()
    posters = [asyncio.create_task(load(w), name=f"poster-{w}") for w in range(4)]
    for n in range(6):
        await wait_for(lambda n=n: len(acked) >= 200 * (n + 1))
        await daemon.reload(parse_config(with_base(daemon, without_side if n % 2 else with_side)))
    done.set()
    await asyncio.gather(*posters)
    await wait_for(lambda: settled(daemon), timeout_s=30)
    archived = {e["id"] for e in read_ndjson(archive)}
    assert set(acked) <= archived, f"{len(set(acked) - archived)} acknowledged events lost"
    # Every event routed to `side` was delivered there or dead-lettered when it was removed.
    side_ids = {e["id"] for e in read_ndjson(side)} | {
        letter["event"]["id"]
        for letter in read_ndjson(tmp_path / "var" / "deadletter" / "side.ndjson")
    }
    assert side_ids, "side received events in the periods it was configured"
    assert_books_balance(daemon)


class ConfigFile:
    """A config file for a daemon process: an archive target, optionally an `extra` one."""

    def __init__(self, tmp_path: Path, port: int, **sections: Any) -> None:
        self.path = tmp_path / "router.yaml"
        self.archive, self.extra = tmp_path / "archive.ndjson", tmp_path / "extra.ndjson"
        self.base = {
            "server": {"host": "127.0.0.1", "port": port},
            "storage": {"path": str(tmp_path / "var")},
            "startup": {"validate_targets": False},
            **sections,
        }

    def write(self, *, extra: bool) -> None:
        targets = [file_target("archive", self.archive)]
        if extra:
            targets.append(file_target("extra", self.extra))
        routes = everything_to(*(t["id"] for t in targets))
        self.path.write_text(yaml.safe_dump({**self.base, "targets": targets, "routes": routes}))


async def status_targets(port: int) -> list[str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/v1/status") as resp,
    ):
        return list((await resp.json())["targets"])


async def test_sighup_reloads_the_config_file(tmp_path: Path) -> None:
    port = free_port()
    files = ConfigFile(tmp_path, port)
    files.write(extra=False)
    archive, extra = files.archive, files.extra
    config = files.path
    proc = await serve(config, port)
    try:
        files.write(extra=True)
        proc.send_signal(signal.SIGHUP)

        async def extra_routed() -> bool:
            return "extra" in await status_targets(port)

        await wait_for(extra_routed, what="the reload to take effect")
        config.write_text("targets: [oops")  # a broken file: the running config stays
        proc.send_signal(signal.SIGHUP)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{port}/v1/events", json=make_event(id="x")) as resp,
        ):
            assert resp.status == 202
        await wait_for(lambda: "x" in [e["id"] for e in read_ndjson(extra)])
        await wait_for(
            lambda: (
                sum(e["action"] == "event-router.config.reload" for e in read_ndjson(archive)) == 2
            )
        )
        outcomes = [
            e["outcome"]
            for e in read_ndjson(archive)
            if e["action"] == "event-router.config.reload"
        ]
        assert outcomes == ["success", "failure"]
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


async def test_reload_watch_applies_a_changed_file(tmp_path: Path) -> None:
    port = free_port()
    files = ConfigFile(tmp_path, port, reload={"watch": True, "watch_interval_s": 0.05})
    files.write(extra=False)
    proc = await serve(files.path, port)
    try:
        files.write(extra=True)

        async def has_extra() -> bool:
            return "extra" in await status_targets(port)

        await wait_for(has_extra, what="the watched change to be applied")
        assert await terminate(proc) == 0
    finally:
        await reap(proc)


async def test_a_reload_of_a_readable_file_with_a_secret_literal_is_refused(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {
            "targets": [file_target("archive", tmp_path / "a.ndjson")],
            "routes": everything_to("archive"),
        }
    )
    path = tmp_path / "router.yaml"
    data = with_base(
        daemon,
        {
            "targets": [
                file_target("archive", tmp_path / "a.ndjson"),
                http_target(
                    "siem",
                    "https://siem.example/in",
                    auth={"type": "bearer", "token": "a-literal-token"},
                ),
            ],
            "routes": everything_to("archive"),
        },
    )
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o644)
    assert await daemon.reload_from(path) is False
    assert [t.id for t in daemon.config.targets] == ["archive"]
    path.chmod(0o600)
    assert await daemon.reload_from(path) is True
    assert [t.id for t in daemon.config.targets] == ["archive", "siem"]


async def test_a_reload_of_a_yaml_alias_bomb_is_refused_at_once(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {
            "targets": [file_target("archive", tmp_path / "a.ndjson")],
            "routes": everything_to("archive"),
        }
    )
    path = tmp_path / "router.yaml"
    path.write_text(alias_bomb(), encoding="utf-8")
    # Held the event loop (ingest, health checks) for minutes before the loader counted.
    assert await asyncio.wait_for(daemon.reload_from(path), timeout=5) is False
    assert [t.id for t in daemon.config.targets] == ["archive"]
    assert daemon.ingest_stats.reloads == {"refused": 1}
