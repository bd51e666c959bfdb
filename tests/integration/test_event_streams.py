"""The event_streams target against a real Apache Kafka 4 broker (KRaft) on loopback.

A real daemon (in-process, real journal) produces to the broker of tests/peers/kafka.py; the
tests read the topic back with a consumer, to its end offsets, so a duplicate or a missing
message is seen. The IBM way (SASL PLAIN as `token` with the API key, over TLS) delivers every
event once with its key and atracker's headers; a wrong key fails permanently and visibly; the
broker stopped under load is retried until it is back, and then everything is there once; a
message over the broker's limit is dead-lettered alone, with its reason.
"""

from __future__ import annotations

import asyncio
import copy
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.helpers import create_ssl_context

from router.daemon import Daemon
from tests.conftest import StartDaemon
from tests.fakes import ACCOUNT, make_event, read_ndjson, wait_for
from tests.helpers import (
    assert_books_balance,
    everything_to,
    free_port,
    post,
    settled,
)
from tests.integration.test_api import INGEST, Client, loopback_auth
from tests.integration.test_crash import kill_9_under_load
from tests.integration.test_hostile_admin import dns
from tests.peers.kafka import AnswerDropper, KafkaBroker

pytestmark = pytest.mark.peers
__all__ = ["dns"]  # a fixture, used by name

ES_CRN = "crn:v1:bluemix:public:messagehub:eu-de:a/a1b2c3d4:7e1b2c3d-0000-4c1d-9e2f-5a6b7c8d9e0f::"


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    with KafkaBroker(tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch, kafka: KafkaBroker) -> str:
    monkeypatch.setenv("EVENT_STREAMS_API_KEY", kafka.api_key)
    return kafka.api_key


def es_target(topic: str, brokers: str, **endpoint: Any) -> dict[str, Any]:
    return {
        "id": "es",
        "target_type": "event_streams",
        "eventstreams_endpoint": {
            "target_crn": ES_CRN,
            "brokers": [brokers],
            "topic": topic,
            **endpoint,
        },
    }


def ibm_way(kafka: KafkaBroker) -> dict[str, Any]:
    """What an Event Streams target needs: SASL PLAIN as `token` over TLS (our CA here)."""
    return {"api_key": "${env:EVENT_STREAMS_API_KEY}", "tls": {"ca_file": str(kafka.ca_file)}}


def plaintext() -> dict[str, Any]:
    return {"tls": False, "sasl": {"mechanism": "none"}}


