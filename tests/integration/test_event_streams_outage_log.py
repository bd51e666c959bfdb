"""A Kafka outage is logged, not flooded: aiokafka 0.14 retries a failed metadata update at
once, for ever (~3,600 "Unable connect" ERROR lines in the outage of test_event_streams'
broker-stopped test); the event_streams target paces it with a doubling backoff, as Kafka's own
client paces reconnects. Against the real broker of tests/peers/kafka.py, stopped and started.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from router.targets._aiokafka import METADATA_BACKOFF_MAX_S
from tests.conftest import StartDaemon
from tests.fakes import make_event, wait_for
from tests.helpers import assert_books_balance, everything_to, post, settled
from tests.integration.test_event_streams import es_target, plaintext, read_topic, row
from tests.peers.kafka import KafkaBroker

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    with KafkaBroker(tmp_path_factory.mktemp("kafka-outage"), tls=False) as broker:
        yield broker


def unable_to_connect(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        1
        for record in caplog.records
        if record.name.startswith("aiokafka")
        and record.levelno >= logging.ERROR
        and record.getMessage().startswith("Unable connect")
    )


@pytest.mark.timeout(240)
async def test_a_broker_outage_logs_a_few_lines_not_thousands_and_loses_nothing(
    start_daemon: StartDaemon, kafka: KafkaBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiokafka")
    daemon = await start_daemon(
        {
            "targets": [
                es_target("audit-quiet", kafka.bootstrap, timeout_s=1, **plaintext())
                | {
                    "retry": {
                        "max_attempts": 1000,
                        "max_age_s": 600,
                        "initial_backoff_s": 0.2,
                        "max_backoff_s": 1,
                    }
                }
            ],
            "routes": everything_to("es"),
        }
    )
    await post(daemon, [make_event(id="before")])
    await wait_for(lambda: settled(daemon), timeout_s=60, what="the first delivery")

    caplog.clear()
    await kafka.astop()
    down = time.monotonic()
    await post(daemon, [make_event(id=f"during-{i}") for i in range(10)])
    retries = row(daemon)["retries"]
    await wait_for(
        lambda: row(daemon)["retries"] >= retries + 5, timeout_s=60, what="retries while down"
    )
    outage_s = time.monotonic() - down
    during = unable_to_connect(caplog)
    await kafka.astart()
    await wait_for(lambda: settled(daemon), timeout_s=120, what="the backlog delivered")

    # Paced, a failed update is followed by a wait that doubles up to METADATA_BACKOFF_MAX_S;
    # unpaced, aiokafka logged hundreds of these per second.
    allowed = 10 + 2 * outage_s / METADATA_BACKOFF_MAX_S
    assert 0 < during <= allowed, f"{during} 'Unable connect' lines in {outage_s:.1f}s"
    keys = sorted(r.key.decode() for r in await read_topic(kafka.bootstrap, "audit-quiet"))
    assert keys == sorted(["before", *(f"during-{i}" for i in range(10))])
    es = row(daemon)
    assert (es["delivered"], es["dead_lettered"]) == (11, 0)
    assert_books_balance(daemon)
