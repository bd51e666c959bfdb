"""The atracker-compatible management API, with requests shaped as IBM's atracker v2 SDKs send
them, against a real daemon: models, status codes, errors, masking, persistence, audit."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from router.config import parse_config
from router.daemon import Daemon
from router.evidence.keys import generate
from router.server.api import ConfigSource
from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import (
    ReceiverFactory,
    assert_books_balance,
    everything_to,
    file_target,
    http_target,
    settled,
)

ADMIN = "an-admin-token-for-the-api-0001"
INGEST = "an-ingest-token-for-the-api-001"


def auth() -> dict[str, Any]:
    return {
        "admin_tokens": [
            {"name": "ops-alice", "sha256": hashlib.sha256(ADMIN.encode()).hexdigest()}
        ],
        "ingest_tokens": [{"name": "sm", "sha256": hashlib.sha256(INGEST.encode()).hexdigest()}],
    }


def loopback_auth() -> dict[str, Any]:
    """auth() for tests whose API-made targets are loopback receivers standing in for remote
    services: the operator lets the API point targets at loopback (auth.api_target_networks);
    by default it may not."""
    return {**auth(), "api_target_networks": ["127.0.0.0/8"]}


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

    await daemon.acceptor.accept([make_event(id="us-1", location="us-east")])
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


async def test_the_api_creates_no_more_targets_or_routes_than_the_server_limit(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Each target starts a delivery worker with its own connections and each route is planned
    for every event: an admin token may not add them without end. Past server.max_targets
    (atracker's 16 by default, with its code `target_limit_reached`) and server.max_routes
    (atracker's 30), a 400 names the setting, counting the operator's own; a delete makes room."""
    daemon = await start_daemon(
        {
            "auth": auth(),
            "server": {"max_targets": 2, "max_routes": 2},
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": everything_to("archive"),
        }
    )
    api = Client(daemon)

    def target(name: str) -> dict[str, Any]:
        path = str(tmp_path / f"{name}.ndjson")
        return {"name": name, "target_type": "file", "file_endpoint": {"path": path}}

    status, made = await api.call("POST", "/api/v2/targets", target("second"))
    assert status == 201, made
    status, answer = await api.call("POST", "/api/v2/targets", target("third"))
    assert status == 400, answer
    [error] = answer["errors"]
    assert error["code"] == "target_limit_reached", error
    assert "server.max_targets (2)" in error["message"], error
    assert [t.id for t in daemon.config.targets] == ["archive", made["id"]]

    def route(name: str) -> dict[str, Any]:
        return {"name": name, "rules": [{"locations": ["us-south"], "target_ids": [made["id"]]}]}

    status, kept = await api.call("POST", "/api/v2/routes", route("r2"))
    assert status == 201, kept
    status, answer = await api.call("POST", "/api/v2/routes", route("r3"))
    assert status == 400, answer
    [error] = answer["errors"]
    assert error["code"] == "limit_reached" and "server.max_routes (2)" in error["message"], error
    assert len(daemon.config.routes) == 2
    assert (await api.call("DELETE", f"/api/v2/routes/{kept['id']}"))[0] == 204
    assert (await api.call("POST", "/api/v2/routes", route("r3")))[0] == 201


