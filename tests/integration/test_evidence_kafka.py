"""Evidence over a Kafka topic: the event_streams target (evidence.event_streams) keeps every
message's value the event's JSON and carries its place in the chain in headers, with signed
checkpoints as messages of their own; `event-router verify kafka://TARGET` reads the whole
topic back from the real broker of tests/peers/kafka.py and names the first break. Tampering
is done the only way a topic allows: producing forged messages into it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from router.evidence.canonical import (
    CHECKPOINT_TYPE,
    Link,
    header_link,
    link_headers,
)
from router.evidence.checkpoint import checkpoint_line
from router.evidence.keys import generate
from tests.conftest import StartDaemon
from tests.fakes import make_event, wait_for
from tests.helpers import (
    assert_books_balance,
    everything_to,
    free_port,
    post,
    run_cli,
    settled,
)
from tests.integration.test_crash import kill_9_under_load
from tests.integration.test_event_streams import (
    create_topic,
    es_target,
    kafka,
    letters,
    plaintext,
    read_topic,
)
from tests.peers.kafka import AnswerDropper, KafkaBroker

pytestmark = pytest.mark.peers
__all__ = ["kafka"]  # fixtures used by name

EN_DASH = "\u2013"


def chained(topic: str, bootstrap: str, target_id: str) -> dict[str, Any]:
    return {**es_target(topic, bootstrap, **plaintext()), "id": target_id}


async def write_topics(
    start_daemon: StartDaemon,
    kafka: KafkaBroker,
    tmp_path: Path,
    topics: dict[str, str],
    *,
    events: int = 30,
) -> tuple[Path, Path, dict[str, Any]]:
    """A daemon with chained, signed event_streams targets (target id -> topic) took `events`
    events, 10 a post, and stopped (a final checkpoint each): returns its config file, the
    public key and the first target's books."""
    key, public = generate(tmp_path / "signing.key")
    for topic in topics.values():
        await create_topic(kafka, topic)
    daemon = await start_daemon(
        {
            "storage": {"path": str(tmp_path / "var")},
            "targets": [chained(topic, kafka.bootstrap, tid) for tid, topic in topics.items()],
            "routes": everything_to(*topics),
            "evidence": {
                "signing_key_file": str(key),
                "checkpoint_every_events": 7,
                "event_streams": True,
            },
        }
    )
    for start in range(0, events, 10):
        batch = [make_event(id=f"k-{n}") for n in range(start, start + 10)]
        assert (await post(daemon, batch))[0] == 202
        await wait_for(lambda: settled(daemon), timeout_s=60, what="delivery")
    assert_books_balance(daemon)
    await daemon.stop()
    books = daemon.status()["targets"][next(iter(topics))]
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(daemon.source.data))
    return config, public, books


async def verify_topic(config: Path, public: Path, target_id: str) -> tuple[int, str, str]:
    return await run_cli(
        "verify", f"kafka://{target_id}", "--config", str(config), "--public-key", str(public)
    )


async def produce(kafka: KafkaBroker, topic: str, value: bytes, headers: list[Any]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=value, key=b"forged", headers=headers)
    finally:
        await producer.stop()


@pytest.mark.timeout(240)
async def test_every_message_carries_its_place_and_the_topic_verifies(
    start_daemon: StartDaemon, kafka: KafkaBroker, tmp_path: Path
) -> None:
    config, public, books = await write_topics(start_daemon, kafka, tmp_path, {"es": "chain-ok"})
    records = await read_topic(kafka.bootstrap, "chain-ok")
    events = [r for r in records if dict(r.headers)["type"] == b"audit"]
    checkpoints = [r for r in records if dict(r.headers)["type"] == CHECKPOINT_TYPE]
    # The value is the event's JSON, unchanged; the place is in the headers.
    values = [orjson.loads(r.value) for r in events]
    assert all("_chain" not in value for value in values)
    links = [header_link(dict(r.headers)) for r in events]
    places = [link.seq for link in links if link is not None]
    first_id = values[0]["id"]
    assert first_id == "k-0" or values[0]["action"] == "event-router.target.validate"
    assert places == list(range(1, len(events) + 1))
    for record, link in zip(events, links, strict=True):
        assert link is not None
        assert hashlib.sha256(link.prev + record.value).digest() == link.hash
    assert len(checkpoints) == 3, "one after each batch of 10 (every 7 places, at a write)"
    code, out, err = await verify_topic(config, public, "es")
    assert code == 0, out + err
    assert books["received"] == books["delivered"] + books["dead_lettered"] + books["pending"]
    assert out.startswith(
        f"OK: {len(events)} events and 0 dead letters verified (chain head seq {len(events)}, "
        f"0 re-sent), {len(checkpoints)} checkpoints ({len(checkpoints)} signature-checked) "
        "in 1 file"
    ), out


