"""The registry of target types is the one list: the config schema's target section and each
type's endpoint dataclass follow from TARGET_TYPES."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from typing import Any

import pytest

from router.config import config_schema, parse_config
from router.errors import ConfigError
from router.iam import SET_BY_LOADER
from router.resources import schemas_dir
from router.targets import TARGET_TYPES, TargetType

ROUTES = [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["t"]}]}]


@pytest.mark.parametrize("name", list(TARGET_TYPES))
def test_each_types_endpoint_schema_names_exactly_its_dataclass_fields(name: str) -> None:
    kind: TargetType = TARGET_TYPES[name]
    # Fields the config loader fills in from the top-level `iam` section (the daemon's trusted
    # profile): no endpoint schema may name them, so neither the YAML nor the API sets them.
    by_loader = {f.name for f in fields(kind.config_class) if f.metadata == SET_BY_LOADER}
    names = {f.name for f in fields(kind.config_class)} - by_loader
    required = {
        f.name
        for f in fields(kind.config_class)
        if f.default is MISSING and f.default_factory is MISSING
    }
    assert set(kind.schema["properties"]) == names
    assert not by_loader & set(kind.schema["properties"])
    assert set(kind.schema.get("required", ())) == required
    assert kind.schema.get("additionalProperties") is False


def test_the_config_schema_follows_the_registry() -> None:
    target = config_schema()["$defs"]["target"]
    assert target["properties"]["target_type"]["enum"] == list(TARGET_TYPES)
    entries = target["allOf"]
    assert [e["if"]["properties"]["target_type"]["const"] for e in entries] == list(TARGET_TYPES)
    for entry, kind in zip(entries, TARGET_TYPES.values(), strict=True):
        assert entry["then"]["required"] == [kind.endpoint_key]
        assert entry["then"]["properties"][kind.endpoint_key] == kind.schema


def test_the_shared_schema_file_names_no_target_type() -> None:
    # A new type is its module and one registry line: the shared schema file stays as it is.
    text = (schemas_dir() / "config.schema.json").read_text(encoding="utf-8")
    target = json.loads(text)["$defs"]["target"]
    assert "enum" not in target["properties"]["target_type"]
    for name, kind in TARGET_TYPES.items():
        assert kind.endpoint_key not in text, name


def problems_of(target: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"targets": [target], "routes": ROUTES})
    return list(info.value.problems)


def test_a_target_with_another_types_endpoint_is_refused_by_name() -> None:
    target = {
        "id": "t",
        "target_type": "file",
        "file_endpoint": {"path": "/tmp/t.ndjson"},
        "http_endpoint": {"url": "https://siem.example/in"},
    }
    assert problems_of(target) == ["targets[0]: unknown key 'http_endpoint'"]


def test_a_target_of_a_known_type_gets_its_endpoint_dataclass() -> None:
    config = parse_config(
        {
            "targets": [{"id": "t", "target_type": "syslog", "syslog_endpoint": {"host": "h"}}],
            "routes": ROUTES,
        }
    )
    endpoint = config.target("t").endpoint
    assert isinstance(endpoint, TARGET_TYPES["syslog"].config_class)