async def read_topic(bootstrap: str, topic: str, **auth: Any) -> list[Any]:
    """Every record of the topic's only partition, from its start to its end offset now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **auth)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        records: list[Any] = []

        async def read_to_end() -> bool:
            for batch in (await consumer.getmany(partition, timeout_ms=200)).values():
                records.extend(batch)
            return await consumer.position(partition) >= end

        await wait_for(read_to_end, timeout_s=60, what=f"{end} records of {topic}")
        return records
    finally:
        await consumer.stop()


async def create_topic(kafka: KafkaBroker, topic: str, **configs: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs=configs)])
    finally:
        await admin.close()


def letters(tmp_path: Path) -> list[dict[str, Any]]:
    return read_ndjson(tmp_path / "var" / "deadletter" / "es.ndjson")


def row(daemon: Daemon) -> dict[str, Any]:
    result: dict[str, Any] = daemon.status()["targets"]["es"]
    return result


@pytest.mark.timeout(180)
async def test_every_event_arrives_once_with_its_key_and_atrackers_headers(
    start_daemon: StartDaemon, kafka: KafkaBroker, api_key: str, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {
            "targets": [
                es_target("audit-once", kafka.sasl_ssl_bootstrap, **ibm_way(kafka)),
                {
                    "id": "archive",
                    "target_type": "file",
                    "file_endpoint": {"path": str(tmp_path / "archive.ndjson")},
                },
            ],
            "routes": everything_to("es", "archive"),
        }
    )
    events = [make_event(id=f"once-{i}", location="us-south") for i in range(40)]
    events += [make_event(id=f"once-g{i}", location="") for i in range(5)]
    for start in range(0, len(events), 15):
        status, _ = await post(daemon, events[start : start + 15])
        assert status == 202
    await wait_for(lambda: settled(daemon), timeout_s=60, what="every event delivered")

    auth = {
        "security_protocol": "SASL_SSL",
        "ssl_context": create_ssl_context(cafile=str(kafka.ca_file)),
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "token",
        "sasl_plain_password": api_key,
    }
    records = await read_topic(kafka.sasl_ssl_bootstrap, "audit-once", **auth)
    keys = [r.key.decode() for r in records]
    assert sorted(keys) == sorted(e["id"] for e in events), "each event once, nothing else"

    posted = {e["id"]: e for e in events}
    # The archive's lines are the same stored events (with the archive's own `_chain` link).
    archived = {e["id"]: e for e in read_ndjson(tmp_path / "archive.ndjson") if "id" in e}
    for record in records:
        value = orjson.loads(record.value)
        assert value == posted[record.key.decode()], "the event's JSON as stored"
        assert {k: v for k, v in archived[value["id"]].items() if k != "_chain"} == value
        headers = {k: bytes(v).decode() for k, v in record.headers}
        location = "global" if record.key.startswith(b"once-g") else "us-south"
        assert headers == {
            "type": "audit",
            "account": ACCOUNT,
            "region": "eu-de",  # the Event Streams instance's region, from target_crn
            "location": location,
        }
    es = row(daemon)
    assert (es["delivered"], es["dead_lettered"], es["pending"]) == (len(events), 0, 0)
    assert es["write_status"]["status"] == "success"
    assert_books_balance(daemon)


@pytest.mark.timeout(180)
async def test_validate_writes_a_test_message_to_the_topic(
    start_daemon: StartDaemon, kafka: KafkaBroker, api_key: str
) -> None:
    daemon = await start_daemon(
        {
            "targets": [
                es_target(
                    "audit-validate",
                    kafka.sasl_bootstrap,
                    api_key="${env:EVENT_STREAMS_API_KEY}",
                    tls=False,
                )
            ],
            "routes": everything_to("es"),
        }
    )
    result = await daemon.probe_target("es")
    assert result.ok, result.message
    records = await read_topic(kafka.bootstrap, "audit-validate")
    assert len(records) == 1
    assert orjson.loads(records[0].value)["action"] == "event-router.target.validate"
    assert row(daemon)["write_status"]["status"] == "success"


@pytest.mark.parametrize("mechanism", ["scram-sha-256", "scram-sha-512"])
@pytest.mark.timeout(180)
async def test_scram_authenticates_to_a_real_broker_and_a_wrong_password_is_permanent(
    start_daemon: StartDaemon, kafka: KafkaBroker, tmp_path: Path, mechanism: str
) -> None:
    """Other Kafka clusters than Event Streams: SCRAM (the broker keeps the user's salted
    credentials in its KRaft metadata), the api_key as the password."""
    sasl = {"mechanism": mechanism, "username": kafka.scram_user}
    topic = f"audit-{mechanism}"
    daemon = await start_daemon(
        {
            "targets": [
                es_target(topic, kafka.sasl_bootstrap, api_key=kafka.api_key, tls=False, sasl=sasl),
                es_target(
                    topic, kafka.sasl_bootstrap, api_key="not-the-password", tls=False, sasl=sasl
                )
                | {"id": "wrong"},
            ],
            "routes": everything_to("es", "wrong"),
        }
    )
    status, _ = await post(daemon, [make_event(id=f"{mechanism}-{i}") for i in range(5)])
    assert status == 202
    await wait_for(lambda: settled(daemon), timeout_s=60, what="the events settled")
    records = await read_topic(kafka.bootstrap, topic)
    assert sorted(r.key.decode() for r in records) == [f"{mechanism}-{i}" for i in range(5)]
    assert (row(daemon)["delivered"], row(daemon)["dead_lettered"]) == (5, 0)
    wrong = daemon.status()["targets"]["wrong"]
    assert (wrong["delivered"], wrong["dead_lettered"]) == (0, 5)
    assert (
        f"SASL {mechanism} as {kafka.scram_user!r}"
        in wrong["write_status"]["reason_for_last_failure"]
    )
    assert_books_balance(daemon)


@pytest.mark.timeout(180)
async def test_a_wrong_api_key_fails_permanently_and_says_so(
    start_daemon: StartDaemon,
    kafka: KafkaBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVENT_STREAMS_API_KEY", "not-the-api-key")
    daemon = await start_daemon(
        {
            "targets": [es_target("audit-refused", kafka.sasl_ssl_bootstrap, **ibm_way(kafka))],
            "routes": everything_to("es"),
        }
    )
    result = await daemon.probe_target("es")
    assert not result.ok
    assert "refused the credentials" in result.message
    assert "SaslAuthenticationFailed" in result.message

    await post(daemon, [make_event(id="refused-1"), make_event(id="refused-2")])
    await wait_for(lambda: settled(daemon), timeout_s=60, what="the events settled")
    dead = letters(tmp_path)
    assert sorted(letter["event"]["id"] for letter in dead) == ["refused-1", "refused-2"]
    assert {letter["reason"] for letter in dead} == {"permanent_error"}
    assert all(letter["attempts"] == 1 for letter in dead), "not retried"
    assert "refused the credentials" in dead[0]["message"]
    assert "not-the-api-key" not in dead[0]["message"]
    status = row(daemon)["write_status"]
    assert status["status"] == "failed"
    assert "refused the credentials" in status["reason_for_last_failure"]
    assert_books_balance(daemon)


@pytest.mark.timeout(300)
async def test_the_broker_stopped_under_load_is_retried_and_everything_arrives_once(
    start_daemon: StartDaemon, kafka: KafkaBroker, tmp_path: Path
) -> None:
    """The daemon reaches the broker through an AnswerDropper while a steady stream flows.
    First the broker's answers to produce requests are lost (it stores batches the producer
    cannot know it stored), then the broker shuts down (its controlled shutdown answers that
    the partition has no leader), stays down for longer than a produce request may take
    (timeout_s) and comes back. Every event must be in the topic exactly once: a batch whose
    answer was lost may only go again under the producer's own sequence numbers."""
    async with AnswerDropper(kafka) as dropper:
        daemon = await start_daemon(
            {
                "targets": [
                    es_target("audit-outage", kafka.proxied_bootstrap, timeout_s=2, **plaintext())
                    | {
                        "retry": {
                            "max_attempts": 1000,
                            "max_age_s": 600,
                            "initial_backoff_s": 0.2,
                            "max_backoff_s": 1,
                        },
                        "batch": {"max_events": 50, "max_wait_s": 0.05},
                    }
                ],
                "routes": everything_to("es"),
            }
        )
        sent: list[str] = []
        enough = asyncio.Event()

        async def steady_stream() -> None:
            """20 events every few milliseconds, through the outage and after it."""
            n = 0
            while not enough.is_set():
                ids = [f"load-{n}-{i}" for i in range(20)]
                status, _ = await post(daemon, [make_event(id=event_id) for event_id in ids])
                assert status == 202
                sent.extend(ids)
                n += 1
                await asyncio.sleep(0.02)  # a steady stream, not one burst

        stream = asyncio.create_task(steady_stream())
        await wait_for(lambda: row(daemon)["delivered"] >= 100, timeout_s=60, what="delivery")
        dropper.dropping = True
        await wait_for(lambda: dropper.dropped >= 2, timeout_s=60, what="answers lost")
        await kafka.astop()  # with the stream still flowing
        dropper.dropping = False
        retries = row(daemon)["retries"]
        await wait_for(
            lambda: row(daemon)["retries"] >= retries + 4,
            timeout_s=60,
            what="retries while the broker is down",
        )
        assert row(daemon)["pending"] > 0
        assert row(daemon)["write_status"]["status"] == "failed"
        await kafka.astart()
        delivered = row(daemon)["delivered"]
        await wait_for(
            lambda: row(daemon)["delivered"] >= delivered + 200,
            timeout_s=60,
            what="delivery after the restart",
        )
        enough.set()
        await stream
        await wait_for(lambda: settled(daemon), timeout_s=120, what="the backlog delivered")

    records = await read_topic(kafka.bootstrap, "audit-outage")
    keys = [r.key.decode() for r in records]
    assert set(keys) == set(sent), "every event reaches the topic"
    es = row(daemon)
    assert (es["delivered"], es["dead_lettered"]) == (len(sent), 0)
    assert es["write_status"]["status"] == "success"
    twice = sorted(key for key, n in Counter(keys).items() if n > 1)
    assert not twice, f"{len(keys)} messages for {len(set(keys))} events; again: {twice[:10]}"
    assert letters(tmp_path) == []
    assert_books_balance(daemon)


