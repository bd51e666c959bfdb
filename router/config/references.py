"""Secrets as references: `${env:NAME}` and `${file:/path}`, found and resolved.

A `${file:}` reference is read bounded (a regular file, at most MAX_REFERENCE_BYTES, never
blocking on a FIFO), so a wrong path cannot hang or fill the daemon.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

# A ${file:} reference is a secret, not a document: past this it is refused, not read.
MAX_REFERENCE_BYTES = 64 * 1024

_REF = re.compile(r"\$\{(env|file):([^}]+)\}")


def references(value: Any, where: str) -> list[str]:
    """The places in `value` (any depth) that hold a `${env:}`/`${file:}` reference."""
    if isinstance(value, str):
        return [where] if _REF.search(value) else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in references(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for n, v in enumerate(value) for p in references(v, f"{where}[{n}]")]
    return []


def file_references(value: Any) -> list[str]:
    """The paths that `${file:}` references in `value` (any depth) read."""
    if isinstance(value, str):
        return [ref for kind, ref in _REF.findall(value) if kind == "file"]
    if isinstance(value, dict):
        return [path for v in value.values() for path in file_references(v)]
    if isinstance(value, list):
        return [path for v in value for path in file_references(v)]
    return []


def resolve(value: str, where: str, problems: list[str]) -> str:
    """Expand `${env:NAME}` and `${file:/path}` so secrets stay out of the YAML."""

    def expand(match: re.Match[str]) -> str:
        kind, ref = match.group(1), match.group(2)
        if kind == "env":
            if ref not in os.environ:
                problems.append(f"{where}: environment variable {ref!r} is not set")
                return ""
            return os.environ[ref]
        try:
            return read_reference(ref)
        except (OSError, ValueError) as exc:
            problems.append(f"{where}: cannot read {ref!r}: {getattr(exc, 'strerror', 0) or exc}")
            return ""

    return _REF.sub(expand, value)


def read_reference(path: str) -> str:
    """The value of `${file:path}`: a regular file of at most MAX_REFERENCE_BYTES, read
    without blocking on a FIFO (opened non-blocking, refused by its type) and without
    filling memory from a device such as /dev/zero."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        data = b""
        while len(data) <= MAX_REFERENCE_BYTES and (
            chunk := os.read(fd, MAX_REFERENCE_BYTES + 1 - len(data))
        ):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_REFERENCE_BYTES:
        raise ValueError(f"larger than {MAX_REFERENCE_BYTES} bytes")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ValueError("not UTF-8 text") from exc


def resolve_all(value: Any, where: str, problems: list[str]) -> Any:
    """References may stand in any string of an endpoint, and in its headers' values."""
    if isinstance(value, str):
        return resolve(value, where, problems)
    if isinstance(value, dict):
        return {k: resolve_all(v, f"{where}.{k}", problems) for k, v in value.items()}
    return value


# What an HTTP client refuses to put in a header (it raises at send time, so a target would
# fail on every batch): control characters other than HTAB in a value, and names that are not
