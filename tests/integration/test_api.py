"""The atracker-compatible management API, with requests shaped as IBM's atracker v2 SDKs send
them, against a real daemon: models, status codes, errors, masking, persistence, audit."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from router.api import ConfigSource
from router.app import Daemon
from router.config import parse_config
from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.integration.test_delivery import (
    ReceiverFactory,
    assert_books_balance,
    everything_to,
    http_target,
    settled,
)
from tests.integration.test_ingest import file_target

ADMIN = "an-admin-token-for-the-api-0001"
INGEST = "an-ingest-token-for-the-api-001"


def auth() -> dict[str, Any]:
    return {
        "admin_tokens": [
            {"name": "ops-alice", "sha256": hashlib.sha256(ADMIN.encode()).hexdigest()}
        ],
        "ingest_tokens": [{"name": "sm", "sha256": hashlib.sha256(INGEST.encode()).hexdigest()}],
    }


class Client:
    """What an SDK does: JSON bodies, a bearer token, atracker's paths."""

    def __init__(self, daemon: Daemon, token: str | None = ADMIN) -> None:
        self.base = f"http://127.0.0.1:{daemon.port}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.base + path, json=body, headers=self.headers) as resp,
        ):
            text = await resp.text()
            return resp.status, (yaml.safe_load(text) if text else None)


