"""The real peers of tests/peers/ work with the client libraries the product will use.

Kafka 4 (KRaft) with aiokafka: an idempotent acks=all producer and a consumer group, headers
kept, over PLAINTEXT, SASL PLAIN (the API key as password, a wrong one refused) and SASL PLAIN
over TLS; a restarted broker still has what it acknowledged. moto's S3 with aiobotocore
(SigV4): put/get/list, a multipart upload aborted leaves nothing, an outage of the endpoint
refuses and then finds every object again. nats-server with JetStream and nats-py: Nats-Msg-Id
de-duplication, a durable pull consumer acked to zero pending; a 3-node cluster keeps taking
publishes to an R3 stream with its stream leader killed.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiobotocore.session
import nats
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from tests.peers.kafka import KafkaBroker
from tests.peers.nats import NatsCluster, NatsServer
from tests.peers.s3 import S3Server

pytestmark = pytest.mark.peers

ACCOUNT = "a1b2c3d4e5f60718293a4b5c6d7e8f90"


async def eventually(
    predicate: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Await `predicate()` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


# Kafka ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    with KafkaBroker(tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


def audit_headers(event_id: str) -> list[tuple[str, bytes]]:
    """atracker's Event Streams headers."""
    return [
        ("type", b"audit"),
        ("account", ACCOUNT.encode()),
        ("region", b"us-south"),
        ("location", b"us-south"),
        ("id", event_id.encode()),
    ]


async def produce(producer: AIOKafkaProducer, topic: str, ids: list[str]) -> None:
    for event_id in ids:
        await producer.send_and_wait(
            topic,
            key=event_id.encode(),
            value=b'{"id": "%s"}' % event_id.encode(),
            headers=audit_headers(event_id),
        )


