"""The daemon's own IBM Cloud identity (the top-level `iam` section) and atracker's target
region, as the config loader gives them to the targets that use them."""

from __future__ import annotations

from typing import Any

import pytest

from router.config import parse_config
from router.targets.cloud_logs import CloudLogsEndpointConfig
from router.targets.cos import CosEndpointConfig, CosTarget
from router.targets.event_streams import EventStreamsEndpointConfig
from tests.unit.test_config import minimal, problems_of
from tests.unit.test_cos import cos

LOGS_CRN = "crn:v1:bluemix:public:logs:eu-de:a/abc:0b5a3c6e-1f2d-4e5a-9b8c-7d6e5f4a3b2c::"
IAM = {"api_key": "${env:DAEMON_KEY}", "iam_url": "https://iam.test.example"}
ROUTES = [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["t"]}]}]


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAEMON_KEY", "the-daemons-own-key")
    monkeypatch.setenv("TARGET_KEY", "the-targets-own-key")


def endpoint_of(target: dict[str, Any], **top: Any) -> Any:
    target = {**target, "id": "t"}
    return parse_config(minimal(targets=[target], routes=ROUTES, **top)).targets[0].endpoint


def logs(**endpoint: Any) -> dict[str, Any]:
    return {
        "target_type": "cloud_logs",
        "cloudlogs_endpoint": {"target_crn": LOGS_CRN, **endpoint},
    }


def streams(**endpoint: Any) -> dict[str, Any]:
    return {
        "target_type": "event_streams",
        "eventstreams_endpoint": {"brokers": ["b:9093"], "topic": "audit", **endpoint},
    }


def test_a_cloud_logs_target_with_only_its_crn_takes_the_daemons_key_and_iam_url() -> None:
    endpoint = endpoint_of(logs(), iam=IAM)
    assert isinstance(endpoint, CloudLogsEndpointConfig)
    assert (endpoint.api_key, endpoint.iam_url) == ("the-daemons-own-key", IAM["iam_url"])


def test_a_targets_own_key_wins_unless_it_asks_for_service_to_service() -> None:
    own = "${env:TARGET_KEY}"
    assert endpoint_of(streams(api_key=own), iam=IAM).api_key == "the-targets-own-key"
    s2s = streams(api_key=own, service_to_service_enabled=True)
    assert endpoint_of(s2s, iam=IAM).api_key == "the-daemons-own-key"
    # Without the iam section there is no identity to use: the target's key stays.
    assert endpoint_of(s2s).api_key == "the-targets-own-key"


@pytest.mark.parametrize(
    ("target", "where"),
    [
        (logs(), "targets[0].cloudlogs_endpoint.api_key"),
        (streams(service_to_service_enabled=True), "targets[0].eventstreams_endpoint.api_key"),
        ({k: v for k, v in cos().items() if k != "id"}, None),
    ],
)
def test_a_target_with_no_key_and_no_daemon_identity_is_refused_by_name(
    target: dict[str, Any], where: str | None
) -> None:
    if where is None:  # cos() carries its own key: take it out
        target = {**target, "cos_endpoint": {**target["cos_endpoint"]}}
        del target["cos_endpoint"]["api_key"]
        where = "targets[0].cos_endpoint.api_key"
    [problem] = problems_of(minimal(targets=[{**target, "id": "t"}], routes=ROUTES))
    assert problem.startswith(f"{where}: required")


def test_kafka_without_sasl_and_cos_with_hmac_keys_need_no_key() -> None:
    plain = streams(sasl={"mechanism": "none"}, tls=False)
    assert isinstance(endpoint_of(plain), EventStreamsEndpointConfig)
    hmac = {"access_key_id": "id", "secret_access_key": "${env:TARGET_KEY}"}
    target = cos(hmac_keys=hmac)
    del target["cos_endpoint"]["api_key"]
    assert endpoint_of(target).api_key is None


def test_the_cos_region_is_the_targets_then_the_metadata_regions_then_the_endpoints() -> None:
    # cos()'s endpoint names us-east
    assert CosTarget("t", endpoint_of(cos())).region == "us-east"
    metadata = {"settings": {"metadata_region_primary": "eu-de"}}
    assert CosTarget("t", endpoint_of(cos(), **metadata)).region == "eu-de"
    in_region = {**cos(), "region": "jp-tok"}
    assert CosTarget("t", endpoint_of(in_region, **metadata)).region == "jp-tok"
    own = endpoint_of({**cos(region="br-sao"), "region": "jp-tok"})
    assert isinstance(own, CosEndpointConfig) and own.region == "br-sao"


def test_region_and_managed_by_are_kept_on_the_target() -> None:
    data = minimal(targets=[{**cos(), "id": "t", "region": "eu-gb", "managed_by": "enterprise"}])
    data["routes"] = ROUTES
    [target] = parse_config(data).targets
    assert (target.region, target.managed_by) == ("eu-gb", "enterprise")
