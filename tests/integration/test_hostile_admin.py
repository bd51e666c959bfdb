"""What an admin token sends that the daemon must refuse with a 4xx naming the field, against
a real daemon: values that are valid JSON and valid by type but that the running daemon could
not live with (an alert window too small to count in, a URL that cannot be a URL, an address
the operator's network keeps for itself, a query too large to run per event). Each case
checks the answer and that ingest still answers 202 afterwards."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from router.config import parse_config
from router.daemon import Daemon
from router.errors import ConfigError
from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import (
    ReceiverFactory,
    assert_books_balance,
    everything_to,
    file_target,
    settled,
)

ADMIN = "an-admin-token-for-hostile-0001"
INGEST = "an-ingest-token-for-hostile-001"


def auth() -> dict[str, Any]:
    return {
        "admin_tokens": [{"name": "ops", "sha256": hashlib.sha256(ADMIN.encode()).hexdigest()}],
        "ingest_tokens": [{"name": "sm", "sha256": hashlib.sha256(INGEST.encode()).hexdigest()}],
    }


async def call(
    daemon: Daemon, method: str, path: str, body: Any = None, token: str = ADMIN
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"http://127.0.0.1:{daemon.port}{path}",
            data=None if body is None else orjson.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        ) as resp,
    ):
        text = await resp.text()
        try:
            return resp.status, orjson.loads(text) if text else None
        except orjson.JSONDecodeError:
            return resp.status, text


def message(answer: Any) -> str:
    assert isinstance(answer, dict), answer
    return "; ".join(error["message"] for error in answer["errors"])


@pytest.fixture
async def daemon(start_daemon: StartDaemon, tmp_path: Path) -> Daemon:
    return await start_daemon(
        {
            "auth": auth(),
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": everything_to("archive"),
        }
    )


async def ingest_still_works(daemon: Daemon, event_id: str) -> None:
    status, answer = await call(daemon, "POST", "/v1/events", [make_event(id=event_id)], INGEST)
    assert status == 202, answer
    assert_books_balance(daemon)


@pytest.mark.parametrize(
    ("alert", "field"),
    [
        ({"threshold": {"count": 1, "window_s": 1e-300}}, "threshold.window_s"),
        ({"threshold": {"count": 1, "window_s": 5e-324}}, "threshold.window_s"),
        ({"absence": {"window_s": 1e-300}}, "absence.window_s"),
        ({"absence": {"window_s": 1e308}}, "absence.window_s"),
        ({"threshold": {"count": 2**60, "window_s": 60}}, "threshold.count"),
        ({"threshold": {"count": 1, "window_s": 60}, "cooldown_s": 1e308}, "cooldown_s"),
    ],
)
async def test_an_alert_window_the_daemon_cannot_count_in_is_refused_naming_the_field(
    daemon: Daemon, alert: dict[str, Any], field: str
) -> None:
    """A presence window of 1e-300 s made every accepted event (the create's own audit event
    first) fail with OverflowError in the slot arithmetic: a 500 for the create, then for
    every ingest request, after the events were journaled."""
    body = {"name": "tiny", "query": "host:secrets-manager", "target_ids": ["archive"], **alert}
    status, answer = await call(daemon, "POST", "/api/v2/alerts", body)
    assert status == 400, answer
    assert field in message(answer)
    status, listed = await call(daemon, "GET", "/api/v2/alerts")
    assert status == 200 and listed["alerts"] == []
    await ingest_still_works(daemon, "after-tiny-window")


COS_CRN = "crn:v1:bluemix:public:cloud-object-storage:global:a/abc123:def456::"
ES_CRN = "crn:v1:bluemix:public:messagehub:us-south:a/abc123:def456::"
LOGS_CRN = "crn:v1:bluemix:public:logs:us-south:a/abc123:0a1b2c3d-0000-4000-8000-000000000000::"
HMAC = {"access_key_id": "an-access-key-id", "secret_access_key": "a-secret-access-key-0001"}


def http(url: str) -> dict[str, Any]:
    return {"name": "t", "target_type": "http", "http_endpoint": {"url": url}}


def cos(endpoint: str) -> dict[str, Any]:
    return {
        "name": "t",
        "target_type": "cloud_object_storage",
        "cos_endpoint": {
            "endpoint": endpoint,
            "target_crn": COS_CRN,
            "bucket": "audit-archive",
            "hmac_keys": HMAC,
        },
    }


def event_streams(broker: str) -> dict[str, Any]:
    return {
        "name": "t",
        "target_type": "event_streams",
        "eventstreams_endpoint": {
            "target_crn": ES_CRN,
            "brokers": [broker],
            "topic": "audit",
            "api_key": "an-event-streams-key-0001",
            "timeout_s": 2,
        },
    }


def syslog(host: str, port: int = 514) -> dict[str, Any]:
    return {"name": "t", "target_type": "syslog", "syslog_endpoint": {"host": host, "port": port}}


def cloud_logs(ingress_url: str) -> dict[str, Any]:
    return {
        "name": "t",
        "target_type": "cloud_logs",
        "cloudlogs_endpoint": {
            "target_crn": LOGS_CRN,
            "api_key": "a-cloud-logs-key-0001",
            "ingress_url": ingress_url,
            "iam_url": "http://127.0.0.1:9/",
        },
    }


@pytest.mark.parametrize(
    ("target", "field"),
    [
        (http("http://[::1"), "http_endpoint.url"),
        (http("http://127.0.0.1:99999/"), "http_endpoint.url"),
        (http("http:///no-host"), "http_endpoint.url"),
        (cos("http://127.0.0.1:70000"), "cos_endpoint.endpoint"),
        (event_streams("127.0.0.1:99999"), "eventstreams_endpoint.brokers[0]"),
        (cloud_logs("https://[fe80::1"), "cloudlogs_endpoint.ingress_url"),
    ],
)
async def test_a_target_address_that_cannot_be_connected_to_is_refused_naming_the_field(
    daemon: Daemon, target: dict[str, Any], field: str
) -> None:
    """`http://[::1` and a port past 65535 passed the schema (a `^https?://` pattern), were
    created with 201, and then failed every delivery attempt as retryable until the retries
    ran out: bad input must be a 400 naming the field."""
    status, answer = await call(daemon, "POST", "/api/v2/targets", target)
    assert status == 400, answer
    assert field in message(answer)
    await ingest_still_works(daemon, "after-bad-url")


@pytest.mark.parametrize(
    ("target", "field"),
    [
        (http("http://169.254.169.254/latest/meta-data/"), "http_endpoint.url"),
        (http("http://[fe80::1]:8080/"), "http_endpoint.url"),
        (http("http://[::ffff:169.254.169.254]/"), "http_endpoint.url"),
        (http("http://2852039166/"), "http_endpoint.url"),  # 169.254.169.254 as one number
        (http("http://[fd00:ec2::254]/"), "http_endpoint.url"),
        (http("http://0.0.0.0:8080/"), "http_endpoint.url"),
        (http("http://224.0.0.1:8080/"), "http_endpoint.url"),
        (cos("http://169.254.169.254"), "cos_endpoint.endpoint"),
        (event_streams("169.254.169.254:9092"), "eventstreams_endpoint.brokers[0]"),
        (syslog("169.254.169.254"), "syslog_endpoint.host"),
        (
            {
                **event_streams("127.0.0.1:1"),
                "eventstreams_endpoint": {
                    **event_streams("127.0.0.1:1")["eventstreams_endpoint"],
                    "sasl": {"mechanism": "oauthbearer"},
                    "iam_url": "http://169.254.169.254/",
                },
            },
            "eventstreams_endpoint.iam_url",
        ),
        (cloud_logs("http://169.254.169.254/"), "cloudlogs_endpoint.ingress_url"),
    ],
)
async def test_an_admin_token_cannot_point_a_target_at_link_local_or_metadata_addresses(
    daemon: Daemon, target: dict[str, Any], field: str
) -> None:
    """A cloud's instance metadata service answers on 169.254.169.254 (fd00:ec2::254 on
    AWS's IPv6): a target there, created through the API, sent events to it and quoted its
    answers in write_status and dead letters, and a COS or Event Streams create connected
    to it at once for its test write. The API refuses these addresses before any connection,
    however they are spelt (IPv4-mapped IPv6, one decimal number)."""
    status, answer = await call(daemon, "POST", "/api/v2/targets", target)
    assert status == 400, answer
    assert field in message(answer)
    assert "link-local" in message(answer)
    status, listed = await call(daemon, "GET", "/api/v2/targets")
    assert [t["id"] for t in listed["targets"]] == ["archive"]
    await ingest_still_works(daemon, "after-metadata-target")


async def test_the_operators_yaml_may_still_name_a_link_local_address(
    start_daemon: StartDaemon, tmp_path: Path, receiver_factory: ReceiverFactory
) -> None:
    """The refusal bounds the API, not the operator: a YAML target on a link-local address
    loads, and the API may edit its other fields (the address is the operator's)."""
    data = {
        "auth": auth(),
        "targets": [
            file_target("archive", tmp_path / "archive.ndjson"),
            {
                "id": "imds",
                "target_type": "syslog",
                "syslog_endpoint": {"host": "169.254.1.1", "port": 514},
            },
        ],
        "routes": everything_to("archive"),
    }
    daemon = await start_daemon(data)
    status, got = await call(daemon, "GET", "/api/v2/targets/imds")
    assert status == 200, got
    status, answer = await call(
        daemon,
        "PUT",
        "/api/v2/targets/imds",
        {"name": "renamed", "target_type": "syslog", "syslog_endpoint": got["syslog_endpoint"]},
    )
    assert status == 200, answer


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/api/v2/alerts",
            {
                "name": "slow",
                "query": " ".join(f"-w{i}" for i in range(5001)),
                "target_ids": ["archive"],
            },
            "query",
        ),
        ("/api/v2/views", {"name": "slow", "query": "x:[" + "a," * 40_000 + "a]"}, "query"),
        (
            "/api/v2/routes",
            {
                "name": "slow",
                "rules": [
                    {
                        "locations": ["*"],
                        "target_ids": ["archive"],
                        "filter": " OR ".join(f"w{i}" for i in range(5001)),
                    }
                ],
            },
            "rules[0].filter",
        ),
    ],
)
async def test_a_query_too_large_to_run_on_every_event_is_refused(
    daemon: Daemon, path: str, body: dict[str, Any], field: str
) -> None:
    """An alert runs its query on every accepted event, a route filter on every event it
    could route: a query of 100,000 words took about a second per event, so one API call
    could stall ingest. A query is at most 5,000 terms and 65,536 characters."""
    status, answer = await call(daemon, "POST", path, body)
    assert status == 400, answer
    assert field in message(answer)
    assert "at most" in message(answer)
    await ingest_still_works(daemon, "after-huge-query")


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/search?target=archive&limit=%C2%B2", "limit"),  # '²': a digit to str.isdigit
        ("/v1/search?target=archive&limit=%D9%A3", "limit"),  # '٣', Arabic-Indic three
        ("/v1/search?target=archive&cursor=%C2%B2-1", "cursor"),
        ("/v1/search?target=archive&since=yesterday", "since"),
        ("/v1/deadletters/archive?limit=%C2%B2", "limit"),
        ("/v1/deadletters/archive?offset=1e3", "offset"),
    ],
)
async def test_a_bad_page_parameter_is_a_400_naming_it(
    daemon: Daemon, path: str, field: str
) -> None:
    """`limit=²` passed str.isdigit() and then failed int(): the 400 quoted Python's
    `invalid literal for int() with base 10` instead of naming the parameter."""
    status, answer = await call(daemon, "GET", path)
    assert status == 400, answer
    assert answer["error"]["message"].startswith(f"{field}: "), answer


