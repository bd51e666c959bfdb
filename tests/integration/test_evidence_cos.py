"""Evidence over a bucket: the cloud_object_storage target chains every line of its objects,
and `event-router verify cos://TARGET` checks the chain across the objects of a real S3 store
(moto's server mode on loopback), naming `object-key:line` at the first break.
"""

from __future__ import annotations

import asyncio
import gzip
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web

from router.config import parse_config
from router.daemon import Daemon
from router.evidence.canonical import split_line
from router.evidence.checkpoint import is_checkpoint
from router.evidence.keys import generate
from router.evidence.receipt import find_in_letters
from tests.conftest import StartDaemon
from tests.fakes import ACCOUNT, incompressible, make_event, wait_for
from tests.helpers import (
    assert_books_balance,
    drained,
    everything_to,
    free_port,
    post,
    reap,
    run_cli,
    serve,
    settled,
    terminate,
)
from tests.integration.test_cos import (
    BUCKET,
    OTHER_ACCOUNT,
    Front,
    cos_target,
    front_factory,
    in_account,
    s3,
    s3_server,
    secret,
)
from tests.peers.s3 import S3Server

pytestmark = pytest.mark.peers
__all__ = ["front_factory", "s3", "s3_server", "secret"]  # fixtures used by name

EN_DASH = "\u2013"


async def bodies(s3: Any) -> dict[str, bytes]:
    """Every object of the bucket as stored (gzip), by key, in key order."""
    found: dict[str, bytes] = {}
    listed = await s3.list_objects_v2(Bucket=BUCKET)
    for item in listed.get("Contents", []):
        got = await s3.get_object(Bucket=BUCKET, Key=item["Key"])
        async with got["Body"] as stream:
            found[item["Key"]] = await stream.read()
    return found


def lines_of(body: bytes) -> list[bytes]:
    return gzip.decompress(body).splitlines()


def seqs(body: bytes) -> list[int]:
    """The places of an object's chained lines."""
    out = []
    for line in lines_of(body):
        found = None if is_checkpoint(line) else split_line(line)
        if found is not None:
            out.append(found[1].seq)
    return out


async def put(s3: Any, key: str, lines: list[bytes]) -> None:
    body = gzip.compress(b"".join(line + b"\n" for line in lines))
    await s3.put_object(Bucket=BUCKET, Key=key, Body=body, ContentEncoding="gzip")


async def write_bucket(
    start_daemon: StartDaemon, s3_server: S3Server, tmp_path: Path, *, posts: int = 6
) -> tuple[Daemon, Path, Path]:
    """A daemon with one chained, signed COS target wrote `posts` batches of 10 events of two
    accounts, then stopped: returns it, its config file and the public key."""
    key, public = generate(tmp_path / "signing.key")
    daemon = await start_daemon(
        {
            "targets": [cos_target(s3_server.endpoint_url)],
            "routes": everything_to("cos"),
            "evidence": {"signing_key_file": str(key), "checkpoint_every_events": 15},
        }
    )
    for n in range(posts):
        batch = [
            in_account(OTHER_ACCOUNT if i % 3 == 0 else ACCOUNT, id=f"e-{n}-{i}") for i in range(10)
        ]
        assert (await post(daemon, batch))[0] == 202
        await wait_for(lambda: settled(daemon), timeout_s=20, what="delivery")
    assert_books_balance(daemon)
    await daemon.stop()
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(daemon.source.data))
    return daemon, config, public


async def verify_bucket(config: Path, public: Path, *extra: str) -> tuple[int, str, str]:
    return await run_cli(
        "verify", "cos://cos", "--config", str(config), "--public-key", str(public), *extra
    )


