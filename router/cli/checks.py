"""`check` (a config exactly as `serve` would load it, with its warnings and the worker
processes it resolves to) and `validate-target` (one real test event to a target, as the
daemon's start-up validation sends it; a chained archive is only opened: its places are the
daemon's)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from router.cli.common import EXIT_CONFIG, EXIT_RUNTIME
from router.config import Config, config_warnings
from router.observe.logformat import counted

if TYPE_CHECKING:
    from router.probe import ProbeResult
    from router.targets import Target


def check(path: Path, config: Config) -> None:
    """`check`: the config's warnings on stderr, then what it holds and the worker processes
    `server.workers` resolves to here (a config that does not load has exited 2 before)."""
    from router.server.workercount import resolve_workers

    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{path}: OK ({counted(len(config.targets), 'target')}, "
        f"{counted(len(config.routes), 'route')}, "
        + "".join(
            f"{counted(len(items), kind)}, "
            for kind, items in (("view", config.views), ("alert", config.alerts))
            if items
        )
        + f"{counted(len(config.settings.default_targets), 'default target')})"
    )
    print(resolve_workers(config.server.workers).describe())


async def validate_target(config: Config, target_id: str) -> int:
    from router.probe import probe
    from router.targets import build_target

    try:
        target_config = config.target(target_id)
    except KeyError:
        known = ", ".join(t.id for t in config.targets) or "none"
        print(f"no target {target_id!r} in the config (targets: {known})", file=sys.stderr)
        return EXIT_CONFIG
    target = build_target(target_config)
    try:
        if target_config.target_type == "file" and config.evidence.enabled:
            result = await _open_chained_archive(target)
        else:
            result = await probe(target)
    finally:
        await target.close()
    print(f"{'OK' if result.ok else 'FAILED'}: {result.message}")
    return 0 if result.ok else EXIT_RUNTIME


async def _open_chained_archive(target: Target) -> ProbeResult:
    """A file target whose archive is an evidence chain gets no test line from here: only the
    daemon, which holds the chain's head, may take a place in it (its start-up validation and
    the API's validate do write one). Opening the file for appending is the test."""
    from router.probe import ProbeResult

    try:
        await target.start()
    except OSError as exc:
        return ProbeResult(target.id, False, f"target {target.id}: {exc}")
    return ProbeResult(
        target.id,
        True,
        f"target {target.id} can be written (no test event: its archive is an evidence chain, "
        "written by the daemon only)",
    )
