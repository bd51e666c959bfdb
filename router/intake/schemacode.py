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
from dataclasses import dataclass
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


def remembered(pattern: re.Pattern[str], matching: set[str] | None = None) -> Callable[[str], bool]:
    """`pattern.search(text) is not None` (re.search, as jsonschema does: `$` may match before a
    final newline), remembered for texts of at most REMEMBERED_MAX_CHARS. `matching`, when
    given, is kept holding the remembered texts that match, for the fast path's `in` test (a
    look-up without a call). A pattern anchored at the start (`^...` or `\\A...`, no
    alternative around it, not multiline) is tried at the start only: the same verdict as
    search, without search's tries at every later position (0.33 us, not 0.43, an eventTime)."""
    verdicts: dict[str, bool] = {}
    search = pattern.match if anchored(pattern) else pattern.search
    if matching is None:
        matching = set()

    def matches(text: str) -> bool:
        verdict = verdicts.get(text)
        if verdict is None:
            verdict = search(text) is not None
            if len(text) <= REMEMBERED_MAX_CHARS:
                if len(verdicts) >= REMEMBERED_PER_PATTERN:
                    verdicts.clear()
                    matching.clear()
                verdicts[text] = verdict
                if verdict:
                    matching.add(text)
        return verdict

    return matches


def anchored(pattern: re.Pattern[str]) -> bool:
    """Can `pattern` match only at the start of a text? Its first element, outside any
    alternative, is `^` or `\\A`, and `^` does not mean a line's start (no MULTILINE flag).
    False when unsure (the parser is the standard library's own, re._parser)."""
    parser = getattr(re, "_parser", None)
    if parser is None or pattern.flags & re.MULTILINE:
        return False
    try:
        parsed = list(parser.parse(pattern.pattern, pattern.flags))
        starts = ((parser.AT, parser.AT_BEGINNING), (parser.AT, parser.AT_BEGINNING_STRING))
    except (re.error, AttributeError):  # an internal module: unsure means "search"
        return False
    return bool(parsed) and parsed[0] in starts


class Unsupported(Exception):
    """The schema uses something this compiler does not write: use fastjsonschema."""


def compile_exact(schema: Any) -> Callable[[Any], bool] | None:
    """`valid(instance)`, exactly jsonschema's verdict on `schema`; None when the schema uses
    a keyword outside the compiled subset, or a dialect other than Draft 2020-12."""
    parts = compile_parts(schema)
    return None if parts is None else parts.valid


@dataclass(frozen=True, slots=True)
class Compiled:
    """A schema's functions: `valid` (the verdict: `fast`, or else `exact`), and its parts for
    the tests: `fast` answers True only for what `exact` accepts (False: "ask exact"), and
    may raise KeyError instead of False; `exact` is jsonschema's verdict on any instance."""

    valid: Callable[[Any], bool]
    fast: Callable[[Any], bool]
    exact: Callable[[Any], bool]
    source: str


