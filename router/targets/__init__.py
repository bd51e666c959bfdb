"""The Target protocol and the registry of target types.

A target is small: it sends one batch and classifies failures as retryable or permanent. It
never retries by itself; batching, retries, dead letters and write_status live in delivery.py,
once, for every target type. A new target type is one module and one line in TARGET_TYPES:
the module owns its endpoint's dataclass and JSON Schema, and the config loader, the config
schema's target section and the management API take the endpoint key, the dataclass and the
schema from here. Target modules import nothing of the config, so the config may import this
registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from router.events import Event
from router.targets import cloud_logs, cos, event_streams, file, http, syslog
from router.targets._net import AddressBound

if TYPE_CHECKING:
    from router.config import TargetConfig


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


@dataclass(frozen=True, slots=True)
class TargetType:
    """What the config loader and the daemon know of one type of target."""

    endpoint_key: str  # the YAML key of its endpoint object (`file_endpoint`)
    config_class: type[Any]  # the frozen dataclass that endpoint object becomes
    factory: Callable[[str, Any], Target]  # (target id, endpoint config) -> the Target
    schema: Mapping[str, Any]  # the JSON Schema of the endpoint object
    # Batch settings of this type under `delivery.batch` and the target's own `batch`
    # (a COS object wants megabytes and a minute, not the 0.2 s of an HTTP receiver).
    batch_defaults: Mapping[str, Any] = field(default_factory=dict)
    # Whether an endpoint (its checked YAML mapping) needs an `api_key`: its own, or the
    # daemon's identity from the top-level `iam` section, which the config loader fills in
    # when the endpoint has none or sets service_to_service_enabled.
    needs_api_key: Callable[[Mapping[str, Any]], bool] | None = None


TARGET_TYPES: Final[dict[str, TargetType]] = {
    "file": TargetType(
        "file_endpoint",
        file.FileEndpointConfig,
        file.FileTarget,
        file.ENDPOINT_SCHEMA,
        file.BATCH_DEFAULTS,
    ),
    "http": TargetType(
        "http_endpoint", http.HttpEndpointConfig, http.HttpTarget, http.ENDPOINT_SCHEMA
    ),
    "cloud_logs": TargetType(
        "cloudlogs_endpoint",
        cloud_logs.CloudLogsEndpointConfig,
        cloud_logs.CloudLogsTarget,
        cloud_logs.ENDPOINT_SCHEMA,
        needs_api_key=cloud_logs.needs_api_key,
    ),
    "syslog": TargetType(
        "syslog_endpoint", syslog.SyslogEndpointConfig, syslog.SyslogTarget, syslog.ENDPOINT_SCHEMA
    ),
    "cloud_object_storage": TargetType(
        "cos_endpoint",
        cos.CosEndpointConfig,
        cos.CosTarget,
        cos.ENDPOINT_SCHEMA,
        cos.BATCH_DEFAULTS,
        needs_api_key=cos.needs_api_key,
    ),
    "event_streams": TargetType(
        "eventstreams_endpoint",
        event_streams.EventStreamsEndpointConfig,
        event_streams.EventStreamsTarget,
        event_streams.ENDPOINT_SCHEMA,
        needs_api_key=event_streams.needs_api_key,
    ),
}


@runtime_checkable
class Bounded(Protocol):
    """A target that checks where its names resolve before it connects (a target type that
    connects over the network has `bound`, None until build_target sets it)."""

    bound: AddressBound | None


def build_target(config: TargetConfig) -> Target:
    """The Target for a configured target (the config schema guarantees a known type), bound
    to where the management API lets it connect if the API set any of its hosts."""
    kind = TARGET_TYPES[config.target_type]
    assert isinstance(config.endpoint, kind.config_class)
    target = kind.factory(config.id, config.endpoint)
    if config.bound is not None and isinstance(target, Bounded):
        target.bound = config.bound
    return target
