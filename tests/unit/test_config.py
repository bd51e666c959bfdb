"""config.load_config / parse_config and `event-router check`: defaults, overrides, every error."""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.cli import main
from router.config import (
    MAX_ALIAS_NODES,
    MAX_REFERENCE_BYTES,
    MAX_YAML_DEPTH,
    BatchConfig,
    Config,
    RetryConfig,
    RouteConfig,
    RuleConfig,
    ServerConfig,
    ShutdownConfig,
    StorageConfig,
    ValidationConfig,
    archive_roots,
    load_config,
    parse_config,
)
from router.errors import ConfigError
from router.resources import schemas_dir
from router.server.workercount import resolve_workers
from router.targets.file import BATCH_DEFAULTS as FILE_BATCH
from router.targets.file import FileEndpointConfig
from router.targets.http import HttpEndpointConfig

MiB = 1024 * 1024
CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
# What `check` says of a config without server.workers (tests/unit/test_worker_count.py).
AUTO_WORKERS = resolve_workers("auto").describe()
SHIPPED_CONFIGS = [CONFIG_DIR / "router.yaml", *sorted((CONFIG_DIR / "examples").glob("*.yaml"))]

ARCHIVE = {"id": "archive", "target_type": "file", "file_endpoint": {"path": "/tmp/a.ndjson"}}
SIEM = {"id": "siem", "target_type": "http", "http_endpoint": {"url": "https://siem.example/in"}}


def minimal(**overrides: Any) -> dict[str, Any]:
    """A valid config: one file target and one route that sends everything to it."""
    data: dict[str, Any] = {
        "targets": [copy.deepcopy(ARCHIVE)],
        "routes": [
            {"name": "everything", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}
        ],
    }
    data.update(overrides)
    return data


def problems_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    assert info.value.source == "test.yaml"
    assert info.value.problems, "a ConfigError must list at least one problem"
    return info.value.problems


def http_target(**endpoint: Any) -> dict[str, Any]:
    return {
        "id": "siem",
        "target_type": "http",
        "http_endpoint": {"url": "https://siem.example/in", **endpoint},
    }


# -- shipped configs and defaults ------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_cleanly(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Examples keep secrets as ${env:NAME} references; give each one a value, as a deployment would.
    for name in re.findall(r"\$\{env:([^}]+)\}", path.read_text(encoding="utf-8")):
        monkeypatch.setenv(name, f"{name.lower()}-value-from-the-environment")
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.targets, f"{path.name} defines no target"


def test_embedded_default_config_archives_every_event_to_one_file() -> None:
    config = load_config(CONFIG_DIR / "router.yaml")
    assert [(t.id, t.target_type) for t in config.targets] == [("archive", "file")]
    assert isinstance(config.targets[0].endpoint, FileEndpointConfig)
    assert config.routes == (
        RouteConfig(
            id="everything",
            name="everything",
            rules=(RuleConfig(locations=("*",), target_ids=("archive",)),),
        ),
    )
    assert config.server.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("cls", "name", "default"),
    [
        (ServerConfig, "host", "127.0.0.1"),
        (ServerConfig, "port", 8080),
        (ServerConfig, "max_body_bytes", 5 * MiB),
        (ServerConfig, "max_inflated_bytes", 20 * MiB),
        (ServerConfig, "max_events_per_request", 10_000),
        (StorageConfig, "path", "./var"),
        (ValidationConfig, "unknown_actions", "reject"),
        (ValidationConfig, "schemas_dir", None),
        (ShutdownConfig, "drain_timeout_s", 10.0),
        (BatchConfig, "max_events", 500),
        (BatchConfig, "max_bytes", 1 * MiB),
        (BatchConfig, "max_wait_s", 0.2),
        (RetryConfig, "max_attempts", 8),
        (RetryConfig, "max_age_s", 300.0),
        (RetryConfig, "initial_backoff_s", 0.5),
        (RetryConfig, "max_backoff_s", 30.0),
    ],
)
def test_dataclass_defaults(cls: type[Any], name: str, default: Any) -> None:
    assert getattr(cls(), name) == default


def test_empty_config_is_all_defaults() -> None:
    assert parse_config({}) == Config()
    assert Config().settings.default_targets == ()


