"""What every command shares: the exit codes, the admin token a client command sends, the
config loaded with its problems said on stderr, and the target a `cos://` or `kafka://` path
names."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from router.config import Config, TargetConfig, load_config_and_data
from router.errors import ConfigError
from router.observe.logformat import counted
from router.resources import default_config_path

if TYPE_CHECKING:
    from router.targets import Target
    from router.targets.cos import CosTarget

T = TypeVar("T")


EXIT_RUNTIME = 1
EXIT_CONFIG = 2
TOKEN_ENV = "EVENT_ROUTER_TOKEN"
EXIT_CODES = """\
exit codes (every command):
  0  done (a search or a redrive that matches nothing is done too)
  1  failed: nothing could be done (a port in use, the daemon out of reach, a target that
     fails its test write, dead letters none of which can be redriven, an archive that
     fails verify)
  2  usage or config error: an unknown option or target, a bad query, time or count,
     a config that does not load or does not pass check, a storage.path another daemon holds
     or whose journal a newer event-router wrote"""
# A Path keeps one slash of `cos://` or `kafka://`: what an argument naming a store starts with.
COS_SCHEME = "cos:/"
KAFKA_SCHEME = "kafka:/"


def loaded(path: Path | None) -> tuple[Config, dict[str, Any]] | None:
    """The config at `path` (default: the embedded one) and its data; None when it does not
    load, its problems said on stderr, one a line."""
    try:
        return load_config_and_data(path or default_config_path())
    except ConfigError as exc:
        print(f"{exc.source}: {counted(len(exc.problems), 'problem')}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def admin_token(token_file: Path | None) -> str | None:
    """The token a client command sends: from --token-file, else $EVENT_ROUTER_TOKEN. Never
    an argument of its own, which `ps` would show to every user."""
    if token_file is not None:
        return token_file.read_text(encoding="utf-8").strip()
    return os.environ.get(TOKEN_ENV) or None


def cos_target(
    args: argparse.Namespace, path: str, command: str
) -> tuple[CosTarget, str, Config] | int:
    """The cloud_object_storage target `cos://TARGET[/PREFIX]` names in --config, the prefix,
    and the config; or the exit code of a config that does not load or has no such target."""
    from router.targets.cos import CosEndpointConfig, CosTarget

    target_id, _, prefix = path.removeprefix(COS_SCHEME).lstrip("/").partition("/")
    found = config_target(args, target_id, CosEndpointConfig, "cloud_object_storage", command)
    if isinstance(found, int):
        return found
    target, config = found
    assert isinstance(target.endpoint, CosEndpointConfig)
    return CosTarget(target_id, target.endpoint), prefix, config


def config_target(
    args: argparse.Namespace,
    target_id: str,
    endpoint_type: type,
    type_name: str,
    command: str = "verify",
) -> tuple[TargetConfig, Config] | int:
    """The target `target_id` of --config (of the type whose endpoint is `endpoint_type`)
    and the config; or the exit code of a config that does not load or has no such target."""
    found_config = loaded(args.config)
    if found_config is None:
        return EXIT_CONFIG
    config, _ = found_config
    found = [t for t in config.targets if t.id == target_id]
    if not found or not isinstance(found[0].endpoint, endpoint_type):
        print(f"{command}: no {type_name} target {target_id!r} in the config", file=sys.stderr)
        return EXIT_CONFIG
    return found[0], config


def on_store(command: str, work: Callable[[], Awaitable[T]], target: Target) -> T | int:
    """Run `work` on a bucket's or a topic's target and close its client; a store that cannot
    be read is said on stderr (exit 1)."""
    from router.errors import DeliveryError

    async def run() -> T:
        try:
            return await work()
        finally:
            await target.close()

    try:
        return asyncio.run(run())
    except DeliveryError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
