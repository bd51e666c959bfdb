"""Bearer tokens against a real daemon: who may send, who may administer, and the audit
events the router writes about everyone it turns away."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from router.daemon import Daemon
from router.intake.validation import EventValidator
from router.query import parse
from router.resources import schemas_dir
from router.selfevent import LOGIN_ACTION, instance_crn, router_event
from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, sm_crn, wait_for
from tests.helpers import file_target, run_cli

INGEST_TOKEN = "ingest-token-0123456789abcdef"
SM_TOKEN = "sm-only-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
SECRETS = (INGEST_TOKEN, SM_TOKEN, ADMIN_TOKEN)


def auth_config(tmp_path: Path, **refusal_events: Any) -> dict[str, Any]:
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN + "\n")
    return {
        "ingest_tokens": [
            {"name": "producer", "token": "${env:TEST_INGEST_TOKEN}"},
            {
                "name": "sm-producer",
                "sha256": hashlib.sha256(SM_TOKEN.encode()).hexdigest(),
                "services": ["secrets-manager"],
            },
        ],
        "admin_tokens": [{"name": "ops", "token": f"${{file:{tmp_path / 'admin.token'}}}"}],
        **({"refusal_events": refusal_events} if refusal_events else {}),
    }


def refusal_of(path: str, answer: dict[str, Any]) -> dict[str, str]:
    """The {"code", "message"} of a refusal: in atracker's shape under the management API
    (a trace, the status, a list of errors), in the daemon's own elsewhere."""
    if path.startswith("/api/v2/"):
        assert set(answer) == {"trace", "status_code", "errors"}, answer
        (error,) = answer["errors"]
        return dict(error)
    return dict(answer["error"])


@pytest.fixture
async def guarded(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Daemon, Path]:
    """A daemon with tokens whose one file target archives every event."""
    monkeypatch.setenv("TEST_INGEST_TOKEN", INGEST_TOKEN)
    path = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {
            "auth": auth_config(tmp_path),
            "targets": [file_target("archive", path)],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )
    return daemon, path


async def call(
    daemon: Daemon,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = orjson.dumps(body)
        sent["Content-Type"] = "application/json"
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"http://127.0.0.1:{daemon.port}{path}", data=data, headers=sent
        ) as resp,
    ):
        text = await resp.read()
        answer = orjson.loads(text) if resp.content_type == "application/json" else text
        return resp.status, dict(resp.headers), answer


def login_events(path: Path) -> list[dict[str, Any]]:
    return [e for e in read_ndjson(path) if e["action"] == LOGIN_ACTION]