async def test_every_object_line_is_chained_and_the_bucket_verifies(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any, tmp_path: Path
) -> None:
    daemon, config, public = await write_bucket(start_daemon, s3_server, tmp_path)
    found = await bodies(s3)
    places = sorted(seq for body in found.values() for seq in seqs(body))
    assert places == list(range(1, 61)), "every event has one place, 1 to 60"
    checkpoints = [k for k, body in found.items() if all(is_checkpoint(x) for x in lines_of(body))]
    assert checkpoints, "checkpoints are objects of their own"
    for key, body in found.items():
        for line in lines_of(body):
            assert is_checkpoint(line) or b',"_chain":{"seq":' in line, (key, line)
    evidence = daemon.status()["targets"]["cos"]["evidence"]
    assert evidence["chain_seq"] == evidence["checkpoint_seq"] == 60

    code, out, err = await verify_bucket(config, public)
    assert code == 0, out + err
    assert out.startswith(
        "OK: 60 events and 0 dead letters verified (chain head seq 60, 0 re-sent)"
    )
    assert "signature-checked" in out and err == ""


TAMPERINGS = ["object deleted", "line edited in a gzip object", "object replaced by an older copy"]


@pytest.mark.parametrize("tampering", TAMPERINGS)
async def test_tampering_with_the_bucket_is_reported_at_its_place(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any, tmp_path: Path, tampering: str
) -> None:
    _, config, public = await write_bucket(start_daemon, s3_server, tmp_path)
    found = await bodies(s3)
    # Event objects in seq order; one in the middle, with its neighbours in the chain.
    events = sorted((k for k in found if seqs(found[k])), key=lambda k: seqs(found[k])[0])
    assert len(events) >= 6
    before, victim, after = events[2], events[3], events[4]
    first, last = seqs(found[victim])[0], seqs(found[victim])[-1]
    before_line = len(lines_of(found[before]))
    if tampering == "object deleted":
        await s3.delete_object(Bucket=BUCKET, Key=victim)
        expected = (
            f"gap: seq {first}{EN_DASH}{last} missing between {before}:{before_line} and "
            f"{after}:1 (dead letters: give their file too)"
        )
    elif tampering == "line edited in a gzip object":
        lines = lines_of(found[victim])
        lines[1] = lines[1].replace(b'"id":"e-', b'"id":"x-', 1)
        await put(s3, victim, lines)
        expected = f"{victim}:2: hash does not match the chain (the line was changed)"
    else:
        await put(s3, victim, lines_of(found[before]))  # an older object's copy over it
        before_first, before_last = seqs(found[before])[0], seqs(found[before])[-1]
        expected = (
            f"gap: seq {first}{EN_DASH}{last} missing between {before}:{before_line} and "
            f"{after}:1 (dead letters: give their file too); {victim} repeats seq "
            f"{before_first}{EN_DASH}{before_last} of {before}: replaced by a copy of it?"
        )
    code, out, _ = await verify_bucket(config, public)
    assert code == 1, out
    assert out.splitlines()[0] == f"BROKEN: {expected}"
    assert "before the break:" in out


async def test_a_retried_put_keeps_its_places_and_the_bucket_verifies(
    start_daemon: StartDaemon, front_factory: Any, s3: Any, tmp_path: Path
) -> None:
    front = await front_factory([(503, "SlowDown"), (500, "InternalError"), None])
    daemon = await start_daemon(
        {"targets": [cos_target(front.url)], "routes": everything_to("cos")}
    )
    await post(daemon, [make_event(id=f"t-{i}") for i in range(10)])
    await wait_for(lambda: settled(daemon), timeout_s=20, what="everything settled")
    await daemon.stop()
    found = await bodies(s3)
    event_objects = [body for body in found.values() if seqs(body)]
    assert [seqs(body) for body in event_objects] == [list(range(1, 11))]
    row = daemon.status()["targets"]["cos"]
    assert (row["delivered"], row["retries"]) == (10, 2)
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(daemon.source.data))
    code, out, err = await run_cli("verify", "cos://cos", "--config", str(config))
    assert code == 0, out + err
    assert out.startswith("OK: 10 events and 0 dead letters verified (chain head seq 10")


