"""Checks events against schemas/: the base event model, then the producing service's catalogue.

Schemas are compiled once at start-up, twice over: into Python code that accepts a valid event
in about 5 us (router/intake/schemacode.py, or fastjsonschema's code, about 9 us, for a schema
outside that compiler's keywords; jsonschema takes about 180 us, which capped ingest near 5,000
events/s per core), and into jsonschema, the reference implementation, which explains a
rejection. An event is accepted only when jsonschema finds nothing, so the fast path
can never let through what the reference rejects. `validate` reports every problem of an event,
each with a JSON pointer, so a producer can fix all of them in one round trip.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import fastjsonschema
import jsonschema

from router.errors import ConfigError
from router.events import action_service, crn_service
from router.intake.schemacode import compile_exact, compile_parts


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an event: where (a JSON pointer) and what."""

    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


@dataclass(frozen=True, slots=True)
class Catalogue:
    """The actions one service may emit (schemas/catalog/<service>.json)."""

    service: str
    actions: frozenset[str]
    source: str


def json_pointer(parts: Iterable[str | int]) -> str:
    """RFC 6901: `("requestData", "a/b", 0)` -> `/requestData/a~1b/0`."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), [f"cannot load schema: {exc}"]) from exc


def load_catalogues(schemas: Path) -> dict[str, Catalogue]:
    """Every catalogue under schemas/catalog/, checked against schemas/catalog.schema.json."""
    meta = jsonschema.Draft202012Validator(_load_json(schemas / "catalog.schema.json"))
    catalogues: dict[str, Catalogue] = {}
    for path in sorted((schemas / "catalog").glob("*.json")):
        doc = _load_json(path)
        problems = [
            f"{json_pointer(e.absolute_path) or '/'}: {e.message}" for e in meta.iter_errors(doc)
        ]
        if problems:
            raise ConfigError(str(path), problems)
        if doc["service"] in catalogues:
            raise ConfigError(str(path), [f"service {doc['service']!r} has two catalogues"])
        catalogues[doc["service"]] = Catalogue(
            service=doc["service"], actions=frozenset(doc["actions"]), source=path.name
        )
    return catalogues


class EventValidator:
    """Validates event bodies; build one at start-up and share it."""

    def __init__(self, schemas: Path, *, unknown_actions: str = "reject") -> None:
        schema = _load_json(schemas / "event.schema.json")
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        self._validator = cls(schema)
        parts = compile_parts(schema)
        self._accepts = parts.valid if parts is not None else compile_accepts(schema)
        # clean's first question: the compiled fast function itself, without valid's frame
        # around it (True only for what jsonschema accepts; False or KeyError: "ask valid").
        self._first: Callable[[Any], bool] = parts.fast if parts is not None else self._accepts
        self.catalogues: Mapping[str, Catalogue] = load_catalogues(schemas)
        self._reject_unknown_actions = unknown_actions == "reject"
        # Events of one producer repeat one (action, CRN) pair: each is checked once.
        self._catalogue_verdict = lru_cache(maxsize=4096)(self._catalogue_check)

    def validate(self, event: Any) -> list[Problem]:
        """Every problem of `event`; an empty list means it may be accepted."""
        if not isinstance(event, dict):
            return [Problem("", f"an event must be a JSON object, not {_json_type(event)}")]
        try:
            accepted = self._accepts(event)
        except RecursionError:  # a recursive schema over a deep event: jsonschema decides
            accepted = False
        if accepted:  # nearly every event: only the catalogue may object (all at /action)
            return self._catalogue_problems(event) if self._reject_unknown_actions else []
        problems = [self._problem(e) for e in self._validator.iter_errors(event)]
        if self._reject_unknown_actions and not any(p.path == "/action" for p in problems):
            problems.extend(self._catalogue_problems(event))
        problems.sort(key=lambda p: p.path)
        return problems

    def clean(self, event: dict[str, Any]) -> bool:
        """True only when `validate(event)` finds nothing: the fast path accepts it and the
        catalogue knows its action. False means "ask validate", which decides and explains
        (jsonschema has the last word on every rejection)."""
        try:
            if not self._first(event) and not self._accepts(event):
                return False
        except (KeyError, RecursionError):  # KeyError: a required key missing (fast's way)
            try:
                if not self._accepts(event):
                    return False
            except RecursionError:
                return False
        if not self._reject_unknown_actions:
            return True
        action, crn = event.get("action"), event.get("logSourceCRN")
        return not isinstance(action, str) or not self._catalogue_verdict(
            action, crn if isinstance(crn, str) else None
        )

    def _catalogue_problems(self, event: dict[str, Any]) -> list[Problem]:
        """Checked beside the schema's findings, so a producer learns everything in one answer."""
        action, crn = event.get("action"), event.get("logSourceCRN")
        if not isinstance(action, str):
            return []
        return list(self._catalogue_verdict(action, crn if isinstance(crn, str) else None))

    def _catalogue_check(self, action: str, crn: str | None) -> tuple[Problem, ...]:
        services = {action_service(action)}
        if isinstance(crn, str):
            services.add(crn_service(crn))
        return tuple(
            Problem(
                "/action",
                f"{action!r} is not an action of the {name} catalogue ({catalogue.source})",
            )
            for name in sorted(services)
            if (catalogue := self.catalogues.get(name)) and action not in catalogue.actions
        )

    @staticmethod
    def _problem(error: jsonschema.ValidationError) -> Problem:
        path = json_pointer(error.absolute_path)
        if error.validator == "required":
            # Point at the missing field itself, not at the object that lacks it.
            missing = error.message.split("'")[1] if "'" in error.message else ""
            return Problem(f"{path}/{missing}", "required field is missing")
        schema = error.schema if isinstance(error.schema, dict) else {}
        if error.validator == "pattern" and "x-error" in schema:
            return Problem(path, f"{_excerpt(error.instance)} {schema['x-error']}")
        if error.validator == "type":
            return Problem(
                path, f"must be of type {error.validator_value}, not {_json_type(error.instance)}"
            )
        if error.validator == "enum":
            allowed = ", ".join(map(str, cast(list[Any], error.validator_value)))
            return Problem(path, f"{_excerpt(error.instance)} is not one of: {allowed}")
        if error.validator == "const":
            return Problem(path, f"must be {error.validator_value!r}")
        return Problem(path, error.message)