async def test_the_api_refuses_a_route_past_atrackers_limits_per_route(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """atracker's limits per route: 1 to 10 rules, at most 8 locations and 3 target_ids per
    rule (server.max_rules_per_route, max_locations_per_rule, max_target_ids_per_rule).
    Routing plans every rule and location for every event, so an admin token may not make a
    route of thousands; past a limit, create and replace are `400 invalid_value` in atracker's
    words, naming the field and the limit, and nothing changes. The YAML is not bounded by
    them: its own route of 12 rules loads (the limits bound the API, not the operator's
    file)."""
    ids = ["a", "b", "c", "d"]
    regions = ["us-south", "us-east", "eu-de", "eu-gb", "eu-es", "jp-tok", "jp-osa", "au-syd"]
    daemon = await start_daemon(
        {
            "auth": auth(),
            "targets": [file_target(i, tmp_path / f"{i}.ndjson") for i in ids],
            "routes": [
                {"name": "operators", "rules": [{"locations": ["*"], "target_ids": ids}] * 12}
            ],
        }
    )
    api = Client(daemon)

    def route(rules: int = 1, locations: int = 1, targets: int = 1) -> dict[str, Any]:
        rule = {"locations": [*regions, "ca-tor"][:locations], "target_ids": ids[:targets]}
        return {"name": "team", "rules": [rule] * rules}

    status, kept = await api.call("POST", "/api/v2/routes", route(10, 8, 3))
    assert status == 201, kept  # each limit itself is allowed
    path = f"/api/v2/routes/{kept['id']}"
    refused = {
        "rules per route limit 10 is reached": route(rules=11),
        "rules[0].locations: locations per rule limit 8 is reached": route(locations=9),
        "rules[0].target_ids: target_ids per rule limit 3 is reached": route(targets=4),
        "rules: [] should be non-empty": route(rules=0),  # the schema's, for the YAML too
    }
    for message, body in refused.items():
        for method, where in (("POST", "/api/v2/routes"), ("PUT", path)):
            status, answer = await api.call(method, where, body)
            assert status == 400, (method, message, answer)
            [error] = answer["errors"]
            assert error["code"] == "invalid_value", error
            assert error["message"].startswith(message), (method, error)
    assert [len(r.rules) for r in daemon.config.routes] == [12, 10], "nothing changed"
    assert (await api.call("GET", path))[1]["version"] == 0


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
    # named as the caller sent it: the route's own rules, not its place in the config
    assert error["errors"][0]["message"] == "rules[0].target_ids[0]: unknown target 'ghost'"
    assert [r.name for r in daemon.config.routes] == ["all"], "a refused change changes nothing"
    assert (await api.call("DELETE", "/api/v2/routes/all"))[0] == 204
    assert (await api.call("DELETE", "/api/v2/targets/archive"))[0] == 204
    assert daemon.config.targets == ()


async def test_the_api_needs_an_admin_token(daemon: Daemon) -> None:
    assert (await Client(daemon, token=None).call("GET", "/api/v2/targets"))[0] == 401
    assert (await Client(daemon, token=INGEST).call("GET", "/api/v2/targets"))[0] == 403


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_a_compressed_api_body_is_refused_naming_the_content_encoding(
    daemon: Daemon, encoding: str
) -> None:
    """The management API reads its bodies as they come: a gzip body was answered 400 'the
    input parameters ... are in the wrong format: ... at line 1 column 1', as if the JSON were
    broken. It is a 415 that names the Content-Encoding."""
    body = gzip.compress(orjson.dumps({"name": "v", "query": "x"}))
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(
            f"http://127.0.0.1:{daemon.port}/api/v2/views",
            data=body,
            headers={
                "Authorization": f"Bearer {ADMIN}",
                "Content-Type": "application/json",
                "Content-Encoding": encoding,
            },
        ) as resp,
    ):
        assert resp.status == 415
        error = (await resp.json())["errors"][0]
    assert error["code"] == "unsupported_media_type"
    assert f"Content-Encoding {encoding!r}" in error["message"]
    assert daemon.config.views == ()


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
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "auth": auth(),
        "targets": [
            file_target("archive", tmp_path / "archive.ndjson"),
            # The operator's reference, in the operator's file (the API refuses references).
            {
                "id": "siem",
                "target_type": "http",
                "http_endpoint": {
                    "url": siem.url,
                    "auth": {"type": "bearer", "token": "${env:SIEM_TOKEN}"},
                },
            },
        ],
        "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
    }
    path.write_text(yaml.safe_dump(data))
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        api = Client(daemon)
        status, _ = await api.call(
            "POST",
            "/api/v2/targets",
            {"target_type": "file", "file_endpoint": {"path": str(tmp_path / "extra.ndjson")}},
        )
        assert status == 201
        status, target = await api.call("GET", "/api/v2/targets/siem")
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
        await daemon.acceptor.accept([make_event(id="to-siem")])
        await wait_for(lambda: any(e["id"] == "to-siem" for e in siem.delivered_events))
        assert siem.requests[-1].headers["Authorization"] == "Bearer the-real-siem-token"
        written = path.read_text()
        assert "${env:SIEM_TOKEN}" in written and "the-real-siem-token" not in written
        assert path.with_name("router.yaml.prev").exists()
    finally:
        await daemon.stop()

    # A restart comes back with what the API changed.
    again = Daemon(parse_config(yaml.safe_load(path.read_text())), ConfigSource(path, {}))
    assert [t.name for t in again.config.targets] == [
        "archive",
        "siem-2",
        again.config.targets[2].id,
    ]
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
    gone = stuck | {"id": "gone"}
    data = {
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "shutdown": {"drain_timeout_s": 2},
        "auth": auth(),
        "targets": [file_target("archive", tmp_path / "archive.ndjson"), stuck, gone],
        "routes": everything_to("archive", "down", "gone"),
    }
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o600)
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        await daemon.acceptor.accept([make_event(id="held")])
        await wait_for(lambda: len(down.requests) >= 2, what="the stuck targets' first attempts")
        # The file gains a target, changes a stuck one and removes the other, whose worker
        # holds the reload for the drain timeout: the API edit arrives meanwhile.
        changed = stuck | {"retry": {"max_attempts": 100_000, "max_age_s": 3601}}
        extra = file_target("extra", tmp_path / "extra.ndjson")
        path.write_text(
            yaml.safe_dump(
                data
                | {
                    "targets": [data["targets"][0], changed, extra],
                    "routes": everything_to("archive", "down"),
                }
            )
        )
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


