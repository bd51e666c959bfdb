"""The event_streams target's config: atracker's body is enough, extensions reach other Kafka
clusters, and what cannot work is refused by `check` with the field's path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
)

from router.config import parse_config
from router.errors import ConfigError
from router.events import Event
from router.targets.event_streams import (
    EventStreamsEndpointConfig,
    KafkaSaslConfig,
    KafkaTlsConfig,
    client_settings,
    headers,
    is_retryable,
    security_protocol,
)
from tests.fakes import ACCOUNT, make_event

CRN = "crn:v1:bluemix:public:messagehub:us-south:a/a1b2:7e1b2c3d-0000-4c1d-9e2f-5a6b7c8d9e0f::"
# The body IBM's SDK sends for an Event Streams target (atracker's fields only).
ATRACKER_BODY = {
    "target_crn": CRN,
    "brokers": ["broker-0.kafka.svc.us-south.eventstreams.cloud.ibm.com:9093"],
    "topic": "my-audit-topic",
    "api_key": "an-api-key-0123456789",
    "service_to_service_enabled": False,
}


def endpoint(raw: dict[str, Any]) -> EventStreamsEndpointConfig:
    config = parse_config(
        {"targets": [{"id": "es", "target_type": "event_streams", "eventstreams_endpoint": raw}]}
    )
    result = config.targets[0].endpoint
    assert isinstance(result, EventStreamsEndpointConfig)
    return result


def problems(raw: dict[str, Any], target_type: str = "event_streams") -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"targets": [{"id": "es", "target_type": target_type, **raw}]})
    return str(caught.value)


def test_atrackers_body_gives_sasl_plain_as_token_over_tls() -> None:
    es = endpoint(ATRACKER_BODY)
    assert (es.tls, es.sasl) == (True, KafkaSaslConfig(mechanism="plain", username="token"))
    settings = client_settings(es)
    assert settings["security_protocol"] == "SASL_SSL"
    assert (settings["sasl_mechanism"], settings["sasl_plain_username"]) == ("PLAIN", "token")
    assert settings["sasl_plain_password"] == ATRACKER_BODY["api_key"]
    assert settings["ssl_context"] is not None


@pytest.mark.parametrize(
    ("extension", "protocol"),
    [
        ({"tls": False}, "SASL_PLAINTEXT"),
        ({"tls": False, "sasl": {"mechanism": "none"}}, "PLAINTEXT"),
        ({"sasl": {"mechanism": "none"}}, "SSL"),
        ({"sasl": {"mechanism": "scram-sha-512", "username": "alice"}}, "SASL_SSL"),
    ],
)
def test_extensions_reach_other_kafka_clusters(extension: dict[str, Any], protocol: str) -> None:
    es = endpoint({**ATRACKER_BODY, **extension})
    assert security_protocol(es) == protocol


def test_a_ca_file_makes_a_tls_section() -> None:
    es = endpoint({**ATRACKER_BODY, "tls": {"ca_file": "/etc/kafka/ca.pem"}})
    assert es.tls == KafkaTlsConfig(ca_file="/etc/kafka/ca.pem")


def test_api_key_is_required_unless_sasl_is_off() -> None:
    body = {k: v for k, v in ATRACKER_BODY.items() if k != "api_key"}
    assert (
        "targets[0].eventstreams_endpoint.api_key: required (or service_to_service_enabled "
        "with the daemon's own identity in the top-level iam section)"
    ) in problems({"eventstreams_endpoint": body})
    assert endpoint({**body, "sasl": {"mechanism": "none"}}).api_key is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"brokers": []}, "eventstreams_endpoint.brokers: [] should be non-empty"),
        ({"brokers": ["no-port"]}, "eventstreams_endpoint.brokers[0]: 'no-port' does not match"),
        ({"topic": "a topic"}, "eventstreams_endpoint.topic: 'a topic' does not match"),
        ({"sasl": {"mechanism": "gssapi"}}, "eventstreams_endpoint.sasl.mechanism: 'gssapi'"),
        ({"password": "x"}, "eventstreams_endpoint: unknown key 'password'"),
    ],
)
def test_what_cannot_work_is_refused_with_its_path(change: dict[str, Any], expected: str) -> None:
    assert expected in problems({"eventstreams_endpoint": {**ATRACKER_BODY, **change}})


def test_another_types_target_may_not_carry_an_eventstreams_endpoint() -> None:
    message = problems(
        {"file_endpoint": {"path": "/tmp/x.ndjson"}, "eventstreams_endpoint": ATRACKER_BODY},
        target_type="file",
    )
    assert "eventstreams_endpoint" in message


def test_headers_are_atrackers() -> None:
    event = Event.from_body(make_event(id="h-1", location="eu-gb"))
    assert headers(event, "us-south") == [
        ("type", b"audit"),
        ("account", ACCOUNT.encode()),
        ("region", b"us-south"),
        ("location", b"eu-gb"),
    ]
    global_event = Event.from_body(make_event(id="h-2", location=""))
    assert dict(headers(global_event, None))["location"] == b"global"
    assert dict(headers(global_event, None))["region"] == b"global"


def test_failures_are_classified() -> None:
    retryable = [
        KafkaConnectionError(),
        KafkaTimeoutError(),
        NotLeaderForPartitionError(),
        OutOfOrderSequenceNumber(),
        TimeoutError(),
    ]
    permanent = [
        SaslAuthenticationFailed(),
        TopicAuthorizationFailedError(),
        MessageSizeTooLargeError(),
    ]
    assert [is_retryable(e) for e in retryable] == [True] * len(retryable)
    assert [is_retryable(e) for e in permanent] == [False] * len(permanent)


def test_the_readme_example_is_a_valid_target(monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### `event_streams`", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("EVENT_STREAMS_API_KEY", "an-api-key")
    config = parse_config({"targets": yaml.safe_load(block)})
    es = config.targets[0].endpoint
    assert isinstance(es, EventStreamsEndpointConfig)
    assert (es.topic, es.api_key, es.tls, es.timeout_s) == ("audit-events", "an-api-key", True, 30)
    assert es == EventStreamsEndpointConfig(
        target_crn=es.target_crn, brokers=es.brokers, topic=es.topic, api_key=es.api_key
    ), "the example sets atracker's fields only; the rest are defaults"