async def test_the_chain_goes_on_after_kill_9_from_the_head_the_journal_kept(
    s3_server: S3Server, s3: Any, tmp_path: Path
) -> None:
    """A real daemon process writes objects and is killed with kill -9 (no shutdown
    checkpoint); the next one continues the chain from the head the journal kept after each
    write, and the bucket verifies as one chain."""
    port = free_port()
    key, public = generate(tmp_path / "signing.key")
    target = cos_target(s3_server.endpoint_url)
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"path": str(tmp_path / "var")},
        "targets": [target],
        "routes": everything_to("cos"),
        # Checkpoints only at the first write and at shutdown: the head is the journal's.
        "evidence": {"signing_key_file": str(key), "checkpoint_every_s": 3600},
    }
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = None
    try:
        proc = await serve(config, port)
        for n in range(3):
            assert (await post_events(port, [f"a-{n}-{i}" for i in range(5)])) == 202
            await wait_for(lambda: drained(port), what="delivery")
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        proc = await serve(config, port)
        assert (await post_events(port, [f"b-{i}" for i in range(5)])) == 202
        await wait_for(lambda: drained(port), what="delivery after the restart")
        assert await terminate(proc) == 0
    finally:
        await reap(proc)
    places = sorted(seq for body in (await bodies(s3)).values() for seq in seqs(body))
    assert places == list(range(1, 21)), "one chain, no place twice, none missing"
    code, out, err = await verify_bucket(config, public)
    assert code == 0, out + err
    assert out.startswith(
        "OK: 20 events and 0 dead letters verified (chain head seq 20, 0 re-sent)"
    )


async def post_events(port: int, ids: list[str]) -> int:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/v1/events",
            data=orjson.dumps([make_event(id=i) for i in ids]),
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        return resp.status


async def test_the_newest_object_deleted_after_the_last_checkpoint_fails_given_the_head(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any, tmp_path: Path
) -> None:
    """No checkpoint covers the newest objects yet: deleting them leaves a bucket whose chain
    is whole as far as it goes, and only the head the daemon reports shows it stops short."""
    daemon = await start_daemon(
        {
            "targets": [cos_target(s3_server.endpoint_url)],
            "routes": everything_to("cos"),
            "evidence": {"checkpoint_every_events": 1000, "checkpoint_every_s": 3600},
        }
    )
    for n in range(3):
        await post(daemon, [make_event(id=f"n-{n}-{i}") for i in range(4)])
        await wait_for(lambda: settled(daemon), timeout_s=20, what="delivery")
    evidence = daemon.status()["targets"]["cos"]["evidence"]
    assert (evidence["chain_seq"], evidence["checkpoint_seq"]) == (12, 0)
    head = f"{evidence['chain_seq']}:{evidence['chain_hash']}"
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(daemon.source.data))
    verify = ("verify", "cos://cos", "--config", str(config), "--expect-head", head)
    code, out, err = await run_cli(*verify)
    assert code == 0, out + err
    assert "no checkpoint: nothing vouches for the chain's head" in err

    found = await bodies(s3)
    newest = max(found, key=lambda key: seqs(found[key])[-1])
    assert seqs(found[newest]) == [9, 10, 11, 12]
    await s3.delete_object(Bucket=BUCKET, Key=newest)
    code, out, _ = await run_cli(*verify[:4])
    assert code == 0, "without the head, nothing shows the objects are gone"
    code, out, _ = await run_cli(*verify)
    assert code == 1
    [before] = [key for key, body in found.items() if seqs(body) and seqs(body)[-1] == 8]
    assert out.splitlines()[0] == (
        f"BROKEN: seq 9{EN_DASH}12 missing at the end: the chain ends at seq 8 ({before}:4) "
        "but the daemon's head is seq 12 (places cut off the end)"
    )


