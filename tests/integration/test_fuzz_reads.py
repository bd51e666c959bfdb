"""Fuzzing every route of the running daemon, in a subprocess, as an attacker would call it:
any method on any path (ids of every shape: percent-escapes that are not UTF-8, a line break,
`..`, very long), query strings with repeated, empty, huge, negative and non-UTF-8 values,
bodies of every kind, with an admin token, an ingest token or none. tests/integration/
test_fuzz.py drives the documented operations and the bodies of ingest and the management
API; this one drives the reads (status, search, dead letters, receipts, metrics, console)
and the paths and query strings of all of them. Pass: every answer is below 500 (503 only
with a JSON reason), none holds a traceback, the daemon logs no error (an unhandled
exception, an audit event it could not record), and it still answers /readyz 200. The
number of requests is printed at the end (pytest -s)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import make_event

EXAMPLES = 500
INGEST_TOKEN = "fuzz-reads-ingest-token-0123456789"
ADMIN_TOKEN = "fuzz-reads-admin-token-0123456789"
TRIED: dict[str, int] = {"requests": 0}


class Served:
    """A daemon process, where it listens, and the file its log goes to."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("fuzz-reads")
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "max_body_bytes": 64 * 1024},
        "storage": {"path": str(root / "var"), "fsync": "never"},
        "startup": {"validate_targets": False},
        "targets": [
            {
                "id": "archive",
                "target_type": "file",
                "file_endpoint": {"path": str(root / "archive.ndjson")},
            }
        ],
        "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        "auth": {
            "ingest_tokens": [
                {"name": "fuzz", "sha256": hashlib.sha256(INGEST_TOKEN.encode()).hexdigest()}
            ],
            "admin_tokens": [
                {"name": "fuzz-admin", "sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}
            ],
        },
    }
    config_file = root / "router.yaml"
    config_file.write_text("# written by test_fuzz_reads\n" + yaml.safe_dump(config))
    log = root / "daemon.log"
    with open(log, "wb") as sink:  # a file, not a pipe nobody reads while the fuzz runs
        process = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--config", str(config_file)],
            stderr=sink,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    served = Served(process, _wait_for_url(process, log), log)
    yield served
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def _wait_for_url(process: subprocess.Popen[bytes], log: Path) -> str:
    """The URL the ready line names (JSON log lines), waiting for it with a deadline."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            message = json.loads(line).get("message", "")
            if " ready on " in message:
                return str(message.split(" ready on ")[1].split()[0])
        assert process.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError("the daemon did not start")


# Path segments: ids that exist, raw escapes that are not UTF-8 or that decode to what a path
# should not hold (a line break inside, which a CRN quoting the id cannot), text of any kind
# percent-encoded; the hostile ones twice as likely as the text.
HOSTILE_SEGMENTS = [
    *("archive", "all", "nope", "..", ".", "%2e%2e", "%ff", "%00", "%c0%af", "%25", "%20"),
    *("a%0Ab", "%0Ax", "x%0D%0Ay", "%0A%0A", "%E2%80%A8", "%ED%A0%80", "x" * 3000, "a%2Fb"),
]
SEGMENTS = st.one_of(
    st.sampled_from(HOSTILE_SEGMENTS),
    st.sampled_from(HOSTILE_SEGMENTS),
    st.text(min_size=1, max_size=40).map(lambda text: quote(text, safe="")),
)
PATHS = [
    "/v1/status",
    "/v1/search",
    "/v1/deadletters",
    "/v1/deadletters/{}",
    "/v1/deadletters/{}/redrive",
    "/v1/receipts/{}",
    "/v1/events",
    "/metrics",
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/console",
    "/console/{}",
    "/api/v2/targets",
    "/api/v2/targets/{}",
    "/api/v2/targets/{}/validate",
    "/api/v2/routes",
    "/api/v2/routes/{}",
    "/api/v2/views",
    "/api/v2/views/{}",
    "/api/v2/alerts",
    "/api/v2/alerts/{}",
    "/api/v2/settings",
    "/{}",
]
KEYS = st.sampled_from(
    ["target", "query", "since", "until", "limit", "cursor", "reason", "region", "view", "id"]
) | st.text(max_size=10).map(lambda text: quote(text, safe=""))
VALUES = st.one_of(
    st.sampled_from(["", "archive", "-1", "0", "1", "200", "201", "1e9", "NaN", "Infinity"]),
    st.sampled_from(["9" * 5000, str(2**64), str(-(2**63)), "1-2", "99999999999999999999-0"]),
    st.sampled_from(["2024-05-01T12:00:00Z", "2024-13-45", "9999-12-31T23:59:59+99:99", "now"]),
    st.sampled_from(["%ff", "%ED%A0%80", "%00", "(" * 200, "a:" * 100, "outcome:failure"]),
    st.text(max_size=60).map(lambda text: quote(text, safe="")),
)
QUERIES = st.lists(st.tuples(KEYS, VALUES), max_size=6).map(
    lambda pairs: "?" + "&".join(f"{k}={v}" for k, v in pairs) if pairs else ""
)
BODIES = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.sampled_from([b"{}", b"[]", b"null", b'{"name": "x"}', b'{"a": NaN}', b'"\\ud800"']),
    st.just(json.dumps([make_event()]).encode()),
)
TOKENS = st.sampled_from([ADMIN_TOKEN, ADMIN_TOKEN, ADMIN_TOKEN, INGEST_TOKEN, None])
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/x-ndjson"])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(["GET", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    path=st.sampled_from(PATHS),
    segment=SEGMENTS,
    query=QUERIES,
    body=BODIES,
    token=TOKENS,
    content_type=CONTENT_TYPES,
)
def test_no_route_answers_a_server_error_or_a_traceback(
    served: Served,
    method: str,
    path: str,
    segment: str,
    query: str,
    body: bytes | None,
    token: str | None,
    content_type: str,
) -> None:
    TRIED["requests"] += 1
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = served.url + path.format(segment) + query
    response = requests.request(method, url, data=body, headers=headers, timeout=30)
    text = response.text
    assert response.status_code < 500 or (
        response.status_code == 503 and "application/json" in response.headers["Content-Type"]
    ), (method, url, response.status_code, text[:500])
    assert "Traceback" not in text, (method, url, text[:500])
    assert served.process.poll() is None, "the daemon died"


def test_the_daemon_logged_no_error_and_is_still_ready(served: Served) -> None:
    """Runs after the fuzzer (pytest keeps a module's order)."""
    assert requests.get(served.url + "/readyz", timeout=10).status_code == 200
    errors = [
        line
        for line in served.log.read_text().splitlines()
        if json.loads(line).get("level") in ("error", "critical")
    ]
    assert errors == [], "\n".join(line[:600] for line in errors[:3])
    print(f"\nfuzz reads: {TRIED['requests']} requests")
    assert TRIED["requests"] >= EXAMPLES
