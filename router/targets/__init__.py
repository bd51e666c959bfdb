"""The Target protocol and the registry of target types.

A target is small: it sends one batch and classifies failures as retryable or permanent. It
never retries by itself; batching, retries, dead letters and write_status live in delivery.py,
once, for every target type. A new target type is one module and one line in TARGET_TYPES.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final, Protocol

from router.config import TargetConfig
from router.events import Event


class Target(Protocol):
    """A destination for batches of events."""

    id: str

    async def start(self) -> None:
        """Open files or sessions. Called once before the first send."""

    def unsendable(self, event: Event) -> str | None:
        """Why this event can never be sent here (e.g. `too_large`), or None. Such an event is
        dead-lettered with that reason at once, not retried, and the rest of its batch goes."""

    def requests(self, batch: Sequence[Event]) -> Iterator[Sequence[Event]]:
        """The batch cut into what goes out in one request each, each event in exactly one
        (in order, or grouped: the COS target makes one object per account). The worker sends,
        retries and settles each on its own, so a failed second request neither sends the
        first again nor dead-letters events the first already stored. Most targets take a
        batch in one request: `yield batch`."""

    async def send(self, batch: Sequence[Event]) -> None:
        """Deliver the whole batch or raise Retryable/PermanentDeliveryError."""

    async def close(self) -> None:
        """Release resources; safe to call more than once."""


def _file(config: TargetConfig) -> Target:
    from router.targets.file import FileTarget

    return FileTarget.from_config(config)


def _http(config: TargetConfig) -> Target:
    from router.targets.http import HttpTarget

    return HttpTarget.from_config(config)


def _cloud_logs(config: TargetConfig) -> Target:
    from router.targets.cloud_logs import CloudLogsTarget

    return CloudLogsTarget.from_config(config)


def _syslog(config: TargetConfig) -> Target:
    from router.targets.syslog import SyslogTarget

    return SyslogTarget.from_config(config)


def _cos(config: TargetConfig) -> Target:
    from router.targets.cos import CosTarget

    return CosTarget.from_config(config)


TARGET_TYPES: Final[Mapping[str, Callable[[TargetConfig], Target]]] = {
    "file": _file,
    "http": _http,
    "cloud_logs": _cloud_logs,
    "syslog": _syslog,
    "cloud_object_storage": _cos,
}


def build_target(config: TargetConfig) -> Target:
    """The Target for a configured target (the config schema guarantees a known type)."""
    return TARGET_TYPES[config.target_type](config)