def compile_parts(schema: Any) -> Compiled | None:
    """The functions of `schema` (see Compiled); None as for compile_exact."""
    if jsonschema.validators.validator_for(schema) is not jsonschema.Draft202012Validator:
        return None
    try:
        _check_locations(schema, root=True)
        writer = _Writer(schema)
        exact = writer.function(schema)
        fast = writer.fast_function(schema)
    except Unsupported:
        return None
    writer.lines.extend(
        [
            "def _valid(x):",
            "    try:",
            f"        if {fast}(x):",
            "            return True",
            "    except KeyError:",  # a required property missing: exact says which way
            "        pass",
            f"    return {exact}(x)",
        ]
    )
    namespace: dict[str, Any] = dict(writer.constants)
    namespace["_Number"] = numbers.Number
    source = "\n".join(writer.lines)
    exec(compile(source, "<event-schema>", "exec"), namespace)
    return Compiled(namespace["_valid"], namespace[fast], namespace[exact], source)


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
        self._fast: dict[int, str] = {}  # id(subschema) -> its fast function's name
        self._patterns: dict[str, tuple[str, str]] = {}  # pattern -> (matches, matching set)
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def constant(self, value: Any) -> str:
        name = self._name("_c")
        self.constants[name] = value
        return name

    def pattern(self, pattern: re.Pattern[str]) -> tuple[str, str]:
        """The names of `pattern`'s remembered verdicts and of its set of matching texts, one
        pair per pattern, shared by the exact and the fast functions."""
        names = self._patterns.get(pattern.pattern)
        if names is None:
            matching: set[str] = set()
            names = (self.constant(remembered(pattern, matching)), self.constant(matching))
            self._patterns[pattern.pattern] = names
        return names

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

    @staticmethod
    def _lengths(
        schema: Any, keys: tuple[str, str], x: str, guard: str, out: list[str], ind: str
    ) -> None:
        """A string's or an array's length bounds (`keys`: its minimum and maximum)."""
        for key, test in zip(keys, ("<", ">"), strict=True):
            if key in schema:
                if not isinstance(schema[key], int):
                    raise Unsupported(key)
                out.append(f"{ind}if {guard}len({x}) {test} {schema[key]!r}:")
                out.append(f"{ind}    return False")

    def _strings(self, schema: Any, x: str, out: list[str], ind: str, known: str | None) -> None:
        guard = self._guard(x, "string", known)
        self._lengths(schema, ("minLength", "maxLength"), x, guard, out, ind)
        if "pattern" in schema:
            try:
                pattern = re.compile(schema["pattern"])
            except (re.error, TypeError) as exc:  # as fastjsonschema had it: its compile says
                raise Unsupported("pattern") from exc
            matches, _ = self.pattern(pattern)
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
        self._lengths(schema, ("minItems", "maxItems"), x, guard, out, ind)
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

    # -- the fast path: exact builtin types only, True only where the exact code says True --

    def fast_function(self, schema: Any) -> str:
        """The name of `schema`'s fast function: True only for an instance `schema` accepts;
        False (or KeyError, for a missing required property) whenever it is unsure, for
        instance of a subclass of str or dict, which jsonschema judges and this does not."""
        name = self._fast.get(id(schema))
        if name is not None:
            return name
        name = self._fast[id(schema)] = self._name("_fast")
        body: list[str] = []
        self._fast_node(schema, "x", body, "    ", None, ())
        self.lines.append(f"def {name}(x):")
        self.lines.extend(body)
        self.lines.append("    return True")
        return name

    def _fast_node(
        self,
        schema: Any,
        x: str,
        out: list[str],
        ind: str,
        known: frozenset[str] | None,
        inlined: tuple[int, ...],
    ) -> None:
        """Append to `out` statements that `return False` unless `x` certainly passes
        `schema`. `known`: the exact types (_FAST_TYPES' names) `x` is known to have here,
        None when nothing is known; `inlined`: the $ref targets being written inline."""
        if schema is True:
            return
        if schema is False:
            out.append(f"{ind}return False")
            return
        if "$ref" in schema:
            target = self._resolve(schema["$ref"])
            if id(target) in inlined or not _ref_free(target):
                out.append(f"{ind}if not {self.fast_function(target)}({x}):")
                out.append(f"{ind}    return False")
            else:
                self._fast_node(target, x, out, ind, known, (*inlined, id(target)))
        if "type" in schema:
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            allowed = frozenset().union(*(_FAST_TYPES[t][1] for t in types))
            if known is None or not known <= allowed:
                test = " or ".join(_FAST_TYPES[t][0].format(x=x) for t in types)
                out.append(f"{ind}if not ({test}):")
                out.append(f"{ind}    return False")
            known = allowed if known is None else known & allowed
        self._fast_values(schema, x, out, ind, known)
        for kind, (python, test, loose) in _KINDS.items():
            checks: list[str] = []
            here = known is not None and known <= python
            inner = ind if here else ind + "    "
            if kind == "string":
                self._fast_strings(schema, x, checks, inner)
            elif kind == "number":
                self._fast_numbers(schema, x, checks, inner)
            elif kind == "object":
                self._fast_object(schema, x, checks, inner, inlined)
            else:
                self._fast_array(schema, x, checks, inner, inlined)
            if not checks or (known is not None and not known & python):
                continue  # no such keyword, or `x` is certainly not of this kind
            if not here:
                out.append(f"{ind}if {test.format(x=x)}:")
            out.extend(checks)
            if not here and known is None:  # a subclass of the kind: the exact code decides
                out.append(f"{ind}elif {loose.format(x=x)}:")
                out.append(f"{ind}    return False")
        self._fast_applicators(schema, x, out, ind, known, inlined)

    def _fast_values(
        self, schema: Any, x: str, out: list[str], ind: str, known: frozenset[str] | None
    ) -> None:
        guard = "" if known == _STR else f"type({x}) is str and "
        if "const" in schema:
            value = schema["const"]
            if isinstance(value, str):
                out.append(f"{ind}if not ({guard}{x} == {value!r}):")
            else:
                check = self.constant(jsonschema.Draft202012Validator({"const": value}).is_valid)
                out.append(f"{ind}if not {check}({x}):")
            out.append(f"{ind}    return False")
        if "enum" in schema:
            values = schema["enum"]
            if all(isinstance(v, str) for v in values):
                names = self.constant(frozenset(values))
                out.append(f"{ind}if not ({guard}{x} in {names}):")
            else:
                check = self.constant(jsonschema.Draft202012Validator({"enum": values}).is_valid)
                out.append(f"{ind}if not {check}({x}):")
            out.append(f"{ind}    return False")

    def _fast_strings(self, schema: Any, x: str, out: list[str], ind: str) -> None:
        """For an exact str `x`."""
        tests = []
        if schema.get("minLength") == 1:
            tests.append(f"{x} != ''")
        elif "minLength" in schema:
            tests.append(f"len({x}) >= {schema['minLength']!r}")
        if "maxLength" in schema:
            tests.append(f"len({x}) <= {schema['maxLength']!r}")
        if "pattern" in schema:
            matches, matching = self.pattern(re.compile(schema["pattern"]))
            tests.append(f"({x} in {matching} or {matches}({x}))")
        if tests:
            out.append(f"{ind}if not ({' and '.join(tests)}):")
            out.append(f"{ind}    return False")

    def _fast_numbers(self, schema: Any, x: str, out: list[str], ind: str) -> None:
        """For an exact int or float `x` (NaN fails every bound here: the exact code decides)."""
        tests = [
            f"{x} {_FAST_BOUNDS[key]} {self.constant(schema[key])}"
            for key in _BOUNDS
            if key in schema
        ]
        if tests:
            out.append(f"{ind}if not ({' and '.join(tests)}):")
            out.append(f"{ind}    return False")

    def _fast_object(
        self, schema: Any, x: str, out: list[str], ind: str, inlined: tuple[int, ...]
    ) -> None:
        """For an exact dict `x`. A required property that is checked is read at once: its
        absence raises KeyError, which sends the instance to the exact code."""
        required = schema.get("required", [])
        properties = schema.get("properties", {})
        unread = [key for key in required if key not in properties]
        body: list[str] = []
        for key, subschema in properties.items():
            value = self._name("v")
            checks: list[str] = []
            present = key in required
            self._fast_node(
                subschema, value, checks, ind + ("" if present else "    "), None, inlined
            )
            if not checks:
                if present:
                    unread.append(key)
                continue
            if not present:
                body.append(f"{ind}if {key!r} in {x}:")
            body.append(f"{ind}{'' if present else '    '}{value} = {x}[{key!r}]")
            body.extend(checks)
        if unread:
            out.append(f"{ind}if not {x}.keys() >= {self.constant(frozenset(unread))}:")
            out.append(f"{ind}    return False")
        out.extend(body)
        if "additionalProperties" in schema:
            name, value = self._name("k"), self._name("v")
            checks = []
            self._fast_node(
                schema["additionalProperties"], value, checks, ind + "        ", None, inlined
            )
            if checks:
                listed = self.constant(frozenset(properties))
                out.append(f"{ind}for {name} in {x}:")
                out.append(f"{ind}    if {name} not in {listed}:")
                out.append(f"{ind}        {value} = {x}[{name}]")
                out.extend(checks)

    def _fast_array(
        self, schema: Any, x: str, out: list[str], ind: str, inlined: tuple[int, ...]
    ) -> None:
        """For an exact list `x`."""
        tests = [
            f"len({x}) {test} {schema[key]!r}"
            for key, test in (("minItems", ">="), ("maxItems", "<="))
            if key in schema
        ]
        if tests:
            out.append(f"{ind}if not ({' and '.join(tests)}):")
            out.append(f"{ind}    return False")
        if "items" in schema:
            item = self._name("i")
            checks: list[str] = []
            self._fast_node(schema["items"], item, checks, ind + "    ", None, inlined)
            if checks:
                out.append(f"{ind}for {item} in {x}:")
                out.extend(checks)

    def _fast_applicators(
        self,
        schema: Any,
        x: str,
        out: list[str],
        ind: str,
        known: frozenset[str] | None,
        inlined: tuple[int, ...],
    ) -> None:
        """allOf and then/else are written inline; anyOf asks the parts' fast functions; oneOf,
        not and if need exact verdicts, so they ask the exact functions."""
        for sub in schema.get("allOf", ()):
            self._fast_node(sub, x, out, ind, known, inlined)
        if "anyOf" in schema:
            calls = " or ".join(f"{self.fast_function(sub)}({x})" for sub in schema["anyOf"])
            out.append(f"{ind}if not ({calls}):")
            out.append(f"{ind}    return False")
        if "oneOf" in schema:
            calls = ", ".join(f"{self.function(sub)}({x})" for sub in schema["oneOf"])
            out.append(f"{ind}if not [{calls}].count(True) == 1:")
            out.append(f"{ind}    return False")
        if "not" in schema:
            out.append(f"{ind}if {self.function(schema['not'])}({x}):")
            out.append(f"{ind}    return False")
        if "if" in schema and ("then" in schema or "else" in schema):
            then: list[str] = []
            otherwise: list[str] = []
            self._fast_node(schema.get("then", True), x, then, ind + "    ", known, inlined)
            self._fast_node(schema.get("else", True), x, otherwise, ind + "    ", known, inlined)
            if then or otherwise:
                # The condition's exact verdict, asked only when a look cannot tell it fails
                # (the event schema's `outcome: failure` asks for a reasonType: nearly every
                # event's outcome says at a glance that it does not hold).
                fails = _fails(schema["if"], x, known)
                condition = f"{self.function(schema['if'])}({x})"
                if fails != "False":
                    condition = f"not {fails} and {condition}"
                out.append(f"{ind}if {condition}:")
                out.extend(then or [f"{ind}    pass"])
                if otherwise:
                    out.append(f"{ind}else:")
                    out.extend(otherwise)


