"""Routers as real processes over a real JetStream: share the work, survive kill -9 of a router
and of a NATS node, and lose no acknowledged event.

Each router is `python -m router serve` with storage.backend jetstream and the same config (it
is shared), whose file targets write under each router's own directory (`${env:ROUTER_DIR}`):
one shared consumer per target, so the archives of all routers together must hold every
acknowledged event: exactly once when nothing dies; at least once
when a router is killed holding a batch (JetStream redelivers it to another router).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
import pytest
import yaml

from router.config import JetStreamConfig
from router.journal.jetstream import queue_stream
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import free_port, reap, serve, terminate
from tests.peers.nats import NatsCluster, NatsServer

pytestmark = pytest.mark.peers

TARGETS = ("a", "b")
EVENTS_PER_POST = 20
_streams = itertools.count(1)


@dataclass
class Router:
    """One router process: its port, its archives (one file per target), its process."""

    name: str
    port: int
    workdir: Path
    proc: asyncio.subprocess.Process | None = None

    def archive(self, target_id: str) -> Path:
        return self.workdir / f"{target_id}.ndjson"

    async def status(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.port}/v1/status") as resp,
        ):
            return dict(await resp.json())


def write_config(router: Router, servers: list[str], stream: str, **jetstream: Any) -> Path:
    config = router.workdir / "router.yaml"
    router.workdir.mkdir(parents=True, exist_ok=True)
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": router.port},
                "storage": {
                    "path": str(router.workdir / "var"),
                    "backend": "jetstream",
                    "jetstream": {
                        "servers": servers,
                        "stream": stream,
                        "max_bytes": 64 * 1024 * 1024,
                        **jetstream,
                    },
                },
                "evidence": {"enabled": False},
                "startup": {"validate_targets": False},
                "shutdown": {"drain_timeout_s": 5},
                "delivery": {"batch": {"max_wait_s": 0.05}},
                "targets": [
                    {
                        "id": target_id,
                        "target_type": "file",
                        # The same text on every router (the routers share their config),
                        # a directory of each router's own (its environment).
                        "file_endpoint": {"path": f"${{env:ROUTER_DIR}}/{target_id}.ndjson"},
                    }
                    for target_id in TARGETS
                ],
                "routes": [
                    {"name": "all", "rules": [{"locations": ["*"], "target_ids": list(TARGETS)}]}
                ],
            }
        )
    )
    return config


async def start_routers(
    tmp_path: Path, servers: list[str], count: int = 2, **jetstream: Any
) -> tuple[list[Router], str]:
    """`count` routers on a fresh stream prefix; the routers and the prefix."""
    stream = f"P{next(_streams)}"
    routers = [Router(f"r{i + 1}", free_port(), tmp_path / f"r{i + 1}") for i in range(count)]
    for router in routers:
        config = write_config(router, servers, stream, **jetstream)
        # The router's log beside its config (the child keeps its own copy of the descriptor).
        log = os.open(router.workdir / "router.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            env = {**os.environ, "ROUTER_DIR": str(router.workdir)}
            router.proc = await serve(config, router.port, stderr=log, env=env)
        finally:
            os.close(log)
    return routers, stream


@dataclass
class Load:
    """Producers posting batches round-robin to the routers, as behind a load balancer; a
    router that does not answer gets the same batch sent to the next one (same ids)."""

    routers: list[Router]
    acked: list[str] = field(default_factory=list)
    answers: Counter[int] = field(default_factory=Counter)
    failovers: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, worker: int, posts: int | None = None) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            for n in itertools.count():
                if self.stop.is_set() or (posts is not None and n >= posts):
                    return
                ids = [f"w{worker}-{n}-{i}" for i in range(EVENTS_PER_POST)]
                body = orjson.dumps([make_event(id=i) for i in ids])
                await self._post(session, body, ids, first=worker + n)

    async def _post(
        self, session: aiohttp.ClientSession, body: bytes, ids: list[str], first: int
    ) -> None:
        for k in range(len(self.routers) * 20):
            router = self.routers[(first + k) % len(self.routers)]
            try:
                async with session.post(
                    f"http://127.0.0.1:{router.port}/v1/events",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    self.answers[resp.status] += 1
                    if resp.status == 202:
                        self.acked.extend(ids)
                        return
            except (aiohttp.ClientError, ConnectionError):
                self.failovers += 1
                continue
            await asyncio.sleep(0.2)  # a 503: the producer retries after a pause
        raise AssertionError(f"no router took {ids[0]}..: {self.answers}")


def delivered(routers: list[Router], target_id: str) -> Counter[str]:
    """How often each event id is in the target's archives, over all routers."""
    return Counter(e["id"] for r in routers for e in read_ndjson(r.archive(target_id)))


