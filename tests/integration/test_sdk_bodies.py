"""The management API driven with the request bodies of IBM's atrackerv2 SDK, exactly as its
models build them (CreateTargetOptions, ReplaceTargetOptions, CreateRouteOptions,
PutSettingsOptions; ../shared/reference/atracker-api.md §2-§5, §10), against a real daemon
with its config in a file, a real S3-compatible store (moto) for the COS targets and a
loopback IAM token endpoint for the daemon's own identity (the top-level `iam:` section).

The SDK sends no secrets back on PUT, no extension fields, no `target_type` or `region` on
PUT, and reads `created_at`/`updated_at` as RFC 3339 date-times. Every call is checked and
every failure collected, so one run says how many of the SDK's calls the daemon refuses or
answers wrongly; the test demands none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import parse_config
from router.daemon import Daemon
from router.iam import IamTokenSource
from router.server.api import ConfigSource
from tests.conftest import StartDaemon
from tests.fake_cloud_logs import API_KEY, FakeCloudLogs
from tests.fakes import ACCOUNT, INSTANCE, make_event, wait_for
from tests.helpers import assert_books_balance, everything_to, file_target, post, settled
from tests.integration.test_api import Client, loopback_auth
from tests.integration.test_cloud_logs import now_iso
from tests.peers.kafka import KafkaBroker
from tests.peers.s3 import S3Server

pytestmark = pytest.mark.peers

BUCKET = "my-atracker-bucket"
COS_CRN = f"crn:v1:bluemix:public:cloud-object-storage:global:a/{ACCOUNT}:{INSTANCE}::"
ES_CRN = f"crn:v1:bluemix:public:messagehub:us-south:a/{ACCOUNT}:{INSTANCE}::"
LOGS_CRN = f"crn:v1:bluemix:public:logs:us-south:a/{ACCOUNT}:{INSTANCE}::"
APP_CONFIG_CRN = f"crn:v1:bluemix:public:apprapp:us-south:a/{ACCOUNT}:{INSTANCE}::"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


def rfc3339(value: Any) -> bool:
    """What IBM's SDK cores parse as a date-time (strfmt.DateTime, Python's datetime)."""
    if not isinstance(value, str) or not value:
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


class Calls:
    """Every SDK call made, and what was wrong with each answer."""

    def __init__(self, api: Client) -> None:
        self.api = api
        self.made = 0
        self.failures: list[str] = []
        self.failed: set[int] = set()  # the numbers of the calls with something wrong

    async def call(self, name: str, method: str, path: str, body: Any, status: int) -> Any:
        self.made += 1
        got, answer = await self.api.call(method, path, body)
        if got != status:
            self.failures.append(f"{name}: {got} (expected {status}): {answer}")
            self.failed.add(self.made)
        return answer

    def check(self, name: str, ok: bool, what: str) -> None:
        """A check of the latest call's answer (or of what it changed)."""
        if not ok:
            self.failures.append(f"{name}: {what}")
            self.failed.add(self.made)


def checked(answer: Any, field: str, predicate: Any) -> bool:
    return isinstance(answer, dict) and predicate(answer.get(field))


async def start(path: Path) -> Daemon:
    data = yaml.safe_load(await asyncio.to_thread(path.read_text))
    daemon = Daemon(parse_config(data, str(path)), ConfigSource(path, data))
    await daemon.start()
    return daemon


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """IBM Event Streams' way in: SASL PLAIN as `token` over TLS; the password is the key
    the SDK bodies send and the daemon's own identity (the same key here)."""
    with KafkaBroker(tmp_path_factory.mktemp("kafka"), api_key=API_KEY) as broker:
        yield broker