@pytest.mark.timeout(180)
async def test_a_message_over_the_brokers_limit_is_dead_lettered_alone(
    start_daemon: StartDaemon, kafka: KafkaBroker, tmp_path: Path
) -> None:
    # Smaller than the batch of small events, so Kafka first refuses them all together.
    await create_topic(kafka, "audit-limit", **{"max.message.bytes": "6000"})
    daemon = await start_daemon(
        {
            "targets": [es_target("audit-limit", kafka.bootstrap, **plaintext())],
            "routes": everything_to("es"),
        }
    )
    small = [make_event(id=f"small-{i}") for i in range(12)]
    big = make_event(id="big", requestData={"blob": "x" * 20_000})
    status, _ = await post(daemon, [*small[:6], big, *small[6:]])
    assert status == 202
    await wait_for(lambda: settled(daemon), timeout_s=60, what="the batch settled")

    records = await read_topic(kafka.bootstrap, "audit-limit")
    assert sorted(r.key.decode() for r in records) == sorted(e["id"] for e in small)
    [letter] = letters(tmp_path)
    assert letter["event"]["id"] == "big"
    assert letter["reason"] == "permanent_error"
    assert "MessageSizeTooLargeError" in letter["message"]
    es = row(daemon)
    assert (es["delivered"], es["dead_lettered"]) == (len(small), 1)
    assert_books_balance(daemon)


