"""Fuzzing the real daemon, in a subprocess: schemathesis drives every operation of the
daemon's own OpenAPI document (GET /openapi.json), and hypothesis posts generated bodies to
POST /v1/events and to the management API (/api/v2/..., which that document does not
describe): near-valid targets of every type, routes, views, alerts and settings. Pass: no
5xx, the process still alive, and every event that was accepted passes the event schema. The
number of inputs tried is printed at the end (pytest -s)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from router.intake.validation import EventValidator
from router.resources import schemas_dir
from tests.fakes import make_event, read_ndjson
from tests.unit.test_decode import bodies as hostile_bodies

SCHEMATHESIS_EXAMPLES = 100  # per operation, at most
BODY_EXAMPLES = 150
HOSTILE_EXAMPLES = 150
API_EXAMPLES = 150
TRIED: dict[str, int] = {
    "schemathesis": 0,
    "hypothesis_bodies": 0,
    "hostile_bodies": 0,
    "api_bodies": 0,
}


MAX_PEAK_RSS_MB = 300
INGEST_TOKEN = "fuzz-ingest-token-0123456789"
ADMIN_TOKEN = "fuzz-admin-token-0123456789"


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


class Served:
    """A daemon process and where it listens."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, archive: Path) -> None:
        self.process, self.url, self.archive = process, url, archive


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("fuzz")
    archive = root / "archive.ndjson"
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "max_body_bytes": 256 * 1024},
        "storage": {"path": str(root / "var"), "fsync": "never"},
        "startup": {"validate_targets": False},
        "targets": [
            {"id": "archive", "target_type": "file", "file_endpoint": {"path": str(archive)}}
        ],
        "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        # With tokens, so that the management API's changes are fuzzed too (a daemon without
        # admin tokens refuses them all).
        "auth": {
            "ingest_tokens": [{"name": "fuzz", "sha256": sha256(INGEST_TOKEN)}],
            "admin_tokens": [{"name": "fuzz-admin", "sha256": sha256(ADMIN_TOKEN)}],
        },
    }
    config_file = root / "router.yaml"
    config_file.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "router", "serve", "--config", str(config_file)],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    url = ""
    for line in process.stderr:  # JSON log lines; the ready line names the port
        message = json.loads(line).get("message", "")
        if " ready on " in message:
            url = message.split(" ready on ")[1].split()[0]
            break
    assert url, "the daemon did not start"
    # Drained while the tests run: a pipe nobody reads fills (64 KiB, a dozen tracebacks) and
    # then blocks the daemon's next log line, which turned one 500 into every later request
    # timing out.
    logged: list[bytes] = []
    drain = threading.Thread(target=logged.extend, args=(process.stderr,), daemon=True)
    drain.start()
    yield Served(process, url, archive)
    process.send_signal(signal.SIGTERM)
    drain.join(timeout=30)
    process.stderr.close()
    assert process.wait(timeout=30) == 0