@pytest.mark.parametrize(
    ("cls", "section"),
    [
        (ServerConfig, "server"),
        (StorageConfig, "storage"),
        (ValidationConfig, "validation"),
        (ShutdownConfig, "shutdown"),
    ],
)
def test_absent_section_takes_its_dataclass_defaults(cls: type[Any], section: str) -> None:
    assert getattr(parse_config(minimal()), section) == cls()


def test_section_overrides_only_the_fields_it_names() -> None:
    config = parse_config(minimal(server={"port": 9000}))
    assert config.server == ServerConfig(port=9000)


def test_target_without_batch_or_retry_takes_dataclass_defaults() -> None:
    """...and its type's batch defaults over them: a file target's batch is one write and one
    fsync, so it takes larger batches than a receiver's request (targets/file.py)."""
    archive, siem = parse_config(minimal(targets=[ARCHIVE, SIEM])).targets
    assert (siem.batch, siem.retry) == (BatchConfig(), RetryConfig())
    assert (archive.batch, archive.retry) == (BatchConfig(**FILE_BATCH), RetryConfig())
    assert archive.batch.max_events > BatchConfig().max_events
    assert archive.batch.max_wait_s == BatchConfig().max_wait_s
    assert archive.endpoint == FileEndpointConfig(path="/tmp/a.ndjson")


def test_names_default_to_ids() -> None:
    config = parse_config(minimal())
    assert config.targets[0].name == "archive"
    assert config.routes[0].id == "everything"


DELIVERY = {
    "batch": {"max_events": 100, "max_wait_s": 1.0},
    "retry": {"max_attempts": 3, "max_backoff_s": 5.0},
}


@pytest.mark.parametrize(
    ("target", "batch", "retry"),
    [
        pytest.param(
            ARCHIVE,
            BatchConfig(max_events=100, max_bytes=FILE_BATCH["max_bytes"], max_wait_s=1.0),
            RetryConfig(max_attempts=3, max_backoff_s=5.0),
            id="delivery-defaults",
        ),
        pytest.param(
            {**ARCHIVE, "batch": {"max_events": 10}},
            BatchConfig(max_events=10, max_bytes=FILE_BATCH["max_bytes"], max_wait_s=1.0),
            RetryConfig(max_attempts=3, max_backoff_s=5.0),
            id="own-batch-field",
        ),
        pytest.param(
            {**ARCHIVE, "batch": {"max_bytes": 2048}, "retry": {"max_attempts": 1}},
            BatchConfig(max_events=100, max_bytes=2048, max_wait_s=1.0),
            RetryConfig(max_attempts=1, max_backoff_s=5.0),
            id="own-fields-merge-with-delivery",
        ),
        pytest.param(
            {**ARCHIVE, "retry": {"initial_backoff_s": 2.0, "max_age_s": 60}},
            BatchConfig(max_events=100, max_bytes=FILE_BATCH["max_bytes"], max_wait_s=1.0),
            RetryConfig(max_attempts=3, max_backoff_s=5.0, initial_backoff_s=2.0, max_age_s=60),
            id="own-retry-fields",
        ),
    ],
)
def test_delivery_section_gives_defaults_and_a_target_overrides_single_fields(
    target: dict[str, Any], batch: BatchConfig, retry: RetryConfig
) -> None:
    config = parse_config(minimal(delivery=DELIVERY, targets=[target]))
    assert config.targets[0].batch == batch
    assert config.targets[0].retry == retry


def test_target_override_does_not_leak_into_other_targets() -> None:
    own = {**ARCHIVE, "id": "own", "file_endpoint": {"path": "/tmp/own.ndjson"}}
    own["batch"] = {"max_events": 10}
    config = parse_config(minimal(delivery=DELIVERY, targets=[ARCHIVE, own]))
    assert [t.batch.max_events for t in config.targets] == [100, 10]


def test_http_target_endpoint_fields() -> None:
    config = parse_config(minimal(targets=[ARCHIVE, http_target(timeout_s=2.5)]))
    assert config.target("siem").endpoint == HttpEndpointConfig(
        url="https://siem.example/in", timeout_s=2.5
    )