async def books_settled(
    routers: list[Router], received: int, seen: list[Any] | None = None
) -> bool:
    """Every live router's books show `received` events per target, none pending; `seen`
    keeps the last books read, for the failure message when they never settle."""
    for router in routers:
        if router.proc is None or router.proc.returncode is not None:
            continue
        targets = (await router.status())["targets"]
        if seen is not None:
            seen[:] = [router.name, received, {t: targets[t] for t in TARGETS}]
        for target_id in TARGETS:
            row = targets[target_id]
            if (row["received"], row["pending"]) != (received, 0):
                return False
    return True


async def test_two_routers_deliver_every_event_exactly_once_per_target_and_agree_on_the_books(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    routers, _ = await start_routers(tmp_path, [nats_server.url])
    try:
        load = Load(routers)
        await asyncio.gather(*(load.run(w, posts=15) for w in range(4)))
        total = 4 * 15 * EVENTS_PER_POST
        assert len(load.acked) == total
        await wait_for(lambda: books_settled(routers, total), timeout_s=60, what="both drained")
        for target_id in TARGETS:
            counts = delivered(routers, target_id)
            assert set(counts) == set(load.acked), f"{target_id}: every event"
            assert set(counts.values()) == {1}, f"{target_id}: each once"
            # Both routers took part (work-queue semantics share the backlog).
            assert all(read_ndjson(r.archive(target_id)) for r in routers), target_id
        books = [(await r.status())["targets"] for r in routers]
        for target_id in TARGETS:
            rows = [
                {k: b[target_id][k] for k in ("received", "delivered", "dead_lettered", "pending")}
                for b in books
            ]
            assert (
                rows[0]
                == rows[1]
                == {
                    "received": total,
                    "delivered": total,
                    "dead_lettered": 0,
                    "pending": 0,
                }
            )
        for router in routers:
            assert router.proc is not None
            assert await terminate(router.proc) == 0
    finally:
        for router in routers:
            await reap(router.proc)


@pytest.mark.timeout(180)
async def test_kill_9_of_one_router_under_load_the_other_finishes_and_nothing_acked_is_missing(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # ack_wait_s 2: the dead router's batches go to the other within seconds, not 30.
    routers, _ = await start_routers(tmp_path, [nats_server.url], ack_wait_s=2)
    victim, survivor = routers
    try:
        load = Load(routers)
        producers = [asyncio.create_task(load.run(w), name=f"producer-{w}") for w in range(6)]
        await wait_for(lambda: len(load.acked) >= 2000, timeout_s=60, what="load acknowledged")
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGKILL)
        await victim.proc.wait()
        acked_at_kill = len(load.acked)
        await wait_for(
            lambda: len(load.acked) >= acked_at_kill + 1000,
            timeout_s=60,
            what="the survivor to keep acknowledging",
        )
        load.stop.set()
        await asyncio.gather(*producers)
        await wait_for(
            lambda: books_settled([survivor], len(set(load.acked))),
            timeout_s=90,
            what="the survivor to finish both targets' backlogs",
        )
        for target_id in TARGETS:
            counts = delivered(routers, target_id)
            missing = set(load.acked) - set(counts)
            assert not missing, f"{target_id}: {len(missing)} acknowledged events missing"
        print(
            f"kill -9 of a router: {len(set(load.acked))} acked, failovers {load.failovers}, "
            f"answers {dict(load.answers)}, duplicates per target "
            f"{ {t: sum(c - 1 for c in delivered(routers, t).values()) for t in TARGETS} }"
        )
        assert survivor.proc is not None
        assert await terminate(survivor.proc) == 0
    finally:
        for router in routers:
            await reap(router.proc)


async def stream_leader(cluster: NatsCluster, stream: str) -> str:
    nc = await nats.connect(servers=[n.url for n in cluster.nodes if n.running])
    try:
        info = await nc.jetstream().stream_info(stream)
        assert info.cluster is not None and info.cluster.leader is not None
        return info.cluster.leader
    finally:
        await nc.close()


async def replicas_current(cluster: NatsCluster, stream: str) -> bool:
    nc = await nats.connect(servers=cluster.urls)
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    replicas = (info.cluster.replicas if info.cluster else None) or []
    return len(replicas) == 2 and all(r.current and not r.offline for r in replicas)


@pytest.mark.timeout(240)
async def test_kill_9_of_a_nats_node_under_load_ingest_keeps_answering_and_nothing_is_missing(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    # A publish waits out the stream's leader election (seconds) rather than answer 503.
    routers, prefix = await start_routers(
        tmp_path, nats_cluster.urls, replicas=3, publish_timeout_s=30
    )
    stream = queue_stream(JetStreamConfig(stream=prefix), "a")
    try:
        leader = await stream_leader(nats_cluster, stream)
        node = next(n for n in nats_cluster.nodes if n.server_name == leader)
        load = Load(routers)
        producers = [asyncio.create_task(load.run(w), name=f"producer-{w}") for w in range(4)]
        await wait_for(lambda: len(load.acked) >= 1000, timeout_s=60, what="load acknowledged")
        await node.akill()
        acked_at_kill = len(load.acked)
        started = time.monotonic()
        await wait_for(
            lambda: len(load.acked) >= acked_at_kill + 1000,
            timeout_s=60,
            what="ingest to keep acknowledging with a node dead",
        )
        print(f"1000 more events acknowledged {time.monotonic() - started:.1f}s after the kill")
        load.stop.set()
        await asyncio.gather(*producers)
        assert set(load.answers) == {202}, f"every request answered 202: {load.answers}"
        seen: list[Any] = []
        started = time.monotonic()
        try:
            # About a second, or, when the dead node led a consumer and had handed out
            # messages nobody received, up to ack_wait_s (30 s) after the kill. (The books
            # of a router whose connection was to the dead node also stood still for most of
            # publish_timeout_s, a read's answer lost with the node, until reads waited
            # READ_TRY_S.)
            await wait_for(
                lambda: books_settled(routers, len(set(load.acked)), seen),
                timeout_s=90,
                what="both routers to drain with a node dead",
            )
        except AssertionError as e:
            logs = {r.name: (r.workdir / "router.log").read_text()[-3000:] for r in routers}
            raise AssertionError(f"{e}; last books {seen}; router logs {logs}") from None
        print(f"both routers drained {time.monotonic() - started:.1f}s after the load stopped")
        for target_id in TARGETS:
            counts = delivered(routers, target_id)
            missing = set(load.acked) - set(counts)
            assert not missing, f"{target_id}: {len(missing)} acknowledged events missing"
            twice = sum(n - 1 for n in counts.values())
            assert not twice, f"{target_id}: {twice} events delivered again after the node died"
        print(f"node kill: answers {dict(load.answers)}, failovers {load.failovers}")
        # Back on its ports and store, the node catches up with the stream.
        await node.astart()
        await wait_for(
            lambda: replicas_current(nats_cluster, stream),
            timeout_s=60,
            what="the restarted node to catch up",
        )
        for router in routers:
            assert router.proc is not None
            assert await terminate(router.proc) == 0
    finally:
        for router in routers:
            await reap(router.proc)
        for n in nats_cluster.nodes:
            if not n.running:
                await n.astart()


@pytest.mark.timeout(180)
async def test_a_router_waits_for_a_nats_node_still_joining_then_takes_events(
    tmp_path: Path,
) -> None:
    """A router started beside NATS (one compose file, one boot) found its streams
    unplaceable while a node had not joined yet ("no suitable peers for placement") and
    exited 1 at once. It now says what it waits for and tries again until start_timeout_s:
    once the node has joined it starts, and what it takes is delivered. Four nodes, three
    started, four replicas: the fourth node's joining is what the router waits for."""
    cluster = NatsCluster(tmp_path / "nats", size=4)
    late = cluster.nodes[-1]
    routers: list[Router] = []
    starting: asyncio.Task[tuple[list[Router], str]] | None = None
    try:
        for node in cluster.nodes[:-1]:
            node.spawn()
        for node in cluster.nodes[:-1]:
            await asyncio.to_thread(node.wait_ready)
        starting = asyncio.create_task(
            start_routers(tmp_path, cluster.urls, count=1, replicas=4, start_timeout_s=120)
        )
        log = tmp_path / "r1" / "router.log"

        def waiting() -> bool:
            if starting.done():
                raise AssertionError(f"with a node yet to join: {starting.exception() or 'up'}")
            return log.exists() and b"cannot place" in log.read_bytes()

        await wait_for(waiting, timeout_s=60, what="the router to say it waits for the node")
        await late.astart()
        routers, _ = await starting
        ids = [f"after-the-join-{i}" for i in range(EVENTS_PER_POST)]
        async with aiohttp.ClientSession() as session:
            body = orjson.dumps([make_event(id=i) for i in ids])
            await Load(routers)._post(session, body, ids, 0)
        await wait_for(lambda: books_settled(routers, len(ids)), timeout_s=60, what="delivered")
        for target_id in TARGETS:
            assert set(delivered(routers, target_id)) == set(ids), target_id
        assert routers[0].proc is not None
        assert await terminate(routers[0].proc) == 0
    finally:
        if starting is not None and not starting.done():
            starting.cancel()  # serve() reaps a daemon it was still waiting for
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        for router in routers:
            await reap(router.proc)
        cluster.stop()
