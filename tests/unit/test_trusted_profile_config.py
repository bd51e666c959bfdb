"""The daemon's identity as a trusted profile (`iam: {trusted_profile: ...}`): how the loader
checks it and gives it to the targets that use the daemon's identity."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

import router.iam
from router.config import parse_config
from router.iam import TrustedProfileConfig, read_cr_token
from router.targets.cloud_logs import CloudLogsEndpointConfig
from router.targets.cos import CosEndpointConfig
from router.targets.event_streams import EventStreamsEndpointConfig, sasl_mechanism
from tests.unit.test_config import minimal, problems_of
from tests.unit.test_cos import cos
from tests.unit.test_identity import ROUTES, logs, streams

PROFILE_ID = "Profile-9f0e6a3c-5d4b-4c2a-8e1f-0a9b8c7d6e5f"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa-token"
    path.write_text("eyJhbGciOiJSUzI1NiJ9.cr-token.sig\n")
    return path


def profile_iam(token_file: Path, **profile: Any) -> dict[str, Any]:
    return {
        "trusted_profile": {"profile_id": PROFILE_ID, "cr_token_file": str(token_file), **profile},
        "iam_url": "https://iam.test.example",
    }


def endpoint_of(target: dict[str, Any], iam: dict[str, Any]) -> Any:
    data = minimal(targets=[{**target, "id": "t"}], routes=ROUTES, iam=iam)
    return parse_config(data).targets[0].endpoint


def iam_problems(iam: dict[str, Any], target: dict[str, Any] | None = None) -> list[str]:
    data = minimal(targets=[{**(target or logs()), "id": "t"}], routes=ROUTES, iam=iam)
    return problems_of(data)


def test_a_trusted_profile_serves_every_target_that_uses_the_daemons_identity(
    token_file: Path,
) -> None:
    iam = profile_iam(token_file)
    expected = TrustedProfileConfig(profile_id=PROFILE_ID, cr_token_file=str(token_file))
    cloud_logs = endpoint_of(logs(), iam)
    assert isinstance(cloud_logs, CloudLogsEndpointConfig)
    assert (cloud_logs.trusted_profile, cloud_logs.api_key) == (expected, "")
    assert cloud_logs.iam_url == "https://iam.test.example"
    target = cos(service_to_service_enabled=True)
    bucket = endpoint_of({k: v for k, v in target.items() if k != "id"}, iam)
    assert isinstance(bucket, CosEndpointConfig)
    assert (bucket.trusted_profile, bucket.api_key) == (expected, None), "s2s: not its own key"
    kafka = endpoint_of(streams(service_to_service_enabled=True), iam)
    assert isinstance(kafka, EventStreamsEndpointConfig)
    assert kafka.trusted_profile == expected
    assert sasl_mechanism(kafka) == "oauthbearer", "a profile has no password to send"
    assert kafka.iam_url == "https://iam.test.example"


def test_a_targets_own_key_still_wins_over_the_daemons_profile(
    token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TARGET_KEY", "the-targets-own-key")
    kafka = endpoint_of(streams(api_key="${env:TARGET_KEY}"), profile_iam(token_file))
    assert (kafka.api_key, kafka.trusted_profile) == ("the-targets-own-key", None)
    assert sasl_mechanism(kafka) == "plain"


@pytest.mark.parametrize(
    ("iam", "expected"),
    [
        ({"api_key": "k", "trusted_profile": {"profile_id": "p"}}, "iam: exactly one of api_key "),
        ({"iam_url": "https://iam.test.example"}, "iam: exactly one of api_key"),
        (
            {"trusted_profile": {"profile_id": "p", "profile_name": "n"}},
            "iam.trusted_profile: exactly one of profile_id, profile_name, profile_crn, not "
            "profile_id and profile_name",
        ),
        ({"trusted_profile": {}}, "iam.trusted_profile: exactly one of profile_id"),
        (
            # IAM looks a profile_name up in the compute resource's own account: the cr-token
            # grant takes no account id (IBM's IAM Identity API, get_token_cr_token).
            {"trusted_profile": {"profile_name": "n", "account_id": "abc"}},
            "iam.trusted_profile: unknown key 'account_id'",
        ),
        (
            {"trusted_profile": {"profile_id": "p", "cr_token_file": "${file:/etc/hostname}"}},
            "iam.trusted_profile.cr_token_file",
        ),
    ],
)
def test_a_wrong_iam_section_is_refused_naming_the_field(
    iam: dict[str, Any], expected: str, token_file: Path
) -> None:
    profile = iam.get("trusted_profile")
    if isinstance(profile, dict) and "cr_token_file" not in profile:
        profile["cr_token_file"] = str(token_file)
    problems = iam_problems(iam)
    assert any(expected in problem for problem in problems), problems


def test_a_token_file_that_cannot_be_read_is_refused_when_the_config_loads(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere" / "token"
    [problem] = iam_problems(profile_iam(missing))
    assert problem == (
        f"iam.trusted_profile.cr_token_file: compute-resource token file {missing}: "
        "No such file or directory"
    )
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    [problem] = iam_problems(profile_iam(empty))
    assert problem.endswith(f"compute-resource token file {empty} is empty")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opened without blocking, and refused
    [problem] = iam_problems(profile_iam(fifo))
    assert problem.endswith(f"compute-resource token file {fifo}: not a regular file")


def test_without_a_file_named_the_sdks_default_files_are_searched_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = (str(tmp_path / "vault-token"), str(tmp_path / "sa-token"), str(tmp_path / "ce"))
    monkeypatch.setattr(router.iam, "DEFAULT_CR_TOKEN_FILES", defaults)
    iam = {"trusted_profile": {"profile_id": PROFILE_ID}}
    [problem] = iam_problems(iam)
    assert problem.startswith("iam.trusted_profile.cr_token_file: cr_token_file is not set")
    assert all(path in problem for path in defaults)
    Path(defaults[2]).write_text("code-engine-token")
    Path(defaults[1]).write_text("iks-token")
    assert read_cr_token(None) == "iks-token", "the first that exists wins"
    assert endpoint_of(logs(), iam).trusted_profile.cr_token_file is None


@pytest.mark.parametrize("kind", ["api_key", "trusted_profile"])
def test_the_daemons_identity_is_exchanged_at_the_iam_sections_url_only(
    kind: str, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAEMON_KEY", "the-daemons-own-key")
    iam = profile_iam(token_file) if kind == "trusted_profile" else {"api_key": "${env:DAEMON_KEY}"}
    elsewhere = logs(iam_url="https://collector.example/steal")
    [problem] = iam_problems(iam, elsewhere)
    assert problem.startswith("targets[0].cloudlogs_endpoint.iam_url: this target uses the ")
    # The same URL as the daemon's is no conflict.
    same = logs(iam_url=iam.get("iam_url", "https://iam.cloud.ibm.com") + "/")
    assert endpoint_of(same, iam).iam_url.rstrip("/") == same["cloudlogs_endpoint"]["iam_url"][:-1]


def test_kafka_with_a_password_mechanism_cannot_use_the_daemons_profile(
    token_file: Path,
) -> None:
    target = streams(service_to_service_enabled=True, sasl={"mechanism": "scram-sha-512"})
    [problem] = iam_problems(profile_iam(token_file), target)
    assert problem.startswith("targets[0].eventstreams_endpoint.sasl.mechanism: 'scram-sha-512'")
    explicit = streams(service_to_service_enabled=True, sasl={"mechanism": "oauthbearer"})
    assert sasl_mechanism(endpoint_of(explicit, profile_iam(token_file))) == "oauthbearer"


def test_no_endpoint_takes_a_trusted_profile_or_a_token_file_of_its_own(
    token_file: Path,
) -> None:
    """Only the operator's top-level `iam` section names a token file: a target (from the
    YAML or, the same check, from the API) that tries is refused by the schema."""
    own = logs(trusted_profile={"profile_id": "p", "cr_token_file": "/etc/shadow"})
    problems = iam_problems(profile_iam(token_file), own)
    unknown = "cloudlogs_endpoint: unknown key 'trusted_profile'"
    assert any(unknown in problem for problem in problems), problems


def test_the_readmes_iam_examples_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### The daemon's own identity (`iam`)", 1)[1].split("\n### ", 1)[0]
    blocks = [part.split("```", 1)[0] for part in section.split("```yaml\n")[1:]]
    assert len(blocks) == 2, "an API key and a trusted profile"
    monkeypatch.setenv("IBMCLOUD_API_KEY", "a-key")
    token = tmp_path / "sa-token"
    token.write_text("a-cr-token")
    # The example names no file: the SDK's default list, here pointed at a file of the test's.
    monkeypatch.setattr(router.iam, "DEFAULT_CR_TOKEN_FILES", (str(token),))
    key, profile = (endpoint_of(logs(), yaml.safe_load(block)["iam"]) for block in blocks)
    assert (key.api_key, key.trusted_profile) == ("a-key", None)
    assert profile.trusted_profile == TrustedProfileConfig(profile_id=PROFILE_ID)
    assert profile.iam_url == key.iam_url == "https://iam.cloud.ibm.com"
