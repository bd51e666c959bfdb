"""The event schema compiler (router/intake/schemacode.py) answers jsonschema's verdict exactly,
on schemas hypothesis writes from every keyword it compiles, nested and combined (`not`, `if`
and `oneOf` need exact verdicts of their parts, not merely safe ones), and on instances of
every JSON type; a keyword it does not compile leaves the schema to fastjsonschema. Its fast
path (exact builtin types only) says yes only where jsonschema does, also for subclasses of
str, dict, list, int and float, NaN and infinities, and says yes to every valid instance of
the types orjson decodes to."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.intake.schemacode import (
    REMEMBERED_MAX_CHARS,
    REMEMBERED_PER_PATTERN,
    anchored,
    compile_exact,
    compile_parts,
    remembered,
)

KEYS = ["a", "b", "c"]
TYPES = ["object", "array", "string", "boolean", "null", "integer", "number"]
PATTERNS = ["^a", "b$", "^[0-9]+$", "x", "^$", "^a.*z$"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from([0.0, 1.0, 2.5, -1.5, 1e300, 2**70])
    | st.sampled_from(["", "a", "b", "b\n", "12", "az", "a\nz", "x", "ab", "abc", "é"])
)
instances = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner),
    max_leaves=10,
)
numbers = st.integers(-3, 3) | st.sampled_from([0.5, -1.5, 2.0])
leaf_schemas = (
    st.booleans()
    | st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(TYPES)
            | st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True),
            "minLength": st.integers(0, 3),
            "maxLength": st.integers(0, 3),
            "pattern": st.sampled_from(PATTERNS),
            "minimum": numbers,
            "maximum": numbers,
            "exclusiveMinimum": numbers,
            "exclusiveMaximum": numbers,
            "const": scalars,
            "enum": st.lists(scalars, min_size=1, max_size=3),
            "required": st.lists(st.sampled_from(KEYS), max_size=2, unique=True),
            "minItems": st.integers(0, 2),
            "maxItems": st.integers(0, 2),
            "format": st.just("date-time"),
            "x-error": st.just("ignored, as jsonschema ignores it"),
        },
    )
    | st.just({"$ref": "#/$defs/d"})
)


def composite(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    subschemas = st.lists(inner, min_size=1, max_size=3)
    return st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(TYPES),
            "properties": st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
            "additionalProperties": inner,
            "required": st.lists(st.sampled_from(KEYS), max_size=2, unique=True),
            "items": inner,
            "allOf": subschemas,
            "anyOf": subschemas,
            "oneOf": subschemas,
            "not": inner,
            "if": inner,
            "then": inner,
            "else": inner,
        },
    )


schemas = st.recursive(leaf_schemas, composite, max_leaves=8)


@settings(max_examples=600, deadline=None)
@given(schema=schemas, definition=leaf_schemas, values=st.lists(instances, min_size=1, max_size=5))
def test_the_compiled_schema_decides_as_jsonschema_does(
    schema: Any, definition: Any, values: list[Any]
) -> None:
    root = schema if isinstance(schema, dict) else {"allOf": [schema]}
    if definition == {"$ref": "#/$defs/d"}:  # a definition that is only itself never ends
        definition = True
    root = {**root, "$defs": {"d": definition}}
    jsonschema.Draft202012Validator.check_schema(root)
    reference = jsonschema.Draft202012Validator(root)
    valid = compile_exact(root)
    assert valid is not None
    for value in values:
        assert valid(value) is reference.is_valid(value), value


@pytest.mark.parametrize(
    "schema",
    [
        {"uniqueItems": True},
        {"patternProperties": {"^a": {"type": "string"}}},
        {"prefixItems": [{"type": "string"}]},
        {"unevaluatedProperties": False},
        {"properties": {"a": {"$id": "https://elsewhere.example/a", "type": "string"}}},
        {"$ref": "https://elsewhere.example/schema.json"},
        {"$ref": "#here", "$defs": {"d": {"$anchor": "here", "type": "string"}}},
        {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"},
        {"properties": {"a": {"multipleOf": 2}}},
    ],
)
def test_a_keyword_it_does_not_compile_leaves_the_schema_to_fastjsonschema(
    schema: dict[str, Any],
) -> None:
    assert compile_exact(schema) is None


def test_a_string_before_a_final_newline_matches_a_dollar_as_jsonschema_says() -> None:
    """re.search, as jsonschema: `^a$` matches "a\\n" (fastjsonschema's `\\Z` does not)."""
    schema = {"pattern": "^a$"}
    valid = compile_exact(schema)
    assert valid is not None
    assert valid("a\n") is jsonschema.Draft202012Validator(schema).is_valid("a\n") is True


@settings(max_examples=300, deadline=None)
@given(
    parts=st.fixed_dictionaries(
        {"if": leaf_schemas}, optional={"then": leaf_schemas, "else": leaf_schemas}
    ),
    values=st.lists(instances, min_size=1, max_size=5),
)
def test_if_then_else_decide_as_jsonschema_does(parts: dict[str, Any], values: list[Any]) -> None:
    root = {**parts, "$defs": {"d": {"type": "string"}}}
    reference = jsonschema.Draft202012Validator(root)
    valid = compile_exact(root)
    assert valid is not None
    for value in values:
        assert valid(value) is reference.is_valid(value), value


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.sampled_from(["a", "a\n", "ba", ""]) | st.text(max_size=300), max_size=50))
def test_a_remembered_verdict_is_the_search_s_verdict(texts: list[str]) -> None:
    """Verdicts are remembered per pattern (a table that empties when full, long texts never
    kept); each is what re.search says, whatever came before it."""
    pattern = re.compile("^a$|b")
    matches = remembered(pattern)
    filler = [f"x{n}" for n in range(REMEMBERED_PER_PATTERN + 1)]
    for text in [*texts, *filler, *texts, "b" * (REMEMBERED_MAX_CHARS + 1), *texts]:
        assert matches(text) is (pattern.search(text) is not None)