SECRET = "hunter2-do-not-echo"


@pytest.mark.parametrize(
    "target",
    [
        http(f"http://user:{SECRET}@127.0.0.1:99999/"),  # refused by the address check
        http(f"ftp://user:{SECRET}@127.0.0.1/"),  # refused by the schema's pattern
        http(f"http://127.0.0.1:99999/?token={SECRET}"),
        {
            **cos("http://127.0.0.1:1"),
            "cos_endpoint": {**cos("x")["cos_endpoint"], "api_key": [SECRET], "hmac_keys": 1},
        },
        {
            **cos("http://127.0.0.1:1"),
            "cos_endpoint": {
                **cos("x")["cos_endpoint"],
                "hmac_keys": {"access_key_id": "id", "secret_access_key": {"v": SECRET}},
            },
        },
        {
            "name": "t",
            "target_type": "http",
            "http_endpoint": {"url": "http://127.0.0.1:1/", "headers": {"X-Api-Key": [SECRET]}},
        },
        {
            "name": "t",
            "target_type": "http",
            "http_endpoint": {"url": "http://127.0.0.1:1/", "auth": {"type": "x", "token": SECRET}},
        },
    ],
)
async def test_a_refused_change_never_quotes_a_secret_in_its_answer_or_its_audit_event(
    daemon: Daemon, tmp_path: Path, target: dict[str, Any]
) -> None:
    """A problem quoted the value it was about: a URL's password, an api_key sent as a list,
    a whole `auth` object with its token. The answer, and the refused change's audit event
    (journaled, archived, sent to every target its routes name), carried the secret."""
    status, answer = await call(daemon, "POST", "/api/v2/targets", target)
    assert status == 400, answer
    assert SECRET not in orjson.dumps(answer).decode()
    await wait_for(lambda: settled(daemon))
    audit = [e for e in read_ndjson(tmp_path / "archive.ndjson") if e["outcome"] == "failure"]
    assert audit, "the refusal is audited"
    assert SECRET not in orjson.dumps(audit).decode()