def test_rule_actions_and_default_targets_are_kept() -> None:
    data = minimal(
        targets=[ARCHIVE, SIEM],
        routes=[
            {
                "id": "r1",
                "name": "secrets to siem",
                "rules": [
                    {
                        "locations": ["us-south", "eu-de"],
                        "target_ids": ["siem"],
                        "actions": ["secrets-manager.secret.*"],
                    },
                    {"locations": ["global"], "target_ids": []},
                ],
            }
        ],
        settings={"default_targets": ["archive"]},
    )
    config = parse_config(data)
    assert config.routes == (
        RouteConfig(
            id="r1",
            name="secrets to siem",
            rules=(
                RuleConfig(
                    locations=("us-south", "eu-de"),
                    target_ids=("siem",),
                    actions=("secrets-manager.secret.*",),
                ),
                RuleConfig(locations=("global",), target_ids=()),
            ),
        ),
    )
    assert config.settings.default_targets == ("archive",)


# -- errors ----------------------------------------------------------------------------------


def two_rule_route(second_target: str) -> dict[str, Any]:
    return {
        "name": "r",
        "rules": [
            {"locations": ["us-south"], "target_ids": ["archive"]},
            {"locations": ["*"], "target_ids": [second_target]},
        ],
    }


def route_with_rule(**rule: Any) -> list[dict[str, Any]]:
    return [{"name": "r", "rules": [{"locations": ["*"], "target_ids": ["archive"], **rule}]}]


ERROR_CASES = [
    pytest.param(
        minimal(routes=[two_rule_route("siem")]),
        "routes[0].rules[1].target_ids[0]: unknown target 'siem'",
        id="unknown-target-in-rule",
    ),
    pytest.param(
        minimal(settings={"default_targets": ["nowhere"]}),
        "settings.default_targets[0]: unknown target 'nowhere'",
        id="unknown-default-target",
    ),
    pytest.param(
        minimal(targets=[ARCHIVE, {**ARCHIVE, "file_endpoint": {"path": "/tmp/b"}}]),
        "targets[1].id: duplicate target id 'archive' (also targets[0])",
        id="duplicate-target-id",
    ),
    pytest.param(
        minimal(
            routes=[
                {"id": "r1", "name": "one", "rules": [{"locations": ["*"], "target_ids": []}]},
                {"id": "r1", "name": "two", "rules": [{"locations": ["*"], "target_ids": []}]},
            ]
        ),
        "routes[1]: duplicate route id 'r1' (also routes[0])",
        id="duplicate-route-id",
    ),
    pytest.param(
        minimal(colour="blue"),
        "(top level): unknown key 'colour'",
        id="unknown-top-level-key",
    ),
    pytest.param(
        minimal(server={"port": 8080, "colour": "blue"}),
        "server: unknown key 'colour'",
        id="unknown-key-in-server",
    ),
    pytest.param(
        minimal(targets=[{**ARCHIVE, "colour": "blue"}]),
        "targets[0]: unknown key 'colour'",
        id="unknown-key-in-target",
    ),
    pytest.param(
        minimal(targets=[{**ARCHIVE, "file_endpoint": {"path": "/tmp/a", "colour": "blue"}}]),
        "targets[0].file_endpoint: unknown key 'colour'",
        id="unknown-key-in-endpoint",
    ),
    pytest.param(
        minimal(routes=route_with_rule(colour="blue")),
        "routes[0].rules[0]: unknown key 'colour'",
        id="unknown-key-in-rule",
    ),
    pytest.param(
        minimal(delivery={"batch": {"colour": "blue"}}),
        "delivery.batch: unknown key 'colour'",
        id="unknown-key-in-delivery-batch",
    ),
    pytest.param(
        minimal(targets=[{"id": "archive", "target_type": "kafka"}]),
        "targets[0].target_type: 'kafka' is not one of "
        "['file', 'http', 'cloud_logs', 'syslog', 'cloud_object_storage', 'event_streams']",
        id="wrong-target-type",
    ),
    pytest.param(
        minimal(targets=[{"id": "archive", "target_type": "file"}]),
        "targets[0]: 'file_endpoint' is a required property",
        id="file-target-without-file-endpoint",
    ),
    pytest.param(
        minimal(targets=[{"id": "archive", "target_type": "http"}]),
        "targets[0]: 'http_endpoint' is a required property",
        id="http-target-without-http-endpoint",
    ),
    pytest.param(
        minimal(targets=[ARCHIVE, http_target(url="siem.example/in")]),
        "targets[1].http_endpoint.url: 'siem.example/in' does not match",
        id="http-url-without-scheme",
    ),
    pytest.param(
        minimal(targets=[ARCHIVE, http_target(url="ftp://siem.example/in")]),
        "targets[1].http_endpoint.url: 'ftp://siem.example/in' does not match",
        id="http-url-with-other-scheme",
    ),
    pytest.param(
        minimal(routes=route_with_rule(filter="severity:critical AND")),
        "routes[0].rules[0].filter: column 22: expected a term after AND, found the end of the "
        "query in 'severity:critical AND'",
        id="rule-filter-that-does-not-parse",
    ),
    pytest.param(
        minimal(routes=route_with_rule(filter="")),
        "routes[0].rules[0].filter: '' should be non-empty",
        id="empty-rule-filter",
    ),
    pytest.param(
        minimal(routes=route_with_rule(locations=["US South"])),
        "routes[0].rules[0].locations[0]: 'US South' does not match",
        id="bad-location",
    ),
    pytest.param(
        minimal(routes=route_with_rule(locations=[])),
        "routes[0].rules[0].locations: [] should be non-empty",
        id="no-locations",
    ),
    pytest.param(
        minimal(routes=[{"name": "r", "rules": []}]),
        "routes[0].rules: [] should be non-empty",
        id="route-without-rules",
    ),
    pytest.param(
        minimal(server={"port": 70000}),
        "server.port: 70000 is greater than the maximum of 65535",
        id="port-out-of-range",
    ),
    pytest.param(
        minimal(validation={"unknown_actions": "ignore"}),
        "validation.unknown_actions: 'ignore' is not one of ['reject', 'accept']",
        id="bad-unknown-actions",
    ),
    pytest.param(
        ["not", "a", "mapping"],
        "(top level): ['not', 'a', 'mapping'] is not of type 'object'",
        id="top-level-list",
    ),
]