@settings(max_examples=200, deadline=None)
@given(
    source=st.sampled_from(
        ["^a", "\\Aa", "(?m)^a", "^a|b", "(^a)b", "^(a|b)$", "(?:^a)z", "a^", "x$", "(?i)^A$"]
    ),
    texts=st.lists(st.text(alphabet="abAzx\n", max_size=6), max_size=30),
)
def test_an_anchored_pattern_tried_at_the_start_only_says_what_search_says(
    source: str, texts: list[str]
) -> None:
    """A pattern anchored at the start is tried there only (match, not search); the set of
    texts it is remembered to match (the fast path's look-up) holds only texts that match."""
    pattern = re.compile(source)
    assert anchored(pattern) is (source in ("^a", "\\Aa", "^(a|b)$", "(?:^a)z", "(?i)^A$"))
    matching: set[str] = set()
    matches = remembered(pattern, matching)
    for text in texts + texts:
        assert matches(text) is (pattern.search(text) is not None)
    assert all(pattern.search(text) is not None for text in matching)


class Text(str):
    """Subclasses: jsonschema judges them as their base type; the fast path leaves them to the
    exact code."""


class Object(dict[str, Any]):
    pass


class Items(list[Any]):
    pass


class Whole(int):
    pass


class Real(float):
    pass


odd_scalars = (
    scalars
    | st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0])
    | st.sampled_from(["", "a", "b\n", "az", "12", "x"]).map(Text)
    | st.integers(-3, 3).map(Whole)
    | st.sampled_from([0.5, 2.0, -1.5]).map(Real)
)
odd_instances = st.recursive(
    odd_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(Items)
        | st.dictionaries(st.sampled_from(KEYS), inner)
        | st.dictionaries(st.sampled_from(KEYS), inner).map(Object)
    ),
    max_leaves=10,
)


def decoded_types_only(value: Any) -> bool:
    """Is `value` made only of what orjson decodes JSON to, floats aside (an integer-valued
    float passes `type: integer`, which the fast path leaves to the exact code)?"""
    if type(value) is dict:
        return all(decoded_types_only(item) for item in value.values())
    if type(value) is list:
        return all(decoded_types_only(item) for item in value)
    return value is None or type(value) in (bool, int, str)


def fast_verdict(fast: Any, value: Any) -> bool:
    try:
        return bool(fast(value))
    except KeyError:  # a required property missing: the exact code decides
        return False


@settings(max_examples=600, deadline=None)
@given(
    schema=schemas,
    definition=leaf_schemas,
    values=st.lists(odd_instances | instances, min_size=1, max_size=5),
)
def test_the_fast_path_says_yes_only_where_jsonschema_does(
    schema: Any, definition: Any, values: list[Any]
) -> None:
    """The compiled function's two parts: the fast one (exact builtin types) may only say yes
    to what jsonschema accepts, and, for the types orjson decodes to, says yes to all of it
    (else it would only cost time); the function as a whole is jsonschema's verdict."""
    root = schema if isinstance(schema, dict) else {"allOf": [schema]}
    if definition == {"$ref": "#/$defs/d"}:
        definition = True
    root = {**root, "$defs": {"d": definition}}
    jsonschema.Draft202012Validator.check_schema(root)
    reference = jsonschema.Draft202012Validator(root)
    parts = compile_parts(root)
    assert parts is not None
    for value in values:
        verdict = reference.is_valid(value)
        assert parts.valid(value) is verdict, value
        assert parts.exact(value) is verdict, value
        fast = fast_verdict(parts.fast, value)
        assert verdict or not fast, value
        if verdict and decoded_types_only(value):
            assert fast, value


BOUNDARY_VALUES = [
    *("x" * n for n in range(4)),
    *([0] * n for n in range(4)),
    *range(-1, 4),
    *(n + 0.5 for n in range(-1, 3)),
    2.0,
    float("nan"),
    Text("xx"),
    Whole(2),
]


@pytest.mark.parametrize(
    "schema",
    [
        {key: bound}
        for bound in (0, 1, 2)
        for key in (
            "minLength",
            "maxLength",
            "minItems",
            "maxItems",
            "minimum",
            "maximum",
            "exclusiveMinimum",
            "exclusiveMaximum",
        )
    ]
    + [{"type": kind, "minimum": 1, "maximum": 2} for kind in ("integer", "number")]
    + [{"type": "string", "minLength": 1, "maxLength": 2}],
)
def test_the_fast_path_on_either_side_of_every_bound(schema: dict[str, Any]) -> None:
    """Each bound just met, just missed and just exceeded, by every kind of value: the fast
    path says yes only where jsonschema does, and to every exact-typed value it accepts."""
    reference = jsonschema.Draft202012Validator(schema)
    parts = compile_parts(schema)
    assert parts is not None
    for value in BOUNDARY_VALUES:
        verdict = reference.is_valid(value)
        fast = fast_verdict(parts.fast, value)
        assert parts.valid(value) is verdict, value
        assert verdict or not fast, value
        if verdict and decoded_types_only(value):
            assert fast, value