async def test_secrets_in_target_urls_and_headers_reach_no_log_status_letter_or_answer(
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "password").write_text("SUPERSECRET-password\n")
    siem = await receiver_factory([400])
    host = siem.url.split("://", 1)[1]
    url = f"http://svc:${{file:{tmp_path / 'password'}}}@{host}?token=QUERY-SECRET&tenant=a"
    daemon = await start_daemon(
        {
            "auth": auth(),
            "targets": [
                {
                    "id": "siem",
                    "target_type": "http",
                    "http_endpoint": {
                        "url": url,
                        "headers": {"X-Api-Key": "HEADER-SECRET", "X-Tenant": "audit"},
                    },
                }
            ],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["siem"]}]}],
        }
    )
    secrets = ("SUPERSECRET-password", "QUERY-SECRET", "HEADER-SECRET")
    await daemon.acceptor.accept([make_event(id="to-siem")])
    await wait_for(lambda: settled(daemon))
    assert siem.requests[0].headers["X-Api-Key"] == "HEADER-SECRET"
    books = daemon.status()["targets"]["siem"]
    assert books["received"] == books["delivered"] + books["dead_lettered"] + books["pending"]
    assert books["dead_lettered"] == 1
    failure = books["write_status"]["reason_for_last_failure"]
    assert "svc:REDACTED@" in failure and "token=REDACTED" in failure
    letters = (tmp_path / "var" / "deadletter" / "siem.ndjson").read_text()
    shown = [failure, letters, caplog.text]
    api = Client(daemon)
    status, target = await api.call("GET", "/api/v2/targets/siem")
    assert status == 200
    endpoint = target["http_endpoint"]
    assert endpoint["headers"] == {"X-Api-Key": "REDACTED", "X-Tenant": "audit"}
    assert endpoint["url"].startswith("http://svc:REDACTED@")
    shown.append(str(target))
    for text in shown:
        assert not any(secret in text for secret in secrets), text
    # What was read back and sent again keeps the real URL and header.
    status, _ = await api.call("PUT", "/api/v2/targets/siem", {"http_endpoint": endpoint})
    assert status == 200
    kept = daemon.config.target("siem").endpoint
    assert "SUPERSECRET-password" in kept.url  # type: ignore[union-attr]
    assert kept.headers["X-Api-Key"] == "HEADER-SECRET"  # type: ignore[union-attr]