@pytest.mark.parametrize(("data", "expected"), ERROR_CASES)
def test_bad_config_raises_config_error_naming_the_path(data: Any, expected: str) -> None:
    problems = problems_of(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_rule_filter_is_parsed_and_compiled_at_load_time() -> None:
    config = parse_config(minimal(routes=route_with_rule(filter="reason.reasonType:Unauthorized")))
    query = config.routes[0].rules[0].filter
    assert query is not None
    assert str(query) == "reason.reasonType:Unauthorized"
    assert query.matches({"reason": {"reasonType": "unauthorized"}})
    assert not query.matches({"reason": {"reasonType": "Created"}})


def test_a_rule_without_filter_has_none() -> None:
    assert parse_config(minimal()).routes[0].rules[0].filter is None


def test_every_bad_filter_is_reported_with_its_rule() -> None:
    routes = [
        {"name": "a", "rules": [{"locations": ["*"], "target_ids": [], "filter": "(x"}]},
        {
            "name": "b",
            "rules": [
                {"locations": ["*"], "target_ids": ["archive"], "filter": "ok"},
                {"locations": ["*"], "target_ids": ["nope"], "filter": "code:>abc"},
            ],
        },
    ]
    assert problems_of(minimal(routes=routes)) == [
        "routes[0].rules[0].filter: column 1: this '(' is never closed in '(x'",
        "routes[1].rules[1].filter: column 7: expected a number after 'code:>' in 'code:>abc'",
        "routes[1].rules[1].target_ids[0]: unknown target 'nope'",
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            minimal(
                routes=[two_rule_route("siem")],
                settings={"default_targets": ["nowhere"]},
            ),
            [
                "routes[0].rules[1].target_ids[0]: unknown target 'siem'",
                "settings.default_targets[0]: unknown target 'nowhere'",
            ],
            id="two-cross-check-problems",
        ),
        pytest.param(
            minimal(colour="blue", server={"port": "eighty"}),
            [
                "(top level): unknown key 'colour'",
                "server.port: 'eighty' is not of type 'integer'",
            ],
            id="two-schema-problems",
        ),
    ],
)
def test_several_problems_are_reported_at_once(data: Any, expected: list[str]) -> None:
    problems = problems_of(data)
    assert len(problems) >= 2
    assert sorted(problems) == sorted(expected)


