"""The redaction policy: what the schema marks, what the config adds, how each action looks."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.config import RedactionConfig, RedactionKeyConfig, parse_config
from router.errors import ConfigError
from router.intake.redaction import HASH_PREFIX, MASK, MAX_RECORDED_PATHS, Redactor, normalize
from router.intake.validation import EventValidator, json_pointer
from router.reload import checkers_for, redactor_for, validator_for
from router.resources import schemas_dir
from tests.fakes import make_event

KEY = "a-hash-key-of-some-length"


def redactor(*keys: RedactionKeyConfig) -> Redactor:
    return Redactor.from_schemas(schemas_dir(), RedactionConfig(keys=keys, hash_key=KEY))


@pytest.mark.parametrize("spelling", ["api_key", "apiKey", "API-KEY", "Api_Key", "apikey"])
def test_every_spelling_of_a_key_is_one_key(spelling: str) -> None:
    assert normalize(spelling) == "apikey"


def test_schema_marked_keys_are_redacted_at_any_depth_with_their_action() -> None:
    event = make_event(
        requestData={
            "secret_type": "arbitrary",
            "Payload": "the secret itself",
            "versions": [{"PASSWORD": "hunter2", "meta": {"api-key": "k-123"}}],
        },
        responseData={"apiKey": "k-123", "certificate": {"pem": "-----BEGIN"}},
    )
    assert redactor().redact(event) == 5
    assert event["requestData"] == {
        "secret_type": "arbitrary",
        "versions": [{"PASSWORD": MASK, "meta": {"api-key": event["responseData"]["apiKey"]}}],
    }
    hashed = event["responseData"]["apiKey"]
    assert hashed.startswith(HASH_PREFIX) and "k-123" not in hashed
    assert "certificate" not in event["responseData"]
    assert event["redaction"] == {
        "by": "event-router",
        "count": 5,
        "paths": [
            "/requestData/Payload",
            "/requestData/versions/0/PASSWORD",
            "/requestData/versions/0/meta/api-key",
            "/responseData/apiKey",
            "/responseData/certificate",
        ],
    }
    assert EventValidator(schemas_dir()).validate(event) == []


def test_equal_values_hash_equal_only_under_the_same_key() -> None:
    a, b = redactor(), redactor()
    assert a.hash("k-123") == b.hash("k-123") != a.hash("k-124")
    other = Redactor.from_schemas(schemas_dir(), RedactionConfig(hash_key="another-key-of-length"))
    assert other.hash("k-123") != a.hash("k-123")


def test_an_event_without_sensitive_keys_is_untouched() -> None:
    event = make_event()
    before = copy.deepcopy(event)
    assert redactor().redact(event) == 0
    assert event == before


def test_config_adds_names_and_paths() -> None:
    r = redactor(
        RedactionKeyConfig(key="unseal_key", action="drop"),
        RedactionKeyConfig(key="requestData.vault.role_id", action="hash"),
    )
    event = make_event(
        requestData={"x": [{"Unseal-Key": "u"}], "vault": {"role_id": "r", "other": "o"}}
    )
    assert r.redact(event) == 2
    assert event["requestData"]["x"] == [{}]
    assert event["requestData"]["vault"]["role_id"].startswith(HASH_PREFIX)
    assert event["requestData"]["vault"]["other"] == "o"


def test_deep_nesting_costs_no_recursion() -> None:
    deep: dict[str, Any] = {"password": "p"}
    for _ in range(5000):
        deep = {"n": [deep]}
    event = make_event(requestData=deep)
    assert redactor().redact(event) == 1


@pytest.mark.parametrize(
    ("redaction", "expected"),
    [
        ({"keys": ["initiator.name"]}, "redaction.keys[0]"),
        ({"keys": [{"key": "x", "action": "shred"}]}, "redaction.keys[0]"),
        ({"hash_key": "a-literal-key-value"}, "redaction.hash_key"),
    ],
)
def test_bad_redaction_config_is_reported(redaction: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"redaction": redaction})
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_hash_key_comes_from_a_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HASH_KEY", "0123456789abcdef0123")
    config = parse_config({"redaction": {"hash_key": "${env:HASH_KEY}", "keys": ["x"]}})
    assert config.redaction.hash_key == "0123456789abcdef0123"
    assert config.redaction.keys == (RedactionKeyConfig(key="x", action="mask"),)
    assert "0123456789abcdef0123" not in repr(config)


def test_a_reload_to_other_schemas_redacts_by_their_marks(tmp_path: Path) -> None:
    """The redactor reads validation's schemas: a reload that points validation elsewhere
    (redaction itself unchanged) redacts by the new schemas' x-sensitive marks, in the daemon
    and in every worker process alike (reload.checkers_for serves both)."""
    schema = orjson.loads((schemas_dir() / "event.schema.json").read_bytes())
    schema["$defs"]["serviceData"]["properties"]["ticket"] = {"x-sensitive": "mask"}
    shutil.copytree(schemas_dir(), tmp_path / "schemas")
    (tmp_path / "schemas" / "event.schema.json").write_bytes(orjson.dumps(schema))
    old = parse_config({})
    new = parse_config({"validation": {"schemas_dir": str(tmp_path / "schemas")}})
    validator, redactor = validator_for(old), redactor_for(old)
    event = make_event(requestData={"ticket": "T-1"})
    assert redactor.redact(copy.deepcopy(event)) == 0

    validator, redactor = checkers_for(old, new, validator, redactor)
    redacted = copy.deepcopy(event)
    assert redactor.redact(redacted) == 1
    assert redacted["requestData"]["ticket"] == MASK
    assert validator.validate(redacted) == []


def reference_redact(redactor: Redactor, event: dict[str, Any]) -> int:
    """The policy as first written: every key of a dict listed, normalised and looked up,
    each container pushed as met. The redactor must leave an event exactly as this does."""
    places: list[tuple[str | int, ...]] = []
    for path, action in redactor.policy.exact.items():
        parent: Any = event
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and path[-1] in parent:
            redactor._apply(parent, path[-1], action)
            places.append(path)
    for scope, keys in redactor.policy.nested.items():
        node: Any = event
        for part in scope:
            node = node.get(part) if isinstance(node, dict) else None
        stack: list[tuple[Any, tuple[str | int, ...]]] = [(node, scope)]
        while stack:
            node, where = stack.pop()
            if isinstance(node, dict):
                for key in list(node):
                    found = keys.get(normalize(key))
                    if found is not None:
                        redactor._apply(node, key, found)
                        places.append((*where, key))
                    elif isinstance(value := node[key], dict | list):
                        stack.append((value, (*where, key)))
            elif isinstance(node, list):
                stack.extend((item, (*where, i)) for i, item in enumerate(node))
    if places:
        event["redaction"] = {
            "by": "event-router",
            "count": len(places),
            "paths": sorted(json_pointer(p) for p in places)[:MAX_RECORDED_PATHS],
        }
    return len(places)


KEYS_SEEN = ["api_key", "API-Key", "password", "Token", "payload", "name", "secret_type", "a"]
details = st.recursive(
    st.none() | st.integers(-5, 5) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS_SEEN) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    request=details,
    response=details,
    top=st.dictionaries(st.sampled_from(["api_key", "password", "note"]), details, max_size=2),
)
def test_the_redactor_leaves_every_event_as_the_policy_first_written_does(
    request: Any, response: Any, top: dict[str, Any]
) -> None:
    """The walk skips empty containers, looks at a dict's keys in one pass and remembers each
    spelling's action; the event it leaves, its `redaction` record and the count are those
    of the straightforward walk, on any nesting of dicts and lists, twice over (the second
    time from what it remembered)."""
    chosen = redactor(
        RedactionKeyConfig(key="vault_token", action="mask"),
        RedactionKeyConfig(key="initiator.name", action="hash"),
    )
    for _ in range(2):
        event = make_event(requestData=copy.deepcopy(request), responseData=copy.deepcopy(response))
        event.update(copy.deepcopy(top))
        expected = copy.deepcopy(event)
        assert chosen.redact(event) == reference_redact(chosen, expected)
        assert event == expected


def test_long_keys_are_redacted_each_time_and_never_remembered() -> None:
    """A producer's keys are remembered with their actions, but only short ones: a key of up
    to server.max_string_chars, new in each event, would otherwise pin thousands of them."""
    r = redactor()
    for n in range(50):
        sensitive = "-" * 1000 + f"{n:04d}" + "_" * 10 + "password"  # normalizes to "…password"
        event = make_event(
            requestData={
                "x" * 1000 + str(n): "benign",
                "-" * 2000 + "password": "hunter2",
                sensitive: "hunter3",
                "keep": "short keys are remembered",
            }
        )
        assert r.redact(event) == 1
        assert event["requestData"]["-" * 2000 + "password"] == MASK
        assert event["requestData"][sensitive] == "hunter3"  # "0000password" is not a key
    remembered = [key for actions in r._actions.values() for key in actions]
    assert "keep" in remembered
    assert max(map(len, remembered)) <= 256, "a long key was remembered"


def test_a_long_action_is_judged_without_being_remembered() -> None:
    from router.intake.accept import _own_action, reserved_action

    before = _own_action.cache_info().currsize
    for n in range(20):
        assert reserved_action({"action": "a" * 600 + f".object.verb{n}"}) == []
    assert reserved_action({"action": "event-router." + "x" * 600 + ".verb"}) != []
    assert _own_action.cache_info().currsize == before
