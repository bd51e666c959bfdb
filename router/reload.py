"""A config reload, planned and applied: what changes, and the order it changes in.

A reload swaps the route table, settings and targets while the daemon runs (SIGHUP). Some
sections cannot change under a running daemon: the listener (`server`), where the journal lives
(`storage`) and the shutdown policy; a new config that changes them is refused as a whole with
the reason, and the running config stays. Everything else is applied: targets are added,
removed (their backlog is delivered within the drain timeout, the rest dead-lettered with
reason `target_removed`) or restarted with their new settings (at once: their backlog stays
and continues from its cursor).

`plan_reload` is the pure comparison; `apply_reload` builds what the new config needs before
it touches anything running (so a refusal costs nothing), then takes the daemon's steps in
order through `Swaps`, which the daemon hands it: reload never names the daemon.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from router.config import Config, TargetConfig
from router.errors import ConfigError
from router.intake.redaction import Redactor
from router.intake.validation import EventValidator
from router.observe.logformat import counted
from router.resources import schemas_dir
from router.routing import RouteTable
from router.targets import Target, build_target

log = logging.getLogger(__name__)

RESTART_ONLY = ("server", "storage", "shutdown", "auth", "reload", "evidence")


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """The difference between two configs, in the terms a reload acts on."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    refused: tuple[str, ...]  # why the new config cannot be applied live (empty: it can)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Compare target by target; name every restart-only section that differs."""
    old_targets = {t.id: t for t in old.targets}
    new_targets = {t.id: t for t in new.targets}
    refused = tuple(
        f"{section}: changes here need a restart"
        for section in RESTART_ONLY
        if getattr(old, section, None) != getattr(new, section, None)
    )
    return ReloadPlan(
        added=tuple(t for t in new_targets if t not in old_targets),
        removed=tuple(t for t in old_targets if t not in new_targets),
        changed=tuple(
            t for t in new_targets if t in old_targets and new_targets[t] != old_targets[t]
        ),
        refused=refused,
    )


def validator_for(config: Config) -> EventValidator:
    """The validator `config` asks for (its schemas directory, else the packaged schemas)."""
    schemas = config.validation.schemas_dir
    return EventValidator(
        Path(schemas) if schemas else schemas_dir(),
        unknown_actions=config.validation.unknown_actions,
    )


def redactor_for(config: Config) -> Redactor:
    """The redactor `config` asks for: its redaction section over the schemas validation
    reads (they name the fields to redact)."""
    schemas = config.validation.schemas_dir
    return Redactor.from_schemas(Path(schemas) if schemas else schemas_dir(), config.redaction)


def checkers_for(
    old: Config, new: Config, validator: EventValidator, redactor: Redactor
) -> tuple[EventValidator, Redactor]:
    """The validator and redactor for `new`, given those running for `old`: each built again
    only when a section it is built from changed (the redactor reads validation's schemas
    too), for the daemon's reload and each worker process's alike."""
    if new.validation != old.validation:
        validator = validator_for(new)
    if new.redaction != old.redaction or new.validation != old.validation:
        redactor = redactor_for(new)
    return validator, redactor


def config_digest(config: Config) -> str:
    """A stable digest of a config (its dataclass repr, which hides secrets), for audit
    events that say what changed without saying what the secrets are."""
    return "sha256:" + hashlib.sha256(repr(config).encode()).hexdigest()[:16]


class Swaps(Protocol):
    """The steps a reload takes on the running daemon, handed over by the daemon; the reload
    decides which and in what order."""

    async def add_target(self, target_id: str) -> None:
        """Give a new target its place in the journal and its stats, before it is routed to."""

    def leave(self, target: TargetConfig) -> None:
        """Keep showing a removed target while its backlog is retired."""

    async def swap(
        self, new: Config, validator: EventValidator, routes: RouteTable, redactor: Redactor
    ) -> None:
        """From the next request on, validate, route and redact with these, and run `new`."""

    async def stop_worker(self, target_id: str, *, drain: bool = True) -> None:
        """Drain a target's worker within the drain timeout (or not at all: a changed target
        keeps its backlog), stop it, close the target."""

    async def retire(self, target_id: str) -> None:
        """Dead-letter a removed target's backlog and forget it."""

    async def start_target(self, config: TargetConfig, target: Target) -> None:
        """Run a new or changed target: start it and its delivery worker."""


async def apply_reload(
    old: Config,
    new: Config,
    *,
    validator: EventValidator,
    redactor: Redactor,
    swaps: Swaps,
) -> ReloadPlan:
    """Refuse `new` whole (ConfigError) if it changes what cannot change live; otherwise swap
    routes, settings and validation atomically for ingest, add and start new targets, restart
    changed ones (their backlog stays), and retire removed ones (delivered within the drain
    timeout, the rest dead-lettered target_removed). `validator` and `redactor` are the
    running ones, kept when their sections did not change."""
    plan = plan_reload(old, new)
    if plan.refused:
        raise ConfigError("reload", list(plan.refused))
    validator, redactor = checkers_for(old, new, validator, redactor)
    routes = RouteTable(new.routes, new.settings.default_targets)
    fresh = {t.id: t for t in new.targets if t.id in plan.added + plan.changed}
    built = {target_id: build_target(config) for target_id, config in fresh.items()}
    for target_id in plan.added:
        await swaps.add_target(target_id)
    for target_id in plan.removed:
        swaps.leave(old.target(target_id))
    # From here on every new request routes with the new table; requests that routed with
    # the old one have all reached the journal (or will, via its retired-target path).
    await swaps.swap(new, validator, routes, redactor)
    # A changed target keeps its backlog for its new worker: the old one stops after the
    # attempt it is making, not after draining it (into an endpoint the reload may be fixing).
    for target_id in plan.changed:
        await swaps.stop_worker(target_id, drain=False)
    for target_id in plan.removed:
        await swaps.stop_worker(target_id)
    for target_id in plan.removed:
        await swaps.retire(target_id)
    for target_id, target in built.items():
        await swaps.start_target(fresh[target_id], target)
    log.info(
        "config reloaded: %s added, %d changed, %d removed; %s",
        counted(len(plan.added), "target"),
        len(plan.changed),
        len(plan.removed),
        counted(len(new.routes), "route"),
    )
    return plan