# -- secret references -----------------------------------------------------------------------


def test_env_reference_in_header_is_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIEM_TOKEN", "s3cret")
    target = http_target(headers={"Authorization": "Bearer ${env:SIEM_TOKEN}", "X-Plain": "p"})
    config = parse_config(minimal(targets=[ARCHIVE, target]))
    endpoint = config.target("siem").endpoint
    assert isinstance(endpoint, HttpEndpointConfig)
    assert endpoint.headers == {"Authorization": "Bearer s3cret", "X-Plain": "p"}


def test_env_reference_in_url_host_is_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIEM_HOST", "siem.internal:8443")
    target = http_target(url="https://${env:SIEM_HOST}/ingest")
    endpoint = parse_config(minimal(targets=[ARCHIVE, target])).target("siem").endpoint
    assert isinstance(endpoint, HttpEndpointConfig)
    assert endpoint.url == "https://siem.internal:8443/ingest"


def test_missing_env_variable_is_a_problem_naming_the_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SIEM_TOKEN", raising=False)
    target = http_target(headers={"Authorization": "Bearer ${env:SIEM_TOKEN}"})
    assert problems_of(minimal(targets=[ARCHIVE, target])) == [
        "targets[1].http_endpoint.headers.Authorization: "
        "environment variable 'SIEM_TOKEN' is not set"
    ]


def test_file_reference_in_header_is_read_and_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("  tok-123\n\n", encoding="utf-8")
    target = http_target(headers={"X-Api-Key": f"${{file:{secret}}}"})
    endpoint = parse_config(minimal(targets=[ARCHIVE, target])).target("siem").endpoint
    assert isinstance(endpoint, HttpEndpointConfig)
    assert endpoint.headers == {"X-Api-Key": "tok-123"}


