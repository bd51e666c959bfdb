"""The `auth` section: tokens are references or digests, never literals, and are kept as
digests only."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from router.config import parse_config
from router.errors import ConfigError
from router.server.auth import TokenTable

DIGEST = hashlib.sha256(b"a-token-of-enough-length").hexdigest()


def problems_of(auth: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"auth": auth})
    return info.value.problems


def test_a_digest_and_a_reference_load_as_digests(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ROUTER_TOKEN", "another-token-of-enough-length")
    config = parse_config(
        {
            "auth": {
                "ingest_tokens": [
                    {"name": "a", "sha256": DIGEST, "services": ["secrets-manager"]},
                    {"name": "b", "token": "${env:ROUTER_TOKEN}"},
                ]
            }
        }
    )
    assert config.auth is not None
    a, b = config.auth.ingest_tokens
    assert a.digest.hex() == DIGEST and a.services == ("secrets-manager",)
    assert b.digest == hashlib.sha256(b"another-token-of-enough-length").digest()
    assert "enough-length" not in repr(config)
    table = TokenTable(config.auth)
    assert table.lookup("another-token-of-enough-length") is not None
    assert table.lookup("another-token-of-enough-lengtH") is None


def test_no_auth_section_means_none() -> None:
    assert parse_config({}).auth is None


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"ingest_tokens": [{"name": "a", "token": "a-literal-token-123456"}]}, "does not match"),
        ({"ingest_tokens": [{"name": "a"}]}, "auth.ingest_tokens[0]"),
        (
            {"ingest_tokens": [{"name": "a", "sha256": DIGEST, "token": "${env:X}"}]},
            "auth.ingest_tokens[0]",
        ),
        ({"admin_tokens": [{"name": "a", "sha256": "abc"}]}, "auth.admin_tokens[0].sha256"),
        (
            {"admin_tokens": [{"name": "a", "sha256": DIGEST, "services": ["x"]}]},
            "unknown key 'services'",
        ),
        (
            {
                "ingest_tokens": [{"name": "a", "sha256": DIGEST}],
                "admin_tokens": [{"name": "a", "sha256": "0" * 64}],
            },
            "auth.admin_tokens[0].name: duplicate token name 'a' (also auth.ingest_tokens[0])",
        ),
        (
            {
                "ingest_tokens": [{"name": "a", "sha256": DIGEST}],
                "admin_tokens": [{"name": "b", "sha256": DIGEST.upper()}],
            },
            "auth.admin_tokens[0]: the same token as auth.ingest_tokens[0]",
        ),
        (
            {"ingest_tokens": [{"name": "a", "token": "${env:SURELY_UNSET_TOKEN_VAR}"}]},
            "environment variable 'SURELY_UNSET_TOKEN_VAR' is not set",
        ),
    ],
)
def test_bad_auth_sections_are_reported_with_their_place(auth: Any, expected: str) -> None:
    assert any(expected in problem for problem in problems_of(auth)), problems_of(auth)


def test_a_short_referenced_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_TOKEN", "short")
    problems = problems_of({"ingest_tokens": [{"name": "a", "token": "${env:SHORT_TOKEN}"}]})
    assert problems == ["auth.ingest_tokens[0].token: at least 16 characters"]


def test_unset_token_variables_are_reported_once_each_not_as_duplicates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_SUCH_INGEST_TOKEN", raising=False)
    monkeypatch.delenv("NO_SUCH_ADMIN_TOKEN", raising=False)
    problems = problems_of(
        {
            "ingest_tokens": [{"name": "p", "token": "${env:NO_SUCH_INGEST_TOKEN}"}],
            "admin_tokens": [{"name": "o", "token": "${env:NO_SUCH_ADMIN_TOKEN}"}],
        }
    )
    assert problems == [
        "auth.ingest_tokens[0].token: environment variable 'NO_SUCH_INGEST_TOKEN' is not set",
        "auth.admin_tokens[0].token: environment variable 'NO_SUCH_ADMIN_TOKEN' is not set",
    ]