async def test_a_refused_admin_action_is_recorded_even_when_it_quotes_a_huge_value(
    daemon: Daemon, tmp_path: Path
) -> None:
    status, error = await Client(daemon).call(
        "POST",
        "/api/v2/targets",
        {
            "name": "n" * 100_000,
            "target_type": "file",
            "file_endpoint": {"path": str(tmp_path / "huge.ndjson")},
        },
    )
    assert status == 400 and error["errors"][0]["code"] == "invalid_value"
    assert daemon.config.targets == daemon.config.targets[:1]

    def refused() -> list[dict[str, Any]]:
        return [
            e
            for e in read_ndjson(tmp_path / "archive.ndjson")
            if e["action"] == "event-router.target.create"
        ]

    await wait_for(lambda: len(refused()) == 1, what="the refused create's audit event")
    event = refused()[0]
    assert event["outcome"] == "failure" and event["initiator"]["name"] == "ops-alice"
    failure = event["requestData"]["reasonForFailure"]
    assert "does not match" in failure and len(failure) < 5000


async def test_a_refused_admin_action_is_recorded_whatever_characters_its_url_holds(
    daemon: Daemon, tmp_path: Path
) -> None:
    """The id from the URL is quoted in the audit event's target CRN: a line break in it (which
    a CRN cannot hold) had the event rejected, so the refusal went unrecorded."""
    api = Client(daemon)
    ids = ["archive%0AX-Injected:1", "a%0Ab%0Dc", "%E2%80%A8x%0A%0A"]
    for target_id in ids:
        assert (await api.call("DELETE", f"/api/v2/targets/{target_id}"))[0] == 404
        assert (await api.call("PUT", f"/api/v2/views/{target_id}", {"name": "v"}))[0] == 404

    def refused() -> list[dict[str, Any]]:
        return [
            e
            for e in read_ndjson(tmp_path / "archive.ndjson")
            if e["action"] in ("event-router.target.delete", "event-router.view.update")
        ]

    await wait_for(lambda: len(refused()) == 2 * len(ids), what="every refusal audited")
    assert {e["target"]["name"] for e in refused()} == {
        "archive\nX-Injected:1",
        "a\nb\rc",
        "\u2028x\n\n",
    }
    # The CRN quotes them escaped, so it stays one line of the CRN's pattern.
    assert not any("\n" in e["target"]["id"] for e in refused())


async def test_a_refused_change_changes_nothing_version_included(daemon: Daemon) -> None:
    api = Client(daemon)
    before = (await api.call("GET", "/api/v2/settings"))[1]
    status, _ = await api.call(
        "PUT",
        "/api/v2/settings",
        {
            "default_targets": ["ghost"],
            "metadata_region_primary": "eu-de",
            "private_api_endpoint_only": True,
        },
    )
    assert status == 400
    assert (await api.call("GET", "/api/v2/settings"))[1] == before
    status, route = await api.call(
        "POST", "/api/v2/routes", {"name": "r", "rules": [{"target_ids": ["archive"]}]}
    )
    assert status == 201 and route["version"] == 0
    for _ in range(2):
        status, _ = await api.call(
            "PUT", f"/api/v2/routes/{route['id']}", {"name": "r", "rules": [{"target_ids": ["x"]}]}
        )
        assert status == 400
    assert (await api.call("GET", f"/api/v2/routes/{route['id']}"))[1] == route
    # Each refusal is on the record, whatever refused it (here a 404 too).
    assert (await api.call("DELETE", "/api/v2/routes/nope"))[0] == 404
    expected = ["setting.update", "route.update", "route.update", "route.delete"]

    def failures() -> list[str]:
        return [
            e["action"].removeprefix("event-router.")
            for e in read_ndjson(Path(daemon.config.target("archive").endpoint.path))  # type: ignore[union-attr]
            if e["action"].startswith("event-router.") and e["outcome"] == "failure"
        ]

    await wait_for(lambda: failures() == expected, what="four refusals audited")


