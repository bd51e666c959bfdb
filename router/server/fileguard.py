"""Which files the management API may make the daemon read or write. An admin token can
create file targets and TLS settings; without these checks it could have the daemon append
to any file it can open (its config, a key, another archive's rotations) or read a key and
present it to a server of the caller's choosing. The operator's own YAML is not held to
them: only what a remote caller sends or changes is."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from router.config import TargetConfig, file_references
from router.targets._net import TLS_FILE_KEYS
from router.targets.file import FileEndpointConfig


def root_problem(path: str, roots: tuple[Path, ...]) -> str | None:
    """Why the API may not put a file target at `path` (None if it may): outside every
    archive root once resolved, symlinks followed."""
    if "\x00" in path:
        return None  # the config's own check names it
    resolved = Path(path).resolve()
    if any(resolved.is_relative_to(root) for root in roots):
        return None
    allowed = ", ".join(repr(str(root)) for root in roots) or "none"
    return (
        f"{path!r} is outside the archive roots ({allowed}); the API writes files only there "
        "(storage.archive_roots, by default the directories of the config's file targets)"
    )


def host_files(value: Any, where: str) -> list[str]:
    """The places in a target's data (any depth) that name a file on the daemon's host for
    it to read (a TLS CA, certificate or key): an admin token would have the daemon read any
    file it can, and present a key found there to a server of the caller's choosing."""
    if isinstance(value, list):
        return [p for n, v in enumerate(value) for p in host_files(v, f"{where}[{n}]")]
    if not isinstance(value, dict):
        return []
    places = [f"{where}.{k}" for k, v in value.items() if k in TLS_FILE_KEYS and v is not None]
    return places + [p for k, v in value.items() for p in host_files(v, f"{where}.{k}")]


def daemon_file_problem(
    path: str, data: Mapping[str, Any], config_path: Path | None, others: Sequence[TargetConfig]
) -> str | None:
    """Why the API may not put a file target at `path` inside the archive roots (None if it
    may): a file the daemon reads (daemon_files), or where another file target's archive
    rotates to (`archive.ndjson.1`, `.2.gz`): appended events would break the config at the
    next start, a key, a secret, or another archive's chain."""
    resolved = Path(path).resolve()
    if resolved in daemon_files(data, config_path):
        return (
            f"{path!r} is a file the daemon reads (its config file, a key, a certificate or "
            "a ${file:} secret); the API writes archives only"
        )
    for other in others:
        if isinstance(other.endpoint, FileEndpointConfig):
            archive = Path(other.endpoint.path).resolve()
            if resolved.parent == archive.parent and resolved.name.startswith(archive.name + "."):
                return f"{path!r} is where the archive {str(archive)!r} rotates to"
    return None


def daemon_files(data: Mapping[str, Any], config_path: Path | None) -> set[Path]:
    """The files the daemon reads, resolved: its config file (with the write-back's `.prev`
    and `.tmp`), every file the config names under a `*_file` key (keys, certificates,
    credentials, a token file; a signing key's `.pub` beside it) and every `${file:}`."""
    named: list[str] = list(file_references(data))

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and key.endswith("_file") and isinstance(item, str):
                    named.extend((item, item + ".pub"))
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(data)
    if config_path is not None:  # the write-back's files are beside the file a link names
        for base in (config_path, config_path.resolve()):
            named.extend(str(base) + suffix for suffix in ("", ".prev", ".tmp"))
    return {Path(name).resolve() for name in named if "\x00" not in name}


def same_at(where: str, new: Any, old: Any) -> bool:
    """Whether `new` and `old` hold the same value at the dotted/indexed path `where`."""
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", where):
        key, index = part
        try:
            new = new[key] if key else new[int(index)]
            old = old[key] if key else old[int(index)]
        except (KeyError, IndexError, TypeError):
            return False
    return bool(new == old)