@pytest.mark.timeout(180)
async def test_an_event_over_max_message_bytes_is_dead_lettered_before_any_attempt(
    start_daemon: StartDaemon, kafka: KafkaBroker, tmp_path: Path
) -> None:
    daemon = await start_daemon(
        {
            "targets": [
                es_target("audit-preflight", kafka.bootstrap, max_message_bytes=4096, **plaintext())
            ],
            "routes": everything_to("es"),
        }
    )
    await post(daemon, [make_event(id="fits"), make_event(id="huge", message="y" * 5000)])
    await wait_for(lambda: settled(daemon), timeout_s=60, what="the batch settled")
    [letter] = letters(tmp_path)
    assert (letter["event"]["id"], letter["reason"], letter["attempts"]) == ("huge", "too_large", 0)
    records = await read_topic(kafka.bootstrap, "audit-preflight")
    assert [r.key for r in records] == [b"fits"]
    assert_books_balance(daemon)


@pytest.mark.timeout(180)
async def test_the_management_api_creates_and_validates_an_event_streams_target(
    start_daemon: StartDaemon, kafka: KafkaBroker, tmp_path: Path
) -> None:
    daemon = await start_daemon({"auth": loopback_auth(), "targets": [], "routes": []})
    api = Client(daemon)
    body = {
        "name": "audit to event streams",
        "target_type": "event_streams",
        "eventstreams_endpoint": {
            "target_crn": ES_CRN,
            "brokers": [kafka.sasl_bootstrap],
            "topic": "audit-api",
            "api_key": kafka.api_key,
            "service_to_service_enabled": False,
            "tls": False,  # the extension this loopback listener needs
        },
    }
    status, target = await api.call("POST", "/api/v2/targets", body)
    assert status == 201, target
    assert target["eventstreams_endpoint"]["api_key"] == "REDACTED"
    assert target["eventstreams_endpoint"]["brokers"] == [kafka.sasl_bootstrap]
    status, validated = await api.call("POST", f"/api/v2/targets/{target['id']}/validate")
    assert status == 200 and validated["write_status"]["status"] == "success"
    records = await read_topic(kafka.bootstrap, "audit-api")  # create's test write, validate's
    assert [orjson.loads(r.value)["action"] for r in records] == [
        "event-router.target.validate"
    ] * 2

    # atracker test-writes on create and update (its ts-17): a refused write creates nothing
    # and changes nothing.
    wrong = {**body, "eventstreams_endpoint": {**body["eventstreams_endpoint"], "api_key": "nope"}}
    status, refused = await api.call("POST", "/api/v2/targets", wrong | {"name": "wrong key"})
    assert status == 400, refused
    assert refused["errors"][0]["code"] == "event_streams_write_test_failed", refused
    assert "could not write to the Event Streams topic" in refused["errors"][0]["message"]
    assert "refused the credentials" in refused["errors"][0]["message"]
    assert "nope" not in str(refused)
    status, listed = await api.call("GET", "/api/v2/targets")
    assert [t["name"] for t in listed["targets"]] == ["audit to event streams"]

    status, replaced = await api.call("PUT", f"/api/v2/targets/{target['id']}", wrong)
    assert status == 400 and replaced["errors"][0]["code"] == "event_streams_write_test_failed"
    assert len(await read_topic(kafka.bootstrap, "audit-api")) == 2  # refused writes add none
    status, kept = await api.call("POST", f"/api/v2/targets/{target['id']}/validate")
    assert status == 200 and kept["write_status"]["status"] == "success"


