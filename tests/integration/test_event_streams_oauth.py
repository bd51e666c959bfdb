"""Event Streams with the daemon's own identity: SASL OAUTHBEARER with an IAM token, against
the real Kafka 4 broker of tests/peers/kafka.py, whose OAUTH listener VALIDATES each token
with Kafka's own OAuthBearerValidatorCallbackHandler: the RS256 signature against the JWKS
the loopback IAM publishes (tests/fakes.py FakeIam, run in a thread for as long as the
broker), the issuer, the audience and the expiry.

The daemon's identity is a trusted profile (the compute-resource token file exchanged at the
loopback IAM); the topic is read back over the broker's PLAINTEXT listener, so a duplicate or
a missing message is seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.daemon import Daemon
from router.iam import CR_TOKEN_GRANT_TYPE, IamTokenSource
from tests.conftest import StartDaemon
from tests.fakes import (
    IAM_AUDIENCE,
    IAM_ISSUER,
    FakeIam,
    IamSigningKey,
    IamThread,
    make_event,
    read_ndjson,
    wait_for,
)
from tests.helpers import assert_books_balance, everything_to, post, settled
from tests.integration.test_event_streams import ES_CRN, read_topic
from tests.peers.kafka import KafkaBroker, OAuthValidation

pytestmark = pytest.mark.peers

CR_TOKEN = "eyJhbGciOiJSUzI1NiJ9.the-pods-service-account-token.sig"


@pytest.fixture(scope="module")
def iam_thread() -> Iterator[FakeIam]:
    with IamThread(FakeIam(cr_tokens={CR_TOKEN})) as iam:
        yield iam


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory, iam_thread: FakeIam) -> Iterator[KafkaBroker]:
    oauth = OAuthValidation(iam_thread.jwks_url, issuer=IAM_ISSUER, audience=IAM_AUDIENCE)
    with KafkaBroker(tmp_path_factory.mktemp("kafka-oauth"), tls=False, oauth=oauth) as broker:
        yield broker


@pytest.fixture
def iam(iam_thread: FakeIam) -> FakeIam:
    """The module's IAM, as a test expects it: no grants yet, honest tokens."""
    iam_thread.grants.clear()
    iam_thread.cr_tokens = {CR_TOKEN}
    iam_thread.audience = IAM_AUDIENCE
    iam_thread.forger = None
    iam_thread.expires_in_s = 3600
    IamTokenSource._shared.clear()  # each test gets its own token cache
    return iam_thread


async def start(
    start_daemon: StartDaemon, iam: FakeIam, kafka: KafkaBroker, tmp_path: Path, topic: str
) -> Daemon:
    token_file = tmp_path / "sa-token"
    await asyncio.to_thread(token_file.write_text, CR_TOKEN)
    name, value = iam.profile
    return await start_daemon(
        {
            "iam": {
                "trusted_profile": {name: value, "cr_token_file": str(token_file)},
                "iam_url": iam.url,
            },
            "targets": [
                {
                    "id": "es",
                    "target_type": "event_streams",
                    # atracker's body: no key of its own, the daemon's identity.
                    "eventstreams_endpoint": {
                        "target_crn": ES_CRN,
                        "brokers": [kafka.oauth_bootstrap],
                        "topic": topic,
                        "service_to_service_enabled": True,
                        "tls": False,  # the test listener; Event Streams is TLS
                        "timeout_s": 10,
                    },
                    "retry": {"max_attempts": 3},
                }
            ],
            "routes": everything_to("es"),
        }
    )


def letters(tmp_path: Path) -> list[dict[str, Any]]:
    return read_ndjson(tmp_path / "var" / "deadletter" / "es.ndjson")


@pytest.mark.timeout(240)
async def test_every_event_arrives_once_with_a_validated_iam_token(
    start_daemon: StartDaemon, iam: FakeIam, kafka: KafkaBroker, tmp_path: Path
) -> None:
    daemon = await start(start_daemon, iam, kafka, tmp_path, "audit-oauth")
    events = [make_event(id=f"oauth-{i}") for i in range(40)]
    for first in range(0, len(events), 10):
        status, _ = await post(daemon, events[first : first + 10])
        assert status == 202
    await wait_for(lambda: settled(daemon), timeout_s=60, what="every event delivered")

    records = await read_topic(kafka.bootstrap, "audit-oauth")
    keys = sorted(r.key.decode() for r in records)
    assert keys == sorted(e["id"] for e in events), "each event once, nothing else"
    assert iam.grants, "the token came from IAM"
    for grant in iam.grants:
        assert (grant.status, grant.form["grant_type"]) == (200, CR_TOKEN_GRANT_TYPE)
        assert grant.form["cr_token"] == CR_TOKEN
        assert grant.form[iam.profile[0]] == iam.profile[1]
    # One token, cached, for every connection the producer opened.
    assert len(iam.issued) == 1
    row = daemon.status()["targets"]["es"]
    assert (row["delivered"], row["dead_lettered"], row["pending"]) == (len(events), 0, 0)
    assert row["write_status"]["status"] == "success"
    assert_books_balance(daemon)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("wrong", ["audience", "signature"])
