"""An event schema compiled to one Python function that answers jsonschema's verdict exactly.

`compile_exact(schema)` writes the source of `valid(instance) -> bool`, True exactly when
jsonschema's Draft 2020-12 validator (as EventValidator builds it: no format checker) finds no
error, and False otherwise; it returns None for a schema that uses a keyword it does not
compile, and the caller keeps fastjsonschema then. Each keyword is written as jsonschema's own
code decides it (its type checker, `re.search`, `len`; a const or an enum that is not all
strings is asked of jsonschema itself), and every subschema's verdict is exact, not merely
safe, so `not`, `if`, `anyOf` and `oneOf` can use them as they stand.

Why not fastjsonschema alone: its code for the event schema copies every object's keys into
a set and removes each known property from it, whether or not the schema asks about the
others, and checks each value's type twice; accepting the bench's 1 KB event took 9.0 us of
the ~25 us the event loop spent per event, this code 3.4 us (4.5 without remembering pattern
verdicts, below). The keywords jsonschema knows but this does not (additionalProperties with
patternProperties, uniqueItems, unevaluated*, $dynamicRef, ...) make the whole schema fall
back, so an operator's schema (validation.schemas_dir) is never judged by a half-compiled
function.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

import jsonschema

# Keywords that jsonschema only reads as annotations or that locate other schemas: ignored
# here as jsonschema ignores them. A keyword jsonschema does not know at all is ignored too.
_IGNORED = frozenset({"$schema", "$defs", "definitions", "$comment", "format", "then", "else"})
# Change what a $ref points at, below the root: not compiled.
_RELOCATING = frozenset({"$id", "$anchor", "$dynamicAnchor"})
# jsonschema's number: a numbers.Number but not a bool (int and float are asked first: fast).
_NUMBER = (
    "(type({x}) is int or type({x}) is float or isinstance({x}, _Number) "
    "and not isinstance({x}, bool))"
)
_TYPE_CHECKS: Mapping[str, str] = {
    "object": "isinstance({x}, dict)",
    "array": "isinstance({x}, list)",
    "string": "isinstance({x}, str)",
    "boolean": "isinstance({x}, bool)",
    "null": "{x} is None",
    # jsonschema's draft 6+ type checker: an int but not a bool, or a float with no fraction.
    "integer": "(isinstance({x}, int) and not isinstance({x}, bool) "
    "or isinstance({x}, float) and {x}.is_integer())",
    "number": _NUMBER,
}
_BOUNDS: Mapping[str, str] = {
    "minimum": "<",
    "maximum": ">",
    "exclusiveMinimum": "<=",
    "exclusiveMaximum": ">=",
}


# A pattern's verdicts on short strings are remembered, this many per pattern: a producer's
# events repeat their action, CRN and target id (a search costs 0.25-0.35 us, a look-up 0.04),
# while a value unique to each event (eventTime) only refills its own pattern's table.
REMEMBERED_PER_PATTERN = 1024
REMEMBERED_MAX_CHARS = 256


def remembered(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    """`pattern.search(text) is not None` (re.search, as jsonschema does: `$` may match before a
    final newline), remembered for texts of at most REMEMBERED_MAX_CHARS."""
    verdicts: dict[str, bool] = {}
    search = pattern.search

    def matches(text: str) -> bool:
        verdict = verdicts.get(text)
        if verdict is None:
            verdict = search(text) is not None
            if len(text) <= REMEMBERED_MAX_CHARS:
                if len(verdicts) >= REMEMBERED_PER_PATTERN:
                    verdicts.clear()
                verdicts[text] = verdict
        return verdict

    return matches


class Unsupported(Exception):
    """The schema uses something this compiler does not write: use fastjsonschema."""


def compile_exact(schema: Any) -> Callable[[Any], bool] | None:
    """`valid(instance)`, exactly jsonschema's verdict on `schema`; None when the schema uses
    a keyword outside the compiled subset, or a dialect other than Draft 2020-12."""
    if jsonschema.validators.validator_for(schema) is not jsonschema.Draft202012Validator:
        return None
    try:
        _check_locations(schema, root=True)
        writer = _Writer(schema)
        entry = writer.function(schema)
    except Unsupported:
        return None
    namespace: dict[str, Any] = dict(writer.constants)
    namespace["_Number"] = numbers.Number
    exec(compile("\n".join(writer.lines), "<event-schema>", "exec"), namespace)
    valid: Callable[[Any], bool] = namespace[entry]
    return valid


def _check_locations(node: Any, *, root: bool) -> None:
    """Refuse an $id or anchor below the root (a $ref could mean another place by it)."""
    if isinstance(node, dict):
        if not root and _RELOCATING & node.keys():
            raise Unsupported("an $id or anchor below the root")
        for value in node.values():
            _check_locations(value, root=False)
    elif isinstance(node, list):
        for value in node:
            _check_locations(value, root=False)


class _Writer:
    """Writes one function per $ref target, `if`, and applicator operand; the rest inline."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.lines: list[str] = []
        self.constants: dict[str, Any] = {}
        self._functions: dict[int, str] = {}  # id(subschema) -> its function's name
        self._pending: list[tuple[str, Any]] = []
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def constant(self, value: Any) -> str:
        name = self._name("_c")
        self.constants[name] = value
        return name

    def function(self, schema: Any) -> str:
        """The name of the function deciding `schema`, written (once) with any it calls."""
        name = self._functions.get(id(schema))
        if name is not None:
            return name
        name = self._functions[id(schema)] = self._name("_valid")
        body: list[str] = []
        self._node(schema, "x", body, "    ", known=None)
        self.lines.append(f"def {name}(x):")
        self.lines.extend(body)
        self.lines.append("    return True")
        return name

    def _node(self, schema: Any, x: str, out: list[str], ind: str, known: str | None) -> None:
        """Append to `out` the statements that `return False` when `x` fails `schema`."""
        if schema is True:
            return
        if schema is False:
            out.append(f"{ind}return False")
            return
        if not isinstance(schema, dict):
            raise Unsupported(f"a schema that is a {type(schema).__name__}")
        handled = _IGNORED | {"$ref", "type", "properties", "required", "additionalProperties"}
        for key in schema:
            if key in jsonschema.Draft202012Validator.VALIDATORS and key not in handled | _OWN:
                raise Unsupported(key)
        if "$ref" in schema:
            out.append(f"{ind}if not {self.function(self._resolve(schema['$ref']))}({x}):")
            out.append(f"{ind}    return False")
        if "type" in schema:
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not all(isinstance(t, str) and t in _TYPE_CHECKS for t in types):
                raise Unsupported("type")
            test = " or ".join(_TYPE_CHECKS[t].format(x=x) for t in types)
            out.append(f"{ind}if not ({test}):")
            out.append(f"{ind}    return False")
            if len(types) == 1:
                known = types[0]
        self._strings(schema, x, out, ind, known)
        self._numbers(schema, x, out, ind, known)
        self._values(schema, x, out, ind)
        self._object(schema, x, out, ind, known)
        self._array(schema, x, out, ind, known)
        self._applicators(schema, x, out, ind)

    def _resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise Unsupported("a $ref outside the schema, or to an anchor")
        node = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node or "%" in part:
                raise Unsupported(f"$ref {ref}")
            node = node[part]
        return node

    @staticmethod
    def _guard(x: str, kind: str, known: str | None) -> str:
        """The test that `x` is of JSON type `kind`, or "" when the schema's type settled it."""
        if known == kind:
            return ""
        return _TYPE_CHECKS[kind].format(x=x) + " and "

    def _strings(self, schema: Any, x: str, out: list[str], ind: str, known: str | None) -> None:
        guard = self._guard(x, "string", known)
        for key, test in (("minLength", "<"), ("maxLength", ">")):
            if key in schema:
                if not isinstance(schema[key], int):
                    raise Unsupported(key)
                out.append(f"{ind}if {guard}len({x}) {test} {schema[key]!r}:")
                out.append(f"{ind}    return False")
        if "pattern" in schema:
            try:
                pattern = re.compile(schema["pattern"])
            except (re.error, TypeError) as exc:  # as fastjsonschema had it: its compile says
                raise Unsupported("pattern") from exc
            matches = self.constant(remembered(pattern))
            out.append(f"{ind}if {guard}not {matches}({x}):")
            out.append(f"{ind}    return False")

    def _numbers(self, schema: Any, x: str, out: list[str], ind: str, known: str | None) -> None:
        for key, test in _BOUNDS.items():
            if key in schema:
                bound = schema[key]
                if isinstance(bound, bool) or not isinstance(bound, int | float):
                    raise Unsupported(key)
                guard = "" if known == "number" else _NUMBER.format(x=x) + " and "
                out.append(f"{ind}if {guard}{x} {test} {self.constant(bound)}:")
                out.append(f"{ind}    return False")

    def _values(self, schema: Any, x: str, out: list[str], ind: str) -> None:
        if "const" in schema:
            value = schema["const"]
            if isinstance(value, str):
                out.append(f"{ind}if not (isinstance({x}, str) and {x} == {value!r}):")
            else:  # jsonschema's own verdict (bool is not 1, 1.0 is 1): rare, and exact
                check = self.constant(jsonschema.Draft202012Validator({"const": value}).is_valid)
                out.append(f"{ind}if not {check}({x}):")
            out.append(f"{ind}    return False")
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list):
                raise Unsupported("enum")
            if all(isinstance(v, str) for v in values):
                names = self.constant(frozenset(values))
                out.append(f"{ind}if not (isinstance({x}, str) and {x} in {names}):")
            else:
                check = self.constant(jsonschema.Draft202012Validator({"enum": values}).is_valid)
                out.append(f"{ind}if not {check}({x}):")
            out.append(f"{ind}    return False")

    def _object(self, schema: Any, x: str, out: list[str], ind: str, known: str | None) -> None:
        body: list[str] = []
        inner = ind if known == "object" else ind + "    "
        if "required" in schema:
            required = schema["required"]
            if not (isinstance(required, list) and all(isinstance(k, str) for k in required)):
                raise Unsupported("required")
            if required:
                body.append(f"{inner}if not {x}.keys() >= {self.constant(frozenset(required))}:")
                body.append(f"{inner}    return False")
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise Unsupported("properties")
        present = frozenset(schema.get("required", ()))  # checked above: they are there
        for key, subschema in properties.items():
            value = self._name("v")
            checks: list[str] = []
            self._node(subschema, value, checks, inner + ("" if key in present else "    "), None)
            if not checks:  # a property the schema only annotates costs nothing
                continue
            if key not in present:
                body.append(f"{inner}if {key!r} in {x}:")
            body.append(f"{inner}{'' if key in present else '    '}{value} = {x}[{key!r}]")
            body.extend(checks)
        if "additionalProperties" in schema:
            name = self._name("k")
            checks = []
            self._node(
                schema["additionalProperties"], f"{x}[{name}]", checks, inner + "        ", None
            )
            if checks:
                listed = self.constant(frozenset(properties))
                body.append(f"{inner}for {name} in {x}:")
                body.append(f"{inner}    if {name} not in {listed}:")
                body.extend(checks)
        if body and known != "object":
            out.append(f"{ind}if isinstance({x}, dict):")
        out.extend(body)

    def _array(self, schema: Any, x: str, out: list[str], ind: str, known: str | None) -> None:
        guard = self._guard(x, "array", known)
        for key, test in (("minItems", "<"), ("maxItems", ">")):
            if key in schema:
                if not isinstance(schema[key], int):
                    raise Unsupported(key)
                out.append(f"{ind}if {guard}len({x}) {test} {schema[key]!r}:")
                out.append(f"{ind}    return False")
        if "items" in schema:
            item = self._name("i")
            inner = ind + "        " if guard else ind + "    "
            checks: list[str] = []
            self._node(schema["items"], item, checks, inner, known=None)
            if checks:
                if guard:
                    out.append(f"{ind}if {guard[: -len(' and ')]}:")
                    ind += "    "
                out.append(f"{ind}for {item} in {x}:")
                out.extend(checks)

    def _applicators(self, schema: Any, x: str, out: list[str], ind: str) -> None:
        for key in ("allOf", "anyOf", "oneOf"):
            if key in schema:
                if not (isinstance(schema[key], list) and schema[key]):
                    raise Unsupported(key)
                calls = [f"{self.function(sub)}({x})" for sub in schema[key]]
                if key == "allOf":
                    test = " and ".join(calls)
                elif key == "anyOf":
                    test = " or ".join(calls)
                else:
                    test = f"[{', '.join(calls)}].count(True) == 1"
                out.append(f"{ind}if not ({test}):")
                out.append(f"{ind}    return False")
        if "not" in schema:
            out.append(f"{ind}if {self.function(schema['not'])}({x}):")
            out.append(f"{ind}    return False")
        if "if" in schema and ("then" in schema or "else" in schema):
            condition = f"{self.function(schema['if'])}({x})"
            then = f"{self.function(schema.get('then', True))}({x})"
            otherwise = f"{self.function(schema.get('else', True))}({x})"
            out.append(f"{ind}if not ({then} if {condition} else {otherwise}):")
            out.append(f"{ind}    return False")


# The keywords the writer's methods compile (beside those _node handles itself).
_OWN = frozenset(
    {
        "minLength",
        "maxLength",
        "pattern",
        "const",
        "enum",
        "minItems",
        "maxItems",
        "items",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
        "if",
        *_BOUNDS,
    }
)
