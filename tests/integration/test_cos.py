"""The cloud_object_storage target against a real S3-compatible store (moto's server mode on
loopback, behind a forwarder that can go down while the store keeps every object).

A scripted front (a real aiohttp proxy) stands between the daemon and the store where a test
needs S3's error answers (503 SlowDown, 500 InternalError) or to see the request headers.
"""

from __future__ import annotations

import asyncio
import gzip
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiobotocore.session
import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from botocore.config import Config

from router.cli import main
from router.config import parse_config
from router.events import Event
from router.iam import IamTokenSource
from router.targets.cos import CosEndpointConfig, CosTarget
from tests.conftest import StartDaemon
from tests.fake_cloud_logs import API_KEY, FakeCloudLogs
from tests.fakes import ACCOUNT, INSTANCE, make_event, read_ndjson, wait_for
from tests.integration.test_api import Client, loopback_auth
from tests.integration.test_delivery import assert_books_balance, everything_to, settled
from tests.integration.test_hostile_admin import dns
from tests.integration.test_ingest import post
from tests.integration.test_reload import with_base
from tests.peers.s3 import S3Server

pytestmark = pytest.mark.peers
__all__ = ["dns"]  # a fixture, used by name

OTHER_ACCOUNT = "f12375ed17a24ecfb1f32afcf47285f3"
COS_CRN = f"crn:v1:bluemix:public:cloud-object-storage:global:a/{ACCOUNT}:{INSTANCE}::"
BUCKET = "audit-archive"
# <account>/<region>/<YYYY-MM-DDTHH>/<YYYY-MM-DDTHH:MM>+<SS>_<uuid v7>.log
KEY = re.compile(
    r"^(?P<account>[0-9a-z-]+)/(?P<region>[a-z0-9-]+)/(?P<hour>\d{4}-\d\d-\d\dT\d\d)/"
    r"(?P=hour):\d\d\+\d\d_[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    r"\.log$"
)
PATIENT = {"max_attempts": 100_000, "max_age_s": 120}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
async def s3(s3_server: S3Server) -> AsyncIterator[Any]:
    """A fresh store with the bucket, and a client that reads it straight from moto."""
    s3_server.reset()
    if not s3_server.front.running:
        await s3_server.astart()
    s3_server.create_bucket(BUCKET)
    config = Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1})
    session = aiobotocore.session.get_session()
    kwargs = {
        **s3_server.client_config(),
        "endpoint_url": f"http://127.0.0.1:{s3_server.store.port}",
    }
    async with session.create_client("s3", config=config, **kwargs) as client:
        yield client


def cos_target(endpoint: str, *, target_id: str = "cos", **extra: Any) -> dict[str, Any]:
    return {
        "id": target_id,
        "target_type": "cloud_object_storage",
        "cos_endpoint": {
            "endpoint": endpoint,
            "target_crn": COS_CRN,
            "bucket": BUCKET,
            "hmac_keys": {
                "access_key_id": "test-hmac-access-key-id",
                "secret_access_key": "${env:COS_SECRET_ACCESS_KEY}",
            },
            **extra,
        },
        "batch": {"max_wait_s": 0.2},
        "retry": {"initial_backoff_s": 0.01, "max_backoff_s": 0.2, **PATIENT},
    }


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COS_SECRET_ACCESS_KEY", "test-hmac-secret-access-key")


async def objects(s3: Any) -> dict[str, list[dict[str, Any]]]:
    """Every object of the bucket: its key and its events (gunzipped NDJSON)."""
    found: dict[str, list[dict[str, Any]]] = {}
    listed = await s3.list_objects_v2(Bucket=BUCKET)
    for item in listed.get("Contents", []):
        got = await s3.get_object(Bucket=BUCKET, Key=item["Key"])
        async with got["Body"] as stream:
            body = await stream.read()
        assert got["ContentEncoding"] == "gzip"
        lines = gzip.decompress(body).decode().splitlines()
        found[item["Key"]] = [orjson.loads(line) for line in lines]
    return found


def ids(found: dict[str, list[dict[str, Any]]]) -> list[str]:
    return sorted(event["id"] for events in found.values() for event in events)


def in_account(account: str, **fields: Any) -> dict[str, Any]:
    event = make_event(**fields)
    event["logSourceCRN"] = event["logSourceCRN"].replace(f"a/{ACCOUNT}", f"a/{account}")
    return event


