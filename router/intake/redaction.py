"""Redaction at ingest: sensitive values are removed, masked or hashed before an event is
journaled, so no target, dead letter, tail, log line or metric can ever see them.

The policy comes from two places. The event schema marks keys with `x-sensitive: drop | mask
| hash`; under an object marked `x-redact-nested` (requestData and responseData) a marked key
counts at any depth and in any spelling (`apiKey`, `API_KEY`, `api-key` are one key), since
services nest their details freely. The config's `redaction.keys` adds names and dotted
paths. `hash` is HMAC-SHA256 under `redaction.hash_key`: equal values give equal hashes, so an
analyst can still see that two events carried the same key, without learning it.

An event that lost anything says so in a top-level `redaction` object: `by`, `count` and the
JSON pointers of the first MAX_RECORDED_PATHS places (a producer's own `redaction` field is
replaced). Redaction runs after validation; it only touches keys the event schema does not
require, so a redacted event still passes the schema.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from router.config import RedactionConfig
from router.intake.validation import json_pointer

MASK: Final = "[REDACTED]"
HASH_PREFIX: Final = "hmac-sha256:"
MAX_RECORDED_PATHS: Final = 50
NESTED_SCOPES: Final = ("requestData", "responseData")
ACTIONS: Final = frozenset({"drop", "mask", "hash"})
# A tuple, not `dict | list`: isinstance takes 60 % longer over a union.
_CONTAINERS: Final = (dict, list)
MAX_REMEMBERED_KEYS: Final = 8192  # per scope: keys as spelled, each with its action
# Only keys this short are remembered: a producer's keys repeat and are short, while keys of
# up to server.max_string_chars, each new, would otherwise pin 8,192 of them (512 MiB at 64 KiB).
REMEMBERED_MAX_CHARS: Final = 256

Path = tuple[str, ...]


def normalize(key: str) -> str:
    """One spelling per key: case-folded, only letters and digits. The redactor remembers
    each short key's action as spelled, so this runs once per new key."""
    return _NOT_ALNUM.sub("", key.casefold())


_NOT_ALNUM: Final = re.compile(r"[^0-9a-z]")


@dataclass(frozen=True, slots=True)
class Policy:
    """Which keys go, and how: exact paths from the event root, and normalized key names
    that count anywhere below a scope."""

    exact: Mapping[Path, str]
    nested: Mapping[Path, Mapping[str, str]]

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any], config: RedactionConfig) -> Policy:
        exact: dict[Path, str] = {}
        nested: dict[Path, dict[str, str]] = {}
        _collect(schema, schema, (), exact, nested, depth=0)
        for rule in config.keys:
            if "." in rule.key:
                exact[tuple(rule.key.split("."))] = rule.action
            else:
                for scope in NESTED_SCOPES:
                    nested.setdefault((scope,), {})[normalize(rule.key)] = rule.action
        return cls(exact, nested)


def _collect(
    root: Mapping[str, Any],
    node: Mapping[str, Any],
    path: Path,
    exact: dict[Path, str],
    nested: dict[Path, dict[str, str]],
    depth: int,
) -> None:
    """Walk `properties` (following local $refs) and gather the x-sensitive marks."""
    if depth > 32:
        return
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    is_scope = node.get("x-redact-nested") is True
    for key, sub in (node.get("properties") or {}).items():
        if not isinstance(sub, Mapping):
            continue
        action = sub.get("x-sensitive")
        if action in ACTIONS:
            if is_scope:
                nested.setdefault(path, {})[normalize(key)] = action
            else:
                exact[(*path, key)] = action
        _collect(root, sub, (*path, key), exact, nested, depth + 1)


# The key of `hash` where redaction.hash_key is not set: drawn once per run of the daemon, so
# that equal values hash equally within the run, across reloads that build the redactor again
# and across worker processes, which take their owner's (router/server/worker.py): each worker
# had drawn its own, and one API key hashed two ways depending on the worker a producer reached.
_run_hash_key = os.urandom(32)


def run_hash_key() -> bytes:
    return _run_hash_key


def take_run_hash_key(key: bytes) -> None:
    """A worker process hashes under its owner's run key (WorkerSetup)."""
    global _run_hash_key
    _run_hash_key = key