@pytest.mark.timeout(240)
async def test_every_call_of_the_atracker_sdk_works_with_its_exact_bodies(
    s3_server: S3Server, kafka: KafkaBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not s3_server.front.running:
        await s3_server.astart()
    s3_server.reset()
    s3_server.create_bucket(BUCKET)
    iam = await FakeCloudLogs().start()
    IamTokenSource._shared.clear()
    monkeypatch.setenv("IBMCLOUD_API_KEY", API_KEY)
    path = tmp_path / "router.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": 0, "workers": 1},
                "storage": {"path": str(tmp_path / "var")},
                "startup": {"validate_targets": False},
                "auth": loopback_auth(),
                # The daemon's own IBM Cloud identity, for targets that have no key of their own.
                "iam": {"api_key": "${env:IBMCLOUD_API_KEY}", "iam_url": iam.url},
                "targets": [file_target("archive", tmp_path / "archive.ndjson")],
                "routes": [
                    {"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}
                ],
            }
        )
    )
    # Creating an Event Streams target test-writes to its topic (atracker's ts-17). The SDK
    # body carries no CA: the broker's is trusted the way a system CA would be.
    monkeypatch.setenv("SSL_CERT_FILE", str(kafka.ca_file))
    broker = kafka.sasl_ssl_bootstrap
    cos_endpoint = {
        # The SDK's fields only; the host is the loopback store's (a URL is our extension).
        "endpoint": s3_server.endpoint_url,
        "target_crn": COS_CRN,
        "bucket": BUCKET,
    }
    daemon = await start(path)
    try:
        calls = Calls(Client(daemon))
        cos = await calls.call(
            "CreateTarget cos (api_key)",
            "POST",
            "/api/v2/targets",
            {
                "name": "a-cos-target-us-south",
                "target_type": "cloud_object_storage",
                "cos_endpoint": {
                    **cos_endpoint,
                    "api_key": API_KEY,
                    "service_to_service_enabled": False,
                },
                "region": "us-south",
                "managed_by": "account",
            },
            201,
        )
        cos_id = cos.get("id", "missing") if isinstance(cos, dict) else "missing"
        calls.check("CreateTarget cos", checked(cos, "region", lambda r: r == "us-south"), "region")
        calls.check("CreateTarget cos", checked(cos, "created_at", rfc3339), "created_at")
        s2s = await calls.call(
            "CreateTarget cos (service_to_service_enabled)",
            "POST",
            "/api/v2/targets",
            {
                "name": "a-cos-target-s2s",
                "target_type": "cloud_object_storage",
                "cos_endpoint": {**cos_endpoint, "service_to_service_enabled": True},
                "managed_by": "enterprise",
            },
            201,
        )
        s2s_id = s2s.get("id", "missing") if isinstance(s2s, dict) else "missing"
        calls.check(
            "CreateTarget cos s2s",
            checked(s2s, "managed_by", lambda m: m == "enterprise"),
            "managed_by kept",
        )
        es = await calls.call(
            "CreateTarget event_streams",
            "POST",
            "/api/v2/targets",
            {
                "name": "an-event-streams-target",
                "target_type": "event_streams",
                "eventstreams_endpoint": {
                    "target_crn": ES_CRN,
                    "brokers": [broker],
                    "topic": "my-topic",
                    "api_key": API_KEY,
                    "service_to_service_enabled": False,
                },
                "region": "us-south",
            },
            201,
        )
        es_id = es.get("id", "missing") if isinstance(es, dict) else "missing"
        await calls.call(
            "CreateTarget event_streams (service_to_service_enabled)",
            "POST",
            "/api/v2/targets",
            {
                "name": "an-event-streams-target-s2s",
                "target_type": "event_streams",
                "eventstreams_endpoint": {
                    "target_crn": ES_CRN,
                    "brokers": [broker],
                    "topic": "my-topic",
                    "service_to_service_enabled": True,
                },
            },
            201,
        )
        logs = await calls.call(
            "CreateTarget cloud_logs (target_crn only)",
            "POST",
            "/api/v2/targets",
            {
                "name": "a-cloud-logs-target",
                "target_type": "cloud_logs",
                "cloudlogs_endpoint": {"target_crn": LOGS_CRN},
            },
            201,
        )
        logs_id = logs.get("id", "missing") if isinstance(logs, dict) else "missing"
        refused = await calls.call(
            "CreateTarget app_config",
            "POST",
            "/api/v2/targets",
            {
                "name": "an-app-config-target",
                "target_type": "app_config",
                "appconfig_endpoint": {"target_crn": APP_CONFIG_CRN},
            },
            400,
        )
        calls.check(
            "CreateTarget app_config",
            "app_config" in str(refused) and "not supported" in str(refused),
            f"the refusal says app_config is not supported: {refused}",
        )
        await calls.call(
            "CreateTarget invalid target_type",
            "POST",
            "/api/v2/targets",
            {"name": "bad", "target_type": "logdna", "cos_endpoint": cos_endpoint},
            400,
        )
        missing = await calls.call(
            "CreateTarget cos without bucket",
            "POST",
            "/api/v2/targets",
            {
                "name": "no-bucket",
                "target_type": "cloud_object_storage",
                "cos_endpoint": {"endpoint": s3_server.endpoint_url, "target_crn": COS_CRN},
            },
            400,
        )
        message = str(missing)
        calls.check(
            "CreateTarget cos without bucket",
            "cos_endpoint.bucket" in message and "targets[" not in message,
            f"names cos_endpoint.bucket as sent: {message}",
        )

        listed = await calls.call("ListTargets", "GET", "/api/v2/targets", None, 200)
        for target in (listed or {}).get("targets", []):
            for stamp in ("created_at", "updated_at"):
                calls.check(
                    f"ListTargets {target.get('name')}",
                    rfc3339(target.get(stamp)),
                    f"{stamp} {target.get(stamp)!r} is a date-time",
                )
        in_region = await calls.call(
            "ListTargets region=us-south", "GET", "/api/v2/targets?region=us-south", None, 200
        )
        calls.check(
            "ListTargets region=us-south",
            cos_id in [t["id"] for t in (in_region or {}).get("targets", [])],
            "the us-south target is listed",
        )
        got = await calls.call("GetTarget cos", "GET", f"/api/v2/targets/{cos_id}", None, 200)
        calls.check("GetTarget cos", checked(got, "region", lambda r: r == "us-south"), "region")
        calls.check(
            "GetTarget cos", checked(got, "managed_by", lambda m: m == "account"), "managed_by"
        )

        # ReplaceTargetOptions: name and the endpoint the SDK user has, never the api_key.
        await calls.call(
            "ReplaceTarget cos (no api_key)",
            "PUT",
            f"/api/v2/targets/{cos_id}",
            {
                "name": "a-cos-target-renamed",
                "cos_endpoint": {**cos_endpoint, "service_to_service_enabled": False},
            },
            200,
        )
        stored = yaml.safe_load(await asyncio.to_thread(path.read_text))["targets"]
        kept = [t["cos_endpoint"].get("api_key") for t in stored if t["id"] == cos_id]
        calls.check("ReplaceTarget cos (no api_key)", kept == [API_KEY], "the stored api_key kept")
        validated = await calls.call(
            "ValidateTarget cos (the stored api_key still used)",
            "POST",
            f"/api/v2/targets/{cos_id}/validate",
            None,
            200,
        )
        calls.check(
            "ValidateTarget cos",
            checked(validated, "write_status", lambda w: (w or {}).get("status") == "success"),
            "write_status success",
        )
        await calls.call(
            "ValidateTarget cos s2s (the daemon's identity)",
            "POST",
            f"/api/v2/targets/{s2s_id}/validate",
            None,
            200,
        )
        await calls.call(
            "ReplaceTarget event_streams (no api_key)",
            "PUT",
            f"/api/v2/targets/{es_id}",
            {
                "name": "an-event-streams-target-renamed",
                "eventstreams_endpoint": {
                    "target_crn": ES_CRN,
                    "brokers": [broker],
                    "topic": "my-topic",
                    "service_to_service_enabled": False,
                },
            },
            200,
        )
        await calls.call(
            "ReplaceTarget cloud_logs (name only)",
            "PUT",
            f"/api/v2/targets/{logs_id}",
            {"name": "a-cloud-logs-target-renamed"},
            200,
        )
        unknown = "f7dcfae6-e7c5-08ca-451b-fdfa696c9bb6"
        await calls.call("GetTarget unknown", "GET", f"/api/v2/targets/{unknown}", None, 404)
        await calls.call(
            "ReplaceTarget unknown", "PUT", f"/api/v2/targets/{unknown}", {"name": "x"}, 404
        )
        await calls.call(
            "ValidateTarget unknown", "POST", f"/api/v2/targets/{unknown}/validate", None, 404
        )
        await calls.call("DeleteTarget unknown", "DELETE", f"/api/v2/targets/{unknown}", None, 404)

        route = await calls.call(
            "CreateRoute",
            "POST",
            "/api/v2/routes",
            {
                "name": "my-route",
                "rules": [{"target_ids": [cos_id], "locations": ["us-south"]}],
                "managed_by": "account",
            },
            201,
        )
        route_id = route.get("id", "missing") if isinstance(route, dict) else "missing"
        await calls.call(
            "CreateRoute unknown target",
            "POST",
            "/api/v2/routes",
            {"name": "bad-route", "rules": [{"target_ids": [unknown], "locations": ["*"]}]},
            400,
        )
        routes = await calls.call("ListRoutes", "GET", "/api/v2/routes", None, 200)
        for item in (routes or {}).get("routes", []):
            calls.check(
                f"ListRoutes {item.get('name')}",
                rfc3339(item.get("created_at")) and rfc3339(item.get("updated_at")),
                "created_at/updated_at are date-times",
            )
        await calls.call("GetRoute", "GET", f"/api/v2/routes/{route_id}", None, 200)
        await calls.call(
            "ReplaceRoute",
            "PUT",
            f"/api/v2/routes/{route_id}",
            {
                "name": "my-route",
                "rules": [
                    {"target_ids": [cos_id], "locations": ["us-south", "us-east"]},
                    {"target_ids": [], "locations": ["*"]},
                ],
            },
            200,
        )
        bad = await calls.call(
            "ReplaceRoute unknown target",
            "PUT",
            f"/api/v2/routes/{route_id}",
            {"name": "my-route", "rules": [{"target_ids": [unknown], "locations": ["*"]}]},
            400,
        )
        calls.check(
            "ReplaceRoute unknown target",
            str(bad).count(f"rules[0].target_ids[0]: unknown target '{unknown}'") == 1
            and "routes[" not in str(bad),
            f"names rules[0].target_ids[0] as sent: {bad}",
        )
        settings = await calls.call("GetSettings", "GET", "/api/v2/settings", None, 200)
        calls.check(
            "GetSettings",
            (settings or {}).get("metadata_region_primary") != "local",
            f"metadata_region_primary is a region or unset: {settings}",
        )
        put = {
            "metadata_region_primary": "us-south",
            "private_api_endpoint_only": False,
            "default_targets": [cos_id],
            "permitted_target_regions": ["us-south", "eu-de"],
            "metadata_region_backup": "eu-de",
        }
        answer = await calls.call("PutSettings", "PUT", "/api/v2/settings", put, 201)
        calls.check(
            "PutSettings",
            isinstance(answer, dict) and all(answer.get(k) == v for k, v in put.items()),
            "every field echoed",
        )
        await calls.call("DeleteRoute", "DELETE", f"/api/v2/routes/{route_id}", None, 204)
        await calls.call("DeleteTarget", "DELETE", f"/api/v2/targets/{es_id}", None, 204)
        before = await Client(daemon).call("GET", "/api/v2/targets")
    finally:
        await daemon.stop()

    # A restart keeps the timestamps (YAML targets' too), region, managed_by and the settings.
    daemon = await start(path)
    calls.api = Client(daemon)
    try:
        after = await calls.call("ListTargets after a restart", "GET", "/api/v2/targets", None, 200)
        stamps = {
            t["id"]: (t.get("created_at"), t.get("updated_at"), t.get("region"), t["managed_by"])
            for t in before[1]["targets"]
        }
        again = {
            t["id"]: (t.get("created_at"), t.get("updated_at"), t.get("region"), t["managed_by"])
            for t in (after or {}).get("targets", [])
        }
        calls.check("a restart", stamps == again, f"targets kept: {stamps} != {again}")
        settings = await calls.call(
            "GetSettings after a restart", "GET", "/api/v2/settings", None, 200
        )
        calls.check(
            "a restart",
            isinstance(settings, dict) and all(settings.get(k) == v for k, v in put.items()),
            f"settings kept: {settings}",
        )
    finally:
        await daemon.stop()
        await iam.stop()
    print(f"{len(calls.failed)} of {calls.made} SDK calls failed")
    assert not calls.failures, "\n".join(calls.failures)


