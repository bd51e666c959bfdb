"""Loads a YAML config: YAML (bounded loader) -> JSON Schema -> dataclasses -> cross-checks.

A target's endpoint belongs to its type: the dataclass and the JSON Schema of each endpoint
live in its module under router/targets/, and `config_schema()` completes the schema's target
section from `TARGET_TYPES`. `event-router check` and `serve` share `load_config`, so a config
that passes `check` is exactly a config that `serve` runs.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import jsonschema

from router.config.build import build_config
from router.config.crosscheck import cross_check
from router.config.model import (
    Config,
)
from router.errors import ConfigError
from router.masking import MASK, SECRET_KEYS, mask_headers, mask_text, masked
from router.resources import schemas_dir
from router.targets import TARGET_TYPES

if TYPE_CHECKING:
    import yaml


def format_path(parts: Iterable[str | int]) -> str:
    """`["routes", 1, "rules", 0]` -> `routes[1].rules[0]`: how every problem names its place."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, check and resolve the YAML file at `path`; raise ConfigError listing every problem."""
    return load_config_and_data(path)[0]


def load_config_and_data(path: str | os.PathLike[str]) -> tuple[Config, dict[str, Any]]:
    """The config and the data it came from (references unresolved), read once, through the
    same checks at start-up, on `check` and on every reload."""
    data = read_config_data(path)
    exposed = secret_literals(data)
    if exposed:
        mode = os.stat(path).st_mode
        if mode & 0o044:
            raise ConfigError(
                str(path),
                [
                    f"{where}: a secret written in a file other users can read (mode "
                    f"{mode & 0o777:04o}); chmod 600 the file, or use ${{env:NAME}} or "
                    "${file:/path}"
                    for where in exposed
                ],
            )
    return parse_config(data, str(path)), data


def secret_literals(data: Any, where: str = "") -> list[str]:
    """The paths of secrets written as literals rather than `${env:}`/`${file:}` references."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if key in SECRET_KEYS and isinstance(value, str) and "${" not in value:
                found.append(path)
            else:
                found.extend(secret_literals(value, path))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.extend(secret_literals(value, f"{where}[{i}]"))
    return found


# Nodes that aliases may repeat, in all, and levels a document may nest: far more than a config
# needs, far less than a "billion laughs" file expands to (every walk over the data, from the
# secret check to the schema, would take minutes) or the loader's recursion can take.
MAX_ALIAS_NODES: Final = 10_000
MAX_YAML_DEPTH: Final = 64


@functools.cache
def bounded_loader() -> type[yaml.SafeLoader]:
    """BoundedLoader, built on first use: PyYAML is imported by a process that reads a config
    file, not by a worker process (server.workers), which is handed the config as data."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """PyYAML's SafeLoader that counts, as it composes, the nodes aliases repeat: an
        alias costs the size of what it names, written out. Past MAX_ALIAS_NODES, or past
        MAX_YAML_DEPTH levels, or an alias inside the node it names (a loop), the file is
        refused before any of it is built, so the refusal costs what the file's text costs,
        not what it would expand to."""

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self._repeated = 0
            self._depth = 0
            self._open_anchors: set[str] = set()
            # id(node) -> nodes written out; composed nodes live on
            self._sizes: dict[int, int] = {}

        def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
            event = self.peek_event()  # type: ignore[no-untyped-call]
            if isinstance(event, yaml.AliasEvent):
                if event.anchor in self._open_anchors:
                    raise self._refuse(
                        f"alias *{event.anchor} refers to a node that holds it (a loop)", event
                    )
                node = super().compose_node(parent, index)
                assert node is not None  # an alias names a composed node, or PyYAML refused it
                self._repeated += self._size(node)
                if self._repeated > MAX_ALIAS_NODES:
                    raise self._refuse(
                        f"aliases here expand to more than {MAX_ALIAS_NODES} nodes in all (a YAML "
                        "alias bomb?); write the repeated parts out, or repeat less",
                        event,
                    )
                return node
            anchor = event.anchor
            self._depth += 1
            if self._depth > MAX_YAML_DEPTH:
                raise self._refuse(f"nested deeper than {MAX_YAML_DEPTH} levels", event)
            if anchor is not None:
                self._open_anchors.add(anchor)
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
                self._open_anchors.discard(anchor)

        def _size(self, node: yaml.Node) -> int:
            """How many nodes `node` stands for once its aliases are written out (memoised, so a
            shared node is counted once however often it is shared)."""
            size = self._sizes.get(id(node))
            if size is None:
                if isinstance(node, yaml.SequenceNode):
                    size = 1 + sum(self._size(item) for item in node.value)
                elif isinstance(node, yaml.MappingNode):
                    size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
                else:
                    size = 1
                self._sizes[id(node)] = size
            return size

        @staticmethod
        def _refuse(problem: str, event: yaml.Event) -> yaml.YAMLError:
            mark = cast(yaml.Mark | None, event.start_mark)
            return yaml.composer.ComposerError(None, None, problem, mark)

    return BoundedLoader


def read_config_data(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The YAML file as data, references unresolved: what the management API edits and
    writes back, so secrets stay references in the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from exc
    import yaml

    loader = bounded_loader()(text)
    loader.name = source  # a problem's mark names the operator's file, not "<unicode string>"
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
    finally:
        loader.dispose()
    if data is not None and not isinstance(data, dict):
        raise ConfigError(source, ["(top level): the config must be a mapping"])
    return data or {}


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Check `data` (parsed YAML) against the config schema and cross-check it."""
    problems = _schema_problems(data)
    if problems:
        raise ConfigError(source, problems)
    problems = []
    config = build_config(data, problems)
    problems.extend(cross_check(config))
    if problems:
        raise ConfigError(source, problems)
    return config