async def test_the_chain_survives_a_reload_that_changes_the_cos_target(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any, tmp_path: Path
) -> None:
    """A reload that changes the target stops it (with a checkpoint object) and starts the new
    one on the same chain: the bucket, with the reload's own audit event, is one chain."""
    key, public = generate(tmp_path / "signing.key")
    daemon = await start_daemon(
        {
            "targets": [cos_target(s3_server.endpoint_url)],
            "routes": everything_to("cos"),
            "evidence": {"signing_key_file": str(key)},
        }
    )
    await post(daemon, [make_event(id=f"before-{i}") for i in range(5)])
    await wait_for(lambda: settled(daemon), timeout_s=20, what="delivery")
    data = daemon.source.data
    changed = cos_target(s3_server.endpoint_url, region="eu-de")
    await daemon.reload(parse_config({**data, "targets": [changed]}))
    await post(daemon, [make_event(id=f"after-{i}") for i in range(5)])
    await wait_for(lambda: settled(daemon), timeout_s=20, what="delivery after the reload")
    row = daemon.status()["targets"]["cos"]
    assert (row["received"], row["delivered"]) == (11, 11), "10 events and the reload's own"
    await daemon.stop()
    found = await bodies(s3)
    assert sorted(seq for body in found.values() for seq in seqs(body)) == list(range(1, 12))
    assert any(key.split("/")[1] == "eu-de" for key in found), "the new target wrote"
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({**data, "targets": [changed]}))
    code, out, err = await verify_bucket(config, public)
    assert code == 0, out + err
    assert out.startswith(
        "OK: 11 events and 0 dead letters verified (chain head seq 11, 0 re-sent)"
    )


# -- kill -9 between a PUT's success and the journal's note of the head --------------------------


@dataclass
class HoldingFront(Front):
    """The proxy in front of the store, which (while `holding`) passes a PUT to the store and
    then holds its answer: the object is in the bucket, the daemon does not know it yet."""

    holding: bool = False
    landed: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def _handle(self, request: web.Request) -> web.Response:
        # Whether to hold is decided when the PUT arrives: a PUT already on its way (the
        # start-up test write, seen in the bucket before its answer came back) is not held.
        hold = request.method == "PUT" and self.holding
        answer = await super()._handle(request)
        if hold:
            self.landed.append(request.path)
            await self.release.wait()
        return answer


@pytest.mark.parametrize("validate", [True, False], ids=["test-write-first", "same-batch"])
async def test_kill_9_between_a_put_and_the_head_resends_the_same_object_first(
    s3_server: S3Server, s3: Any, tmp_path: Path, validate: bool
) -> None:
    """A daemon process PUTs an object, the store keeps it, and the daemon is killed with
    kill -9 before it hears the answer (so before the journal keeps the new head). With
    start-up validation, the next daemon's test write would take the first of those places
    (with other contents): instead the object planned before the PUT is sent again first, byte
    for byte under its name, and the batch's events follow at new places (re-sent). Without
    it, the same batch sent again is that object itself: the same name, no event twice."""
    front = await HoldingFront(f"http://127.0.0.1:{s3_server.store.port}", []).start()
    port = free_port()
    key, public = generate(tmp_path / "signing.key")
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"path": str(tmp_path / "var")},
        "startup": {"validate_targets": validate},
        "targets": [cos_target(front.url)],
        "routes": everything_to("cos"),
        "evidence": {"signing_key_file": str(key), "checkpoint_every_s": 3600},
    }
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = None
    try:
        proc = await serve(config, port)

        async def tested() -> bool:
            return any(seqs(body) == [1] for body in (await bodies(s3)).values())

        if validate:
            await wait_for(tested, what="the start-up test write")
        front.holding = True
        assert (await post_events(port, [f"held-{i}" for i in range(6)])) == 202
        await wait_for(lambda: bool(front.landed), what="the PUT to reach the store")
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        [held] = front.landed
        stored = (await bodies(s3))[held.split("/", 2)[2]]
        first = 2 if validate else 1  # after the start-up test write's place
        assert seqs(stored) == list(range(first, first + 6))
        front.holding = False
        front.release.set()

        proc = await serve(config, port)
        await wait_for(lambda: drained(port), timeout_s=20, what="the re-sent batch")
        assert await terminate(proc) == 0
    finally:
        front.release.set()
        await reap(proc)
        await front.stop()
    found = await bodies(s3)
    assert found[held.split("/", 2)[2]] == stored, "the held object, sent again, is the same"
    config.write_text(yaml.safe_dump({**data, "targets": [cos_target(s3_server.endpoint_url)]}))
    code, out, err = await verify_bucket(config, public)
    assert code == 0, out + err
    if validate:
        summary = "OK: 14 events and 0 dead letters verified (chain head seq 14, 6 re-sent)"
    else:
        summary = "OK: 6 events and 0 dead letters verified (chain head seq 6, 0 re-sent)"
        assert [key for key, body in found.items() if seqs(body)] == [held.split("/", 2)[2]]
    assert out.startswith(summary), out


