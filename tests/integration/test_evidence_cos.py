"""Evidence over a bucket: the cloud_object_storage target chains every line of its objects,
and `event-router verify cos://TARGET` checks the chain across the objects of a real S3 store
(moto's server mode on loopback), naming `object-key:line` at the first break.
"""

from __future__ import annotations

import gzip
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from router.config import parse_config
from router.daemon import Daemon
from router.evidence.canonical import split_line
from router.evidence.checkpoint import is_checkpoint
from router.evidence.keys import generate
from tests.conftest import StartDaemon
from tests.fakes import ACCOUNT, make_event, wait_for
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