async def consume_all(bootstrap: str, topic: str, count: int, **auth: Any) -> list[Any]:
    """Read `count` records of `topic` from the start, as a consumer group would."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"check-{topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **auth,
    )
    await consumer.start()
    records: list[Any] = []
    try:

        async def got_all() -> bool:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
            return len(records) >= count

        await eventually(got_all, timeout_s=60, what=f"{count} records of {topic}")
    finally:
        await consumer.stop()
    return records


def sasl(broker: KafkaBroker, password: str | None = None) -> dict[str, Any]:
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": broker.username,
        "sasl_plain_password": broker.api_key if password is None else password,
    }


@pytest.mark.timeout(180)
async def test_kafka_idempotent_acks_all_producer_delivers_records_with_headers(
    kafka: KafkaBroker,
) -> None:
    ids = [f"evt-{i}" for i in range(20)]
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        await produce(producer, "audit-plain", ids)
    finally:
        await producer.stop()

    records = await consume_all(kafka.bootstrap, "audit-plain", len(ids))

    assert [r.key.decode() for r in records] == ids
    assert records[3].value == b'{"id": "evt-3"}'
    assert [(k, bytes(v)) for k, v in records[3].headers] == audit_headers("evt-3")


@pytest.mark.timeout(180)
async def test_kafka_sasl_plain_takes_the_api_key_and_refuses_a_wrong_one(
    kafka: KafkaBroker,
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.sasl_bootstrap, acks="all", enable_idempotence=True, **sasl(kafka)
    )
    await producer.start()
    try:
        await produce(producer, "audit-sasl", ["s-1", "s-2"])
    finally:
        await producer.stop()
    records = await consume_all(kafka.sasl_bootstrap, "audit-sasl", 2, **sasl(kafka))
    assert [r.key for r in records] == [b"s-1", b"s-2"]

    refused = AIOKafkaProducer(
        bootstrap_servers=kafka.sasl_bootstrap, **sasl(kafka, password="not-the-api-key")
    )
    with pytest.raises(KafkaError):
        await refused.start()
    await refused.stop()


@pytest.mark.timeout(180)
async def test_kafka_sasl_plain_over_tls_as_event_streams_speaks_it(kafka: KafkaBroker) -> None:
    auth = {
        **sasl(kafka),
        "security_protocol": "SASL_SSL",
        "ssl_context": create_ssl_context(cafile=str(kafka.ca_file)),
    }
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.sasl_ssl_bootstrap, acks="all", enable_idempotence=True, **auth
    )
    await producer.start()
    try:
        await produce(producer, "audit-tls", ["t-1"])
    finally:
        await producer.stop()
    records = await consume_all(kafka.sasl_ssl_bootstrap, "audit-tls", 1, **auth)
    assert records[0].key == b"t-1"


@pytest.mark.timeout(240)
async def test_kafka_broker_restarted_mid_test_still_has_what_it_acknowledged(
    kafka: KafkaBroker,
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        await produce(producer, "audit-restart", ["r-1", "r-2"])
        await kafka.arestart()
        # The same producer reconnects to the broker on the same port and goes on.
        await produce(producer, "audit-restart", ["r-3"])
    finally:
        await producer.stop()

    records = await consume_all(kafka.bootstrap, "audit-restart", 3)
    assert [r.key for r in records] == [b"r-1", b"r-2", b"r-3"]


# S3 (moto) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
async def s3(s3_server: S3Server) -> AsyncIterator[Any]:
    """An aiobotocore S3 client (SigV4, path-style, one attempt so outages show at once)."""
    s3_server.reset()
    config = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=2,
        read_timeout=10,
    )
    session = aiobotocore.session.get_session()
    async with session.create_client("s3", config=config, **s3_server.client_config()) as client:
        yield client


async def test_s3_put_get_list_and_an_aborted_multipart_upload_leaves_nothing(
    s3: Any, s3_server: S3Server
) -> None:
    body = gzip.compress(b'{"id": "e-1"}\n{"id": "e-2"}\n')
    key = f"{ACCOUNT}/us-south/2026-11-30T23/20261130T2300Z+0000_obj.log"
    s3_server.create_bucket("audit")
    authorizations: list[str] = []
    s3.meta.events.register(
        "before-send.s3.PutObject",
        lambda request, **_: authorizations.append(request.headers["Authorization"].decode()),
    )

    await s3.put_object(Bucket="audit", Key=key, Body=body, ContentEncoding="gzip")

    assert authorizations[0].startswith(f"AWS4-HMAC-SHA256 Credential={s3_server.access_key_id}/")
    assert f"/{s3_server.region}/s3/aws4_request" in authorizations[0]

    got = await s3.get_object(Bucket="audit", Key=key)
    async with got["Body"] as stream:
        assert await stream.read() == body
    listed = await s3.list_objects_v2(Bucket="audit", Prefix=f"{ACCOUNT}/")
    assert [o["Key"] for o in listed["Contents"]] == [key]

    upload = await s3.create_multipart_upload(Bucket="audit", Key="half.log")
    await s3.upload_part(
        Bucket="audit", Key="half.log", UploadId=upload["UploadId"], PartNumber=1, Body=body
    )
    await s3.abort_multipart_upload(Bucket="audit", Key="half.log", UploadId=upload["UploadId"])

    assert "Uploads" not in await s3.list_multipart_uploads(Bucket="audit")
    listed = await s3.list_objects_v2(Bucket="audit")
    assert [o["Key"] for o in listed["Contents"]] == [key]
    with pytest.raises(ClientError) as refused:
        await s3.put_object(Bucket="no-such-bucket", Key="x", Body=b"x")
    assert refused.value.response["Error"]["Code"] == "NoSuchBucket"


async def test_s3_endpoint_outage_refuses_writes_and_keeps_the_objects(
    s3: Any, s3_server: S3Server
) -> None:
    s3_server.create_bucket("audit")
    await s3.put_object(Bucket="audit", Key="before.log", Body=b"before")

    await s3_server.akill()
    with pytest.raises(EndpointConnectionError):
        await s3.put_object(Bucket="audit", Key="during.log", Body=b"during")
    await s3_server.astart()

    await s3.put_object(Bucket="audit", Key="after.log", Body=b"after")
    listed = await s3.list_objects_v2(Bucket="audit")
    assert [o["Key"] for o in listed["Contents"]] == ["after.log", "before.log"]


# NATS JetStream --------------------------------------------------------------------------


async def publish_acked(js: JetStreamContext, subject: str, event_id: str) -> bool:
    """Publish with Nats-Msg-Id; True when stored, False when the stream saw the id before."""
    ack = await js.publish(subject, event_id.encode(), headers={"Nats-Msg-Id": event_id})
    return not ack.duplicate


async def publish_until_acked(js: JetStreamContext, subject: str, event_id: str) -> None:
    """Publish until the stream acknowledges, as a replicated journal must.

    A new R3 stream, or one whose leader died, has no leader for a moment: the publish times
    out or finds no responders. The retry carries the same Nats-Msg-Id, so nothing is stored
    twice.
    """

    async def stored() -> bool:
        try:
            await publish_acked(js, subject, event_id)
        except (TimeoutError, nats.errors.Error):
            return False
        return True

    await eventually(stored, timeout_s=30, what=f"{event_id} acknowledged")


async def test_jetstream_dedups_by_msg_id_and_a_durable_pull_consumer_acks_to_zero(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="EVENTS", subjects=["events.>"]))
        stored = [await publish_acked(js, "events.in", f"e-{i}") for i in range(10)]
        # A producer's retry after a lost answer: the same ids again are not stored twice.
        again = [await publish_acked(js, "events.in", f"e-{i}") for i in range(3)]
        assert stored == [True] * 10
        assert again == [False] * 3
        assert (await js.stream_info("EVENTS")).state.messages == 10

        sub = await js.pull_subscribe("events.>", durable="target-file", stream="EVENTS")
        seen: list[bytes] = []
        while len(seen) < 10:
            for msg in await sub.fetch(batch=4, timeout=5):
                seen.append(msg.data)
                await msg.ack_sync()

        assert seen == [f"e-{i}".encode() for i in range(10)]
        info = await js.consumer_info("EVENTS", "target-file")
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
    finally:
        await nc.close()


@pytest.mark.timeout(120)
async def test_jetstream_cluster_keeps_taking_publishes_with_the_stream_leader_killed(
    nats_cluster: NatsCluster,
) -> None:
    nc = await nats.connect(servers=nats_cluster.urls, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=2)

        async def answered(request: Awaitable[Any]) -> Any:
            """The API's answer, asked again while none comes in time: a cluster just
            started, or whose node just died, answers its first requests late."""
            try:
                return await request
            except (TimeoutError, nats.errors.TimeoutError):
                return None

        config = StreamConfig(name="REPLICATED", subjects=["rep.>"], num_replicas=3)
        await eventually(
            lambda: answered(js.add_stream(config)), timeout_s=30, what="the stream created"
        )
        for i in range(5):
            await publish_until_acked(js, "rep.in", f"r-{i}")
        info = await eventually(
            lambda: answered(js.stream_info("REPLICATED")), timeout_s=30, what="stream info"
        )
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        leader = next(n for n in nats_cluster.nodes if n.server_name == info.cluster.leader)

        await leader.akill()

        for i in range(5, 15):
            await publish_until_acked(js, "rep.in", f"r-{i}")

        info = await eventually(
            lambda: answered(js.stream_info("REPLICATED")), timeout_s=30, what="stream info"
        )
        state = info.state
        assert state.messages == 15

        # Back on the same ports and store directory, it catches up from the other two.
        await leader.astart()

        async def caught_up() -> bool:
            jsz = await asyncio.to_thread(leader.monitor, "/jsz")
            return bool(jsz) and jsz["messages"] == 15

        await eventually(caught_up, timeout_s=30, what="the restarted node to hold all 15")
    finally:
        await nc.close()


# The helpers themselves -------------------------------------------------------------------


def test_a_peer_whose_port_was_taken_before_it_bound_starts_on_fresh_ports(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path / "nats")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        taken = server.port
        with server:
            assert server.port != taken
            assert len(server.start_seconds) == 1
            assert nats_healthz(server)


@pytest.mark.timeout(180)
def test_kafka_whose_port_was_taken_before_it_bound_starts_on_fresh_ports(
    tmp_path: Path,
) -> None:
    broker = KafkaBroker(tmp_path / "kafka", tls=False)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", broker.sasl_port))
        squatter.listen()
        taken = broker.sasl_port
        with broker:
            assert broker.sasl_port != taken
            assert "Address already in use" in broker.log_path.read_text()


def test_a_cluster_whose_route_port_was_taken_lays_out_fresh_ports(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path / "cluster")
    routes = cluster.nodes[2].routes
    assert routes is not None
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", routes.port))
        squatter.listen()
        with cluster:
            assert cluster.nodes[2].routes is not None
            assert cluster.nodes[2].routes.port != routes.port
            assert all(nats_healthz(node) for node in cluster.nodes)


def nats_healthz(server: NatsServer) -> bool:
    return bool(server.monitor("/healthz") == {"status": "ok"})