def test_unreadable_file_reference_is_a_problem_naming_the_header(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    target = http_target(headers={"X-Api-Key": f"${{file:{missing}}}"})
    [problem] = problems_of(minimal(targets=[ARCHIVE, target]))
    assert problem.startswith(
        f"targets[1].http_endpoint.headers.X-Api-Key: cannot read '{missing}'"
    )


def test_a_control_character_in_a_header_from_a_reference_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """aiohttp refuses such a header at send time (ValueError), which would stall the target:
    the config says so at load time, naming where, never showing the value."""
    monkeypatch.setenv("SIEM_TOKEN", "s3cret-token-from-env\n")  # `export X=$(cat f; echo)`
    inner = tmp_path / "key"
    inner.write_text("tok\r\nX-Injected: 1\n", encoding="utf-8")
    target = http_target(
        headers={"X-Api-Key": f"${{file:{inner}}}", "X-Tenant": "audit\x7f"},
        auth={"type": "bearer", "token": "${env:SIEM_TOKEN}"},
    )
    problems = problems_of(minimal(targets=[ARCHIVE, target]))
    assert sorted(p.split(":")[0] for p in problems) == [
        "targets[1].http_endpoint.auth.token",
        "targets[1].http_endpoint.headers.X-Api-Key",
        "targets[1].http_endpoint.headers.X-Tenant",
    ]
    assert all("control character" in p for p in problems)
    assert not any("s3cret" in p or "Injected" in p for p in problems)


def test_a_header_name_that_is_not_a_token_is_refused() -> None:
    target = http_target(headers={"X-Bad\nName": "v", "X Space": "v"})
    problems = problems_of(minimal(targets=[ARCHIVE, target]))
    assert len(problems) == 2 and all("not a valid header name" in p for p in problems)


def test_a_tab_in_a_header_value_and_a_file_ending_in_a_newline_are_fine(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("tok-123\n", encoding="utf-8")
    target = http_target(headers={"X-Api-Key": f"${{file:{secret}}}", "X-List": "a,\tb"})
    endpoint = parse_config(minimal(targets=[ARCHIVE, target])).target("siem").endpoint
    assert isinstance(endpoint, HttpEndpointConfig)
    assert endpoint.headers == {"X-Api-Key": "tok-123", "X-List": "a,\tb"}


# -- load_config -----------------------------------------------------------------------------


def test_load_config_of_missing_file_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.problems == ["cannot read the file: No such file or directory"]


def test_load_config_of_invalid_yaml_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("targets: [\n  - id: a\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith("not valid YAML: ")


def test_load_config_of_empty_file_is_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n", encoding="utf-8")
    assert load_config(path) == Config()


def test_load_config_reports_schema_problems_with_the_file_as_source(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(minimal(routes=[two_rule_route("siem")])), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.problems == ["routes[0].rules[1].target_ids[0]: unknown target 'siem'"]


# -- event-router check ----------------------------------------------------------------------


def test_check_command_prints_ok_for_a_good_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(
        yaml.safe_dump(minimal(settings={"default_targets": ["archive"]})), encoding="utf-8"
    )
    main(["check", "--config", str(path)])
    out, err = capsys.readouterr()
    assert out == f"{path}: OK (1 target, 1 route, 1 default target)\n{AUTO_WORKERS}\n"
    assert err == ""


def test_check_command_without_config_checks_the_embedded_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["check"])
    out, _ = capsys.readouterr()
    assert out.endswith(f"router.yaml: OK (1 target, 1 route, 0 default targets)\n{AUTO_WORKERS}\n")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            minimal(routes=[two_rule_route("siem")], settings={"default_targets": ["nowhere"]}),
            id="cross-check-problems",
        ),
        pytest.param(minimal(colour="blue", server={"port": "eighty"}), id="schema-problems"),
        pytest.param(minimal(routes=route_with_rule(filter="host:x OR")), id="bad-filter"),
    ],
)
def test_check_command_exits_2_and_prints_every_problem_for_a_bad_config(
    data: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    problems = problems_of(data)
    with pytest.raises(SystemExit) as info:
        main(["check", "--config", str(path)])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: {len(problems)} problem{'' if len(problems) == 1 else 's'}",
        *(f"  {p}" for p in problems),
    ]


def test_check_command_exits_2_for_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(SystemExit) as info:
        main(["check", "--config", str(path)])
    assert info.value.code == 2
    assert "cannot read the file" in capsys.readouterr().err


def test_every_dataclass_field_has_a_schema_property() -> None:
    # The schema names every setting the dataclasses hold, so none is unreachable from YAML.
    schema = json.loads((schemas_dir() / "config.schema.json").read_text(encoding="utf-8"))
    sections = {
        "server": ServerConfig,
        "storage": StorageConfig,
        "validation": ValidationConfig,
        "shutdown": ShutdownConfig,
    }
    for key, cls in sections.items():
        assert {f.name for f in fields(cls)} == set(schema["properties"][key]["properties"]), key
    assert {f.name for f in fields(BatchConfig)} == set(schema["$defs"]["batch"]["properties"])
    assert {f.name for f in fields(RetryConfig)} == set(schema["$defs"]["retry"]["properties"])


SECRET_CONFIG = """
targets:
  - id: siem
    target_type: http
    http_endpoint:
      url: https://siem.example/ingest
      auth: {type: bearer, token: a-literal-token-value}
routes: []
"""


@pytest.mark.parametrize(("mode", "refused"), [(0o644, True), (0o640, True), (0o600, False)])
def test_secret_literals_in_a_file_others_can_read_are_refused(
    tmp_path: Path, mode: int, refused: bool
) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(SECRET_CONFIG)
    path.chmod(mode)
    if not refused:
        load_config(path)
        return
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert error.value.problems == [
        f"targets[0].http_endpoint.auth.token: a secret written in a file other users can read "
        f"(mode {mode:04o}); chmod 600 the file, or use ${{env:NAME}} or ${{file:/path}}"
    ]


def test_secret_references_may_live_in_a_readable_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIEM_TOKEN", "from-the-environment")
    path = tmp_path / "router.yaml"
    path.write_text(SECRET_CONFIG.replace("a-literal-token-value", '"${env:SIEM_TOKEN}"'))
    path.chmod(0o644)
    assert load_config(path).targets[0].id == "siem"