def _fails(schema: Any, x: str, known: frozenset[str] | None) -> str:
    """An expression that is True only when `x` certainly fails `schema`, from a few keywords
    that tell it at a glance (type, a string const or enum, required, properties); "False"
    when none of them can. `known` as for _Writer._fast_node."""
    if schema is True or schema is False:
        return repr(schema is False)
    proofs: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        proofs.append(f"not ({' or '.join(_TYPE_CHECKS[t].format(x=x) for t in types)})")
    if isinstance(schema.get("const"), str):
        proofs.append(f"type({x}) is str and {x} != {schema['const']!r}")
    dict_test = "" if known == _DICT else f"type({x}) is dict and "
    if schema.get("required"):
        missing = " or ".join(f"{key!r} not in {x}" for key in schema["required"])
        proofs.append(f"{dict_test}({missing})")
    for key, subschema in schema.get("properties", {}).items():
        inner = _fails(subschema, f"{x}[{key!r}]", None)
        if inner != "False":
            proofs.append(f"{dict_test}{key!r} in {x} and {inner}")
    if not proofs or sum(map(len, proofs)) > 2000:  # nested too deep to be worth a glance
        return "False"
    return "(" + " or ".join(f"({proof})" for proof in proofs) + ")"


def _ref_free(schema: Any) -> bool:
    """Does `schema` hold no $ref (so it can be written inline wherever it is referred to)?"""
    if isinstance(schema, dict):
        return "$ref" not in schema and all(_ref_free(value) for value in schema.values())
    if isinstance(schema, list):
        return all(_ref_free(value) for value in schema)
    return True