async def test_batches_are_gzip_ndjson_objects_per_account_named_as_atracker_names_them(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any
) -> None:
    daemon = await start_daemon(
        {
            "targets": [cos_target(s3_server.endpoint_url, region="eu-de")],
            "routes": everything_to("cos"),
        }
    )
    # Both accounts in every request, interleaved, so every batch holds both.
    sent = []
    for n in range(4):
        body = []
        for i in range(25):
            account = ACCOUNT if i % 2 else OTHER_ACCOUNT
            body.append(in_account(account, id=f"e-{n}-{i}"))
        sent += [e["id"] for e in body]
        status, _ = await post(daemon, body)
        assert status == 202
    await wait_for(lambda: settled(daemon), timeout_s=20, what="everything settled")

    found = await objects(s3)
    assert ids(found) == sorted(sent), "every event in exactly one object"
    for key, events in found.items():
        match = KEY.match(key)
        assert match, key
        assert match["region"] == "eu-de"
        accounts = {e["logSourceCRN"].split(":")[6] for e in events}
        assert accounts == {f"a/{match['account']}"}, "an object never mixes accounts"
    assert {KEY.match(k)["account"] for k in found} == {ACCOUNT, OTHER_ACCOUNT}  # type: ignore[index]
    # One write (one request the worker settles on its own) per object: a batch of both
    # accounts is two requests, each of one account's events, not two slices of the batch.
    assert daemon.target_stats["cos"].batches == len(found)
    row = daemon.status()["targets"]["cos"]
    assert (row["delivered"], row["dead_lettered"], row["retries"]) == (100, 0, 0)
    assert_books_balance(daemon)


@dataclass
class Front:
    """A real HTTP proxy in front of the store that answers the first PUTs from a script
    (`(status, S3 error code)`, or None to pass), and records each request's headers."""

    upstream: str
    script: list[tuple[int, str] | None]
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> Front:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # The bodies pass as sent: a gzip object is not a gzip-encoded request to unpack.
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.headers.append(dict(request.headers))
        if request.method == "PUT" and self.script:
            answer = self.script.pop(0)
            if answer is not None:
                status, code = answer
                xml = f"<Error><Code>{code}</Code><Message>scripted {code}</Message></Error>"
                return web.Response(status=status, body=xml.encode(), content_type="text/xml")
        assert self._session is not None
        hop = {"host", "content-length", "transfer-encoding", "connection"}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            data=body,
            headers={k: v for k, v in request.headers.items() if k.lower() not in hop},
        ) as resp:
            answer_body = await resp.read()
            kept = {k: v for k, v in resp.headers.items() if k.lower() not in hop}
            return web.Response(status=resp.status, body=answer_body, headers=kept)


@pytest.fixture
async def front_factory(s3_server: S3Server) -> AsyncIterator[Any]:
    fronts: list[Front] = []

    async def make(script: Sequence[tuple[int, str] | None] = ()) -> Front:
        front = await Front(f"http://127.0.0.1:{s3_server.store.port}", list(script)).start()
        fronts.append(front)
        return front

    yield make
    for front in fronts:
        await front.stop()


async def test_5xx_and_throttling_are_retried_and_every_event_arrives_once(
    start_daemon: StartDaemon, front_factory: Any, s3: Any
) -> None:
    front = await front_factory([(503, "SlowDown"), (500, "InternalError"), (429, "SlowDown")])
    daemon = await start_daemon(
        {"targets": [cos_target(front.url)], "routes": everything_to("cos")}
    )
    await post(daemon, [make_event(id=f"t-{i}") for i in range(10)])
    await wait_for(lambda: settled(daemon), timeout_s=20, what="everything settled")

    found = await objects(s3)
    assert ids(found) == sorted(f"t-{i}" for i in range(10))
    assert len(found) == 1, "the retries wrote the one object, under its first name"
    row = daemon.status()["targets"]["cos"]
    assert (row["delivered"], row["dead_lettered"], row["retries"]) == (10, 0, 3)
    assert_books_balance(daemon)