async def test_auth_api_target_networks_bound_where_api_targets_may_connect(
    start_daemon: StartDaemon, tmp_path: Path, receiver_factory: ReceiverFactory
) -> None:
    """Without an operator's list, an admin token could point a target at any port of the
    daemon's host: an Event Streams create's test write answered `ConnectionRefusedError`
    for a closed port and something else for an open one, a port scanner. With
    `auth.api_target_networks`, a target the API creates or changes may only connect inside
    those networks; the YAML's own targets are the operator's and stay as they are."""
    receiver = await receiver_factory()
    daemon = await start_daemon(
        {
            "auth": {**auth(), "api_target_networks": ["10.0.0.0/8", "fd00:1::/64"]},
            "targets": [
                file_target("archive", tmp_path / "archive.ndjson"),
                {"id": "own", "target_type": "http", "http_endpoint": {"url": receiver.url}},
            ],
            "routes": everything_to("archive", "own"),
        }
    )
    for target, field in [
        (http(receiver.url), "http_endpoint.url"),
        (event_streams("127.0.0.1:22"), "eventstreams_endpoint.brokers[0]"),
        (http("http://localhost:8080/"), "http_endpoint.url"),
        (http("http://no-such-host.invalid/"), "http_endpoint.url"),
    ]:
        status, answer = await call(daemon, "POST", "/api/v2/targets", target)
        assert status == 400, answer
        assert field in message(answer) and "api_target_networks" in message(answer)
        assert "Kafka" not in message(answer)  # refused before any test write
    # Inside the networks: created (nothing listens there; deliveries are only retried).
    status, answer = await call(daemon, "POST", "/api/v2/targets", http("http://10.1.2.3:9/"))
    assert status == 201, answer
    # The operator's own target, changed in another field, keeps its address.
    status, own = await call(daemon, "GET", "/api/v2/targets/own")
    endpoint = {**own["http_endpoint"], "timeout_s": 5}
    status, answer = await call(
        daemon,
        "PUT",
        "/api/v2/targets/own",
        {"name": "own", "target_type": "http", "http_endpoint": endpoint},
    )
    assert status == 200, answer
    await ingest_still_works(daemon, "after-networks")


