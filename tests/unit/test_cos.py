"""The COS target's pure parts: object names, regions, accounts, config, failure classes."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import BatchConfig, parse_config
from router.errors import PermanentDeliveryError, RetryableDeliveryError
from router.events import Event
from router.targets.cos import (
    NO_ACCOUNT,
    CosEndpointConfig,
    CosTarget,
    classify,
    endpoint_region,
    endpoint_url,
    event_account,
    object_key,
    uuid7,
)
from tests.fakes import ACCOUNT, make_event
from tests.unit.test_config import minimal, problems_of

MiB = 1024 * 1024
COS_CRN = "crn:v1:bluemix:public:cloud-object-storage:global:a/abc:0b5a3c6e::"


def cos(**endpoint: Any) -> dict[str, Any]:
    return {
        "id": "cos",
        "target_type": "cloud_object_storage",
        "cos_endpoint": {
            "endpoint": "s3.private.us-east.cloud-object-storage.appdomain.cloud",
            "target_crn": COS_CRN,
            "bucket": "audit-archive",
            "api_key": "${env:HOME}",
            **endpoint,
        },
    }


def test_object_key_follows_atrackers_example() -> None:
    # atracker: f1237.../us-south/2025-04-10T21/2025-04-10T21:02+01_0196361c-....log
    at = datetime(2025, 4, 10, 21, 2, 1, tzinfo=UTC).timestamp()
    unique = uuid7(at, bytes(10))
    key = object_key("f12375ed17a24ecfb1f32afcf47285f3", "us-south", at, unique)
    assert key == (
        f"f12375ed17a24ecfb1f32afcf47285f3/us-south/2025-04-10T21/2025-04-10T21:02+01_{unique}.log"
    )


def test_uuid7_is_version_7_and_starts_with_the_milliseconds() -> None:
    at = datetime(2025, 4, 10, 21, 2, 1, tzinfo=UTC).timestamp()
    unique = uuid7(at)
    assert unique.version == 7 and unique.variant == "specified in RFC 4122"
    assert int(str(unique).replace("-", "")[:12], 16) == int(at * 1000)
    assert uuid7(at) != unique, "random bits follow the time"


@pytest.mark.parametrize(
    ("endpoint", "region"),
    [
        ("s3.us-south.cloud-object-storage.appdomain.cloud", "us-south"),
        ("s3.private.eu-de.cloud-object-storage.appdomain.cloud", "eu-de"),
        ("s3.direct.jp-tok.cloud-object-storage.appdomain.cloud", "jp-tok"),
        ("https://s3.private.us-east.cloud-object-storage.appdomain.cloud", "us-east"),
        ("http://127.0.0.1:9000", None),
        ("minio.internal:9000", None),
    ],
)
def test_an_ibm_cos_endpoint_names_its_region(endpoint: str, region: str | None) -> None:
    assert endpoint_region(endpoint) == region


def test_a_host_name_endpoint_is_https_and_a_url_is_kept() -> None:
    assert endpoint_url("s3.us-south.cloud-object-storage.appdomain.cloud") == (
        "https://s3.us-south.cloud-object-storage.appdomain.cloud"
    )
    assert endpoint_url("http://127.0.0.1:9000/") == "http://127.0.0.1:9000"


def test_the_account_is_the_scope_of_the_log_source_crn() -> None:
    assert event_account(Event.from_body(make_event())) == ACCOUNT
    odd = make_event()
    odd["logSourceCRN"] = "crn:v1:bluemix:public:secrets-manager:us-south:o/org:x::"
    assert event_account(Event.from_body(odd)) == NO_ACCOUNT


def test_the_region_is_the_targets_then_the_endpoints_then_us_south() -> None:
    endpoint = {"target_crn": COS_CRN, "bucket": "b", "api_key": "k"}
    named = "s3.eu-gb.cloud-object-storage.appdomain.cloud"
    chosen = CosEndpointConfig(endpoint=named, region="eu-de", **endpoint)
    assert CosTarget("t", chosen).region == "eu-de"
    assert CosTarget("t", CosEndpointConfig(endpoint=named, **endpoint)).region == "eu-gb"
    other = CosEndpointConfig(endpoint="http://127.0.0.1:1", **endpoint)
    assert CosTarget("t", other).region == "us-south"


def test_a_cos_target_takes_atrackers_fields_and_object_sized_batch_defaults() -> None:
    config = parse_config(minimal(targets=[cos(service_to_service_enabled=False)], routes=[]))
    [target] = config.targets
    assert isinstance(target.endpoint, CosEndpointConfig)
    assert target.endpoint.bucket == "audit-archive"
    assert target.batch == BatchConfig(max_events=20_000, max_bytes=8 * MiB, max_wait_s=60.0)
    assert "api_key=" not in repr(target.endpoint), "the key never shows in a repr"


def test_delivery_and_target_batch_settings_override_the_cos_defaults() -> None:
    data = minimal(targets=[{**cos(), "batch": {"max_wait_s": 5}}], routes=[])
    data["delivery"] = {"batch": {"max_bytes": 2 * MiB}}
    [target] = parse_config(data).targets
    assert target.batch == BatchConfig(max_events=20_000, max_bytes=2 * MiB, max_wait_s=5)


def test_hmac_keys_stand_in_for_the_api_key() -> None:
    target = cos(hmac_keys={"access_key_id": "id", "secret_access_key": "${env:HOME}"})
    del target["cos_endpoint"]["api_key"]
    [parsed] = parse_config(minimal(targets=[target], routes=[])).targets
    assert isinstance(parsed.endpoint, CosEndpointConfig)
    assert parsed.endpoint.hmac_keys is not None
    assert parsed.endpoint.hmac_keys.access_key_id == "id"


def test_a_cos_target_without_a_credential_is_refused_by_name() -> None:
    target = cos()
    del target["cos_endpoint"]["api_key"]
    problems = problems_of(minimal(targets=[target], routes=[]))
    assert problems == [
        "targets[0].cos_endpoint.api_key: required (or service_to_service_enabled with the "
        "daemon's own identity in the top-level iam section)"
    ]


def test_another_types_endpoint_is_refused_on_a_cos_target_and_the_reverse() -> None:
    wrong = {**cos(), "file_endpoint": {"path": "/tmp/x"}}
    assert problems_of(minimal(targets=[wrong], routes=[]))
    file_with_cos = {**minimal()["targets"][0], "cos_endpoint": cos()["cos_endpoint"]}
    assert problems_of(minimal(targets=[file_with_cos]))


def s3_error(status: int, code: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "Error": {"Code": code, "Message": f"the {code} message"},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}},
    }


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (503, "SlowDown", RetryableDeliveryError),
        (500, "InternalError", RetryableDeliveryError),
        (429, "TooManyRequests", RetryableDeliveryError),
        (400, "RequestTimeout", RetryableDeliveryError),
        (404, "NoSuchBucket", PermanentDeliveryError),
        (403, "AccessDenied", PermanentDeliveryError),
        (400, "InvalidDigest", PermanentDeliveryError),
    ],
)
def test_s3_errors_are_classified(status: int, code: str, kind: type[Exception]) -> None:
    error = classify("cos", "PUT http://s3/b/k", s3_error(status, code))
    assert type(error) is kind
    assert error.status == status
    assert re.search(rf"{code}: the {code} message \(HTTP {status}\)", str(error))


def test_a_retry_after_on_throttling_is_honoured() -> None:
    error = classify("cos", "PUT x", s3_error(503, "SlowDown", {"retry-after": "7"}))
    assert isinstance(error, RetryableDeliveryError) and error.retry_after_s == 7.0


def test_the_readme_example_loads_with_the_documented_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### `cloud_object_storage`", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("IBMCLOUD_API_KEY", "a-key")
    [target] = parse_config(minimal(targets=yaml.safe_load(block), routes=[])).targets
    assert target.target_type == "cloud_object_storage"
    assert isinstance(target.endpoint, CosEndpointConfig)
    assert CosTarget(target.id, target.endpoint).region == "us-south"
    assert "max_bytes: 8388608, max_wait_s: 60, max_events: 20000" in block
    assert target.batch == BatchConfig(max_events=20_000, max_bytes=8 * MiB, max_wait_s=60.0)


def test_a_cos_endpoint_pointing_at_the_listener_is_a_problem() -> None:
    data = minimal(server={"host": "127.0.0.1", "port": 8080}, targets=[cos()], routes=[])
    data["targets"][0]["cos_endpoint"]["endpoint"] = "http://localhost:8080"
    assert problems_of(data) == [
        "targets[0].cos_endpoint.endpoint: points at this daemon's own listener "
        "(127.0.0.1:8080); its events would come back as new events for ever"
    ]