def one_try(url: str, *, timeout_s: float) -> dict[str, Any]:
    """The COS target in objects of 10 events, each given one attempt (retry.max_attempts 1):
    an object that fails is given up at once, as the tests of given-up objects need."""
    return cos_target(url, timeout_s=timeout_s) | {
        "batch": {"max_events": 10},
        "retry": {"max_attempts": 1, "initial_backoff_s": 0.01},
    }


def signed_to_cos(target: dict[str, Any], key: Path, **extra: Any) -> dict[str, Any]:
    """A config routing every event to `target` (id `cos`), chained and signed with `key`,
    checkpoints only at the first write and at shutdown."""
    return {
        "targets": [target],
        "routes": everything_to("cos"),
        "evidence": {"signing_key_file": str(key), "checkpoint_every_s": 3600},
        **extra,
    }


async def shed_while_held(
    start_daemon: StartDaemon,
    front: HoldingFront,
    tmp_path: Path,
    target: dict[str, Any],
    key: Path,
) -> Daemon:
    """A daemon with the COS target and a small journal that sheds when full: the front
    holds the answer to the PUT of its first object (events held-0 ... held-9), and 2,000
    events more fill the journal, so its oldest are dead-lettered meanwhile (within 30 s)."""
    daemon = await start_daemon(
        signed_to_cos(
            target,
            key,
            storage={
                "path": str(tmp_path / "var"),
                "max_bytes": 1024 * 1024,
                "when_full": "drop_oldest_per_target",
            },
        )
    )
    front.holding = True
    assert (await post(daemon, [make_event(id=f"held-{i}") for i in range(10)]))[0] == 202
    await wait_for(lambda: bool(front.landed), what="the PUT to reach the store")

    async def fill() -> None:
        for n in range(100):
            batch = [make_event(id=f"f{n}-{i}", message=incompressible(1500)) for i in range(20)]
            assert (await post(daemon, batch))[0] == 202

    await asyncio.wait_for(fill(), timeout=30)
    assert daemon.status()["ingest"]["dropped_buffer_full"] > 0
    return daemon


async def release_and_stop(daemon: Daemon, front: HoldingFront) -> None:
    """Let the held PUT's answer through, wait until everything settled (the books balance),
    and stop the daemon."""
    front.holding = False
    front.release.set()
    await wait_for(lambda: settled(daemon), timeout_s=60, what="everything settled")
    assert_books_balance(daemon)
    await daemon.stop()


@pytest.mark.parametrize("answer", ["stored", "503"])
async def test_dead_letters_do_not_wait_for_a_put_in_flight_and_take_places_after_it(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any, tmp_path: Path, answer: str
) -> None:
    """A full journal sheds the COS target's oldest events as dead letters while the store
    holds the answer to its PUT (timeout_s 120). The letters take their places after the
    object's, without waiting for its answer, so ingest goes on; once the answer comes (the
    object stored, or a 503 and a retry, which PUTs the very same bytes at the same places)
    the bucket and the dead-letter file verify as one chain."""
    script: list[tuple[int, str] | None] = [(503, "SlowDown")] if answer == "503" else []
    front = await HoldingFront(f"http://127.0.0.1:{s3_server.store.port}", script).start()
    key, public = generate(tmp_path / "signing.key")
    target = cos_target(front.url, timeout_s=120) | {"batch": {"max_events": 10}}
    try:
        # Before: the shedding waited for the chain's lock, held for the whole PUT.
        daemon = await shed_while_held(start_daemon, front, tmp_path, target, key)
        assert len(front.landed) == 1 and not front.release.is_set(), "the PUT is still held"
        await release_and_stop(daemon, front)
    finally:
        front.release.set()
        await front.stop()
    found = await bodies(s3)
    held = [seqs(body) for body in found.values() if seqs(body)[:1] == [1]]
    assert held == [list(range(1, 11))], "the held object kept places 1-10"
    first_md5 = front.headers[[h.get("Content-MD5") is not None for h in front.headers].index(True)]
    attempts = [h for h in front.headers if h.get("Content-MD5") == first_md5["Content-MD5"]]
    assert len(attempts) == (2 if answer == "503" else 1), "a retry PUTs the same bytes"
    config = tmp_path / "router.yaml"
    data = {**daemon.source.data, "targets": [cos_target(s3_server.endpoint_url)]}
    config.write_text(yaml.safe_dump(data))
    code, out, err = await verify_bucket(config, public)
    assert code == 0, out + err
    row = daemon.status()["targets"]["cos"]
    assert out.startswith(
        f"OK: {row['delivered']} events and {row['dead_lettered']} dead letters verified"
    ), out