@pytest.mark.timeout(300)
async def test_messages_produced_into_the_topic_are_reported_at_their_place(
    start_daemon: StartDaemon, kafka: KafkaBroker, tmp_path: Path
) -> None:
    """Four chained topics of the same events; into each, one forgery is produced: a copy of
    a message (a re-send: counted, not faulted), a message at a place that is taken, with
    other contents, a message past a missing place, and a checkpoint signed by another key."""
    topics = {f"t{n}": f"chain-tamper-{n}" for n in range(4)}
    config, public, _ = await write_topics(start_daemon, kafka, tmp_path, topics)
    records = {tid: await read_topic(kafka.bootstrap, topic) for tid, topic in topics.items()}

    def event_records(tid: str) -> list[Any]:
        return [r for r in records[tid] if dict(r.headers)["type"] == b"audit"]

    # A copy of the fifth message, value and headers: the same place, the same line.
    fifth = event_records("t0")[4]
    await produce(kafka, topics["t0"], fifth.value, list(fifth.headers))
    code, out, err = await verify_topic(config, public, "t0")
    assert code == 0, out + err
    assert ", 1 re-sent)" in out, out

    # Another event at place 5, linked right (prev is place 4's hash, the hash recomputed).
    fifth = event_records("t1")[4]
    link = header_link(dict(fifth.headers))
    assert link is not None and link.seq == 5
    forged = orjson.dumps({**orjson.loads(fifth.value), "outcome": "failure"})
    forged_link = Link(5, link.prev, hashlib.sha256(link.prev + forged).digest())
    atracker = [(k, v) for k, v in fifth.headers if not k.startswith("chain_")]
    await produce(kafka, topics["t1"], forged, atracker + link_headers(forged_link))
    code, out, _ = await verify_topic(config, public, "t1")
    assert code == 1
    end = len(records["t1"])
    assert out.splitlines()[0] in {
        f"BROKEN: chain-tamper-1[0]@{end}: seq 5 is also at chain-tamper-1[0]@{fifth.offset}, "
        "with other contents (an object or dead letter was replaced)",
        f"BROKEN: chain-tamper-1[0]@{fifth.offset}: seq 5 is also at chain-tamper-1[0]@{end}, "
        "with other contents (an object or dead letter was replaced)",
    }, out

    # A message two places past the head: seq head+1 is missing.
    last = event_records("t2")[-1]
    head = header_link(dict(last.headers))
    assert head is not None
    value = orjson.dumps(make_event(id="after-a-gap"))
    prev = bytes(32)
    ahead = Link(head.seq + 2, prev, hashlib.sha256(prev + value).digest())
    await produce(kafka, topics["t2"], value, [("type", b"audit"), *link_headers(ahead)])
    code, out, _ = await verify_topic(config, public, "t2")
    assert code == 1
    end = len(records["t2"])
    assert out.splitlines()[0] == (
        f"BROKEN: gap: seq {head.seq + 1} missing between chain-tamper-2[0]@{last.offset} and "
        f"chain-tamper-2[0]@{end} (dead letters: give their file too)"
    ), out

    # A checkpoint of the head, signed by another key.
    last = event_records("t3")[-1]
    head = header_link(dict(last.headers))
    assert head is not None
    line = checkpoint_line(
        "t3", head.seq, head.hash, "2026-12-01T00:00:00.000Z", Ed25519PrivateKey.generate()
    )
    await produce(kafka, topics["t3"], line, [("type", CHECKPOINT_TYPE)])
    code, out, _ = await verify_topic(config, public, "t3")
    assert code == 1
    end = len(records["t3"])
    assert out.splitlines()[0] == (
        f"BROKEN: chain-tamper-3[0]@{end}: checkpoint signature does not verify with the public key"
    ), out