@pytest.mark.parametrize("network", ["10.0.0.0/33", "not-a-network", "10.0.0.1/8x"])
def test_a_bad_api_target_network_is_a_config_problem(tmp_path: Path, network: str) -> None:
    data = {"auth": {**auth(), "api_target_networks": [network]}}
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert any(p.startswith("auth.api_target_networks[0]: ") for p in caught.value.problems)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A name server the test controls: a name in this table resolves to the address it holds
    at that moment, every other name as the system resolves it. Every lookup of the daemon
    goes through socket.getaddrinfo (the API's check in a thread, aiohttp's threaded resolver,
    asyncio's open_connection), so this is the DNS the daemon sees, rebinding included."""
    table: dict[str, str] = {}
    system = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        return system(table.get(name, host), port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP port on 127.0.0.1 that records what each connection sends (a syslog receiver)."""
    received: list[bytes] = []

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.close()

    server = await asyncio.start_server(take, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], received
    server.close()
    await server.wait_closed()


async def test_a_name_that_rebinds_after_the_check_is_refused_when_the_daemon_connects(
    start_daemon: StartDaemon,
    tmp_path: Path,
    receiver_factory: ReceiverFactory,
    dns: dict[str, str],
    listener: tuple[int, list[bytes]],
) -> None:
    """DNS rebinding: a name that resolves inside auth.api_target_networks when the API checks
    the target, and to an address the operator did not allow when the daemon connects
    (0.0.0.0 reaches this host's own listeners, as 169.254.169.254 would reach a cloud's
    metadata service). The names were checked only when the target was made, so the daemon
    connected to whatever the name said later. Now every address is checked again when a
    target the API made connects: nothing is sent, and the events are dead-lettered with the
    reason. A name that still resolves inside the networks is delivered to."""
    receiver = await receiver_factory()
    syslog_port, syslog_received = listener
    dns.update({"good.example": "127.0.0.1", "http.example": "127.0.0.1"})
    dns["syslog.example"] = "127.0.0.1"
    daemon = await start_daemon(
        {
            "auth": {**auth(), "api_target_networks": ["127.0.0.1/32"]},
            "delivery": {"retry": {"max_attempts": 2, "initial_backoff_s": 0.05}},
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": everything_to("archive"),
        }
    )
    port = receiver.url.split(":")[2].split("/")[0]
    made = {}
    for name, target in [
        ("good", http(f"http://good.example:{port}/ingest")),
        ("http", http(f"http://http.example:{port}/ingest")),
        ("syslog", syslog("syslog.example", syslog_port)),
    ]:
        status, answer = await call(daemon, "POST", "/api/v2/targets", target)
        assert status == 201, answer
        made[name] = answer["id"]
    # The names' owner points them elsewhere once the checks are done.
    dns.update({"http.example": "0.0.0.0", "syslog.example": "0.0.0.0"})
    route = {"name": "all-api", "rules": [{"locations": ["*"], "target_ids": list(made.values())}]}
    status, answer = await call(daemon, "POST", "/api/v2/routes", route)
    assert status == 201, answer
    await ingest_still_works(daemon, "rebound")
    await wait_for(lambda: settled(daemon), what="every target settled")
    rows = daemon.status()["targets"]
    assert rows[made["good"]]["delivered"] == rows[made["good"]]["received"] >= 1
    assert receiver.requests and all(
        r.headers["Host"].startswith("good.") for r in receiver.requests
    )
    assert syslog_received == []
    for name in ("http", "syslog"):
        row = rows[made[name]]
        assert row["delivered"] == 0 and row["dead_lettered"] == row["received"] >= 1, row
        why = row["write_status"]["reason_for_last_failure"]
        assert "0.0.0.0" in why and "auth.api_target_networks" in why, why
    assert_books_balance(daemon)
    # The hosts the API set are written in the YAML, so a restart or a reload bounds them too.
    saved = {t["id"]: t for t in daemon.source.data["targets"]}
    assert saved[made["http"]]["api_hosts"] == ["http.example"]
    assert saved[made["syslog"]]["api_hosts"] == ["syslog.example"]
    reloaded = parse_config(daemon.source.data).target(made["http"]).bound
    assert reloaded is not None and reloaded == daemon.config.target(made["http"]).bound


async def test_without_api_target_networks_an_admin_token_cannot_point_a_target_at_loopback(
    start_daemon: StartDaemon, tmp_path: Path, receiver_factory: ReceiverFactory
) -> None:
    """With an admin token and no auth.api_target_networks, a target the API made could
    connect to any port on the daemon's own host (loopback), and a COS or Event Streams
    create's test write told open ports from closed ones: a port scanner. Loopback is now
    refused unless the operator lists it in auth.api_target_networks; the YAML's own loopback
    targets stay the operator's."""
    receiver = await receiver_factory()
    daemon = await start_daemon(
        {
            "auth": auth(),
            "targets": [
                file_target("archive", tmp_path / "archive.ndjson"),
                {"id": "own", "target_type": "http", "http_endpoint": {"url": receiver.url}},
            ],
            "routes": everything_to("archive", "own"),
        }
    )
    for target, field in [
        (http(receiver.url), "http_endpoint.url"),
        (http("http://localhost:22/"), "http_endpoint.url"),
        (http("http://[::ffff:127.0.0.1]:22/"), "http_endpoint.url"),
        (event_streams("127.0.0.1:22"), "eventstreams_endpoint.brokers[0]"),
        (syslog("127.0.0.2", 22), "syslog_endpoint.host"),
        (cos("http://127.0.0.1:22"), "cos_endpoint.endpoint"),
    ]:
        status, answer = await call(daemon, "POST", "/api/v2/targets", target)
        assert status == 400, (target, answer)
        assert field in message(answer) and "loopback" in message(answer), message(answer)
        assert "api_target_networks" in message(answer)
        assert "Kafka" not in message(answer)  # refused before any test write
    status, own = await call(daemon, "GET", "/api/v2/targets/own")
    endpoint = {**own["http_endpoint"], "timeout_s": 5}
    status, answer = await call(
        daemon,
        "PUT",
        "/api/v2/targets/own",
        {"name": "own", "target_type": "http", "http_endpoint": endpoint},
    )
    assert status == 200, answer
    await ingest_still_works(daemon, "after-loopback")


async def test_api_target_networks_may_let_api_targets_reach_loopback(
    start_daemon: StartDaemon, tmp_path: Path, receiver_factory: ReceiverFactory
) -> None:
    """The operator who wants API targets on this host says so: with 127.0.0.0/8 listed, a
    loopback target is created and delivered to."""
    receiver = await receiver_factory()
    daemon = await start_daemon(
        {
            "auth": {**auth(), "api_target_networks": ["127.0.0.0/8"]},
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": everything_to("archive"),
        }
    )
    status, answer = await call(daemon, "POST", "/api/v2/targets", http(receiver.url))
    assert status == 201, answer
    route = {"name": "to-it", "rules": [{"locations": ["*"], "target_ids": [answer["id"]]}]}
    assert (await call(daemon, "POST", "/api/v2/routes", route))[0] == 201
    await ingest_still_works(daemon, "to-loopback")
    await wait_for(lambda: settled(daemon), what="delivered")
    assert "to-loopback" in [e["id"] for e in receiver.delivered_events]
    assert_books_balance(daemon)


async def test_an_admin_token_cannot_make_the_daemon_read_a_file_through_a_targets_tls(
    start_daemon: StartDaemon, tmp_path: Path, receiver_factory: ReceiverFactory, pki: Path
) -> None:
    """A target's tls.ca_file, cert_file and key_file name files on the daemon's host, which
    the daemon reads when the target starts: from the API they made the daemon read any file
    it could (/etc/shadow, /proc/self/environ, the operator's own keys, the error telling
    whether it exists), and present a key it found there to a server the caller chose. The API
    refuses them, naming the field; the operator's own value may be sent back unchanged."""
    receiver = await receiver_factory()
    operators_ca = pki / "ca.pem"
    secret = tmp_path / "secret.txt"
    secret.write_text("the operator's secret\n")
    daemon = await start_daemon(
        {
            "auth": {**auth(), "api_target_networks": ["127.0.0.0/8"]},
            "targets": [
                file_target("archive", tmp_path / "archive.ndjson"),
                {
                    "id": "own",
                    "target_type": "http",
                    "http_endpoint": {"url": receiver.url, "tls": {"ca_file": str(operators_ca)}},
                },
            ],
            "routes": everything_to("archive", "own"),
        }
    )
    targets_before = daemon.config.targets
    tls_sets = [
        {"ca_file": str(secret)},
        {"cert_file": str(secret)},
        {"cert_file": str(operators_ca), "key_file": str(secret)},
    ]
    for tls in tls_sets:
        for target, field in [
            (
                {**http(receiver.url), "http_endpoint": {"url": receiver.url, "tls": tls}},
                "http_endpoint.tls",
            ),
            (
                {
                    **syslog("127.0.0.1", 1),
                    "syslog_endpoint": {"host": "127.0.0.1", "port": 1, "tls": tls},
                },
                "syslog_endpoint.tls",
            ),
            (
                {
                    **event_streams("127.0.0.1:1"),
                    "eventstreams_endpoint": {
                        **event_streams("127.0.0.1:1")["eventstreams_endpoint"],
                        "tls": tls,
                    },
                },
                "eventstreams_endpoint.tls",
            ),
        ]:
            status, answer = await call(daemon, "POST", "/api/v2/targets", target)
            assert status == 400, (target, answer)
            for key in tls:
                assert f"{field}.{key}" in message(answer), message(answer)
            assert "Kafka" not in message(answer)  # refused before any test write
    # Nor may a change point the operator's target at another file.
    status, own = await call(daemon, "GET", "/api/v2/targets/own")
    assert status == 200, own
    endpoint = own["http_endpoint"]
    for tls in tls_sets:
        status, answer = await call(
            daemon,
            "PUT",
            "/api/v2/targets/own",
            {"name": "own", "target_type": "http", "http_endpoint": {**endpoint, "tls": tls}},
        )
        assert status == 400, answer
        assert "http_endpoint.tls." in message(answer), message(answer)
    assert daemon.config.targets == targets_before
    # What the operator set may come back as it was read.
    status, answer = await call(
        daemon,
        "PUT",
        "/api/v2/targets/own",
        {"name": "own", "target_type": "http", "http_endpoint": {**endpoint, "timeout_s": 5}},
    )
    assert status == 200, answer
    assert daemon.config.target("own").endpoint.tls.ca_file == str(operators_ca)  # type: ignore[union-attr]
    await ingest_still_works(daemon, "after-tls-files")


@pytest.mark.parametrize(
    "name", ["Content-Length", "transfer-encoding", "Content-Encoding", "Connection", "Upgrade"]
)
async def test_a_header_that_frames_the_request_is_refused_naming_it(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path, name: str
) -> None:
    """The HTTP client frames each POST itself. A target header `Content-Length: 1` was sent
    as given with the whole body after it: the receiver read one byte of JSON, and the rest
    of the batch as the next request on the connection (request smuggling, its method and
    path taken from event bytes an ingest token chose); Transfer-Encoding and
    Content-Encoding made every delivery unreadable. Refused, naming the header, from the API
    and from the operator's YAML alike (no such target can ever deliver)."""
    receiver = await receiver_factory()
    daemon = await start_daemon(
        {
            "auth": {**auth(), "api_target_networks": ["127.0.0.0/8"]},
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": everything_to("archive"),
        }
    )
    target = {**http(receiver.url), "http_endpoint": {"url": receiver.url, "headers": {name: "1"}}}
    status, answer = await call(daemon, "POST", "/api/v2/targets", target)
    assert status == 400, answer
    assert f"http_endpoint.headers.{name}" in message(answer), message(answer)
    yaml_target = {"id": "siem", **target}
    with pytest.raises(ConfigError) as refused:
        parse_config({"targets": [yaml_target], "routes": everything_to("siem")})
    assert any(f"targets[0].http_endpoint.headers.{name}" in p for p in refused.value.problems)
    signing = {"secret": "a-signing-secret-of-enough-length", "header": name}
    yaml_target["http_endpoint"] = {"url": receiver.url, "signing": signing}
    with pytest.raises(ConfigError) as refused:
        parse_config({"targets": [yaml_target], "routes": everything_to("siem")})
    assert any("targets[0].http_endpoint.signing.header" in p for p in refused.value.problems)
    await ingest_still_works(daemon, f"after-{name}")
