"""Evidence with storage.backend jetstream, against a real nats-server on loopback.

Each router chains its own file archive (a chain per router: its chain id, kept in
`<storage.path>/chain-id`), and keeps each chain's head, last checkpoint and plan in the KV
bucket `<stream>_CHAIN` under `<chain id>.<target>`, written with compare-and-set on the
key's revision: a router that lost the key (another process took the same chain) has its writes
refused (fencing) instead of forking the record. Two router processes, one killed with -9 under
load and started again: every archive verifies, every acknowledged event is in a chain, and
the books reconcile.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
import pytest
import yaml

from router.config import StorageConfig, parse_config
from router.daemon import Daemon
from router.errors import StorageUnavailableError
from router.journal import ChainFencedError
from router.journal.jetstream import CHAIN_ID_FILE, JetStreamJournal, chain_key
from router.server.api import ConfigSource
from tests.conftest import FAST_DELIVERY
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import (
    assert_books_balance,
    everything_to,
    file_target,
    free_port,
    post,
    reap,
    run_cli,
    serve,
    terminate,
)
from tests.peers.nats import NatsServer

pytestmark = pytest.mark.peers

_streams = itertools.count(1)
_ids = itertools.count(1)


def storage(path: Path, servers: list[str], stream: str, **settings: Any) -> dict[str, Any]:
    settings.setdefault("max_bytes", 16 * 1024 * 1024)
    return {
        "path": str(path),
        "backend": "jetstream",
        "jetstream": {"servers": servers, "stream": stream, **settings},
    }


def storage_config(path: Path, servers: list[str], stream: str) -> StorageConfig:
    return parse_config({"storage": storage(path, servers, stream)}).storage


async def kv_record(server: NatsServer, stream: str, chain_id: str, target_id: str) -> Any:
    """The chain's record as the bucket holds it (None: no record)."""
    nc = await nats.connect(server.url)
    try:
        kv = await nc.jetstream().key_value(f"{stream}_CHAIN")
        try:
            entry = await kv.get(chain_key(chain_id, target_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        return orjson.loads(entry.value or b"{}")
    finally:
        await nc.close()


@pytest.fixture
async def start_router(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[Any]:
    """In-process daemons on one fresh stream, evidence on: each its own storage.path, port
    and archive (each router's own config, as on machines of their own)."""
    stream = f"E{next(_streams)}"
    daemons: list[Daemon] = []

    async def start(
        name: str, *, workers: int = 1, also: tuple[dict[str, Any], ...] = (), **evidence: Any
    ) -> Daemon:
        archive = tmp_path / name / "archive.ndjson"
        data = {
            "server": {"host": "127.0.0.1", "port": 0, "workers": workers},
            "storage": storage(
                tmp_path / name / "var", [nats_server.url], stream, share_config=False
            ),
            "delivery": FAST_DELIVERY,
            "shutdown": {"drain_timeout_s": 5},
            "startup": {"validate_targets": False},
            "evidence": {"enabled": True, "checkpoint_every_events": 25, **evidence},
            "targets": [file_target("archive", archive), *also],
            "routes": everything_to("archive", *(target["id"] for target in also)),
        }
        daemon = Daemon(parse_config(data), ConfigSource(None, data))
        try:
            await daemon.start()
        except BaseException:
            await daemon.stop()  # as `serve` does after a start that failed
            raise
        daemons.append(daemon)
        return daemon

    start.stream = stream  # type: ignore[attr-defined]
    yield start
    for daemon in daemons:
        if daemon.ready:
            await daemon.stop()


def event() -> dict[str, Any]:
    return make_event(id=f"jse-{next(_ids)}")


async def verify_ok(*args: str) -> str:
    code, out, err = await run_cli("verify", *args)
    assert code == 0, (out, err)
    assert out.startswith("OK: "), out
    return out


def delivered(daemon: Daemon, count: int) -> bool:
    """The books, read back from the streams, show `count` events received and delivered."""
    row = daemon.status()["targets"]["archive"]
    return (row["received"], row["delivered"], row["pending"]) == (count, count, 0)


def chain_of(daemon: Daemon) -> dict[str, Any]:
    return dict(daemon.status()["targets"]["archive"]["evidence"])


async def test_each_router_chains_its_own_file_and_keeps_the_head_in_the_chain_bucket(
    start_router: Any, tmp_path: Path, nats_server: NatsServer
) -> None:
    first, second = await start_router("r1"), await start_router("r2")
    stream = start_router.stream
    ids = []
    for i in range(12):
        events = [event() for _ in range(10)]
        ids += [e["id"] for e in events]
        assert (await post(first if i % 2 else second, events))[0] == 202
    await wait_for(
        lambda: delivered(first, 120) and delivered(second, 120), timeout_s=30, what="delivery"
    )
    archives = [tmp_path / name / "archive.ndjson" for name in ("r1", "r2")]
    got = [e["id"] for archive in archives for e in read_ndjson(archive)]
    assert sorted(got) == sorted(ids), "each event once, in one router's chain"
    chain_ids = []
    for daemon, archive in zip((first, second), archives, strict=True):
        journal = daemon.journal
        assert isinstance(journal, JetStreamJournal)
        chain_ids.append(journal.chain_id)
        head = chain_of(daemon)
        record = await kv_record(nats_server, stream, journal.chain_id, "archive")
        assert (record["seq"], record["hash"]) == (head["chain_seq"], head["chain_hash"])
        key = chain_key(journal.chain_id, "archive")
        assert (head["chain_record"], head["chain_fenced"]) == (f"{stream}_CHAIN:{key}", False)
        await verify_ok(str(archive), "--expect-head", f"{head['chain_seq']}:{head['chain_hash']}")
        assert_books_balance(daemon)
    assert chain_ids[0] != chain_ids[1], "a chain per router"
    # A router started again goes on from its own head (its file and its record agree);
    # alone, so that it takes the next events.
    await first.stop()
    await second.stop()
    before = chain_of(first)["chain_seq"]
    again = await start_router("r1")
    assert again.journal.chain_id == chain_ids[0]  # type: ignore[union-attr]
    assert chain_of(again)["missing_at_start"] is None
    assert (await post(again, [event() for _ in range(5)]))[0] == 202
    await wait_for(lambda: delivered(again, 125), what="delivery after the restart")
    head = chain_of(again)
    assert head["chain_seq"] > before
    await again.stop()
    await verify_ok(str(archives[0]))


async def test_a_file_cut_while_the_router_was_down_is_found_against_the_buckets_head(
    start_router: Any, tmp_path: Path
) -> None:
    daemon = await start_router("r1")
    assert (await post(daemon, [event() for _ in range(10)]))[0] == 202
    await wait_for(lambda: delivered(daemon, 10), what="delivery")
    kept = chain_of(daemon)["chain_seq"]
    await daemon.stop()
    archive = tmp_path / "r1" / "archive.ndjson"
    lines = archive.read_bytes().splitlines(keepends=True)
    archive.write_bytes(b"".join(lines[:-3]))  # the last three lines cut off
    again = await start_router("r1")
    missing = chain_of(again)["missing_at_start"]
    assert missing is not None and missing["last_seq"] == kept, missing


async def test_a_stale_holder_of_a_chain_has_its_writes_refused(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    stream = f"E{next(_streams)}"
    old = JetStreamJournal(storage_config(tmp_path / "old", [nats_server.url], stream), ["t"])
    await old.open()
    try:
        assert await old.chain_heads() == {}
        await old.save_chain("t", 5, b"\x05" * 32, b"cp5", 1.0)
        # The same chain taken by another process (the router's storage.path copied onto a
        # second machine, or a router started again while the old one still runs).
        (tmp_path / "new").mkdir()
        shutil.copy(tmp_path / "old" / CHAIN_ID_FILE, tmp_path / "new" / CHAIN_ID_FILE)
        new = JetStreamJournal(storage_config(tmp_path / "new", [nats_server.url], stream), ["t"])
        await new.open()
        try:
            assert new.chain_id == old.chain_id
            assert await new.chain_heads() == {"t": (5, b"\x05" * 32, b"cp5", 1.0)}
            await new.save_chain("t", 7, b"\x07" * 32, b"cp7", 2.0)
            with pytest.raises(ChainFencedError):
                await old.save_chain("t", 6, b"\x06" * 32, b"cp6", 3.0)
            assert old.chains.where("t")["chain_fenced"]
            assert not new.chains.where("t")["chain_fenced"]
            with pytest.raises(ChainFencedError):  # and stays refused
                await old.save_planned("t", ("k", "n", 6, b"\x06" * 32, 8, b"", b"\x08", b"", ""))
            record = await kv_record(nats_server, stream, new.chain_id, "t")
            assert (record["seq"], record["holder"]) == (7, new.instance)
            # The holder's own writes go on: a plan, dropped, and the head after each ack.
            plan = ("key", "name", 7, b"\x07" * 32, 9, b"\x08" * 32, b"\x09" * 32, b"body", "md5")
            await new.save_planned("t", plan)
            assert await new.planned_objects() == {"t": plan}
            await new.drop_planned("t")
            assert await new.planned_objects() == {}
            assert (await new.chain_heads())["t"][:2] == (7, b"\x07" * 32)
        finally:
            await new.close()
    finally:
        await old.close()


async def test_every_router_issues_receipts_with_the_one_key_the_stream_shares(
    start_router: Any, tmp_path: Path
) -> None:
    # A router that had a key of its own before (its first start on SQLite, say) keeps its
    # receipts checkable by the others only if they all take one key: the first one shared.
    own = tmp_path / "r2" / "var"
    own.mkdir(parents=True)
    (own / "receipts.key").write_bytes(b"\x01" * 32)
    first = await start_router("r1", receipts=True)
    second = await start_router("r2", receipts=True)
    third = await start_router("r3", workers=2, receipts=True)  # worker processes issue them
    keys = {(tmp_path / name / "var" / "receipts.key").read_bytes() for name in ("r1", "r2", "r3")}
    assert len(keys) == 1 and b"\x01" * 32 not in keys
    receipts = []
    for daemon in (first, second, third):
        status, answer = await post(daemon, [event()])
        assert status == 202
        receipts.append(answer["results"][0]["receipt"])
    for daemon in (first, second, third):
        issuer = daemon.acceptor.receipts
        assert issuer is not None
        assert all(issuer.genuine(receipt) for receipt in receipts), "one key for all"
    forged = {**receipts[0], "digest": "sha256:" + "0" * 64}
    assert not first.acceptor.receipts.genuine(forged)  # type: ignore[union-attr]


async def test_a_receipt_lookup_finds_dead_letters_in_their_stream_whichever_router_wrote_them(
    start_router: Any, receiver_factory: Any, tmp_path: Path
) -> None:
    refuses = await receiver_factory([400])
    target = {"id": "refuses", "target_type": "http", "http_endpoint": {"url": refuses.url}}
    writer = await start_router("r1", also=(target,), receipts=True)
    asked = await start_router("r2", receipts=True)  # no such target: another router's letters
    assert (await post(writer, [make_event(id="lookup-1")]))[0] == 202
    await wait_for(
        lambda: writer.status()["targets"]["refuses"]["dead_lettered"] == 1, what="the letter"
    )
    for daemon in (writer, asked):
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{daemon.port}/v1/receipts/lookup-1") as resp,
        ):
            assert resp.status == 200, await resp.text()
            where = (await resp.json())["targets"]
        assert where["refuses"]["state"] == "dead_lettered"
        assert where["refuses"]["reason"] == "permanent_status"
    assert where == {"refuses": where["refuses"]}  # r2's own archive does not hold it


async def test_a_shared_receipt_key_that_is_not_a_key_stops_the_start(
    start_router: Any, nats_server: NatsServer
) -> None:
    await start_router("r1")  # makes the bucket (evidence on, no receipts)
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value(f"{start_router.stream}_CHAIN")
        await kv.put("receipt-key", b"short")
    finally:
        await nc.close()
    with pytest.raises(StorageUnavailableError, match="receipt-key of 5 bytes"):
        await start_router("r2", receipts=True)


# -- routers as processes: kill -9 under load ------------------------------------------------

EVENTS_PER_POST = 20


def write_config(workdir: Path, port: int, servers: list[str], stream: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "storage": storage(
                    workdir / "var", servers, stream, max_bytes=64 * 1024 * 1024, ack_wait_s=2
                ),
                "evidence": {"enabled": True, "checkpoint_every_events": 500},
                "startup": {"validate_targets": False},
                "shutdown": {"drain_timeout_s": 5},
                "delivery": {"batch": {"max_wait_s": 0.05, "max_events": 100}},
                "targets": [
                    {
                        "id": "archive",
                        "target_type": "file",
                        # The same text on every router (the config is shared), a directory
                        # of each router's own.
                        "file_endpoint": {"path": "${env:ROUTER_DIR}/archive.ndjson"},
                    }
                ],
                "routes": everything_to("archive"),
            }
        )
    )
    return config


async def start_process(workdir: Path, port: int) -> asyncio.subprocess.Process:
    log = os.open(workdir / "router.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        env = {**os.environ, "ROUTER_DIR": str(workdir)}
        return await serve(workdir / "router.yaml", port, stderr=log, env=env)
    finally:
        os.close(log)


async def status_of(port: int) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/v1/status") as resp,
    ):
        return dict(await resp.json())


async def produce(ports: list[int], acked: list[str], stop: asyncio.Event, worker: int) -> None:
    """Post batches round-robin; a router that does not answer gets the same batch (same ids)
    sent to the next one."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for n in itertools.count():
            if stop.is_set():
                return
            ids = [f"k{worker}-{n}-{i}" for i in range(EVENTS_PER_POST)]
            body = orjson.dumps([make_event(id=i) for i in ids])
            for k in range(len(ports) * 50):
                port = ports[(worker + n + k) % len(ports)]
                try:
                    async with session.post(
                        f"http://127.0.0.1:{port}/v1/events",
                        data=body,
                        headers={"Content-Type": "application/json"},
                    ) as resp:
                        if resp.status == 202:
                            acked.extend(ids)
                            break
                except (aiohttp.ClientError, ConnectionError):
                    continue
                await asyncio.sleep(0.1)  # a 503: retried after a pause
            else:
                raise AssertionError(f"no router took {ids[0]}..")


@pytest.mark.timeout(240)
async def test_kill_9_of_one_router_under_load_every_chain_verifies_and_the_books_reconcile(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    stream = f"K{next(_streams)}"
    names = ("r1", "r2")
    ports = [free_port() for _ in names]
    dirs = [tmp_path / name for name in names]
    for workdir, port in zip(dirs, ports, strict=True):
        write_config(workdir, port, [nats_server.url], stream)
    procs: list[asyncio.subprocess.Process | None] = [None, None]
    try:
        for i in range(2):
            procs[i] = await start_process(dirs[i], ports[i])
        acked: list[str] = []
        stop = asyncio.Event()
        producers = [
            asyncio.create_task(produce(ports, acked, stop, w), name=f"producer-{w}")
            for w in range(4)
        ]
        await wait_for(lambda: len(acked) >= 2000, timeout_s=60, what="load acknowledged")
        victim = procs[0]
        assert victim is not None
        os.kill(victim.pid, signal.SIGKILL)
        await victim.wait()
        at_kill = len(acked)
        await wait_for(lambda: len(acked) >= at_kill + 1000, timeout_s=60, what="the survivor")
        procs[0] = await start_process(dirs[0], ports[0])  # the victim again, same directory
        started_again = len(acked)
        await wait_for(lambda: len(acked) >= started_again + 500, timeout_s=60, what="both")
        stop.set()
        await asyncio.gather(*producers)
        total = len(set(acked))

        async def drained() -> bool:
            for port in ports:
                row = (await status_of(port))["targets"]["archive"]
                if (row["received"], row["pending"]) != (total, 0):
                    return False
            return True

        await wait_for(drained, timeout_s=90, what="both routers to drain the backlog")
        statuses = [await status_of(port) for port in ports]
        assert statuses[0]["targets"]["archive"]["evidence"]["missing_at_start"] is None
        for i in range(2):
            proc = procs[i]
            assert proc is not None
            assert await terminate(proc) == 0
        # Every archive verifies, up to the head its router's record in the bucket names.
        for workdir in dirs:
            chain_id = (workdir / "var" / CHAIN_ID_FILE).read_text().strip()
            record = await kv_record(nats_server, stream, chain_id, "archive")
            head = f"{record['seq']}:{record['hash']}"
            await verify_ok(str(workdir / "archive.ndjson"), "--expect-head", head)
        counts = Counter(e["id"] for d in dirs for e in read_ndjson(d / "archive.ndjson"))
        assert set(counts) == set(acked), "every acknowledged event is in a chain"
        # Only what the killed router wrote and never acknowledged is in both chains: at most
        # the batches it held (JetStream gave them to the other router after ack_wait_s).
        twice = sum(c - 1 for c in counts.values())
        assert twice <= 10 * 100, twice
        row = statuses[1]["targets"]["archive"]
        assert (row["received"], row["delivered"], row["dead_lettered"], row["pending"]) == (
            total,
            total,
            0,
            0,
        )
        print(f"kill -9 with evidence: {total} acked, {twice} written in both chains")
    finally:
        for proc in procs:
            await reap(proc)
