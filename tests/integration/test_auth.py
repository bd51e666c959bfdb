"""Bearer tokens against a real daemon: who may send, who may administer, and the audit
events the router writes about everyone it turns away."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from router.app import Daemon
from router.auth import LOGIN_ACTION
from router.query import parse
from router.resources import schemas_dir
from router.validation import EventValidator
from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, sm_crn, wait_for
from tests.integration.test_ingest import file_target

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
    with caplog.at_level(logging.WARNING, logger="router.auth"):
        daemon = await start_daemon(
            {"targets": [file_target("archive", tmp_path / "a.ndjson")], "routes": []}
        )
    assert any("no auth section" in r.getMessage() for r in caplog.records)
    status, _, _ = await call(daemon, "POST", "/v1/events", body=make_event())
    assert status == 202
    status, _, body = await call(daemon, "GET", "/v1/status")
    assert status == 200 and body["auth"]["enabled"] is False


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_dlq_redrive_sends_the_admin_token(
    guarded: tuple[Daemon, Path], tmp_path: Path
) -> None:
    daemon, _ = guarded
    url = f"http://127.0.0.1:{daemon.port}"
    base = ["dlq", "redrive", "--target", "archive", "--url", url]
    env = {k: v for k, v in os.environ.items() if k != "EVENT_ROUTER_TOKEN"}
    code, err = await run_cli(*base, env=env)
    assert code == 1 and "401" in err
    code, err = await run_cli(*base, env={**env, "EVENT_ROUTER_TOKEN": ADMIN_TOKEN})
    assert code == 0, err
    token_file = tmp_path / "ops.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    code, err = await run_cli(*base, "--token-file", str(token_file), env=env)
    assert code == 0, err
    code, err = await run_cli(*base, env={**env, "EVENT_ROUTER_TOKEN": INGEST_TOKEN})
    assert code == 1 and "403" in err