async def test_an_object_given_up_after_a_later_dead_letter_leaves_no_gap(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any, tmp_path: Path
) -> None:
    """The COS target's object takes places 1-10 and its PUT is held; meanwhile a full journal
    sheds events as dead letters, which take the places after it. Then the store answers 503
    and the object is given up (retry.max_attempts 1): its ten events are dead-lettered AT its
    places 1-10 (the letters carry the object's chained lines), not at new places, so the
    bucket and the dead-letter file still hold every place: verify passes, and its counts are
    the books' (received = delivered + dead_lettered + pending)."""
    script: list[tuple[int, str] | None] = [(503, "SlowDown")]
    front = await HoldingFront(f"http://127.0.0.1:{s3_server.store.port}", script).start()
    key, public = generate(tmp_path / "signing.key")
    target = one_try(front.url, timeout_s=120)
    try:
        daemon = await shed_while_held(start_daemon, front, tmp_path, target, key)
        await release_and_stop(daemon, front)
    finally:
        front.release.set()
        await front.stop()
    found = await bodies(s3)
    assert not [body for body in found.values() if seqs(body)[:1] == [1]], "never stored"
    letters = tmp_path / "var" / "deadletter" / "cos.ndjson"
    given_up = [
        orjson.loads(line) for line in letters.read_bytes().splitlines() if b"held-" in line
    ]
    assert [letter["event"]["id"] for letter in given_up] == [f"held-{i}" for i in range(10)]
    assert {letter["reason"] for letter in given_up} == {"retries_exhausted"}
    held = [split_line(letter["object_line"].encode()) for letter in given_up]
    assert [found[1].seq for found in held if found] == list(range(1, 11)), "at its places"
    assert find_in_letters(letters, "held-3") == {
        "state": "dead_lettered",
        "reason": "retries_exhausted",
        "message": given_up[3]["message"],
        "seq": 4,
    }, "GET /v1/receipts/{id} names the place it stands at"
    config = tmp_path / "router.yaml"
    data = {**daemon.source.data, "targets": [cos_target(s3_server.endpoint_url)]}
    config.write_text(yaml.safe_dump(data))
    code, out, err = await verify_bucket(config, public)
    assert code == 0, out + err
    row = daemon.status()["targets"]["cos"]
    assert row["received"] == row["delivered"] + row["dead_lettered"] + row["pending"]
    assert row["pending"] == 0
    assert out.startswith(
        f"OK: {row['delivered']} events and {row['dead_lettered']} dead letters verified"
    ), out


async def test_a_put_that_timed_out_but_landed_is_counted_alike_by_the_books_and_verify(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any, tmp_path: Path
) -> None:
    """The store keeps an object and its answer comes after the target's timeout_s: the PUT
    timed out, the one attempt allowed (retry.max_attempts 1) was spent, and the ten events
    were dead-lettered, while the bucket held them. `verify` counted them as events and the
    books as dead letters. The target now asks the store (HEAD) whether an object whose PUT
    had no answer is there with its bytes (its ETag is the body's MD5): it is, so the events
    are delivered, once, in the books and in verify alike."""
    front = await HoldingFront(f"http://127.0.0.1:{s3_server.store.port}", []).start()
    key, public = generate(tmp_path / "signing.key")
    try:
        daemon = await start_daemon(signed_to_cos(one_try(front.url, timeout_s=1), key))
        front.holding = True
        assert (await post(daemon, [make_event(id=f"late-{i}") for i in range(10)]))[0] == 202
        await wait_for(lambda: settled(daemon), timeout_s=30, what="the batch settled")
        assert len(front.landed) == 1, "the PUT reached the store, its answer held"
        assert_books_balance(daemon)
        front.holding = False
        front.release.set()
        await daemon.stop()
    finally:
        front.release.set()
        await front.stop()
    found = await bodies(s3)
    assert [seqs(body) for body in found.values() if seqs(body)[:1] == [1]] == [
        list(range(1, 11))
    ], "the object is in the bucket"
    row = daemon.status()["targets"]["cos"]
    config = tmp_path / "router.yaml"
    data = {**daemon.source.data, "targets": [cos_target(s3_server.endpoint_url)]}
    config.write_text(yaml.safe_dump(data))
    code, out, err = await verify_bucket(config, public)
    assert code == 0, out + err
    assert out.startswith(
        f"OK: {row['delivered']} events and {row['dead_lettered']} dead letters verified"
    ), (out, row)
    assert (row["delivered"], row["dead_lettered"]) == (10, 0)