@pytest.mark.timeout(240)
async def test_kill_9_of_the_daemon_loses_nothing_and_duplicates_at_most_a_batch(
    kafka: KafkaBroker, tmp_path: Path
) -> None:
    """At-least-once across a crash (the README's promise): every event answered 202 is in
    the topic after a `kill -9` and a restart; a message Kafka took whose acknowledgement the
    journal had not recorded may be there twice, nothing more than what was in flight."""
    port = free_port()
    config = tmp_path / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "storage": {"path": str(tmp_path / "var"), "fsync": "always"},
                "startup": {"validate_targets": False},
                "targets": [
                    es_target("audit-crash", kafka.bootstrap, **plaintext())
                    | {"batch": {"max_events": 50}}
                ],
                "routes": everything_to("es"),
            }
        )
    )
    acked = await kill_9_under_load(config, port)
    keys = [r.key.decode() for r in await read_topic(kafka.bootstrap, "audit-crash")]
    missing = set(acked) - set(keys)
    assert not missing, f"lost {len(missing)} of {len(acked)} acknowledged events"
    duplicates = len(keys) - len(set(keys))
    print(f"acked {len(acked)}; in the topic {len(keys)}; duplicates after kill -9: {duplicates}")
    assert duplicates <= 50, "at most one batch in flight at the kill"


@pytest.mark.timeout(180)
async def test_a_broker_name_that_rebinds_after_the_api_checked_it_is_not_connected_to(
    start_daemon: StartDaemon, kafka: KafkaBroker, dns: dict[str, str]
) -> None:
    """A broker name the management API set resolves inside auth.api_target_networks when the
    target is made (its test write reaches the broker), then to 0.0.0.0 (this host's own
    listeners) by the time the daemon starts again. The hosts the API set are kept in the
    YAML (api_hosts), so the restarted daemon checks the name again before aiokafka connects
    to it: nothing reaches the broker, and the event is dead-lettered with the reason."""
    port = kafka.sasl_bootstrap.rpartition(":")[2]
    dns["kafka.example"] = "127.0.0.1"
    auth = {**loopback_auth(), "api_target_networks": ["127.0.0.1/32"]}
    daemon = await start_daemon({"auth": auth, "targets": [], "routes": []})
    api = Client(daemon)
    body = {
        "name": "rebinding",
        "target_type": "event_streams",
        "eventstreams_endpoint": {
            "target_crn": ES_CRN,
            "brokers": [f"kafka.example:{port}"],
            "topic": "audit-rebound",
            "api_key": kafka.api_key,
            "tls": False,
            "timeout_s": 5,
        },
    }
    status, target = await api.call("POST", "/api/v2/targets", body)
    assert status == 201, target
    route = {"name": "r", "rules": [{"locations": ["*"], "target_ids": [target["id"]]}]}
    assert (await api.call("POST", "/api/v2/routes", route))[0] == 201
    await wait_for(lambda: settled(daemon), timeout_s=60, what="the audit events delivered")
    before = len(await read_topic(kafka.bootstrap, "audit-rebound"))
    delivered = daemon.status()["targets"][target["id"]]["delivered"]
    await daemon.stop()

    dns["kafka.example"] = "0.0.0.0"
    data = copy.deepcopy(daemon.source.data)
    data["delivery"] = {"retry": {"max_attempts": 2, "initial_backoff_s": 0.05}}
    again = await start_daemon(data)
    headers = {"Authorization": f"Bearer {INGEST}"}
    assert (await post(again, [make_event(id="rebound")], headers=headers))[0] == 202
    await wait_for(lambda: settled(again), timeout_s=60, what="the event settled")
    row = again.status()["targets"][target["id"]]
    assert (row["delivered"], row["dead_lettered"]) == (delivered, 1), row
    why = row["write_status"]["reason_for_last_failure"]
    assert "0.0.0.0" in why and "auth.api_target_networks" in why, why
    assert len(await read_topic(kafka.bootstrap, "audit-rebound")) == before
    assert_books_balance(again)