def test_schemathesis_finds_no_server_error(served: Served) -> None:
    """Every operation of the served document, SCHEMATHESIS_EXAMPLES cases each. (The
    schemathesis pytest plugin's lazy fixtures do not run under pytest 9, so the operations'
    strategies are driven by hypothesis here.)"""
    document = requests.get(f"{served.url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/v1/tail":
            continue  # a stream that never ends; tests/integration/test_tail.py covers it

        @settings(
            max_examples=SCHEMATHESIS_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def call(case: Any) -> None:
            TRIED["schemathesis"] += 1
            token = INGEST_TOKEN if case.operation.path == "/v1/events" else ADMIN_TOKEN
            response = case.call(base_url=served.url, timeout=30, headers=bearer(token))
            case.validate_response(response, checks=[not_a_server_error])
            assert served.process.poll() is None, "the daemon died"

        call()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
# Near-valid events (one field replaced or removed) find more than noise does.
mutated_events = st.builds(
    lambda field, value, drop: {
        k: v for k, v in {**make_event(), field: value}.items() if k != drop
    },
    st.sampled_from(sorted(make_event())),
    json_values,
    st.sampled_from(["", *sorted(make_event())]),
)
# Valid events with arbitrary service data: accepted, so their archive copy is re-validated.
valid_events = st.builds(
    lambda data: make_event(requestData=data),
    st.dictionaries(st.text(max_size=10), json_values, max_size=4),
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.lists(valid_events, min_size=1, max_size=3).map(lambda es: json.dumps(es).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    mutated_events.map(lambda e: json.dumps(e).encode()),
    st.lists(mutated_events, max_size=5).map(lambda es: json.dumps(es).encode()),
    st.lists(mutated_events, max_size=5).map(
        lambda es: b"\n".join(json.dumps(e).encode() for e in es)
    ),
)
content_types = st.sampled_from(
    ["application/json", "application/x-ndjson", "text/plain", "application/json; charset=utf-8"]
)
encodings = st.sampled_from([None, "gzip", "br", "identity"])


@settings(max_examples=BODY_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, content_type=content_types, encoding=encodings)
def test_generated_bodies_get_no_server_error(
    served: Served, body: bytes, content_type: str, encoding: str | None
) -> None:
    TRIED["hypothesis_bodies"] += 1
    headers = {"Content-Type": content_type, **bearer(INGEST_TOKEN)}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    response = requests.post(f"{served.url}/v1/events", data=body, headers=headers, timeout=30)
    assert response.status_code < 500, response.text
    assert response.status_code in (202, 400, 413, 415), response.text
    assert served.process.poll() is None, "the daemon died"


@settings(max_examples=HOSTILE_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=hostile_bodies,
    content_type=st.sampled_from(["application/json", "application/x-ndjson"]),
    compress=st.booleans(),
)
def test_hostile_json_gets_no_server_error(
    served: Served, body: bytes, content_type: str, compress: bool
) -> None:
    """tests/unit/test_decode.py's bodies (duplicate keys, lone surrogates, NaN, 1e400, huge
    integers, deep nesting, a BOM, invalid UTF-8, NDJSON with blank lines), over HTTP."""
    TRIED["hostile_bodies"] += 1
    headers = {"Content-Type": content_type, **bearer(INGEST_TOKEN)}
    if compress:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    response = requests.post(f"{served.url}/v1/events", data=body, headers=headers, timeout=30)
    assert response.status_code in (202, 400), response.text
    assert served.process.poll() is None, "the daemon died"


# Where generated targets may point: only this machine (nothing is looked up or reached
# elsewhere), and addresses the API must refuse rather than fail on.
ADDRESSES = st.sampled_from(
    [
        "http://127.0.0.1:1/",
        "http://[::1",
        "http://127.0.0.1:99999/",
        "http://169.254.169.254/",
        "http://[::ffff:169.254.169.254]/",
        "http:///",
        "file:///etc/passwd",
        "",
    ]
)
BROKERS = st.sampled_from(["127.0.0.1:1", "127.0.0.1:99999", "169.254.169.254:9092", "x", ""])
COS_CRN = "crn:v1:bluemix:public:cloud-object-storage:global:a/abc123:def456::"
ES_CRN = "crn:v1:bluemix:public:messagehub:us-south:a/abc123:def456::"
LOGS_CRN = "crn:v1:bluemix:public:logs:us-south:a/abc123:0a1b2c3d-0000-4000-8000-000000000000::"


def api_bodies() -> st.SearchStrategy[tuple[str, str, Any]]:
    """(method, path, body): a valid body of each kind with one field replaced by a
    generated value or removed, or generated JSON; addresses only from ADDRESSES/BROKERS."""
    targets = st.one_of(
        st.builds(
            lambda url: {"target_type": "http", "http_endpoint": {"url": url, "timeout_s": 2}},
            ADDRESSES,
        ),
        st.builds(
            lambda url: {
                "target_type": "cloud_object_storage",
                "cos_endpoint": {
                    "endpoint": url.rstrip("/"),
                    "target_crn": COS_CRN,
                    "bucket": "audit-archive",
                    "hmac_keys": {"access_key_id": "key-id", "secret_access_key": "secret-key-01"},
                    "timeout_s": 2,
                },
            },
            ADDRESSES,
        ),
        st.builds(
            lambda broker: {
                "target_type": "event_streams",
                "eventstreams_endpoint": {
                    "target_crn": ES_CRN,
                    "brokers": [broker],
                    "topic": "audit",
                    "api_key": "an-event-streams-key-01",
                    "tls": False,
                    "timeout_s": 2,
                },
            },
            BROKERS,
        ),
        st.builds(
            lambda url: {
                "target_type": "cloud_logs",
                "cloudlogs_endpoint": {
                    "target_crn": LOGS_CRN,
                    "api_key": "a-cloud-logs-key-01",
                    "ingress_url": url,
                    "iam_url": "http://127.0.0.1:1/",
                },
            },
            ADDRESSES,
        ),
        st.builds(
            lambda port: {
                "target_type": "syslog",
                "syslog_endpoint": {"host": "127.0.0.1", "port": port},
            },
            st.integers(),
        ),
    ).map(lambda target: {"name": "fuzz", **target})
    rule = {"locations": ["*"], "target_ids": ["archive"], "filter": "outcome:failure"}
    names = st.integers(0, 10**12).map(lambda n: f"fuzz-{n}")  # a new view or alert each time
    kinds = [
        ("POST", "/api/v2/targets", targets),
        ("POST", "/api/v2/routes", st.just({"name": "fuzz", "rules": [rule]})),
        ("POST", "/api/v2/views", names.map(lambda name: {"name": name, "query": "outcome:f"})),
        (
            "POST",
            "/api/v2/alerts",
            # A query the create's own audit event matches: the new alert counts it at once.
            names.map(
                lambda name: {
                    "name": name,
                    "query": "event-router",
                    "threshold": {"count": 3, "window_s": 60},
                    "target_ids": ["archive"],
                }
            ),
        ),
        (
            "PUT",
            "/api/v2/settings",
            st.just(
                {
                    "default_targets": [],
                    "metadata_region_primary": "us-south",
                    "permitted_target_regions": [],
                    "private_api_endpoint_only": False,
                }
            ),
        ),
    ]

    def mutate(kind: tuple[str, str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
        method, path, valid = kind
        mutated = st.builds(_mutated, valid, st.data())
        # Mostly near-valid bodies: random JSON is refused at once as the wrong shape.
        bodies = st.one_of(valid, mutated, mutated, mutated, json_values)
        return st.tuples(st.just(method), st.just(path), bodies)

    return st.one_of([mutate(kind) for kind in kinds])


# Values at the edges of what a number or a string may be: hypothesis reaches them rarely.
EDGE_VALUES = st.sampled_from(
    [5e-324, 1e-300, 1e308, -1e308, 2**63, -(2**63), 2**53 + 1, 0, -1, "", "x" * 70_000, "\x00"]
)


def _mutated(body: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """`body` with one key, at any depth (each as likely), replaced by a generated or edge
    value, or removed."""
    body = json.loads(json.dumps(body))
    places = list(_places(body))
    holder, key = places[data.draw(st.integers(0, len(places) - 1))]
    if data.draw(st.integers(0, 3)) == 0:
        del holder[key]
    else:
        holder[key] = data.draw(EDGE_VALUES | json_values)
    return body


def _places(body: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    for key, value in body.items():
        yield body, key
        if isinstance(value, dict):
            yield from _places(value)


@settings(max_examples=API_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=api_bodies())
def test_generated_management_api_bodies_get_no_server_error(
    served: Served, call: tuple[str, str, Any]
) -> None:
    TRIED["api_bodies"] += 1
    method, path, body = call
    response = requests.request(
        method,
        served.url + path,
        data=json.dumps(body),
        headers={"Content-Type": "application/json", **bearer(ADMIN_TOKEN)},
        timeout=60,
    )
    assert response.status_code < 500, response.text
    assert served.process.poll() is None, "the daemon died"


def test_every_accepted_event_passes_the_schema(served: Served) -> None:
    """Runs after the fuzzers (pytest keeps a module's order)."""
    validator = EventValidator(schemas_dir())
    status = requests.get(f"{served.url}/v1/status", headers=bearer(ADMIN_TOKEN), timeout=10).json()
    accepted = status["ingest"]["accepted"]
    # The archive may trail the journal by a batch; compare what has arrived.
    archived = read_ndjson(served.archive)
    assert len(archived) <= accepted
    for event in archived:
        assert validator.validate(event) == [], event
    peak_mb = peak_rss_mb(served.process.pid)
    print(
        f"\nfuzz: {TRIED['schemathesis']} schemathesis cases, {TRIED['hypothesis_bodies']} "
        f"generated bodies, {TRIED['hostile_bodies']} hostile JSON bodies, "
        f"{TRIED['api_bodies']} management API bodies; {accepted} events "
        f"accepted, {len(archived)} archived and re-validated; "
        f"daemon peak RSS {peak_mb:.0f} MB"
    )
    # Memory stays bounded: bodies are capped (256 KiB here, inflated 20 MiB) and requests
    # limited in number, so no input may grow the daemon far past its idle ~50 MB.
    assert peak_mb < MAX_PEAK_RSS_MB
    assert TRIED["schemathesis"] > 0 and TRIED["hypothesis_bodies"] >= BODY_EXAMPLES
    assert TRIED["hostile_bodies"] >= HOSTILE_EXAMPLES
    assert TRIED["api_bodies"] >= API_EXAMPLES
