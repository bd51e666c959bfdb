"""storage.backend and storage.jetstream: defaults from the dataclasses, problems by field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from router.cli import main
from router.config import (
    JetStreamConfig,
    JetStreamTlsConfig,
    StorageConfig,
    config_warnings,
    parse_config,
)
from router.errors import ConfigError
from router.journal.jetstream import letters_stream, queue_stream, queue_subject, stream_token

COS_ENDPOINT = {
    "endpoint": "s3.private.us-east.cloud-object-storage.appdomain.cloud",
    "target_crn": "crn:v1:bluemix:public:cloud-object-storage:global:a/abc:0b5a3c6e::",
    "bucket": "audit-archive",
    "api_key": "${env:HOME}",
}


def on_jetstream(**jetstream: Any) -> dict[str, Any]:
    return {
        "storage": {"backend": "jetstream", "jetstream": jetstream},
        "evidence": {"enabled": False},
    }


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return list(info.value.problems)


def test_the_backend_is_sqlite_unless_the_config_says_otherwise() -> None:
    assert parse_config({}).storage.backend == "sqlite"
    assert StorageConfig().jetstream == JetStreamConfig()


def test_jetstream_settings_take_their_dataclass_defaults() -> None:
    config = parse_config(on_jetstream(servers=["nats://10.0.0.1:4222"]))
    assert config.storage.backend == "jetstream"
    assert config.storage.jetstream == JetStreamConfig(servers=("nats://10.0.0.1:4222",))
    assert (config.storage.jetstream.stream, config.storage.jetstream.replicas) == (
        "EVENT_ROUTER",
        1,
    )
    assert config.storage.journal_max_bytes() == JetStreamConfig().max_bytes
    assert config.storage.jetstream.share_config


def test_secrets_are_references_and_tls_files_must_be_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    monkeypatch.setenv("NATS_PASSWORD", "s3cret-from-env")
    config = parse_config(
        on_jetstream(user="router", password="${env:NATS_PASSWORD}", tls={"ca_file": str(ca)})
    )
    assert config.storage.jetstream.password == "s3cret-from-env"
    assert config.storage.jetstream.tls == JetStreamTlsConfig(ca_file=str(ca))
    assert "s3cret" not in repr(config.storage.jetstream)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            on_jetstream(user="router"),
            "storage.jetstream.password: user and password go together",
        ),
        (
            on_jetstream(token="t" * 20, user="router", password="p"),
            "storage.jetstream: user and token are given; name one way to authenticate",
        ),
        (
            on_jetstream(credentials_file="/nonexistent/router.creds"),
            "storage.jetstream.credentials_file: cannot read '/nonexistent/router.creds'",
        ),
        (
            on_jetstream(tls={"cert_file": "/nonexistent/c.pem"}),
            "storage.jetstream.tls.key_file: cert_file and key_file go together",
        ),
        (
            {
                **on_jetstream(),
                "evidence": {"enabled": True},
                "targets": [
                    {
                        "id": "cos",
                        "target_type": "cloud_object_storage",
                        "cos_endpoint": COS_ENDPOINT,
                    }
                ],
            },
            "targets[0]: evidence.enabled chains a cloud_object_storage target's objects, "
            "which every router of a JetStream stream writes into one bucket: one chain written "
            "by several routers is not supported with storage.backend jetstream (file targets "
            "are, a chain per router); set evidence.enabled: false, or use storage.backend sqlite",
        ),
        (
            {**on_jetstream(), "evidence": {"enabled": True, "event_streams": True}},
            "evidence.event_streams: every router of a JetStream stream writes an event_streams "
            "target's topic: one chain written by several routers is not supported with "
            "storage.backend jetstream (file targets are, a chain per router); set "
            "evidence.event_streams: false",
        ),
        (
            {
                "storage": {
                    "backend": "jetstream",
                    "when_full": "drop_oldest_per_target",
                },
                "evidence": {"enabled": False},
            },
            "storage.when_full: drop_oldest_per_target needs storage.backend sqlite; a full "
            "JetStream stream answers 503 + Retry-After (when_full: reject)",
        ),
    ],
)
def test_cross_check_names_the_field(data: dict[str, Any], expected: str) -> None:
    assert expected in problems(data)


@pytest.mark.parametrize(
    ("jetstream", "where"),
    [
        ({"servers": []}, "storage.jetstream.servers"),
        ({"servers": ["10.0.0.1:4222"]}, "storage.jetstream.servers[0]"),
        ({"stream": "has.dot"}, "storage.jetstream.stream"),
        ({"replicas": 0}, "storage.jetstream.replicas"),
        ({"replicas": 7}, "storage.jetstream.replicas"),
        ({"max_bytes": 10}, "storage.jetstream.max_bytes"),
        ({"subject": "x"}, "storage.jetstream"),
    ],
)
def test_schema_refuses_a_bad_jetstream_section(jetstream: dict[str, Any], where: str) -> None:
    found = problems(on_jetstream(**jetstream))
    assert any(p.startswith(where) for p in found), found


def test_file_targets_are_chained_on_jetstream_a_chain_per_router() -> None:
    config = parse_config(
        {
            "storage": {"backend": "jetstream"},
            "targets": [
                {"id": "a", "target_type": "file", "file_endpoint": {"path": "/tmp/a.ndjson"}}
            ],
        }
    )
    assert config.storage.backend == "jetstream"
    assert config.evidence.enabled


def test_sqlite_backend_ignores_the_jetstream_section_and_evidence_stays_allowed() -> None:
    config = parse_config({"storage": {"jetstream": {"user": "router"}}})
    assert config.storage.backend == "sqlite"
    assert config.evidence.enabled


def test_more_replicas_than_servers_listed_is_a_warning() -> None:
    config = parse_config(on_jetstream(servers=["nats://a:4222"], replicas=3))
    assert any(w.startswith("storage.jetstream.replicas:") for w in config_warnings(config))


@pytest.mark.parametrize(
    ("target_id", "token"),
    [("archive", "archive"), ("a.b", "a_2Eb"), ("a_b", "a_5Fb"), ("x:y-z", "x_3Ay-z")],
)
def test_a_target_id_becomes_one_token_of_a_stream_name_and_subject(
    target_id: str, token: str
) -> None:
    assert stream_token(target_id) == token
    config = JetStreamConfig(stream="ER")
    assert queue_stream(config, target_id) == f"ER_{token}"
    assert letters_stream(config, target_id) == f"ER_DLQ_{token}"
    assert queue_subject(config, target_id) == f"ER.q.{token}"


def test_check_exits_2_naming_the_jetstream_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "storage:\n  backend: jetstream\n  jetstream: {user: router}\nevidence: {enabled: false}\n"
    )
    with pytest.raises(SystemExit) as info:
        main(["check", "--config", str(path)])
    assert info.value.code == 2
    assert "storage.jetstream.password: user and password go together" in capsys.readouterr().err