# -- YAML that would hang or crash the loader ------------------------------------------------


def alias_bomb(levels: int = 9) -> str:
    """ "Billion laughs": each level lists the one before nine times, by alias."""
    lines = ['x0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"x{n}: &x{n} [{', '.join([f'*x{n - 1}'] * 9)}]" for n in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(alias_bomb(), "aliases here expand to more than", id="alias-bomb"),
        pytest.param(
            "routes: &loop [*loop]\n", "alias *loop refers to a node that holds it", id="loop"
        ),
        pytest.param(
            "targets: " + "[" * 10_000 + "]" * 10_000 + "\n",
            f"nested deeper than {MAX_YAML_DEPTH} levels",
            id="deep",
        ),
    ],
)
def test_check_refuses_yaml_that_would_hang_or_crash_the_loader_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    # The alias bomb used to hold `check` at full CPU for minutes; the loop and the deep list
    # ended in a RecursionError traceback.
    path = tmp_path / "bomb.yaml"
    path.write_text(text, encoding="utf-8")
    # No stopwatch (a shared machine makes one flaky): the message below proves the bounded
    # loader refused the file before expanding it, and the suite's per-test timeout catches
    # a loader that would hang again.
    with pytest.raises(SystemExit) as info:
        main(["check", "--config", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{path}: 1 problem\n" in err
    assert "not valid YAML: " in err and message in err
    assert f'in "{path}", line ' in err  # where, in the operator's own file


def test_aliases_within_the_bound_load_as_if_written_out(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "targets:\n"
        "  - {id: archive, target_type: file, file_endpoint: {path: /tmp/a.ndjson}}\n"
        "routes:\n"
        "  - name: us\n"
        "    rules: [&to_archive {locations: [us-south], target_ids: [archive]}]\n"
        "  - name: eu\n"
        "    rules: [{<<: *to_archive, locations: [eu-de]}, *to_archive]\n",
        encoding="utf-8",
    )
    written_out = minimal(
        routes=[
            {"name": "us", "rules": [{"locations": ["us-south"], "target_ids": ["archive"]}]},
            {
                "name": "eu",
                "rules": [
                    {"locations": ["eu-de"], "target_ids": ["archive"]},
                    {"locations": ["us-south"], "target_ids": ["archive"]},
                ],
            },
        ]
    )
    assert load_config(path) == parse_config(written_out)


def test_aliases_are_bounded_in_all_not_one_by_one(tmp_path: Path) -> None:
    # Each alias stays small, but together they repeat more than the bound allows.
    many = MAX_ALIAS_NODES // 3 + 1
    path = tmp_path / "router.yaml"
    path.write_text("x: &pair [a, b]\ny: [" + ", ".join(["*pair"] * many) + "]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"aliases here expand to more than {MAX_ALIAS_NODES} nodes" in info.value.problems[0]


def test_bytes_in_flight_below_the_largest_body_is_a_problem() -> None:
    data = minimal(server={"max_body_bytes": 2 * MiB, "max_body_bytes_in_flight": MiB})
    assert problems_of(data) == [
        f"server.max_body_bytes_in_flight: {MiB} is less than server.max_body_bytes "
        f"({2 * MiB}), so a body of the largest size allowed could never be taken"
    ]


# -- what `check` questions ------------------------------------------------------------------


def file_targets(*paths: str | Path, storage: str | Path = "./var") -> dict[str, Any]:
    return minimal(
        storage={"path": str(storage)},
        targets=[
            {"id": f"t{i}", "target_type": "file", "file_endpoint": {"path": str(path)}}
            for i, path in enumerate(paths)
        ],
        routes=[],
    )


def test_two_targets_writing_one_file_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real").mkdir()
    data = file_targets(tmp_path / "real" / "a.ndjson", tmp_path / "link" / "a.ndjson")
    problems = problems_of(data)
    assert len(problems) == 1
    assert problems[0].startswith("targets[1].file_endpoint.path: targets[0] already writes")


def test_a_file_target_in_the_journals_files_or_dead_letters_is_a_problem(tmp_path: Path) -> None:
    var = tmp_path / "var"
    data = file_targets(
        var / "journal.db",
        var / "journal.db-wal",
        var / "deadletter" / "t0.ndjson",
        var / "events.ndjson",  # beside the journal, as the embedded config has it: fine
        var / "journal.lock",
        storage=var,
    )
    assert problems_of(data) == [
        f"targets[0].file_endpoint.path: {str(var / 'journal.db')!r} is one of the journal's "
        "own files",
        f"targets[1].file_endpoint.path: {str(var / 'journal.db-wal')!r} is one of the "
        "journal's own files",
        f"targets[2].file_endpoint.path: {str(var / 'deadletter' / 't0.ndjson')!r} is in the "
        "dead-letter directory",
        f"targets[4].file_endpoint.path: {str(var / 'journal.lock')!r} is one of the "
        "journal's own files",
    ]


def test_directories_devices_and_fifos_are_no_archive(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    data = file_targets(tmp_path, "/dev/null", tmp_path / "fifo", tmp_path / "a\x00b")
    assert [p.split(": ", 1)[1] for p in problems_of(data)] == [
        f"{str(tmp_path)!r} is a directory, not a regular file",
        "'/dev/null' is a device, FIFO or socket, not a regular file",
        f"{str(tmp_path / 'fifo')!r} is a device, FIFO or socket, not a regular file",
        "a NUL byte in the path",
    ]


def test_a_yaml_file_target_outside_any_root_stays_allowed(tmp_path: Path) -> None:
    config = parse_config(file_targets(tmp_path / "anywhere" / "a.ndjson"))
    assert archive_roots(config) == ((tmp_path / "anywhere").resolve(),)
    explicit = parse_config(
        {**file_targets(tmp_path / "a.ndjson"), "storage": {"archive_roots": ["/srv/audit"]}}
    )
    assert archive_roots(explicit) == (Path("/srv/audit"),)


def test_a_target_pointing_at_the_listener_is_a_problem() -> None:
    data = minimal(
        server={"host": "127.0.0.1", "port": 8080},
        targets=[
            ARCHIVE,
            {**SIEM, "http_endpoint": {"url": "http://localhost:8080/v1/events"}},
            {**SIEM, "id": "other-port", "http_endpoint": {"url": "http://127.0.0.1:8081/"}},
        ],
    )
    assert problems_of(data) == [
        "targets[1].http_endpoint.url: points at this daemon's own listener (127.0.0.1:8080); "
        "its events would come back as new events for ever"
    ]


@pytest.mark.parametrize(
    ("make", "why"),
    [
        pytest.param(lambda d: os.mkfifo(d / "ref") or d / "ref", "not a regular file", id="fifo"),
        pytest.param(lambda d: Path("/dev/zero"), "not a regular file", id="device"),
        pytest.param(lambda d: d, "not a regular file", id="directory"),
        pytest.param(
            lambda d: (d / "big").write_bytes(b"x" * (MAX_REFERENCE_BYTES + 1)) and d / "big",
            f"larger than {MAX_REFERENCE_BYTES} bytes",
            id="too-large",
        ),
    ],
)
def test_file_references_are_read_bounded_and_never_block(
    make: Any, why: str, tmp_path: Path
) -> None:
    ref = make(tmp_path)
    data = minimal(
        targets=[
            ARCHIVE,
            {
                **SIEM,
                "http_endpoint": {
                    "url": SIEM["http_endpoint"]["url"],
                    "headers": {"X": f"${{file:{ref}}}"},
                },
            },
        ]
    )
    assert problems_of(data) == [
        f"targets[1].http_endpoint.headers.X: cannot read {str(ref)!r}: {why}"
    ]


def test_check_warns_about_a_config_without_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(yaml.safe_dump({"routes": []}), encoding="utf-8")
    main(["check", "--config", str(path)])
    out, err = capsys.readouterr()
    assert out == f"{path}: OK (0 targets, 0 routes, 0 default targets)\n{AUTO_WORKERS}\n"
    assert err == (
        "warning: targets: none; accepted events go nowhere (counted as unrouted in /v1/status)\n"
    )