async def test_an_outage_mid_batch_leaves_nothing_half_written_and_everything_arrives_after(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any
) -> None:
    daemon = await start_daemon(
        {
            "targets": [cos_target(s3_server.endpoint_url, timeout_s=30)],
            "routes": everything_to("cos"),
        }
    )
    await post(daemon, [make_event(id="before")])
    await wait_for(lambda: settled(daemon), timeout_s=20, what="the first object")

    s3_server.pause()  # a PUT goes out and hangs on the way
    big = "x" * 20_000
    sent = [f"o-{n}-{i}" for n in range(5) for i in range(40)]
    for n in range(5):
        body = [make_event(id=f"o-{n}-{i}", message=big) for i in range(40)]
        assert (await post(daemon, body))[0] == 202
    stats = daemon.target_stats["cos"]
    await wait_for(lambda: stats.batches >= 2, timeout_s=20, what="a PUT in flight")
    await s3_server.akill()  # the PUT in flight is cut, new connections refused
    await wait_for(lambda: stats.retries >= 2, timeout_s=20, what="retries while down")
    assert (await s3.list_multipart_uploads(Bucket=BUCKET)).get("Uploads") is None
    await s3_server.astart()
    await wait_for(lambda: settled(daemon), timeout_s=40, what="everything after the outage")

    found = await objects(s3)  # every object reads back whole: gunzip and parse succeed
    assert ids(found) == sorted([*sent, "before"]), "every event once, none lost, none twice"
    assert (await s3.list_multipart_uploads(Bucket=BUCKET)).get("Uploads") is None
    row = daemon.status()["targets"]["cos"]
    assert (row["delivered"], row["dead_lettered"]) == (201, 0)
    assert row["retries"] >= 2
    assert_books_balance(daemon)


async def test_a_hung_store_times_out_and_a_late_write_is_overwritten_not_duplicated(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any
) -> None:
    daemon = await start_daemon(
        {
            "targets": [cos_target(s3_server.endpoint_url, timeout_s=0.5)],
            "routes": everything_to("cos"),
        }
    )
    s3_server.pause()  # PUTs go out and hang: each attempt times out
    try:
        await post(daemon, [make_event(id=f"h-{i}") for i in range(20)])
        stats = daemon.target_stats["cos"]
        await wait_for(lambda: stats.retries >= 2, timeout_s=20, what="timed-out attempts")
    finally:
        s3_server.resume()  # the hung PUTs now reach the store, late, under the same name
    await wait_for(lambda: settled(daemon), timeout_s=20, what="everything settled")

    found = await objects(s3)
    assert ids(found) == sorted(f"h-{i}" for i in range(20))
    assert len(found) == 1, "every attempt wrote the same object"
    row = daemon.status()["targets"]["cos"]
    assert (row["delivered"], row["dead_lettered"]) == (20, 0)
    assert "no answer within 0.5s" in str(stats.write_status.reason_for_last_failure)
    assert_books_balance(daemon)


async def test_a_missing_bucket_is_permanent_and_dead_letters_with_the_reason(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any, tmp_path: Path
) -> None:
    target = cos_target(s3_server.endpoint_url)
    target["cos_endpoint"]["bucket"] = "no-such-bucket"
    daemon = await start_daemon({"targets": [target], "routes": everything_to("cos")})
    await post(daemon, [make_event(id="lost-1"), make_event(id="lost-2")])
    await wait_for(lambda: settled(daemon), timeout_s=20, what="dead letters")

    letters = read_ndjson(tmp_path / "var" / "deadletter" / "cos.ndjson")
    assert sorted(letter["event"]["id"] for letter in letters) == ["lost-1", "lost-2"]
    for letter in letters:
        assert letter["reason"] == "permanent_status"
        assert letter["status"] == 404
        assert letter["attempts"] == 1, "a permanent failure is not retried"
        assert "NoSuchBucket" in letter["message"]
        assert letter["response_excerpt"].startswith("NoSuchBucket: ")
    row = daemon.status()["targets"]["cos"]
    assert (row["delivered"], row["dead_lettered"]) == (0, 2)
    assert_books_balance(daemon)