async def test_a_token_the_broker_refuses_dead_letters_saying_kafka_refused_it(
    start_daemon: StartDaemon, iam: FakeIam, kafka: KafkaBroker, tmp_path: Path, wrong: str
) -> None:
    if wrong == "audience":
        iam.audience = "some-other-service"
    else:
        iam.forger = IamSigningKey(kid=iam.key.kid)  # same key id, a key IAM never published
    daemon = await start(start_daemon, iam, kafka, tmp_path, f"audit-refused-{wrong}")
    await post(daemon, [make_event(id=f"refused-{wrong}")])
    await wait_for(lambda: settled(daemon), timeout_s=60, what="dead-lettered")

    [letter] = letters(tmp_path)
    assert letter["event"]["id"] == f"refused-{wrong}"
    assert (letter["reason"], letter["attempts"]) == ("permanent_error", 1)
    assert (
        f"Kafka at {kafka.oauth_bootstrap} refused the IAM token of trusted profile "
        in (letter["message"])
    )
    assert "SASL OAUTHBEARER" in letter["message"]
    assert "SaslAuthenticationFailed" in letter["message"]
    assert [grant.status for grant in iam.grants][:1] == [200], "IAM itself said yes"
    assert await read_topic(kafka.bootstrap, f"audit-refused-{wrong}") == []
    assert_books_balance(daemon)


@pytest.mark.timeout(240)
async def test_iam_refusing_the_grant_dead_letters_with_iams_reason(
    start_daemon: StartDaemon, iam: FakeIam, kafka: KafkaBroker, tmp_path: Path
) -> None:
    iam.cr_tokens = {"another-pods-token"}
    daemon = await start(start_daemon, iam, kafka, tmp_path, "audit-no-grant")
    await post(daemon, [make_event(id="no-grant")])
    await wait_for(lambda: settled(daemon), timeout_s=60, what="dead-lettered")

    [letter] = letters(tmp_path)
    assert (letter["reason"], letter["attempts"], letter["status"]) == ("permanent_status", 1, 400)
    assert "IAM refused the grant" in letter["message"]
    assert "BXNIM0438E" in letter["response_excerpt"]
    assert CR_TOKEN not in str(letter)
    assert_books_balance(daemon)


@pytest.mark.timeout(240)
async def test_tokens_that_expire_under_load_are_renewed_and_every_event_arrives_once(
    start_daemon: StartDaemon, iam: FakeIam, kafka: KafkaBroker, tmp_path: Path
) -> None:
    """The broker ends a session when its token expires (connections.max.reauth.ms set);
    aiokafka cannot re-authenticate, so it is disconnected and connects again, asking for a
    token: the cached one is past 80% of its lifetime by then, and IAM is asked for a new
    one. Under a steady stream, across several expiries, every event arrives once."""
    iam.expires_in_s = 3
    daemon = await start(start_daemon, iam, kafka, tmp_path, "audit-expiring")
    sent: list[str] = []
    enough = asyncio.Event()

    async def steady_stream() -> None:
        n = 0
        while not enough.is_set():
            ids = [f"exp-{n}-{i}" for i in range(5)]
            status, _ = await post(daemon, [make_event(id=event_id) for event_id in ids])
            assert status == 202
            sent.extend(ids)
            n += 1
            await asyncio.sleep(0.05)  # a steady stream, not one burst

    stream = asyncio.create_task(steady_stream())
    try:
        await wait_for(lambda: len(iam.issued) >= 4, timeout_s=90, what="three renewals")
    finally:
        enough.set()
        await stream
    await wait_for(lambda: settled(daemon), timeout_s=90, what="everything delivered")

    keys = [r.key.decode() for r in await read_topic(kafka.bootstrap, "audit-expiring")]
    assert sorted(keys) == sorted(sent), "every event once, through every expiry"
    assert len(set(iam.issued)) == len(iam.issued), "each renewal is a new token"
    row = daemon.status()["targets"]["es"]
    assert (row["delivered"], row["dead_lettered"]) == (len(sent), 0)
    assert_books_balance(daemon)