@pytest.mark.timeout(60)
async def test_a_cloud_logs_target_with_only_its_crn_uses_the_daemons_own_identity(
    start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """atracker's cloudlogs_endpoint has only target_crn: the daemon's key (the top-level
    `iam` section) is exchanged for the token, at the iam section's URL."""
    fake = await FakeCloudLogs().start()
    IamTokenSource._shared.clear()
    monkeypatch.setenv("IBMCLOUD_API_KEY", API_KEY)
    try:
        daemon = await start_daemon(
            {
                "iam": {"api_key": "${env:IBMCLOUD_API_KEY}", "iam_url": fake.url},
                "targets": [
                    {
                        "id": "logs",
                        "target_type": "cloud_logs",
                        # atracker's field, and the ingress of the loopback Cloud Logs
                        "cloudlogs_endpoint": {"target_crn": LOGS_CRN, "ingress_url": fake.url},
                    }
                ],
                "routes": everything_to("logs"),
            }
        )
        status, _ = await post(
            daemon, [make_event(id="by-the-daemons-identity", eventTime=now_iso())]
        )
        assert status == 202
        await wait_for(lambda: settled(daemon), timeout_s=30, what="delivered")
    finally:
        await fake.stop()
    assert [r["text"]["id"] for r in fake.records] == ["by-the-daemons-identity"]
    assert fake.token_requests == 1 and fake.problems == []
    assert {r["authorization"] for r in fake.requests} == {"Bearer token-1"}
    assert_books_balance(daemon)