async def test_an_iam_api_key_becomes_a_bearer_token_on_unsigned_requests(
    start_daemon: StartDaemon, front_factory: Any, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    iam = await FakeCloudLogs().start()
    IamTokenSource._shared.clear()
    monkeypatch.setenv("IBMCLOUD_API_KEY", API_KEY)
    try:
        front = await front_factory()
        target = cos_target(front.url, api_key="${env:IBMCLOUD_API_KEY}", iam_url=iam.url)
        del target["cos_endpoint"]["hmac_keys"]
        daemon = await start_daemon({"targets": [target], "routes": everything_to("cos")})
        await post(daemon, [make_event(id="iam-1")])
        await wait_for(lambda: settled(daemon), timeout_s=20, what="delivered")
    finally:
        await iam.stop()

    assert ids(await objects(s3)) == ["iam-1"]
    [put] = [h for h in front.headers if h.get("Content-MD5")]
    assert put["Authorization"] == "Bearer token-1"
    assert iam.token_requests == 1
    assert_books_balance(daemon)


async def test_a_refused_token_is_refreshed_once_before_the_write_counts_as_failed(
    start_daemon: StartDaemon, front_factory: Any, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    iam = await FakeCloudLogs().start()
    IamTokenSource._shared.clear()
    monkeypatch.setenv("IBMCLOUD_API_KEY", API_KEY)
    try:
        front = await front_factory([(403, "AccessDenied")])
        target = cos_target(front.url, api_key="${env:IBMCLOUD_API_KEY}", iam_url=iam.url)
        del target["cos_endpoint"]["hmac_keys"]
        daemon = await start_daemon({"targets": [target], "routes": everything_to("cos")})
        await post(daemon, [make_event(id="iam-2")])
        await wait_for(lambda: settled(daemon), timeout_s=20, what="delivered")
    finally:
        await iam.stop()

    assert ids(await objects(s3)) == ["iam-2"]
    puts = [h["Authorization"] for h in front.headers if h.get("Content-MD5")]
    assert puts == ["Bearer token-1", "Bearer token-2"]
    row = daemon.status()["targets"]["cos"]
    assert (row["delivered"], row["dead_lettered"]) == (1, 0)
    assert_books_balance(daemon)


async def test_hmac_keys_sign_with_sigv4_in_the_targets_region(
    start_daemon: StartDaemon, front_factory: Any, s3: Any
) -> None:
    front = await front_factory()
    daemon = await start_daemon(
        {"targets": [cos_target(front.url, region="eu-gb")], "routes": everything_to("cos")}
    )
    await post(daemon, [make_event(id="signed")])
    await wait_for(lambda: settled(daemon), timeout_s=20, what="delivered")
    [put] = [h for h in front.headers if h.get("Content-MD5")]
    assert put["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=test-hmac-access-key-id/")
    assert "/eu-gb/s3/aws4_request" in put["Authorization"]
    [key] = await objects(s3)
    assert key.startswith(f"{ACCOUNT}/eu-gb/")


async def test_validate_writes_a_test_object_and_a_refused_write_is_cos_write_test_failed(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any
) -> None:
    missing = cos_target(s3_server.endpoint_url, target_id="missing")
    missing["cos_endpoint"]["bucket"] = "no-such-bucket"
    daemon = await start_daemon(
        {
            "auth": loopback_auth(),
            "targets": [cos_target(s3_server.endpoint_url), missing],
            "routes": [],
        }
    )
    api = Client(daemon)
    status, target = await api.call("POST", "/api/v2/targets/cos/validate")
    assert status == 200, target
    assert target["write_status"]["status"] == "success"
    [(key, [event])] = (await objects(s3)).items()
    assert event["action"] == "event-router.target.validate"
    assert KEY.match(key)

    status, body = await api.call("POST", "/api/v2/targets/missing/validate")
    assert status == 400
    [error] = body["errors"]
    assert error["code"] == "cos_write_test_failed"
    assert "could not write to the Cloud Object Storage bucket" in error["message"]
    assert "NoSuchBucket" in error["message"]
    status, target = await api.call("GET", "/api/v2/targets/missing")
    assert target["write_status"]["status"] == "failed"
    assert target["cos_endpoint"]["hmac_keys"] == {
        "access_key_id": "test-hmac-access-key-id",
        "secret_access_key": "REDACTED",
    }


async def test_creating_a_cos_target_writes_a_test_object_and_a_refused_write_creates_nothing(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any
) -> None:
    """atracker test-writes when a COS target is created or updated, and refuses the change
    with cos_write_test_failed when the write fails."""
    daemon = await start_daemon({"auth": loopback_auth(), "targets": [], "routes": []})
    api = Client(daemon)
    body = {
        "name": "archive",
        "target_type": "cloud_object_storage",
        "cos_endpoint": cos_target(s3_server.endpoint_url)["cos_endpoint"]
        | {"hmac_keys": {"access_key_id": "id", "secret_access_key": "a-secret-of-the-store"}},
    }
    status, target = await api.call("POST", "/api/v2/targets", body)
    assert status == 201, target
    [(key, [event])] = (await objects(s3)).items()
    assert event["action"] == "event-router.target.validate"
    assert KEY.match(key)

    elsewhere = body | {"cos_endpoint": body["cos_endpoint"] | {"bucket": "no-such-bucket"}}
    status, refused = await api.call("POST", "/api/v2/targets", elsewhere)
    assert status == 400
    [error] = refused["errors"]
    assert error["code"] == "cos_write_test_failed"
    assert "NoSuchBucket" in error["message"]
    status, listed = await api.call("GET", "/api/v2/targets")
    assert [t["id"] for t in listed["targets"]] == [target["id"]], "nothing created"

    status, refused = await api.call("PUT", f"/api/v2/targets/{target['id']}", elsewhere)
    assert status == 400 and refused["errors"][0]["code"] == "cos_write_test_failed"
    assert daemon.config.target(target["id"]).endpoint.bucket == BUCKET, "nothing changed"


async def test_an_accounts_share_is_cut_into_objects_of_at_most_max_object_bytes(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any
) -> None:
    """A batch never makes an object past max_object_bytes (by default below S3's 5 GB
    single PUT): one account's share of a batch is cut into several objects."""
    target = cos_target(s3_server.endpoint_url, max_object_bytes=4096)
    target["batch"] = {"max_wait_s": 0.5, "max_events": 1000}
    daemon = await start_daemon({"targets": [target], "routes": everything_to("cos")})
    sent = [in_account(ACCOUNT, id=f"cut-{i}") for i in range(40)]
    status, _ = await post(daemon, sent)
    assert status == 202
    await wait_for(lambda: settled(daemon), timeout_s=20, what="everything settled")

    found = await objects(s3)
    assert ids(found) == sorted(e["id"] for e in sent), "every event in exactly one object"
    assert len(found) > 1
    for events in found.values():
        assert sum(len(orjson.dumps(e)) + 1 for e in events) <= 4096
    assert daemon.status()["targets"]["cos"]["dead_lettered"] == 0
    assert_books_balance(daemon)


def test_query_reads_the_objects_a_cos_target_wrote(
    s3_server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s3_server.reset()
    s3_server.start()  # a no-op when the front runs
    s3_server.create_bucket(BUCKET)
    target = cos_target(s3_server.endpoint_url)
    endpoint = parse_config({"targets": [target]}).targets[0].endpoint
    assert isinstance(endpoint, CosEndpointConfig)
    events = [
        make_event(id="q-1", outcome="failure"),
        in_account(OTHER_ACCOUNT, id="q-2", outcome="failure"),
        make_event(id="q-3"),
    ]

    async def write() -> None:
        writer = CosTarget("cos", endpoint)
        try:
            await writer.send([Event.from_body(event) for event in events])
            await writer.send([Event.from_body(make_event(id="q-4", outcome="failure"))])
        finally:
            await writer.close()

    asyncio.run(write())
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"targets": [target], "routes": []}))

    code, out, err = run(capsys, "outcome:failure", "cos://cos", "--config", str(config))
    assert (code, err) == (0, "")
    # Key order: per account, then in the order written (the names sort by time).
    assert ids_of(out) == ["q-1", "q-4", "q-2"]
    code, out, _ = run(
        capsys, "outcome:failure", f"cos://cos/{OTHER_ACCOUNT}/", "--config", str(config)
    )
    assert (code, ids_of(out)) == (0, ["q-2"])
    code, out, _ = run(
        capsys, "outcome:failure", "cos://cos", "--limit", "1", "--config", str(config)
    )
    assert len(ids_of(out)) == 1

    code, _, err = run(capsys, "outcome:failure", "cos://nope", "--config", str(config))
    assert code == 2 and "no cloud_object_storage target 'nope'" in err
    code, _, err = run(
        capsys, "outcome:failure", "cos://cos/no-such-prefix/", "--config", str(config)
    )
    assert code == 1 and "no objects" in err


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["query", *argv])
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def ids_of(out: str) -> list[str]:
    return [orjson.loads(line)["id"] for line in out.splitlines()]