def compile_accepts(schema: dict[str, Any]) -> Callable[[Any], bool]:
    """The fast path: True when `schema` certainly accepts the event, False when jsonschema
    must look (it decides, and explains). The schema compiled to exact code
    (router/intake/schemacode.py) when it keeps to the keywords that compiler writes, else
    fastjsonschema's code, which may also say False for an event jsonschema accepts."""
    exact = compile_exact(schema)
    if exact is not None:
        return exact
    fast = compile_fast(schema)

    def accepts(event: Any) -> bool:
        try:
            fast(event)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    return accepts


def compile_fast(schema: dict[str, Any]) -> Callable[[Any], Any]:
    """The fallback fast path: fastjsonschema's compiled code for `schema`, raising
    JsonSchemaException on an event the schema may reject.

    A top-level `if` that only asks whether one required field equals a constant (the event
    schema's `outcome: failure` asks for a reasonType) is decided here, by a comparison: the
    compiled `if` would raise and catch an exception for every event it does not hold for,
    which cost a third of the fast path. The `then` runs, compiled, only when it holds."""
    condition, then = schema.get("if"), schema.get("then")
    if not (isinstance(condition, dict) and isinstance(then, dict)) or "else" in schema:
        return fastjsonschema.compile(schema, use_default=False, use_formats=False)
    properties = condition.get("properties")
    if not (
        set(condition) == {"properties", "required"}
        and isinstance(properties, dict)
        and len(properties) == 1
        and condition["required"] == list(properties)
        and isinstance(rule := next(iter(properties.values())), dict)
        and set(rule) == {"const"}
        and isinstance(rule["const"], str)
    ):
        return fastjsonschema.compile(schema, use_default=False, use_formats=False)
    name, value = next(iter(properties)), rule["const"]
    rest = {key: part for key, part in schema.items() if key not in ("if", "then")}
    fast_rest = fastjsonschema.compile(rest, use_default=False, use_formats=False)
    fast_then = fastjsonschema.compile(
        {**then, **{key: schema[key] for key in ("$defs", "$schema") if key in schema}},
        use_default=False,
        use_formats=False,
    )

    def fast(event: Any) -> Any:
        fast_rest(event)
        if isinstance(event, dict) and event.get(name) == value:  # a str equals only a str
            fast_then(event)
        return event

    return fast


def _excerpt(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)