async def test_ingest_without_a_token_is_401_with_a_bearer_challenge(
    guarded: tuple[Daemon, Path],
) -> None:
    daemon, _ = guarded
    status, headers, body = await call(daemon, "POST", "/v1/events", body=make_event())
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="event-router"'
    assert body["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    "authorization", ["Bearer wrong-token-0123456789", "Basic dXNlcjpwYXNz", "Bearer", "Bearer  "]
)
async def test_a_wrong_or_malformed_token_is_401(
    guarded: tuple[Daemon, Path], authorization: str
) -> None:
    daemon, _ = guarded
    status, headers, _ = await call(
        daemon, "POST", "/v1/events", body=make_event(), headers={"Authorization": authorization}
    )
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_request_with_two_authorization_headers_is_401_whichever_comes_first(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Authorization holds one credential: with two, the valid one first was taken (200 or
    202) and the same two the other way round refused, where a proxy in front may take the
    last. Neither counts: 401, naming the repeated header, in a worker process too."""
    monkeypatch.setenv("TEST_INGEST_TOKEN", INGEST_TOKEN)
    path = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {
            "server": {"host": "127.0.0.1", "port": 0, "workers": workers},
            "auth": auth_config(tmp_path),
            "targets": [file_target("archive", path)],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )
    calls = [
        ("POST", "/v1/events", INGEST_TOKEN, orjson.dumps(make_event())),
        ("GET", "/v1/status", ADMIN_TOKEN, None),
        ("GET", "/api/v2/targets", ADMIN_TOKEN, None),
    ]
    async with aiohttp.ClientSession() as session:
        for method, route, token, data in calls:
            for pair in ((token, "other-token-0123456789"), ("other-token-0123456789", token)):
                headers = [("Authorization", f"Bearer {value}") for value in pair]
                headers.append(("Content-Type", "application/json"))
                async with session.request(
                    method, f"http://127.0.0.1:{daemon.port}{route}", data=data, headers=headers
                ) as resp:
                    answer = await resp.json()
                    assert resp.status == 401, (route, pair, answer)
                    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="event-router"'
                error = refusal_of(route, answer)
                assert error["code"] == "unauthorized"
                assert "more than one Authorization header" in error["message"]


@pytest.mark.parametrize("token", [INGEST_TOKEN, SM_TOKEN])
async def test_ingest_tokens_from_a_reference_or_a_digest_are_accepted(
    guarded: tuple[Daemon, Path], token: str
) -> None:
    daemon, path = guarded
    status, _, body = await call(daemon, "POST", "/v1/events", token=token, body=make_event())
    assert status == 202 and body["accepted"] == 1
    await wait_for(lambda: len(read_ndjson(path)) == 1)


async def test_the_bearer_scheme_is_case_insensitive(guarded: tuple[Daemon, Path]) -> None:
    daemon, _ = guarded
    status, _, _ = await call(
        daemon,
        "POST",
        "/v1/events",
        body=make_event(),
        headers={"Authorization": f"bearer {INGEST_TOKEN}"},
    )
    assert status == 202


async def test_an_admin_token_cannot_ingest_and_an_ingest_token_cannot_administer(
    guarded: tuple[Daemon, Path],
) -> None:
    daemon, _ = guarded
    status, headers, body = await call(
        daemon, "POST", "/v1/events", token=ADMIN_TOKEN, body=make_event()
    )
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert "WWW-Authenticate" not in headers
    for method, path in (("GET", "/v1/status"), ("POST", "/v1/deadletters/archive/redrive")):
        status, _, _ = await call(daemon, method, path, token=INGEST_TOKEN)
        assert status == 403, path
        status, _, _ = await call(daemon, method, path)
        assert status == 401, path
    status, _, body = await call(daemon, "GET", "/v1/status", token=ADMIN_TOKEN)
    assert status == 200 and body["auth"]["enabled"] is True


async def test_probes_stay_open(guarded: tuple[Daemon, Path]) -> None:
    daemon, _ = guarded
    for path in ("/healthz", "/readyz", "/openapi.json"):
        status, _, _ = await call(daemon, "GET", path)
        assert status == 200, path


async def test_a_token_limited_to_a_service_cannot_forge_another_services_events(
    guarded: tuple[Daemon, Path],
) -> None:
    daemon, path = guarded
    kms = make_event(action="kms.secrets.create", logSourceCRN=sm_crn(service="kms"), id="kms-1")
    status, _, body = await call(
        daemon, "POST", "/v1/events", token=SM_TOKEN, body=[make_event(id="sm-1"), kms]
    )
    assert status == 202
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected"]
    assert body["results"][1]["errors"] == [
        {
            "path": "/logSourceCRN",
            "message": "token 'sm-producer' may send events of secrets-manager only, not of 'kms'",
        }
    ]
    await wait_for(lambda: len(login_events(path)) == 1, what="the Forbidden self-event")
    event = login_events(path)[0]
    assert event["reason"] == {
        "reasonCode": 403,
        "reasonType": "Forbidden",
        "reasonForFailure": "1 event of a service the token may not send for",
    }
    assert event["initiator"]["name"] == "sm-producer"
    assert [e["id"] for e in read_ndjson(path) if e["action"] != LOGIN_ACTION] == ["sm-1"]
    # The unrestricted token may send for any service.
    status, _, _ = await call(daemon, "POST", "/v1/events", token=INGEST_TOKEN, body=kms)
    assert status == 202


async def test_producers_cannot_send_the_routers_own_actions(
    guarded: tuple[Daemon, Path],
) -> None:
    daemon, path = guarded
    forged = router_event(
        action=LOGIN_ACTION,
        message="event-router: refused nothing",
        target={"id": instance_crn(":"), "name": "event-router", "typeURI": "event-router/x"},
    )
    reload = {**forged, "action": "event-router.config.reload", "id": "forged-2"}
    status, _, body = await call(
        daemon,
        "POST",
        "/v1/events",
        token=INGEST_TOKEN,
        body=[make_event(id="sm-1"), {**forged, "id": "forged-1"}, reload],
    )
    assert status == 202
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected", "rejected"]
    assert body["results"][1]["errors"] == [
        {
            "path": "/action",
            "message": "'event-router.instance.login' is an action of the router itself "
            "(event-router.*); a producer may not send it",
        }
    ]
    # The router's own events still go through: this refusal is one.
    await call(daemon, "GET", "/v1/status", token=INGEST_TOKEN)
    await wait_for(lambda: len(login_events(path)) == 1, what="the router's own event")
    assert {e["id"] for e in read_ndjson(path)} & {"forged-1", "forged-2"} == set()


async def test_every_refusal_is_an_audit_event_that_the_seed_query_finds(
    guarded: tuple[Daemon, Path], tmp_path: Path
) -> None:
    daemon, path = guarded
    await call(
        daemon,
        "POST",
        "/v1/events",
        body=make_event(),
        headers={"Authorization": "Bearer not-a-real-token-123", "User-Agent": "attacker/1.0"},
    )
    await call(daemon, "GET", "/v1/status", token=INGEST_TOKEN)
    await wait_for(lambda: len(login_events(path)) == 2, what="two self-events")
    unauthorized, forbidden = login_events(path)
    query = parse("reason.reasonType:Unauthorized")
    assert query.matches(unauthorized) and not query.matches(forbidden)
    assert unauthorized["outcome"] == "failure" and unauthorized["severity"] == "critical"
    assert unauthorized["reason"]["reasonCode"] == 401
    assert unauthorized["initiator"]["host"] == {"address": "127.0.0.1", "agent": "attacker/1.0"}
    assert unauthorized["target"]["name"] == "POST /v1/events"
    assert forbidden["reason"]["reasonType"] == "Forbidden"
    assert forbidden["target"]["name"] == "GET /v1/status"
    validator = EventValidator(schemas_dir())
    assert validator.validate(unauthorized) == [] and validator.validate(forbidden) == []
    # Neither the tokens presented nor the configured ones are written anywhere.
    for file in [path, *(tmp_path / "var").rglob("*")]:
        if file.is_file():
            data = file.read_bytes()
            for secret in (*SECRETS, "not-a-real-token-123"):
                assert secret.encode() not in data, (file, secret)


async def test_refusal_events_are_rate_limited_and_summed_up(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_INGEST_TOKEN", INGEST_TOKEN)
    path = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {
            "auth": auth_config(
                tmp_path, per_client_burst=3, per_client_per_s=0.001, summary_interval_s=0.2
            ),
            "targets": [file_target("archive", path)],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )
    answers = await asyncio.gather(
        *(call(daemon, "POST", "/v1/events", body=make_event()) for _ in range(40))
    )
    assert {status for status, _, _ in answers} == {401}
    await wait_for(lambda: len(login_events(path)) == 4, what="3 events and 1 summary")
    events = login_events(path)
    summary = events[-1]
    assert summary["requestData"] == {"suppressed_attempts": 37, "by_address": {"127.0.0.1": 37}}
    assert summary["reason"]["reasonType"] == "Unauthorized"
    assert daemon.status()["auth"] == {
        "enabled": True,
        "refused": {"Unauthorized": 40},
        "refusal_events": 4,
        "refusal_events_suppressed": 37,
    }


async def test_without_auth_everything_is_open_and_the_daemon_warns(
    start_daemon: StartDaemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="router.server.auth"):
        daemon = await start_daemon(
            {"targets": [file_target("archive", tmp_path / "a.ndjson")], "routes": []}
        )
    assert any("no auth section" in r.getMessage() for r in caplog.records)
    status, _, _ = await call(daemon, "POST", "/v1/events", body=make_event())
    assert status == 202
    status, _, body = await call(daemon, "GET", "/v1/status")
    assert status == 200 and body["auth"]["enabled"] is False


@pytest.fixture
async def open_daemon(start_daemon: StartDaemon, tmp_path: Path) -> Daemon:
    """The quick start's shape: no auth section, loopback only. Its own storage.path, so that
    a test can run it beside `guarded` (one journal belongs to one daemon)."""
    return await start_daemon(
        {
            "storage": {"path": str(tmp_path / "open-var")},
            "targets": [file_target("archive", tmp_path / "a.ndjson")],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )


async def test_without_admin_tokens_api_changes_are_refused_and_reads_stay_open(
    open_daemon: Daemon, tmp_path: Path
) -> None:
    daemon = open_daemon
    new_target = {
        "target_type": "file",
        "file_endpoint": {"path": str(daemon.journal.path)},
    }
    for method, path, body in (
        ("POST", "/api/v2/targets", new_target),
        ("PUT", "/api/v2/targets/archive", {"name": "x"}),
        ("DELETE", "/api/v2/routes/all", None),
        ("POST", "/api/v2/targets/archive/validate", None),
    ):
        status, _, answer = await call(daemon, method, path, body=body)
        assert status == 403, (method, path)
        assert "auth.admin_tokens" in refusal_of(path, answer)["message"]
    assert (await call(daemon, "GET", "/api/v2/targets"))[0] == 200
    assert [t.id for t in daemon.config.targets] == ["archive"]
    assert [r.name for r in daemon.config.routes] == ["all"]


async def test_with_ingest_tokens_only_the_admin_endpoints_say_what_to_configure(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {
            "auth": {"ingest_tokens": [{"name": "p", "sha256": "00" * 32}]},
            "targets": [file_target("archive", tmp_path / "a.ndjson")],
            "routes": [],
        }
    )
    for method, path in (("POST", "/api/v2/targets"), ("GET", "/v1/status")):
        status, _, answer = await call(daemon, method, path, token=INGEST_TOKEN, body={})
        assert status == 403 and "auth.admin_tokens" in refusal_of(path, answer)["message"], path


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io"])
async def test_an_open_daemon_answers_only_to_its_own_names(open_daemon: Daemon, host: str) -> None:
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 sends
    `Host: evil.example`; the daemon, with no token to ask for, must not answer it."""
    daemon = open_daemon
    headers = {"Host": host.format(port=daemon.port)}
    for method, path in (("GET", "/v1/status"), ("GET", "/api/v2/targets"), ("POST", "/v1/events")):
        body = make_event() if method == "POST" else None
        status, _, answer = await call(daemon, method, path, body=body, headers=headers)
        assert status == 403, (method, path)
        assert refusal_of(path, answer)["code"] == "unknown_host"
    for own in ("127.0.0.1", f"127.0.0.1:{daemon.port}", f"localhost:{daemon.port}"):
        status, _, _ = await call(daemon, "GET", "/v1/status", headers={"Host": own})
        assert status == 200, own
    # Probes answer whatever the name (a load balancer's health check may use any).
    assert (await call(daemon, "GET", "/healthz", headers=headers))[0] == 200


async def test_a_change_from_another_origin_is_refused(
    guarded: tuple[Daemon, Path], open_daemon: Daemon, tmp_path: Path
) -> None:
    daemon, _ = guarded
    body = {"target_type": "file", "file_endpoint": {"path": str(tmp_path / "b.ndjson")}}
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{daemon.port + 1}"):
        status, _, answer = await call(
            daemon,
            "POST",
            "/api/v2/targets",
            token=ADMIN_TOKEN,
            body=body,
            headers={"Origin": origin},
        )
        assert status == 403, origin
        assert refusal_of("/api/v2/targets", answer)["code"] == "cross_origin", origin
    assert [t.id for t in daemon.config.targets] == ["archive"]
    status, _, _ = await call(
        open_daemon,
        "POST",
        "/v1/deadletters/archive/redrive",
        headers={"Origin": "http://evil.example"},
    )
    assert status == 403
    # The daemon's own origin may (a page it served, a same-origin tool).
    own = {"Origin": f"http://127.0.0.1:{daemon.port}"}
    status, _, _ = await call(
        daemon, "POST", "/api/v2/targets", token=ADMIN_TOKEN, body=body, headers=own
    )
    assert status == 201


async def test_api_changes_must_be_json(guarded: tuple[Daemon, Path], tmp_path: Path) -> None:
    daemon, _ = guarded
    body = orjson.dumps(
        {"target_type": "file", "file_endpoint": {"path": str(tmp_path / "b.ndjson")}}
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{daemon.port}/api/v2/targets",
            data=body,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "text/plain"},
        ) as resp,
    ):
        assert resp.status == 415
        assert (await resp.json())["errors"][0]["code"] == "unsupported_media_type"
    assert [t.id for t in daemon.config.targets] == ["archive"]


async def test_dlq_redrive_sends_the_admin_token(
    guarded: tuple[Daemon, Path], tmp_path: Path
) -> None:
    daemon, _ = guarded
    url = f"http://127.0.0.1:{daemon.port}"
    base = ["dlq", "redrive", "--target", "archive", "--url", url]
    env = {k: v for k, v in os.environ.items() if k != "EVENT_ROUTER_TOKEN"}
    code, _, err = await run_cli(*base, env=env)
    assert code == 1 and "401" in err
    code, _, err = await run_cli(*base, env={**env, "EVENT_ROUTER_TOKEN": ADMIN_TOKEN})
    assert code == 0, err
    token_file = tmp_path / "ops.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    code, _, err = await run_cli(*base, "--token-file", str(token_file), env=env)
    assert code == 0, err
    code, _, err = await run_cli(*base, env={**env, "EVENT_ROUTER_TOKEN": INGEST_TOKEN})
    assert code == 1 and "403" in err