async def test_a_bucket_endpoint_name_that_rebinds_after_the_api_checked_it_is_not_put_to(
    start_daemon: StartDaemon, s3_server: S3Server, s3: Any, dns: dict[str, str]
) -> None:
    """An endpoint name the management API set resolves inside auth.api_target_networks when
    the target is made (its test write reaches the store), then to 0.0.0.0 (this host's own
    listeners): the target's S3 client checks every address it resolves, so no PUT goes
    there, and the events are dead-lettered with the reason."""
    port = s3_server.endpoint_url.rpartition(":")[2]
    dns["localhost"] = "127.0.0.1"  # a name moto reads as path-style
    daemon = await start_daemon(
        {
            "auth": {**loopback_auth(), "api_target_networks": ["127.0.0.1/32"]},
            "delivery": {
                "batch": {"max_wait_s": 0.2},
                "retry": {"max_attempts": 2, "initial_backoff_s": 0.05},
            },
            "targets": [],
            "routes": [],
        }
    )
    api = Client(daemon)
    body = {
        "name": "archive",
        "target_type": "cloud_object_storage",
        "cos_endpoint": cos_target(f"http://localhost:{port}")["cos_endpoint"]
        | {"hmac_keys": {"access_key_id": "id", "secret_access_key": "a-secret-of-the-store"}},
    }
    status, target = await api.call("POST", "/api/v2/targets", body)
    assert status == 201, target
    written = len(await objects(s3))  # the create's test write
    dns["localhost"] = "0.0.0.0"
    route = {"name": "r", "rules": [{"locations": ["*"], "target_ids": [target["id"]]}]}
    assert (await api.call("POST", "/api/v2/routes", route))[0] == 201
    await wait_for(lambda: settled(daemon), timeout_s=30, what="the events settled")
    row = daemon.status()["targets"][target["id"]]
    assert row["delivered"] == 0 and row["dead_lettered"] == row["received"] >= 1, row
    why = row["write_status"]["reason_for_last_failure"]
    assert "0.0.0.0" in why and "auth.api_target_networks" in why, why
    assert len(await objects(s3)) == written
    assert_books_balance(daemon)