class Redactor:
    """Applies a Policy to event bodies, in place."""

    def __init__(self, policy: Policy, hash_key: str | None) -> None:
        self.policy = policy
        self._key = hash_key.encode() if hash_key is not None else _run_hash_key
        self.redacted_events = 0
        self.redacted_values = 0
        # Per scope, the action of each key as spelled ("" for none): a service's keys repeat
        # from one event to the next, and one look-up replaces normalising each.
        self._actions: dict[Path, dict[str, str]] = {scope: {} for scope in policy.nested}
        # Bound once: per event, redact reads a one-part scope (requestData) with one get, and
        # skips the exact paths' loop when there are none (the event schema marks none).
        self._exact = tuple(policy.exact.items())
        self._scopes = [
            (scope[0] if len(scope) == 1 else None, scope, keys, self._actions[scope])
            for scope, keys in policy.nested.items()
        ]

    @classmethod
    def from_schemas(cls, schemas: pathlib.Path, config: RedactionConfig) -> Redactor:
        """The policy of `<schemas>/event.schema.json` plus the config's keys."""
        schema = orjson.loads((schemas / "event.schema.json").read_bytes())
        return cls(Policy.from_schema(schema, config), config.hash_key)

    def hash(self, value: Any) -> str:
        data = (
            value.encode()
            if isinstance(value, str)
            else orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        )
        return HASH_PREFIX + hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def _apply(self, parent: dict[str, Any], key: str, action: str) -> None:
        if action == "drop":
            del parent[key]
        elif action == "mask":
            parent[key] = MASK
        else:
            parent[key] = self.hash(parent[key])

    def redact(self, event: dict[str, Any]) -> int:
        """Redact `event` in place; how many values went. Iterative, so depth costs no stack."""
        places: list[tuple[str | int, ...]] = []
        for path, action in self._exact:
            parent: Any = event
            for part in path[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if isinstance(parent, dict) and path[-1] in parent:
                self._apply(parent, path[-1], action)
                places.append(path)
        for head, scope, keys, actions in self._scopes:
            node: Any
            if head is not None:
                node = event.get(head)
            else:
                node = event
                for part in scope:
                    node = node.get(part) if isinstance(node, dict) else None
            if not node:
                continue  # most events: {} or null (no empty container can hide a key)
            if isinstance(node, dict):
                # The next most: a few plain fields, each key known to need nothing. Told
                # here without the walk's set-up; a key not yet known, or a container that
                # could hide one, and the walk decides.
                for key, value in node.items():
                    if actions.get(key) != "" or (isinstance(value, _CONTAINERS) and value):
                        break
                else:
                    continue
            elif not isinstance(node, list):
                continue
            self._redact_below(node, scope, keys, places)
        if places:
            event["redaction"] = {
                "by": "event-router",
                "count": len(places),
                "paths": sorted(json_pointer(p) for p in places)[:MAX_RECORDED_PATHS],
            }
            self.redacted_events += 1
            self.redacted_values += len(places)
        return len(places)

    def _redact_below(
        self,
        top: dict[str, Any] | list[Any],
        scope: Path,
        keys: Mapping[str, str],
        places: list[tuple[str | int, ...]],
    ) -> None:
        """Redact every key of `keys` (normalized) at any depth below `top`, recording the
        paths. Containers are walked only when they hold something (an empty one cannot hide
        a key), and a dict's keys are looked at in one pass, its redactions applied after."""
        actions = self._actions[scope]
        if len(actions) > MAX_REMEMBERED_KEYS:
            actions.clear()
        stack: list[tuple[Any, tuple[str | int, ...]]] = [(top, scope)]
        while stack:
            node, where = stack.pop()
            if isinstance(node, dict):
                found: list[tuple[str, str]] = []
                for key, value in node.items():
                    action = actions.get(key)
                    if action is None:
                        action = keys.get(normalize(key), "")
                        if len(key) <= REMEMBERED_MAX_CHARS:
                            actions[key] = action
                    if action:
                        found.append((key, action))
                    elif isinstance(value, _CONTAINERS) and value:
                        stack.append((value, (*where, key)))
                for key, action in found:
                    self._apply(node, key, action)
                    places.append((*where, key))
            else:
                stack.extend(
                    (item, (*where, i))
                    for i, item in enumerate(node)
                    if isinstance(item, _CONTAINERS) and item
                )