# The fast path's type tests: exact builtin types, as orjson decodes JSON, and the names of
# the Python types a value that passed one has. A subclass fails them: the exact code decides.
_FAST_TYPES: Mapping[str, tuple[str, frozenset[str]]] = {
    "object": ("type({x}) is dict", frozenset({"dict"})),
    "array": ("type({x}) is list", frozenset({"list"})),
    "string": ("type({x}) is str", frozenset({"str"})),
    "boolean": ("{x} is True or {x} is False", frozenset({"bool"})),
    "null": ("{x} is None", frozenset({"None"})),
    "integer": ("type({x}) is int", frozenset({"int"})),
    "number": ("type({x}) is int or type({x}) is float", frozenset({"int", "float"})),
}
_STR, _DICT = _FAST_TYPES["string"][1], _FAST_TYPES["object"][1]
# The keywords of each kind: the exact types they are checked on here, the test for those,
# and jsonschema's test for the kind (a value that passes it but not the first: unsure).
_KINDS: Mapping[str, tuple[frozenset[str], str, str]] = {
    "string": (frozenset({"str"}), "type({x}) is str", "isinstance({x}, str)"),
    "number": (
        frozenset({"int", "float"}),
        "type({x}) is int or type({x}) is float",
        "isinstance({x}, _Number) and not isinstance({x}, bool)",
    ),
    "object": (frozenset({"dict"}), "type({x}) is dict", "isinstance({x}, dict)"),
    "array": (frozenset({"list"}), "type({x}) is list", "isinstance({x}, list)"),
}
# A bound holds (for an int or a float that is not NaN) exactly when _BOUNDS' test fails.
_FAST_BOUNDS: Mapping[str, str] = {
    "minimum": ">=",
    "maximum": "<=",
    "exclusiveMinimum": ">",
    "exclusiveMaximum": "<",
}


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