@dataclass
class LateFront(Front):
    """The proxy in front of the store, which (while `holding`) keeps a PUT until `release`
    before it passes it on: the store writes the object after the daemon gave up on it."""

    holding: bool = False
    arrived: list[str] = field(default_factory=list)
    landed: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[web.Response]] = field(default_factory=set)

    async def _handle(self, request: web.Request) -> web.Response:
        if not (request.method == "PUT" and self.holding):
            return await super()._handle(request)
        self.arrived.append(request.path)
        await request.read()  # the whole body, kept by the request for the pass below
        # Passed on in a task of its own: the daemon hangs up first, which ends this handler.
        task = asyncio.create_task(self._late(request))
        self._tasks.add(task)
        return await asyncio.shield(task)

    async def _late(self, request: web.Request) -> web.Response:
        await self.release.wait()
        answer = await super()._handle(request)
        self.landed.append(request.path)
        return answer


async def test_an_object_stored_after_its_events_were_given_up_is_counted_as_the_books_do(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any, tmp_path: Path
) -> None:
    """A PUT gets no answer, its HEAD finds nothing, the one attempt allowed is spent and the
    events are dead-lettered; then the store writes the object after all. The object's places
    were given back, so the letters took them with lines of their own and the landed object
    held the same places with others: verify said BROKEN. A PUT without an answer now keeps
    its places (its letters carry its lines), and verify counts a letter standing at a landed
    object's line as the books do, a dead letter, and says so."""
    front = await LateFront(f"http://127.0.0.1:{s3_server.store.port}", []).start()
    key, public = generate(tmp_path / "signing.key")
    try:
        daemon = await start_daemon(signed_to_cos(one_try(front.url, timeout_s=1), key))
        front.holding = True
        assert (await post(daemon, [make_event(id=f"late-{i}") for i in range(10)]))[0] == 202
        await wait_for(lambda: settled(daemon), timeout_s=30, what="the batch given up")
        assert len(front.arrived) == 1 and not front.landed
        front.holding = False
        front.release.set()
        await wait_for(lambda: bool(front.landed), timeout_s=30, what="the late object")
        assert (await post(daemon, [make_event(id=f"next-{i}") for i in range(10)]))[0] == 202
        await wait_for(lambda: settled(daemon), timeout_s=30, what="the next batch")
        assert_books_balance(daemon)
        await daemon.stop()
    finally:
        front.release.set()
        await front.stop()
    found = await bodies(s3)
    assert sorted(seqs(body) for body in found.values() if seqs(body)) == [
        list(range(1, 11)),
        list(range(11, 21)),
    ], "the late object at places 1-10, the next batch after it"
    row = daemon.status()["targets"]["cos"]
    assert (row["delivered"], row["dead_lettered"]) == (10, 10)
    config = tmp_path / "router.yaml"
    data = {**daemon.source.data, "targets": [cos_target(s3_server.endpoint_url)]}
    config.write_text(yaml.safe_dump(data))
    code, out, err = await verify_bucket(config, public)
    assert code == 0, out + err
    assert out.startswith("OK: 10 events and 10 dead letters verified"), out
    assert "10 dead-lettered events are in the bucket too" in out + err, out + err