@pytest.mark.parametrize("reload_does", ["change", "remove"])
async def test_an_object_written_before_a_reload_stops_its_worker_is_not_written_again(
    start_daemon: StartDaemon, front_factory: Any, s3: Any, tmp_path: Path, reload_does: str
) -> None:
    """A batch of two accounts is two objects, each written and settled on its own: the first
    is written, the second is refused (503) and retried when a reload stops the worker
    mid-batch (the batch stays pending). A changed target's new worker writes only the second
    (every event in the bucket once, not the first account's twice); a removed target's
    retire dead-letters only the second account's events, not those written already."""
    front = await front_factory([None] + [(503, "SlowDown")] * 10_000)
    target = cos_target(front.url)
    daemon = await start_daemon(
        {
            "targets": [target],
            "routes": everything_to("cos"),
            "shutdown": {"drain_timeout_s": 0.5},
        }
    )
    body = [in_account(ACCOUNT, id=f"a-{i}") for i in range(5)]
    body += [in_account(OTHER_ACCOUNT, id=f"b-{i}") for i in range(5)]
    assert (await post(daemon, body))[0] == 202
    stats = daemon.target_stats["cos"]
    await wait_for(lambda: stats.retries >= 2, timeout_s=20, what="the second object retried")
    if reload_does == "change":
        data = {
            "targets": [target | {"batch": {"max_wait_s": 0.1}}],
            "routes": everything_to("cos"),
        }
    else:
        keep = {"id": "keep", "target_type": "file", "file_endpoint": {"path": str(tmp_path / "k")}}
        data = {"targets": [keep], "routes": everything_to("keep")}
    await daemon.reload(parse_config(with_base(daemon, data)), audit=False)
    front.script.clear()
    await wait_for(lambda: settled(daemon), timeout_s=20, what="everything settled")

    found = await objects(s3)
    letters = read_ndjson(tmp_path / "var" / "deadletter" / "cos.ndjson")
    if reload_does == "change":
        assert ids(found) == sorted(e["id"] for e in body), "every event in exactly one object"
        assert len(found) == 2 and not letters
        row = daemon.status()["targets"]["cos"]
        assert (row["received"], row["delivered"], row["dead_lettered"]) == (10, 10, 0)
    else:
        assert ids(found) == [f"a-{i}" for i in range(5)], "the first object, once"
        assert sorted(x["event"]["id"] for x in letters) == [f"b-{i}" for i in range(5)]
        assert {x["reason"] for x in letters} == {"target_removed"}
    assert_books_balance(daemon)
