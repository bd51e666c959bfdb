"""A new target type is one module and one registry line: a toy type, written to a temporary
module by the test, is configured, validated and delivered to like the shipped ones."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from router.config import parse_config
from router.errors import ConfigError
from router.targets import TARGET_TYPES, TargetType
from tests.conftest import StartDaemon
from tests.fakes import make_event, wait_for
from tests.helpers import assert_books_balance, everything_to, post, settled
from tests.integration.test_reload import with_base

TOY_MODULE = '''
"""A toy target type: it keeps every batch it is sent."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from router.events import Event


@dataclass(frozen=True, slots=True, kw_only=True)
class ToyEndpointConfig:
    label: str
    copies: int = 1


ENDPOINT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["label"],
    "properties": {"label": {"type": "string"}, "copies": {"type": "integer", "minimum": 1}},
}

SENT: list[tuple[str, str, list[str]]] = []


class ToyTarget:
    def __init__(self, target_id: str, endpoint: ToyEndpointConfig) -> None:
        self.id = target_id
        self.endpoint = endpoint

    async def start(self) -> None:
        pass

    def unsendable(self, event: Event) -> str | None:
        return None

    def requests(self, batch: Sequence[Event]) -> Iterator[Sequence[Event]]:
        yield batch

    async def send(self, batch: Sequence[Event]) -> None:
        SENT.append((self.id, self.endpoint.label, [event.id for event in batch]))

    async def close(self) -> None:
        pass
'''


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The toy module on sys.path, and its one line in the registry."""
    (tmp_path / "toy_target.py").write_text(TOY_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("toy_target")
    monkeypatch.setitem(
        TARGET_TYPES,
        "toy",
        TargetType(
            "toy_endpoint", module.ToyEndpointConfig, module.ToyTarget, module.ENDPOINT_SCHEMA
        ),
    )
    yield module
    sys.modules.pop("toy_target", None)


async def test_a_toy_target_type_in_its_own_module_takes_events_end_to_end(
    toy: ModuleType, start_daemon: StartDaemon
) -> None:
    daemon = await start_daemon(
        {
            "targets": [{"id": "play", "target_type": "toy", "toy_endpoint": {"label": "box"}}],
            "routes": everything_to("play"),
        }
    )
    endpoint = daemon.config.target("play").endpoint
    assert endpoint == toy.ToyEndpointConfig(label="box")
    status, body = await post(daemon, [make_event(), make_event(), make_event()])
    assert status == 202
    await wait_for(lambda: settled(daemon), what="delivery to the toy target")
    sent = [event_id for target_id, label, ids in toy.SENT for event_id in ids]
    assert {(target_id, label) for target_id, label, _ in toy.SENT} == {("play", "box")}
    assert sent == [result["id"] for result in body["results"]]
    assert daemon.status()["targets"]["play"]["delivered"] == 3
    assert_books_balance(daemon)


async def test_the_toy_types_schema_is_the_one_the_loader_checks(
    toy: ModuleType, start_daemon: StartDaemon
) -> None:
    with pytest.raises(ConfigError) as info:
        await start_daemon(
            {
                "targets": [
                    {"id": "play", "target_type": "toy", "toy_endpoint": {"label": "box", "x": 1}}
                ],
                "routes": everything_to("play"),
            }
        )
    assert info.value.problems == ["targets[0].toy_endpoint: unknown key 'x'"]


async def test_a_toy_target_type_registered_in_the_owner_only_works_with_worker_processes(
    toy: ModuleType, start_daemon: StartDaemon
) -> None:
    """server.workers 2: the worker processes start afresh, without the toy type (nor its
    module on their path). They validate, redact and route; they build no target, so they are
    sent the config without the targets, at start and at a reload that adds one."""
    play = {"id": "play", "target_type": "toy", "toy_endpoint": {"label": "box"}}
    daemon = await start_daemon(
        {
            "server": {"host": "127.0.0.1", "port": 0, "workers": 2},
            "targets": [play],
            "routes": everything_to("play"),
        }
    )
    status, body = await post(daemon, [make_event(), make_event()])
    assert status == 202
    more = {"id": "more", "target_type": "toy", "toy_endpoint": {"label": "bag"}}
    data = with_base(daemon, {"targets": [play, more], "routes": everything_to("play", "more")})
    await daemon.reload(parse_config(data), audit=False)
    status, again = await post(daemon, [make_event()])
    assert status == 202
    await wait_for(lambda: settled(daemon), what="delivery to the toy targets")
    first = [r["id"] for r in body["results"]]
    last = [r["id"] for r in again["results"]]
    sent = sorted((target_id, event_id) for target_id, _, ids in toy.SENT for event_id in ids)
    assert sent == sorted([("play", i) for i in first + last] + [("more", i) for i in last])
    assert_books_balance(daemon)