@pytest.fixture
async def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The address of every TCP connection this loop opens (asyncio's create_connection,
    and so aiokafka and aiohttp, connect through loop.sock_connect), as it was connected to."""
    loop = asyncio.get_running_loop()
    opened: list[str] = []
    sock_connect = loop.sock_connect

    async def recorded(sock: socket.socket, address: Any) -> None:
        opened.append(str(address[0]))
        await sock_connect(sock, address)

    monkeypatch.setattr(loop, "sock_connect", recorded)
    return opened


def bounded(target: dict[str, Any], *hosts: str) -> dict[str, Any]:
    """A target as the management API leaves it in the YAML: the hosts it set, checked again
    at every connection against auth.api_target_networks."""
    return target | {"api_hosts": list(hosts)}


@pytest.fixture
def rebinding(dns: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """A name server for rebinding names: each name added to the returned counter answers
    127.0.0.1 (inside auth.api_target_networks) to its first lookup and 0.0.0.0 (this host's
    own listeners) to every later one, as a zero-TTL name whose owner flips it once it has
    been checked; the counter counts its lookups. One connection made to the address of the
    first answer is all that can succeed."""
    lookups: Counter[str] = Counter()
    system = socket.getaddrinfo  # the dns fixture's: answers its table, else the system

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name in lookups:
            dns[name] = "0.0.0.0" if lookups[name] else "127.0.0.1"
            lookups[name] += 1
        return system(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def rebinding_config(target: dict[str, Any], *hosts: str) -> dict[str, Any]:
    """A daemon with `target` as the management API leaves it in the YAML (`hosts` its
    api_hosts), allowed to reach 127.0.0.1 only, retrying for as long as a test needs."""
    target["eventstreams_endpoint"] |= {"tls": False, "timeout_s": 5}
    return {
        "auth": {**loopback_auth(), "api_target_networks": ["127.0.0.1/32"]},
        "delivery": {"retry": {"max_attempts": 100, "initial_backoff_s": 0.05}},
        "targets": [bounded(target, *hosts)],
        "routes": everything_to("es"),
    }


async def deliver_rebinding(
    start_daemon: StartDaemon, config: dict[str, Any], bootstrap: str, topic: str
) -> list[str]:
    """Post 5 events to a daemon of `config`; when they settle, every one delivered (read
    back from the topic) and the books balance."""
    daemon = await start_daemon(config)
    ids = [f"{topic}-{n}" for n in range(5)]
    events = [make_event(id=i) for i in ids]
    assert (await post(daemon, events, headers={"Authorization": f"Bearer {INGEST}"}))[0] == 202
    await wait_for(lambda: settled(daemon), timeout_s=60, what="the events settled")
    row = daemon.status()["targets"]["es"]
    assert row["delivered"] == row["received"] == len(ids), row
    assert sorted(r.key.decode() for r in await read_topic(bootstrap, topic)) == ids
    assert_books_balance(daemon)
    return ids


@pytest.mark.timeout(180)
async def test_a_broker_is_connected_to_at_the_address_its_check_resolved(
    start_daemon: StartDaemon,
    kafka: KafkaBroker,
    api_key: str,
    rebinding: Counter[str],
    connects: list[str],
) -> None:
    """The window between the check and the connection: the bootstrap broker's name
    answers 127.0.0.1 once, then 0.0.0.0. aiokafka looked the name up again itself after
    the target's check (127.0.0.1), so it connected to 0.0.0.0, an address no check had
    seen, and sent it the SASL credentials. Now each connection goes to the address its own
    check resolved: the events are delivered through 127.0.0.1, nothing connects to
    0.0.0.0."""
    port = kafka.sasl_bootstrap.rpartition(":")[2]
    rebinding["kafka.example"] = 0
    target = es_target(
        "audit-pinned", f"kafka.example:{port}", api_key="${env:EVENT_STREAMS_API_KEY}"
    )
    config = rebinding_config(target, "kafka.example")
    await deliver_rebinding(start_daemon, config, kafka.bootstrap, "audit-pinned")
    assert rebinding["kafka.example"] >= 1
    assert "0.0.0.0" not in connects, connects


@pytest.mark.timeout(240)
async def test_a_broker_its_metadata_names_is_connected_to_at_the_address_checked(
    start_daemon: StartDaemon,
    tmp_path: Path,
    rebinding: Counter[str],
    connects: list[str],
) -> None:
    """The same window for a broker the cluster's metadata names (Event Streams advertises
    its brokers by name): the target bootstraps from an address, the broker's advertised
    name answers 127.0.0.1 once, then 0.0.0.0, and aiokafka connects to the address that
    name's check resolved, never to 0.0.0.0."""
    rebinding["kafka-0.example"] = 0
    with KafkaBroker(
        tmp_path / "kafka", tls=False, sasl_advertised_host="kafka-0.example"
    ) as named:
        target = es_target("audit-named", named.sasl_bootstrap, api_key=named.api_key)
        config = rebinding_config(target, "127.0.0.1")
        await deliver_rebinding(start_daemon, config, named.bootstrap, "audit-named")
    assert rebinding["kafka-0.example"] >= 1
    assert "0.0.0.0" not in connects, connects


