"""What atracker's management API returns but the operator's YAML does not hold: when each
target and route was created and last updated, route versions, and the settings fields the
API accepts and echoes. One small JSON file beside the journal (`api-metadata.json`), written
atomically, staged with the change it belongs to; with JetStream, shared between routers."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from router.appendfile import replace_atomically, replace_with_staged, write_staged
from router.errors import ConfigWriteError
from router.observe.metrics import utc_iso

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Metadata:
    """What atracker returns but our YAML does not hold: timestamps, route versions and the
    settings fields we accept and echo. Kept beside the journal."""

    path: Path | None
    created: dict[str, str] = field(default_factory=dict)
    updated: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> Metadata:
        """The metadata in `path`. A damaged file (not JSON, or not this shape) must not keep
        the daemon from starting, nor fail every API read: it is moved aside
        (`api-metadata.json.corrupt-<time>`, as a damaged alerts.db) and the metadata starts
        again (the YAML's items are seen anew)."""
        if path is None or not path.exists():
            return cls(path)
        problem: str | None
        try:
            data = orjson.loads(path.read_bytes())
            parts = [data[key] for key in ("created", "updated", "versions", "settings")]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            problem = _metadata_problem(*parts)
            if problem is None:
                return cls(path, *parts)
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        path.rename(aside)
        log.error("the API's metadata %s is damaged (%s); moved to %s", path, problem, aside)
        return cls(path)

    def snapshot(self) -> tuple[dict[str, Any], ...]:
        """Everything a change may edit, to put back if the change is refused."""
        return copy.deepcopy((self.created, self.updated, self.versions, self.settings))

    def restore(self, saved: tuple[dict[str, Any], ...]) -> None:
        self.created, self.updated, self.versions, self.settings = saved

    def touch(self, key: str, *, created: bool = False) -> None:
        now = utc_iso(time.time())
        if created or key not in self.created:
            self.created[key] = now
        self.updated[key] = now

    def seen(self, keys: list[str]) -> bool:
        """Record when the daemon first saw each of `keys` (targets and routes of the YAML
        have no other creation time); True if any was new, to be saved."""
        new = [key for key in keys if key not in self.created]
        for key in new:
            self.touch(key, created=True)
        return bool(new)

    def document(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "updated": self.updated,
            "versions": self.versions,
            "settings": self.settings,
        }

    def adopt(self, document: Mapping[str, Any]) -> None:
        """Take the metadata another router shared; what only this router knew stays (its
        first sight of a YAML item the other has not shown yet)."""
        self.created = {**self.created, **document["created"]}
        self.updated = {**self.updated, **document["updated"]}
        self.versions = {**self.versions, **document["versions"]}
        self.settings = dict(document["settings"])

    def save(self) -> None:
        if self.path is None:
            return
        replace_atomically(self.path, orjson.dumps(self.document()))

    def stage(self) -> list[Path]:
        """The metadata written (and fsynced) to a temp file, for `commit` once the change it
        belongs to is applied; none without a file. ConfigWriteError when the storage cannot
        take it (a full disk): the change is refused before it is applied."""
        if self.path is None:
            return []
        try:
            return [write_staged(self.path, orjson.dumps(self.document()))]
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigWriteError(str(self.path), reason, "the API's metadata file") from exc

    def commit(self, staged: list[Path]) -> None:
        if self.path is not None:
            for temp in staged:
                replace_with_staged(self.path, temp)


def _metadata_problem(created: Any, updated: Any, versions: Any, settings: Any) -> str | None:
    """What is wrong with the parts of a metadata file, if anything."""
    for name, part, kind in (
        ("created", created, str),
        ("updated", updated, str),
        ("versions", versions, int),
    ):
        if not isinstance(part, dict) or not all(
            isinstance(key, str) and isinstance(value, kind) for key, value in part.items()
        ):
            return f"{name}: not a map of names to {kind.__name__} values"
    if not isinstance(settings, dict):
        return "settings: not a map"
    return None
