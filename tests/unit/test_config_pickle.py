"""A Config crosses to each worker process by pickle (router/server/workers.py): every part a
config can hold must survive the trip and behave the same on the other side, compiled
queries included."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from router.config import Config, load_config, parse_config
from router.query import Fields, parse
from router.targets import TARGET_TYPES
from tests.fakes import make_event

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
SHIPPED_CONFIGS = [CONFIG_DIR / "router.yaml", *sorted((CONFIG_DIR / "examples").glob("*.yaml"))]
CRN = "crn:v1:bluemix:public:logs:us-south:a/0123456789abcdef:0123-4567-89ab::"
API_KEY = "an-api-key-long-enough-for-the-schema"


def every_target() -> list[dict[str, Any]]:
    """One target of each registered type, with the fields each one needs."""
    endpoints: dict[str, dict[str, Any]] = {
        "file": {"path": "/tmp/archive.ndjson"},
        "http": {"url": "https://siem.example/in", "headers": {"X-Tenant": "a"}},
        "cloud_logs": {"target_crn": CRN, "api_key": API_KEY},
        "syslog": {"host": "syslog.example"},
        "cloud_object_storage": {
            "endpoint": "https://s3.us-south.cloud-object-storage.appdomain.cloud",
            "target_crn": CRN.replace(":logs:", ":cloud-object-storage:"),
            "bucket": "audit",
            "api_key": API_KEY,
        },
        "event_streams": {
            "brokers": ["broker-0.example:9093"],
            "topic": "audit",
            "api_key": API_KEY,
        },
    }
    assert set(endpoints) == set(TARGET_TYPES), "a new target type needs its line here"
    return [
        {"id": name.replace("_", "-"), "target_type": name, kind.endpoint_key: endpoints[name]}
        for name, kind in TARGET_TYPES.items()
    ]


def maximal() -> dict[str, Any]:
    """A config with every section that holds more than plain values."""
    targets = every_target()
    ids = [t["id"] for t in targets]
    digest = hashlib.sha256(b"a-token-of-sixteen-or-more").hexdigest()
    return {
        "server": {"host": "127.0.0.1", "port": 8080, "workers": 2},
        "targets": targets,
        "routes": [
            {
                "name": "refusals",
                "rules": [
                    {
                        "locations": ["us-south", "eu-de"],
                        "actions": ["secrets-manager.*"],
                        "filter": "reason.reasonType:Unauthorized host:svc1 -severity:normal",
                        "target_ids": ids[:2],
                    },
                    {"locations": ["*"], "target_ids": ids},
                ],
            }
        ],
        "views": [{"name": "critical", "query": "severity:critical OR reason.reasonCode>=400"}],
        "alerts": [
            {
                "name": "burst",
                "view": "critical",
                "threshold": {"count": 5, "window_s": 60},
                "target_ids": [ids[0]],
            },
            {
                "name": "silence",
                "query": "action:*.login",
                "absence": {"window_s": 600},
                "target_ids": [ids[1]],
            },
        ],
        "settings": {"default_targets": [ids[0]], "permitted_target_regions": ["us-south"]},
        "auth": {
            "ingest_tokens": [{"name": "producer", "sha256": digest, "services": ["logs"]}],
            "admin_tokens": [
                {"name": "ops", "sha256": hashlib.sha256(b"another-token").hexdigest()}
            ],
            "api_target_networks": ["10.0.0.0/8"],
        },
        "iam": {"api_key": API_KEY},
        "redaction": {
            "keys": [{"key": "password", "action": "drop"}, {"key": "token", "action": "hash"}],
            "hash_key": "${env:ROUTER_TEST_HASH_KEY}",
        },
        "evidence": {"receipts": True},
        "reload": {"watch": True},
    }


def round_trip(config: Config) -> Config:
    return pickle.loads(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL))


def test_a_config_with_every_section_survives_the_trip_to_a_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTER_TEST_HASH_KEY", "a-hash-key-for-the-test")
    config = parse_config(maximal())
    copy = round_trip(config)
    assert copy == config
    event = make_event(reason={"reasonCode": 401, "reasonType": "Unauthorized"}, severity="x")
    for before, after in (
        (config.routes[0].rules[0].filter, copy.routes[0].rules[0].filter),
        (config.views[0].query, copy.views[0].query),
        (config.alerts[1].query, copy.alerts[1].query),
    ):
        assert before is not None and after is not None
        assert after.matches(event) == before.matches(event)
        assert after.matches_fields(Fields(event)) == before.matches(event)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_each_shipped_config_survives_the_trip_to_a_worker(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in re.findall(r"\$\{env:([^}]+)\}", path.read_text(encoding="utf-8")):
        monkeypatch.setenv(name, f"{name.lower()}-value-from-the-environment")
    config = load_config(path)
    assert round_trip(config) == config


def test_a_query_pickles_as_its_tree_and_matches_after() -> None:
    query = parse("reason.reasonType:Unauthorized OR (severity:critical AND -outcome:success)")
    copy = round_trip(query)  # type: ignore[arg-type]
    assert copy == query and str(copy) == str(query)
    assert copy.matches(make_event(reason={"reasonType": "Unauthorized"}))
    assert not copy.matches(make_event())