@pytest.fixture
async def daemon(start_daemon: StartDaemon, tmp_path: Path) -> Daemon:
    return await start_daemon(
        {
            "auth": auth(),
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )


async def test_targets_routes_and_settings_round_trip(daemon: Daemon, tmp_path: Path) -> None:
    api = Client(daemon)
    status, target = await api.call(
        "POST",
        "/api/v2/targets",
        {
            "name": "us archive",
            "target_type": "file",
            "file_endpoint": {"path": str(tmp_path / "us.ndjson")},
        },
    )
    assert status == 201
    assert uuid.UUID(target["id"]).version == 4
    assert {k: target[k] for k in ("name", "target_type", "api_version", "managed_by")} == {
        "name": "us archive",
        "target_type": "file",
        "api_version": 2,
        "managed_by": "account",
    }
    assert target["crn"].endswith(f":target:{target['id']}")
    assert target["write_status"] == {"status": "success"}
    assert target["created_at"].endswith("Z") and target["updated_at"]
    status, listed = await api.call("GET", "/api/v2/targets")
    assert status == 200 and [t["id"] for t in listed["targets"]] == ["archive", target["id"]]

    status, route = await api.call(
        "POST",
        "/api/v2/routes",
        {"name": "us-route", "rules": [{"locations": ["us-south"], "target_ids": [target["id"]]}]},
    )
    assert status == 201 and route["version"] == 0
    assert route["rules"] == [{"target_ids": [target["id"]], "locations": ["us-south"]}]
    status, replaced = await api.call(
        "PUT",
        f"/api/v2/routes/{route['id']}",
        {
            "name": "us-route",
            "rules": [
                {
                    "locations": ["us-south", "us-east"],
                    "target_ids": [target["id"]],
                    "actions": ["secrets-manager.secret.*"],
                }
            ],
        },
    )
    assert status == 200 and replaced["version"] == 1
    assert replaced["rules"][0]["actions"] == ["secrets-manager.secret.*"]

    await daemon.ingest.accept([make_event(id="us-1", location="us-east")])
    await wait_for(lambda: settled(daemon))
    assert [e["id"] for e in read_ndjson(tmp_path / "us.ndjson")] == ["us-1"]

    status, settings = await api.call(
        "PUT",
        "/api/v2/settings",
        {
            "default_targets": [target["id"]],
            "metadata_region_primary": "us-south",
            "private_api_endpoint_only": False,
            "permitted_target_regions": ["us-south"],
        },
    )
    assert status == 201
    assert settings["default_targets"] == [target["id"]]
    assert settings["metadata_region_primary"] == "us-south" and settings["api_version"] == 2
    assert (await api.call("GET", "/api/v2/settings"))[1] == settings


async def test_a_target_in_use_cannot_be_deleted_and_errors_have_atracker_shape(
    daemon: Daemon,
) -> None:
    api = Client(daemon)
    status, error = await api.call("DELETE", "/api/v2/targets/archive")
    assert status == 409
    assert set(error) == {"trace", "status_code", "errors"}
    assert (
        error["errors"][0]["code"] == "target_in_use"
        and "route 'all'" in error["errors"][0]["message"]
    )
    status, error = await api.call("GET", "/api/v2/targets/nope")
    assert status == 404 and error["errors"][0]["code"] == "not_found"
    status, error = await api.call(
        "POST",
        "/api/v2/routes",
        {"name": "bad", "rules": [{"locations": ["*"], "target_ids": ["ghost"]}]},
    )
    assert status == 400 and error["errors"][0]["code"] == "invalid_value"
    assert (
        "routes[1].rules[0].target_ids[0]: unknown target 'ghost'" in error["errors"][0]["message"]
    )
    assert [r.name for r in daemon.config.routes] == ["all"], "a refused change changes nothing"
    assert (await api.call("DELETE", "/api/v2/routes/all"))[0] == 204
    assert (await api.call("DELETE", "/api/v2/targets/archive"))[0] == 204
    assert daemon.config.targets == ()


async def test_the_api_needs_an_admin_token(daemon: Daemon) -> None:
    assert (await Client(daemon, token=None).call("GET", "/api/v2/targets"))[0] == 401
    assert (await Client(daemon, token=INGEST).call("GET", "/api/v2/targets"))[0] == 403


async def test_credentials_come_back_masked_and_stay_references_in_the_file(
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIEM_TOKEN", "the-real-siem-token")
    siem = await receiver_factory([200])
    path = tmp_path / "router.yaml"
    data = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "auth": auth(),
        "targets": [file_target("archive", tmp_path / "archive.ndjson")],
        "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
    }
    path.write_text(yaml.safe_dump(data))
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        api = Client(daemon)
        status, target = await api.call(
            "POST",
            "/api/v2/targets",
            {
                "name": "siem",
                "target_type": "http",
                "http_endpoint": {
                    "url": siem.url,
                    "auth": {"type": "bearer", "token": "${env:SIEM_TOKEN}"},
                },
            },
        )
        assert status == 201
        assert target["http_endpoint"]["auth"] == {"type": "bearer", "token": "REDACTED"}
        # A client that sends back what it read keeps the secret (REDACTED is not a value).
        status, renamed = await api.call(
            "PUT",
            f"/api/v2/targets/{target['id']}",
            {"name": "siem-2", "http_endpoint": target["http_endpoint"]},
        )
        assert status == 200 and renamed["name"] == "siem-2"
        await api.call(
            "PUT",
            "/api/v2/routes/all",
            {
                "name": "all",
                "rules": [{"locations": ["*"], "target_ids": ["archive", target["id"]]}],
            },
        )
        await daemon.ingest.accept([make_event(id="to-siem")])
        await wait_for(lambda: any(e["id"] == "to-siem" for e in siem.delivered_events))
        assert siem.requests[-1].headers["Authorization"] == "Bearer the-real-siem-token"
        written = path.read_text()
        assert "${env:SIEM_TOKEN}" in written and "the-real-siem-token" not in written
        assert path.with_name("router.yaml.prev").exists()
    finally:
        await daemon.stop()

    # A restart comes back with what the API changed.
    again = Daemon(parse_config(yaml.safe_load(path.read_text())), ConfigSource(path, {}))
    assert [t.name for t in again.config.targets] == ["archive", "siem-2"]
    audit = [
        e
        for e in read_ndjson(tmp_path / "archive.ndjson")
        if e["action"].startswith("event-router.")
    ]
    actions = [e["action"] for e in audit]
    assert actions[:3] == [
        "event-router.target.create",
        "event-router.target.update",
        "event-router.route.update",
    ]
    assert {e["initiator"]["name"] for e in audit[:3]} == {"ops-alice"}
    assert audit[0]["requestData"]["initialValue"] != audit[0]["requestData"]["newValue"]
    assert "the-real-siem-token" not in (tmp_path / "archive.ndjson").read_text()


async def test_validate_refreshes_write_status(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory
) -> None:
    broken = await receiver_factory([500])
    daemon = await start_daemon(
        {
            "auth": auth(),
            "targets": [
                {"id": "siem", "target_type": "http", "http_endpoint": {"url": broken.url}}
            ],
            "routes": [],
        }
    )
    status, target = await Client(daemon).call("POST", "/api/v2/targets/siem/validate")
    assert status == 200
    assert target["write_status"]["status"] == "failed"
    assert "500" in target["write_status"]["reason_for_last_failure"]


async def test_an_api_edit_during_a_sighup_reload_keeps_both_changes(
    receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    down = await receiver_factory([503])
    path = tmp_path / "router.yaml"
    stuck = http_target("down", down.url) | {"retry": {"max_attempts": 100_000, "max_age_s": 3600}}
    data = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "shutdown": {"drain_timeout_s": 2},
        "auth": auth(),
        "targets": [file_target("archive", tmp_path / "archive.ndjson"), stuck],
        "routes": everything_to("archive", "down"),
    }
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o600)
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        await daemon.ingest.accept([make_event(id="held")])
        await wait_for(lambda: len(down.requests) >= 1, what="the stuck target's first attempt")
        # The file gains a target and changes the stuck one, whose worker holds the reload
        # for the drain timeout: the API edit arrives meanwhile.
        changed = stuck | {"retry": {"max_attempts": 100_000, "max_age_s": 3601}}
        extra = file_target("extra", tmp_path / "extra.ndjson")
        path.write_text(yaml.safe_dump(data | {"targets": [data["targets"][0], changed, extra]}))
        reload = asyncio.create_task(daemon.reload_from(path))
        await wait_for(
            lambda: "extra" in {t.id for t in daemon.config.targets},
            what="the reload to be under way",
        )
        assert not reload.done()
        status, _ = await Client(daemon).call(
            "PUT",
            "/api/v2/settings",
            {
                "default_targets": ["archive"],
                "metadata_region_primary": "us-south",
                "private_api_endpoint_only": False,
            },
        )
        assert status == 201
        assert await reload is True
        running = daemon.config
        assert [t.id for t in running.targets] == ["archive", "down", "extra"]
        assert running.settings.default_targets == ("archive",)
        written = yaml.safe_load(path.read_text())
        assert [t["id"] for t in written["targets"]] == ["archive", "down", "extra"]
        assert written["settings"]["default_targets"] == ["archive"]
        assert_books_balance(daemon)
    finally:
        await daemon.stop()