@pytest.mark.timeout(180)
async def test_a_bounded_broker_over_tls_is_verified_against_its_name(
    start_daemon: StartDaemon,
    kafka: KafkaBroker,
    api_key: str,
    dns: dict[str, str],
) -> None:
    """A target the API bounds connects to the address it checked, but its TLS handshake
    still names the broker as configured: the broker's certificate (for 127.0.0.1 and
    localhost) passes for `localhost` and fails for `kafka.example`, though both resolve to
    127.0.0.1 (were the checked address the name TLS verifies, both would pass)."""
    port = kafka.sasl_ssl_bootstrap.rpartition(":")[2]
    dns.update({"localhost": "127.0.0.1", "kafka.example": "127.0.0.1"})
    targets = []
    for target_id, name in (("named", "localhost"), ("misnamed", "kafka.example")):
        target = es_target(f"audit-tls-{target_id}", f"{name}:{port}", **ibm_way(kafka))
        target["eventstreams_endpoint"]["timeout_s"] = 5
        targets.append(bounded(target, name) | {"id": target_id})
    daemon = await start_daemon(
        {
            "auth": {**loopback_auth(), "api_target_networks": ["127.0.0.1/32"]},
            "delivery": {"retry": {"max_attempts": 2, "initial_backoff_s": 0.05}},
            "targets": targets,
            "routes": everything_to("named", "misnamed"),
        }
    )
    headers = {"Authorization": f"Bearer {INGEST}"}
    assert (await post(daemon, [make_event(id="tls-1")], headers=headers))[0] == 202
    await wait_for(lambda: settled(daemon), timeout_s=60, what="the event settled")
    rows = daemon.status()["targets"]
    assert rows["named"]["delivered"] == rows["named"]["received"] == 1, rows["named"]
    assert rows["misnamed"]["dead_lettered"] == rows["misnamed"]["received"] == 1
    why = rows["misnamed"]["write_status"]["reason_for_last_failure"]
    assert "CERTIFICATE_VERIFY_FAILED" in why and "kafka.example" in why, why
    assert_books_balance(daemon)


@pytest.mark.timeout(180)
async def test_a_broker_its_metadata_names_that_cannot_be_reached_does_not_hold_up_the_start(
    start_daemon: StartDaemon, tmp_path: Path, dns: dict[str, str]
) -> None:
    """The cluster answers at its bootstrap address, but the broker its metadata names may
    not be connected to (here: a name that resolves to 0.0.0.0, outside the networks the
    operator allows; as well a broker behind an address this host cannot reach). The
    producer waited for a producer id from that broker for ever, inside the target's start,
    so the daemon never opened its port. Now the start gives up after the endpoint's
    timeout_s: the daemon answers, and the events are retried, then dead-lettered with the
    reason."""
    dns["kafka-0.example"] = "0.0.0.0"
    with KafkaBroker(
        tmp_path / "kafka", tls=False, sasl_advertised_host="kafka-0.example"
    ) as named:
        target = es_target("audit-unreachable", named.sasl_bootstrap, api_key=named.api_key)
        config = rebinding_config(target, "127.0.0.1")
        config["delivery"] = {"retry": {"max_attempts": 2, "initial_backoff_s": 0.05}}
        daemon = await start_daemon(config)
        headers = {"Authorization": f"Bearer {INGEST}"}
        assert (await post(daemon, [make_event(id="held-up")], headers=headers))[0] == 202
        await wait_for(lambda: settled(daemon), timeout_s=90, what="the event settled")
    row = daemon.status()["targets"]["es"]
    assert row["delivered"] == 0 and row["dead_lettered"] == row["received"] >= 1, row
    why = row["write_status"]["reason_for_last_failure"]
    assert "kafka-0.example" in why and "0.0.0.0" in why, why
    assert_books_balance(daemon)