async def test_file_targets_from_the_api_stay_under_the_archive_roots(
    daemon: Daemon, tmp_path: Path
) -> None:
    """The root is the directory of the YAML's own file target (tmp_path)."""
    api = Client(daemon)
    (tmp_path / "escape").symlink_to("/etc")
    (tmp_path / "var" / "deadletter").mkdir(parents=True, exist_ok=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused = {
        "../../../../../../x.ndjson": "outside the archive roots",
        "~/.ssh/authorized_keys": "outside the archive roots",
        str(tmp_path / "escape" / "x.ndjson"): "outside the archive roots",
        "/dev/null": "a device, FIFO or socket",
        "/proc/self/mem": "outside the archive roots",
        "/tmp": "a directory",
        str(tmp_path): "a directory",
        str(fifo): "a device, FIFO or socket",
        str(tmp_path / "a\x00b.ndjson"): "a NUL byte",
        str(tmp_path / "var" / "journal.db"): "the journal's own files",
        str(tmp_path / "var" / "deadletter" / "x.ndjson"): "the dead-letter directory",
        str(tmp_path / "archive.ndjson"): "already writes",
    }
    for path, why in refused.items():
        status, error = await api.call(
            "POST", "/api/v2/targets", {"target_type": "file", "file_endpoint": {"path": path}}
        )
        message = error["errors"][0]["message"] if error else ""
        assert status == 400, path
        assert message.startswith("file_endpoint.path: ") and why in message, message
    status, error = await api.call(
        "PUT", "/api/v2/targets/archive", {"file_endpoint": {"path": "/tmp/elsewhere.ndjson"}}
    )
    assert status == 400 and "outside the archive roots" in error["errors"][0]["message"]
    assert [t.id for t in daemon.config.targets] == ["archive"]
    assert daemon.config.target("archive").endpoint.path == str(tmp_path / "archive.ndjson")  # type: ignore[union-attr]
    ok = tmp_path / "sub" / "ok.ndjson"
    status, _ = await api.call(
        "POST", "/api/v2/targets", {"target_type": "file", "file_endpoint": {"path": str(ok)}}
    )
    assert status == 201


async def test_a_file_target_from_the_api_never_writes_a_file_the_daemon_reads(
    tmp_path: Path, pki: Path
) -> None:
    """The operator keeps the config file, the evidence signing key, a ${file:} secret and a
    target's CA beside the archive, in the one archive root. A file target
    from the API could be put on any of them, or on another archive's rotations: the daemon
    then appended events to its own config (the next start failed on it), to its keys, or into
    another archive's rotated, chained files. Each is refused, naming it."""
    archive = tmp_path / "archive.ndjson"
    key = tmp_path / "signing.key"
    generate(key)
    secret = tmp_path / "siem.token"
    secret.write_text("a-token-from-a-file\n")
    ca = tmp_path / "ca.pem"
    ca.write_bytes((pki / "ca.pem").read_bytes())
    path = tmp_path / "router.yaml"
    data = {
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "auth": auth(),
        "evidence": {"signing_key_file": str(key)},
        "targets": [
            {**file_target("archive", archive), "file_endpoint": {"path": str(archive)}},
            {
                "id": "siem",
                "target_type": "http",
                "http_endpoint": {
                    "url": "http://127.0.0.1:9/",
                    "headers": {"X-Token": f"${{file:{secret}}}"},
                    "tls": {"ca_file": str(ca)},
                },
            },
        ],
        "routes": everything_to("archive"),
    }
    text = yaml.safe_dump(data)
    path.write_text(text)
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        api = Client(daemon)
        refused = {
            path: "a file the daemon reads",
            tmp_path / "router.yaml.prev": "a file the daemon reads",
            tmp_path / "router.yaml.tmp": "a file the daemon reads",
            key: "a file the daemon reads",
            tmp_path / "signing.key.pub": "a file the daemon reads",
            secret: "a file the daemon reads",
            ca: "a file the daemon reads",
            tmp_path / "var" / "receipts.key": "the journal's own files",
            tmp_path / "var" / "api-metadata.json.tmp": "the journal's own files",
            tmp_path / "archive.ndjson.1": "rotates",
            tmp_path / "archive.ndjson.2.gz": "rotates",
        }
        for where, why in refused.items():
            status, error = await api.call(
                "POST",
                "/api/v2/targets",
                {"target_type": "file", "file_endpoint": {"path": str(where)}},
            )
            assert status == 400, (where, error)
            message = error["errors"][0]["message"]
            assert message.startswith("file_endpoint.path: ") and why in message, message
        assert [t.id for t in daemon.config.targets] == ["archive", "siem"]
        status, _ = await api.call(
            "POST",
            "/api/v2/targets",
            {"target_type": "file", "file_endpoint": {"path": str(tmp_path / "other.ndjson")}},
        )
        assert status == 201
    finally:
        await daemon.stop()
    assert yaml.safe_load(path.read_text())["evidence"] == data["evidence"]


async def test_references_in_api_bodies_are_refused(
    daemon: Daemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    siem = await receiver_factory([200])
    api = Client(daemon)
    secret = tmp_path / "admin-token"
    secret.write_text("the-admin-token-value\n")
    for endpoint in (
        {"url": siem.url, "headers": {"X-Leak": f"${{file:{secret}}}"}},
        {"url": siem.url + "?home=${env:HOME}"},
        {"url": siem.url, "auth": {"type": "bearer", "token": "${file:/dev/zero}"}},
    ):
        status, error = await api.call(
            "POST", "/api/v2/targets", {"target_type": "http", "http_endpoint": endpoint}
        )
        assert status == 400
        assert "a reference" in error["errors"][0]["message"]
        assert error["errors"][0]["message"].startswith("http_endpoint.")
    assert [t.id for t in daemon.config.targets] == ["archive"] and siem.requests == []


async def test_a_target_pointing_at_the_daemon_itself_is_refused(daemon: Daemon) -> None:
    api = Client(daemon)
    for url in (
        f"http://127.0.0.1:{daemon.port}/v1/events",
        f"http://localhost:{daemon.port}/v1/events",
    ):
        status, error = await api.call(
            "POST", "/api/v2/targets", {"target_type": "http", "http_endpoint": {"url": url}}
        )
        assert status == 400 and "own listener" in error["errors"][0]["message"], url
    assert [t.id for t in daemon.config.targets] == ["archive"]


COMMENTED = """\
# The operator's config: every comment here must survive the API's write-back.
server:
  host: 127.0.0.1   # loopback only
  port: 0
  workers: 1        # one process

storage:
  path: {var}        # the journal lives here

startup: {{validate_targets: false}}

targets:
  # The archive, first and foremost.
  - id: archive
    name: Local archive
    target_type: file
    file_endpoint:
      path: {archive}   # rotated by size

routes:
  - name: all
    rules:
      - locations: ["*"]      # every location
        target_ids: [archive]

# Who may change all this.
auth: {auth}
"""


async def test_write_back_keeps_comments_and_key_order(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    text = COMMENTED.format(
        var=tmp_path / "var",
        archive=tmp_path / "archive.ndjson",
        auth=json.dumps(auth()),  # a JSON flow mapping is YAML too
    )
    path.write_text(text)
    data = yaml.safe_load(text)
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        api = Client(daemon)
        status, target = await api.call(
            "POST",
            "/api/v2/targets",
            {"target_type": "file", "file_endpoint": {"path": str(tmp_path / "b.ndjson")}},
        )
        assert status == 201
        status, _ = await api.call(
            "PUT",
            "/api/v2/routes/all",
            {
                "name": "all",
                "rules": [{"locations": ["*"], "target_ids": ["archive", target["id"]]}],
            },
        )
        assert status == 200
    finally:
        await daemon.stop()
    written = path.read_text()
    comments = [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]
    for comment in comments:
        assert comment in written, comment
    assert list(yaml.safe_load(written)) == list(data), "top-level key order"
    assert yaml.safe_load(written) == daemon.source.data
    previous = path.with_name("router.yaml.prev").read_text()  # the file before the last change
    assert all(comment in previous for comment in comments)
    assert written.startswith(text.split("targets:")[0]), "untouched sections stay as written"


SHARED = """\
server: {{host: 127.0.0.1, port: 0, workers: 1}}
storage: {{path: {var}}}
startup: {{validate_targets: false}}
targets:
  - id: first
    target_type: http
    http_endpoint: &siem   # both targets send to one SIEM
      url: {url}
      timeout_s: 5
  - id: second
    target_type: http
    http_endpoint: *siem
routes:
  - name: all
    rules: [{{locations: ["*"], target_ids: [first, second]}}]
auth: {auth}
"""


@pytest.mark.parametrize("changed", ["first", "second"])
async def test_write_back_changes_only_the_target_changed_where_the_yaml_shares_a_node(
    tmp_path: Path, receiver_factory: ReceiverFactory, changed: str
) -> None:
    """Two targets whose endpoint is one YAML node (an anchor and its alias): the write-back
    merged each target's data into that one node in turn, so the file kept the change of
    whichever came last: a PUT to `first` was lost on restart, and a PUT to `second` moved
    `first` to the new URL too (a target no request named)."""
    old, new = await receiver_factory(), await receiver_factory()
    path = tmp_path / "router.yaml"
    text = SHARED.format(var=tmp_path / "var", url=old.url, auth=json.dumps(loopback_auth()))
    path.write_text(text)
    data = yaml.safe_load(text)
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        status, answer = await Client(daemon).call(
            "PUT",
            f"/api/v2/targets/{changed}",
            {"name": changed, "target_type": "http", "http_endpoint": {"url": new.url}},
        )
        assert status == 200, answer
        urls = {t.id: t.endpoint.url for t in daemon.config.targets}  # type: ignore[union-attr]
    finally:
        await daemon.stop()
    assert urls == {"first": old.url, "second": old.url, changed: new.url}
    written = yaml.safe_load(path.read_text())
    assert {t["id"]: t["http_endpoint"]["url"] for t in written["targets"]} == urls
    assert written == daemon.source.data
    assert "# both targets send to one SIEM" in path.read_text()


@pytest.mark.parametrize(
    "damaged",
    [
        b"\x00\xffnot json",
        b'{"created": {"target:archive": "2024-',
        b"",
        b"[1, 2]",
        b'{"created": {}}',
        b'{"created": [], "updated": 1, "versions": "x", "settings": null}',
        b'{"created": {"a": 1}, "updated": {}, "versions": {"a": "x"}, "settings": {}}',
    ],
)
async def test_a_damaged_api_metadata_file_is_moved_aside_and_the_daemon_starts(
    tmp_path: Path, damaged: bytes
) -> None:
    """The API's metadata (timestamps, route versions) beside the journal was read as it was:
    a damaged file (a bad disk, an edit by hand) stopped the daemon from starting with a
    traceback (JSONDecodeError, KeyError, TypeError), or had every API read answer 500. It is
    moved aside (api-metadata.json.corrupt-<time>), as a damaged alerts.db is, and the API
    starts its metadata again."""
    path = tmp_path / "router.yaml"
    data = {
        "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": False},
        "auth": auth(),
        "targets": [file_target("archive", tmp_path / "archive.ndjson")],
        "routes": everything_to("archive"),
    }
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "api-metadata.json").write_bytes(damaged)
    daemon = Daemon(parse_config(data), ConfigSource(path, data))
    await daemon.start()
    try:
        api = Client(daemon)
        for read in ("/api/v2/targets", "/api/v2/routes", "/api/v2/settings", "/api/v2/views"):
            status, answer = await api.call("GET", read)
            assert status == 200, (read, answer)
        status, answer = await api.call("POST", "/api/v2/views", {"name": "v", "query": "x"})
        assert status == 201, answer
    finally:
        await daemon.stop()
    [aside] = (tmp_path / "var").glob("api-metadata.json.corrupt-*")
    assert aside.read_bytes() == damaged
    assert orjson.loads((tmp_path / "var" / "api-metadata.json").read_bytes())["created"]


def test_prev_files_are_not_tracked() -> None:
    repo = Path(__file__).resolve().parents[2]
    ignored = subprocess.run(
        ["git", "-C", str(repo), "check-ignore", "-q", "config/router.yaml.prev"], check=False
    )
    assert ignored.returncode == 0
