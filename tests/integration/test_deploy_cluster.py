"""deploy/cluster: three routers over a three-node NATS cluster, as shipped, hold together.

No container engine here: the NATS config passes `nats-server -t` for each node, the router
config passes `event-router check`, and the compose file wires what both name (the nodes the
routes and the routers' servers list, the config every router mounts)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from tests.helpers import run_cli
from tests.peers.nats import nats_server

CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "cluster"
ENV = {
    "EVENT_ROUTER_INGEST_TOKEN": "ingest-token-0123456789",
    "EVENT_ROUTER_ADMIN_TOKEN": "admin-token-0123456789",
    "EVENT_ROUTER_NATS_PASSWORD": "nats-password",
    "EVENT_ROUTER_SIEM_TOKEN": "siem-token-0123456789",
}


def test_the_nats_config_is_valid_for_every_node() -> None:
    for name in ("nats1", "nats2", "nats3"):
        result = subprocess.run(
            [nats_server(), "-t", "-c", str(CLUSTER / "nats.conf")],
            env={**os.environ, "NATS_NAME": name},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr


async def test_the_router_config_passes_check() -> None:
    code, _, err = await run_cli(
        "check", "--config", str(CLUSTER / "router.yaml"), env={**os.environ, **ENV}
    )
    assert code == 0, err


def test_compose_runs_three_routers_on_the_three_nodes_the_config_names() -> None:
    compose = yaml.safe_load((CLUSTER / "compose.yaml").read_text())
    router = yaml.safe_load((CLUSTER / "router.yaml").read_text())
    services = compose["services"]
    nodes = sorted(name for name in services if name.startswith("nats"))
    routers = sorted(name for name in services if name.startswith("router"))
    assert (nodes, routers) == (["nats1", "nats2", "nats3"], ["router1", "router2", "router3"])
    assert router["storage"]["jetstream"]["servers"] == [f"nats://{n}:4222" for n in nodes]
    assert router["storage"]["jetstream"]["replicas"] == 3
    conf = (CLUSTER / "nats.conf").read_text()
    assert all(f"nats-route://{n}:6222" in conf for n in nodes)
    for name in routers:
        mounts = services[name]["volumes"]
        assert "./router.yaml:/etc/event-router/router.yaml:ro" in mounts
    # Every router keeps its storage.path on a volume of its own.
    assert len({services[name]["volumes"][1] for name in routers}) == 3