MAX_QUOTED_VALUE_CHARS = 100
# The validator, and the registry of target types it was built from (a test may add a type).
_CONFIG_VALIDATOR: tuple[tuple[tuple[str, int], ...], jsonschema.protocols.Validator] | None = None


def config_schema() -> dict[str, Any]:
    """schemas/config.schema.json with its target section completed from TARGET_TYPES:
    target_type's enum, and one `allOf` entry per type. An entry applies when target_type
    names its type; it requires the type's endpoint object, checks it against the schema the
    type's module ships, and refuses any other key (so another type's endpoint too). Each
    entry names only its own type, so the section grows by one entry per type."""
    schema: dict[str, Any] = json.loads(
        (schemas_dir() / "config.schema.json").read_text(encoding="utf-8")
    )
    target = schema["$defs"]["target"]
    common = dict.fromkeys(target["properties"], True)
    target["properties"]["target_type"] = {"enum": list(TARGET_TYPES)}
    target["allOf"] = [
        {
            "if": {"properties": {"target_type": {"const": name}}, "required": ["target_type"]},
            "then": {
                "properties": {**common, kind.endpoint_key: kind.schema},
                "required": [kind.endpoint_key],
                "additionalProperties": False,
            },
        }
        for name, kind in TARGET_TYPES.items()
    ]
    return schema


def _validator() -> jsonschema.protocols.Validator:
    global _CONFIG_VALIDATOR
    registry = tuple((name, id(kind)) for name, kind in TARGET_TYPES.items())
    if _CONFIG_VALIDATOR is None or _CONFIG_VALIDATOR[0] != registry:
        schema = config_schema()
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        _CONFIG_VALIDATOR = (registry, cls(schema))
    return _CONFIG_VALIDATOR[1]


def _schema_problems(data: Any) -> list[str]:
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.path)))
    return [f"{format_path(error.absolute_path)}: {_describe(error)}" for error in errors]


def _shown(value: Any, path: list[str | int]) -> Any:
    """How a problem may quote `value`, found at `path`: a credential (under a secret key or
    a secret-looking header, at any depth) as REDACTED, anything else as the API shows
    endpoint data (router/masking.py); `value` itself when nothing in it is a secret."""
    keys = [part for part in path if isinstance(part, str)]
    key = keys[-1] if keys else ""
    under_headers = len(keys) >= 2 and keys[-2] == "headers"
    if key in SECRET_KEYS or (under_headers and mask_headers({key: ""})[key] == MASK):
        return MASK
    # A string keeps its references (`${env:NAME}` names no secret, and `check` should say
    # which one it means); a URL in it is masked.
    shown = mask_text(value) if isinstance(value, str) else masked(value, key)
    return value if shown == value else shown


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        schema = error.schema if isinstance(error.schema, dict) else {}
        extra = sorted(
            set(cast(dict[str, Any], error.instance)) - set(schema.get("properties", {}))
        )
        return "unknown key " + ", ".join(repr(k) for k in extra)
    message = str(error.message)
    shown = _shown(error.instance, list(error.absolute_path))
    if shown is not error.instance:
        # A problem goes to the API's answer and its audit event: never quote a secret.
        message = message.replace(repr(error.instance), repr(shown))
    if isinstance(error.instance, str) and len(error.instance) > MAX_QUOTED_VALUE_CHARS:
        # A problem names the place; a 100,000-character value quoted whole helps nobody.
        short = f"{error.instance[:MAX_QUOTED_VALUE_CHARS]!r}... ({len(error.instance)} characters)"
        message = message.replace(repr(error.instance), short)
    return message
