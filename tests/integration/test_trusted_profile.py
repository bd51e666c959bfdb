"""The daemon's identity as a trusted profile: the compute-resource token file exchanged at a
loopback IAM (tests/fakes.py FakeIam, which checks the cr-token grant's form as IAM does) for
the bearer token that cloud_logs and COS (moto behind a recording front) deliver with."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from router.daemon import Daemon
from router.errors import PermanentDeliveryError
from router.iam import CR_TOKEN_GRANT_TYPE, IamTokenSource, TrustedProfileConfig
from tests.conftest import StartDaemon
from tests.fakes import FakeIam, ScriptedReceiver, make_event, read_ndjson, wait_for
from tests.helpers import assert_books_balance, everything_to, post, settled
from tests.integration.test_api import Client, loopback_auth
from tests.integration.test_cloud_logs import LOGS_CRN, now_iso
from tests.integration.test_cos import (  # noqa: F401  (fixtures)
    cos_target,
    front_factory,
    ids,
    objects,
    s3,
    s3_server,
    secret,
)

CR_TOKEN = "eyJhbGciOiJSUzI1NiJ9.the-pods-service-account-token-1.sig"
ROTATED = "eyJhbGciOiJSUzI1NiJ9.the-pods-service-account-token-2.sig"


@pytest.fixture
async def iam() -> AsyncIterator[FakeIam]:
    server = await FakeIam(cr_tokens={CR_TOKEN}).start()
    IamTokenSource._shared.clear()  # each test gets its own token cache
    yield server
    await server.stop()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "sa-token"
    path.parent.mkdir()
    path.write_text(CR_TOKEN + "\n")
    return path


def rotate(path: Path, token: str) -> None:
    """As the kubelet updates a projected volume: the new file renamed over the old one."""
    new = path.with_name(path.name + ".new")
    new.write_text(token)
    os.replace(new, path)


def profile_iam(iam: FakeIam, token_file: Path) -> dict[str, Any]:
    name, value = iam.profile
    return {"trusted_profile": {name: value, "cr_token_file": str(token_file)}, "iam_url": iam.url}


def logs_target(ingress: ScriptedReceiver, **retry: Any) -> dict[str, Any]:
    """atracker's cloud_logs body: only the instance CRN (the ingress URL is a test's)."""
    return {
        "id": "logs",
        "target_type": "cloud_logs",
        "cloudlogs_endpoint": {"target_crn": LOGS_CRN, "ingress_url": ingress.base},
        "retry": {"max_attempts": 5, **retry},
    }


async def start_logs(
    start_daemon: StartDaemon, iam: FakeIam, token_file: Path, ingress: ScriptedReceiver
) -> Daemon:
    return await start_daemon(
        {
            "iam": profile_iam(iam, token_file),
            "targets": [logs_target(ingress)],
            "routes": everything_to("logs"),
        }
    )


async def test_cloud_logs_delivers_with_a_token_for_the_trusted_profile(
    start_daemon: StartDaemon, iam: FakeIam, token_file: Path, receiver_factory: Any
) -> None:
    ingress = await receiver_factory()
    daemon = await start_logs(start_daemon, iam, token_file, ingress)
    for n in range(2):
        await post(daemon, [make_event(id=f"tp-{n}", eventTime=now_iso())])
        await wait_for(lambda: settled(daemon), what="delivered")

    [grant] = iam.grants  # cached between batches: one grant for both
    assert grant.form == {
        "grant_type": CR_TOKEN_GRANT_TYPE,
        "cr_token": CR_TOKEN,  # the file's content, its newline trimmed
        "profile_id": iam.profile[1],
    }
    assert [r.headers["Authorization"] for r in ingress.requests] == [f"Bearer {grant.token}"] * 2
    assert [record["text"]["id"] for record in ingress.delivered_events] == ["tp-0", "tp-1"]
    row = daemon.status()["targets"]["logs"]
    assert (row["delivered"], row["dead_lettered"]) == (2, 0)
    assert_books_balance(daemon)


async def test_the_token_file_is_read_again_at_every_fetch_so_a_rotation_is_honoured(
    start_daemon: StartDaemon, iam: FakeIam, token_file: Path, receiver_factory: Any
) -> None:
    iam.expires_in_s = 0  # every batch needs a new token: refreshed before each send
    ingress = await receiver_factory()
    daemon = await start_logs(start_daemon, iam, token_file, ingress)
    await post(daemon, [make_event(id="before", eventTime=now_iso())])
    await wait_for(lambda: settled(daemon), what="first delivered")
    # Kubernetes rotates the projected token; IAM no longer takes the old one.
    await asyncio.to_thread(rotate, token_file, ROTATED)
    iam.cr_tokens = {ROTATED}
    await post(daemon, [make_event(id="after", eventTime=now_iso())])
    await wait_for(lambda: settled(daemon), what="second delivered")

    assert [(g.form["cr_token"], g.status) for g in iam.grants] == [(CR_TOKEN, 200), (ROTATED, 200)]
    assert [r.headers["Authorization"] for r in ingress.requests] == [
        f"Bearer {token}" for token in iam.issued
    ]
    row = daemon.status()["targets"]["logs"]
    assert (row["delivered"], row["dead_lettered"], row["retries"]) == (2, 0, 0)
    assert_books_balance(daemon)


async def test_the_token_is_refreshed_before_it_expires(iam: FakeIam, token_file: Path) -> None:
    """At 80% of its lifetime, as the API key path and IBM's SDK cores do (a clock of our
    own: no waiting for a real token to age)."""
    now = [1000.0]
    name, value = iam.profile
    profile = TrustedProfileConfig(**{name: value}, cr_token_file=str(token_file))
    source = IamTokenSource(iam.url, profile=profile, clock=lambda: now[0])
    iam.expires_in_s = 100
    async with aiohttp.ClientSession() as session:
        first = await source.token(session, "t")
        now[0] += 79
        assert await source.token(session, "t") == first
        now[0] += 2  # past 80 s of 100
        second = await source.token(session, "t")
    assert second != first
    assert iam.issued == [first, second]


async def test_a_refused_grant_dead_letters_with_iams_reason_and_never_shows_the_token(
    start_daemon: StartDaemon,
    iam: FakeIam,
    token_file: Path,
    receiver_factory: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    iam.cr_tokens = {"some-other-pods-token"}  # this pod is not trusted by the profile
    ingress = await receiver_factory()
    daemon = await start_logs(start_daemon, iam, token_file, ingress)
    await post(daemon, [make_event(id="refused", eventTime=now_iso())])
    await wait_for(lambda: settled(daemon), what="dead-lettered")

    [letter] = read_ndjson(tmp_path / "var" / "deadletter" / "logs.ndjson")
    assert letter["event"]["id"] == "refused"
    assert (letter["reason"], letter["status"], letter["attempts"]) == ("permanent_status", 400, 1)
    assert "IAM refused the grant" in letter["message"]
    assert f"trusted profile profile_id={iam.profile[1]}" in letter["message"]
    assert "BXNIM0438E" in letter["response_excerpt"]
    assert ingress.requests == [], "nothing is sent without a token"
    status = daemon.status()
    assert status["targets"]["logs"]["write_status"]["status"] == "failed"
    for where, text in (
        ("logs", caplog.text),
        ("status", orjson.dumps(status).decode()),
        ("dead letters", (tmp_path / "var" / "deadletter" / "logs.ndjson").read_text()),
    ):
        assert CR_TOKEN not in text, f"the CR token leaked into {where}"
    assert_books_balance(daemon)


async def test_a_token_file_gone_at_fetch_time_dead_letters_naming_the_file(
    start_daemon: StartDaemon,
    iam: FakeIam,
    token_file: Path,
    receiver_factory: Any,
    tmp_path: Path,
) -> None:
    ingress = await receiver_factory()
    daemon = await start_logs(start_daemon, iam, token_file, ingress)
    # Readable when the config loaded, gone at the first token request.
    await asyncio.to_thread(token_file.unlink)
    await post(daemon, [make_event(id="no-file", eventTime=now_iso())])
    await wait_for(lambda: settled(daemon), what="dead-lettered")

    [letter] = read_ndjson(tmp_path / "var" / "deadletter" / "logs.ndjson")
    assert (letter["reason"], letter["attempts"]) == ("permanent_error", 1)
    assert (
        f"compute-resource token file {token_file}: No such file or directory"
        in (letter["message"])
    )
    assert iam.grants == [] and ingress.requests == []
    assert_books_balance(daemon)


async def test_iams_5xx_is_retried_and_the_batch_then_goes(
    start_daemon: StartDaemon, iam: FakeIam, token_file: Path, receiver_factory: Any
) -> None:
    iam.statuses = (503, 500, 0)
    ingress = await receiver_factory()
    daemon = await start_logs(start_daemon, iam, token_file, ingress)
    await post(daemon, [make_event(id="patient", eventTime=now_iso())])
    await wait_for(lambda: settled(daemon), what="delivered")

    assert [grant.status for grant in iam.grants] == [503, 500, 200]
    assert [r.headers["Authorization"] for r in ingress.requests] == [f"Bearer {iam.issued[0]}"]
    row = daemon.status()["targets"]["logs"]
    assert (row["delivered"], row["dead_lettered"], row["retries"]) == (1, 0, 2)
    assert_books_balance(daemon)


async def test_a_token_source_refuses_a_grant_as_permanent_and_a_5xx_as_retryable(
    iam: FakeIam, token_file: Path
) -> None:
    wrong = TrustedProfileConfig(profile_name="not-this-one", cr_token_file=str(token_file))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(PermanentDeliveryError) as refused:
            await IamTokenSource(iam.url, profile=wrong).token(session, "t")
        assert refused.value.status == 400
        assert "BXNIM0440E" in refused.value.response_excerpt
        assert iam.grants[-1].form["profile_name"] == "not-this-one"
        assert "profile_id" not in iam.grants[-1].form


@pytest.mark.peers
async def test_cos_writes_objects_with_a_token_for_the_trusted_profile(
    start_daemon: StartDaemon,
    iam: FakeIam,
    token_file: Path,
    front_factory: Any,  # noqa: F811
    s3: Any,  # noqa: F811
) -> None:
    front = await front_factory()
    target = cos_target(front.url, service_to_service_enabled=True)
    del target["cos_endpoint"]["hmac_keys"]  # atracker's body: s2s, no key of its own
    daemon = await start_daemon(
        {"iam": profile_iam(iam, token_file), "targets": [target], "routes": everything_to("cos")}
    )
    await post(daemon, [make_event(id="cos-1"), make_event(id="cos-2")])
    await wait_for(lambda: settled(daemon), timeout_s=20, what="delivered")

    assert ids(await objects(s3)) == ["cos-1", "cos-2"]
    [grant] = iam.grants
    assert grant.form["cr_token"] == CR_TOKEN and grant.form["profile_id"] == iam.profile[1]
    puts = [h["Authorization"] for h in front.headers if h.get("Content-MD5")]
    assert puts == [f"Bearer {grant.token}"]
    row = daemon.status()["targets"]["cos"]
    assert (row["delivered"], row["dead_lettered"]) == (2, 0)
    assert_books_balance(daemon)


async def test_an_admin_token_can_use_the_profile_but_never_name_a_file_or_another_iam(
    start_daemon: StartDaemon, iam: FakeIam, token_file: Path, receiver_factory: Any
) -> None:
    """The token file is the operator's (the top-level `iam` section, which the API cannot
    change): a target body naming one is refused, and so is a target that would have the
    daemon's CR token exchanged at an IAM URL of the caller's choosing."""
    ingress = await receiver_factory()
    thief = await receiver_factory()
    daemon = await start_daemon(
        {
            "auth": loopback_auth(),
            "iam": profile_iam(iam, token_file),
            "targets": [logs_target(ingress)],
            "routes": everything_to("logs"),
        }
    )
    api = Client(daemon)
    body = {"name": "more-logs", "target_type": "cloud_logs"}
    status, answer = await api.call(
        "POST",
        "/api/v2/targets",
        body
        | {
            "cloudlogs_endpoint": {
                "target_crn": LOGS_CRN,
                "trusted_profile": {"profile_id": "p", "cr_token_file": "/etc/shadow"},
            }
        },
    )
    assert status == 400, answer
    assert "unknown key 'trusted_profile'" in str(answer)
    status, answer = await api.call(
        "POST",
        "/api/v2/targets",
        body | {"cloudlogs_endpoint": {"target_crn": LOGS_CRN, "iam_url": thief.base}},
    )
    assert status == 400, answer
    assert "iam_url: this target uses the daemon's own identity" in str(answer)
    status, answer = await api.call(
        "POST",
        "/api/v2/targets",
        body | {"cloudlogs_endpoint": {"target_crn": LOGS_CRN}},
    )
    assert status == 201, answer  # atracker's body: the daemon's profile serves it
    assert "trusted_profile" not in str(answer) and str(token_file) not in str(answer)
    assert thief.requests == [], "the daemon's CR token went only to its own IAM"
    assert all(grant.form["cr_token"] == CR_TOKEN for grant in iam.grants)