@pytest.mark.timeout(240)
async def test_a_message_the_broker_refuses_is_dead_lettered_at_its_place(
    start_daemon: StartDaemon, kafka: KafkaBroker, tmp_path: Path
) -> None:
    """Kafka refuses one message of a batch as too large: it had its place in the chain when
    the batch was produced, and its letter stands at that place (object_line), so the topic
    and the dead-letter file hold every place."""
    await create_topic(kafka, "chain-limit", **{"max.message.bytes": "6000"})
    daemon = await start_daemon(
        {
            "storage": {"path": str(tmp_path / "var")},
            "targets": [chained("chain-limit", kafka.bootstrap, "es")],
            "routes": everything_to("es"),
            "startup": {"validate_targets": False},
            "evidence": {"event_streams": True},
        }
    )
    small = [make_event(id=f"small-{i}") for i in range(12)]
    big = make_event(id="big", requestData={"blob": "x" * 20_000})
    assert (await post(daemon, [*small[:6], big, *small[6:]]))[0] == 202
    await wait_for(lambda: settled(daemon), timeout_s=60, what="the batch settled")
    assert_books_balance(daemon)
    await daemon.stop()
    [letter] = letters(tmp_path)
    assert letter["event"]["id"] == "big"
    assert orjson.loads(letter["object_line"])["_chain"]["seq"] == 7, "at its place"
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(daemon.source.data))
    code, out, err = await run_cli("verify", "kafka://es", "--config", str(config))
    assert code == 0, out + err
    assert out.startswith("OK: 12 events and 1 dead letter verified (chain head seq 13"), out


@pytest.mark.timeout(300)
async def test_the_chain_survives_kill_9_under_load_and_the_topic_verifies(
    kafka: KafkaBroker, tmp_path: Path
) -> None:
    """A daemon process under load is killed with kill -9, then started again and drained.
    The batch in flight at the kill was kept in the journal (its places and lines) before it
    was produced: the next start sends those very messages again first, at their places, so
    a copy of one Kafka had taken is the same place twice with the same line (counted
    re-sent), and no place is missing: the whole topic verifies."""
    await create_topic(kafka, "chain-crash")
    port = free_port()
    key, public = generate(tmp_path / "signing.key")
    config = tmp_path / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "storage": {"path": str(tmp_path / "var"), "fsync": "always"},
                "targets": [
                    chained("chain-crash", kafka.bootstrap, "es") | {"batch": {"max_events": 50}}
                ],
                "routes": everything_to("es"),
                "evidence": {"signing_key_file": str(key), "event_streams": True},
            }
        )
    )
    acked = await kill_9_under_load(config, port)
    records = await read_topic(kafka.bootstrap, "chain-crash")
    keys = {r.key.decode() for r in records}
    assert not set(acked) - keys, "nothing acknowledged is missing"
    code, out, err = await verify_topic(config, public, "es")
    assert code == 0, out + err
    print(out)


@pytest.mark.timeout(240)
async def test_a_test_write_whose_answer_was_lost_does_not_hold_its_place_for_ever(
    start_daemon: StartDaemon, kafka: KafkaBroker, tmp_path: Path
) -> None:
    """The start-up test write takes place 1, but the broker's answer to it is lost (the
    daemon reaches Kafka through an AnswerDropper): the probe fails, and nothing will ever
    settle that event. The next send finds its place held by no batch: the message Kafka
    took (or, if it had not, a copy sent again) fills it, so the place is let go, the chain
    checkpoints again, and the topic verifies up to a checkpoint at its head."""
    await create_topic(kafka, "chain-probe")
    async with AnswerDropper(kafka) as dropper:
        dropper.dropping = True
        target = es_target("chain-probe", kafka.proxied_bootstrap, timeout_s=2, **plaintext())
        daemon = await start_daemon(
            {
                "storage": {"path": str(tmp_path / "var")},
                "startup": {"validate_targets": True},
                "targets": [target | {"retry": {"initial_backoff_s": 0.2, "max_backoff_s": 1}}],
                "routes": everything_to("es"),
                "evidence": {"event_streams": True, "checkpoint_every_events": 5},
            }
        )
        await wait_for(
            lambda: daemon.status()["targets"]["es"]["write_status"]["status"] == "failed",
            timeout_s=30,
            what="the test write to fail",
        )
        assert daemon.status()["targets"]["es"]["evidence"]["chain_seq"] == 1
        dropper.dropping = False
        for start in (0, 10):
            batch = [make_event(id=f"p-{n}") for n in range(start, start + 10)]
            assert (await post(daemon, batch))[0] == 202
            await wait_for(lambda: settled(daemon), timeout_s=60, what="delivery")
        evidence = daemon.status()["targets"]["es"]["evidence"]
        assert evidence["chain_seq"] == 21 and evidence["checkpoint_seq"] == 21, evidence
        assert_books_balance(daemon)
        await daemon.stop()
    config = tmp_path / "router.yaml"
    data = {**daemon.source.data, "targets": [chained("chain-probe", kafka.bootstrap, "es")]}
    config.write_text(yaml.safe_dump(data))
    code, out, err = await run_cli("verify", "kafka://es", "--config", str(config))
    assert code == 0, out + err
    assert "chain head seq 21" in out and "last checkpoint at seq 21" in out, out
