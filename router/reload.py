"""What a config reload changes: a pure comparison of the running config with a new one.

A reload swaps the route table, settings and targets while the daemon runs (SIGHUP). Some
sections cannot change under a running daemon: the listener (`server`), where the journal lives
(`storage`) and the shutdown policy; a new config that changes them is refused as a whole with
the reason, and the running config stays. Everything else is applied: targets are added,
removed (their backlog is delivered within the drain timeout, the rest dead-lettered with
reason `target_removed`) or restarted with their new settings (their backlog stays and
continues from its cursor).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from router.config import Config

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


def config_digest(config: Config) -> str:
    """A stable digest of a config (its dataclass repr, which hides secrets), for audit
    events that say what changed without saying what the secrets are."""
    return "sha256:" + hashlib.sha256(repr(config).encode()).hexdigest()[:16]
