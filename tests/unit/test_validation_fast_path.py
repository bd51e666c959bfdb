"""The compiled fast validators accept exactly what jsonschema accepts (hypothesis).

EventValidator accepts an event when its fast path does, and asks jsonschema only on a
rejection (which then decides, and writes the messages). The fast path is the event schema
compiled to exact code (router/intake/schemacode.py), or fastjsonschema's code for a schema
outside that compiler's keywords; both are tested here. That is sound only if the fast path
never accepts an event jsonschema rejects; and it is fast only if it rarely rejects one
jsonschema accepts. Generated events: the bench's valid event with fields dropped, retyped or
replaced by arbitrary JSON, nested values too.
"""

from __future__ import annotations

import copy
from typing import Any

import fastjsonschema
import jsonschema
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from router.intake.schemacode import compile_exact
from router.intake.validation import EventValidator, compile_accepts, compile_fast
from router.resources import schemas_dir
from tests.fakes import make_event

SCHEMA = orjson.loads((schemas_dir() / "event.schema.json").read_bytes())
REFERENCE = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)
ACCEPTS = compile_accepts(SCHEMA)  # what EventValidator runs first
EXACT = compile_exact(SCHEMA)
FAST = compile_fast(SCHEMA)  # the fallback, for schemas the exact compiler does not write
VALIDATOR = EventValidator(schemas_dir(), unknown_actions="accept")
CATALOGUED = EventValidator(schemas_dir())  # unknown actions rejected: the catalogue decides too

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "",
            "2024-05-01T12:00:00.12+0000",
            "2024-05-01T12:00:00Z",
            "crn:v1:bluemix:public:secrets-manager:us-south:a/acct:inst::",
            "crn:v1:bluemix:public:secrets-manager::a/acct:::",
            "secrets-manager.secret.create",
            "secrets-manager.secret.explode",  # not in the catalogue
            "success",
            "failure",
            "normal",
            "critical",
            "IBMid-1",
        ]
    )
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into the event's objects."""
    found: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found.append((*prefix, key))
            found.extend(paths(item, (*prefix, key)))
    return found


BASE = make_event()
BASE_PATHS = paths(BASE)
mutation = st.tuples(
    st.sampled_from(["drop", "set", "add"]),
    st.sampled_from(BASE_PATHS),
    json_values,
    st.text(max_size=8),
)


def mutate(event: dict[str, Any], mutations: list[tuple[str, tuple[Any, ...], Any, str]]) -> Any:
    event = copy.deepcopy(event)
    for kind, path, value, key in mutations:
        parent: Any = event
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if kind == "drop":
            parent.pop(path[-1], None)
        elif kind == "set":
            parent[path[-1]] = value
        elif isinstance(parent.get(path[-1]), dict):
            parent[path[-1]][key] = value
    return event


def fast_accepts(event: Any) -> bool:
    try:
        FAST(event)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


def test_the_event_schema_is_compiled_to_exact_code() -> None:
    """The shipped schema keeps to the exact compiler's keywords (else the tests below would
    test fastjsonschema twice), and the validator runs that code."""
    assert EXACT is not None
    for accepts in (ACCEPTS, VALIDATOR._accepts):
        assert accepts.__code__.co_filename == EXACT.__code__.co_filename == "<event-schema>"


def agree(event: Any) -> bool:
    """jsonschema's verdict, after checking that both fast paths give it too."""
    reference_accepts = not any(True for _ in REFERENCE.iter_errors(event))
    assert fast_accepts(event) == reference_accepts
    assert ACCEPTS(event) is reference_accepts
    return reference_accepts


@settings(max_examples=1500, deadline=None)
@given(mutations=st.lists(mutation, max_size=4))
def test_fast_path_accepts_exactly_what_jsonschema_accepts(
    mutations: list[tuple[str, tuple[Any, ...], Any, str]],
) -> None:
    event = mutate(BASE, mutations)
    reference_accepts = agree(event)
    # And the validator's answer is jsonschema's, messages included.
    problems = VALIDATOR.validate(event)
    assert (problems == []) == reference_accepts
    # The accept loop's shortcut (EventValidator.clean) says clean exactly when validate
    # finds nothing: the event schema compiles to exact code.
    assert VALIDATOR.clean(event) is (problems == [])
    assert CATALOGUED.clean(event) is (CATALOGUED.validate(event) == [])


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_fast_path_agrees_on_arbitrary_json(value: Any) -> None:
    agree(value)


@settings(max_examples=500, deadline=None)
@given(
    outcome=st.sampled_from(["failure", "success", "FAILURE"]) | json_values,
    reason=st.fixed_dictionaries(
        {"reasonCode": st.sampled_from([201, 401, "401"])},
        optional={"reasonType": json_values},
    )
    | json_values,
    drop_outcome=st.booleans(),
)
def test_the_outcome_failure_condition_decided_ahead_agrees_with_jsonschema(
    outcome: Any, reason: Any, drop_outcome: bool
) -> None:
    """The schema's `if outcome is failure then reason needs a reasonType`, which the fast
    path decides by a comparison rather than compiled code (validation.compile_fast)."""
    event = copy.deepcopy(BASE) | {"outcome": outcome, "reason": reason}
    if drop_outcome:
        del event["outcome"]
    agree(event)
