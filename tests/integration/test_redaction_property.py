"""A property, tested against a real daemon: a secret planted anywhere in requestData or
responseData, under any spelling of a sensitive key, never reaches any output — the journal's
bytes on disk, a file target, an HTTP target, a dead letter, the tail, the logs, the status."""

from __future__ import annotations

import asyncio
import logging
import string
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.intake.redaction import HASH_PREFIX, MASK
from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import ReceiverFactory, everything_to, file_target, http_target, post

# Marked in the event schema (x-sensitive) or, for vault_token, added by the config below.
SENSITIVE = (
    "payload",
    "password",
    "api_key",
    "private_key",
    "certificate",
    "client_secret",
    "access_token",
    "passphrase",
    "vault_token",
)
EXAMPLES = 60
SECRET_PREFIX = "SECRETVALUE"


@st.composite
def spelling(draw: st.DrawFn) -> str:
    """A sensitive key as some producer might spell it: api_key, API-KEY, apiKey, Apikey..."""
    parts = draw(st.sampled_from(SENSITIVE)).split("_")
    joined = draw(st.sampled_from(["_", "-", ""])).join(parts)
    cases = draw(st.lists(st.booleans(), min_size=len(joined), max_size=len(joined)))
    return "".join(c.upper() if up else c for c, up in zip(joined, cases, strict=True))


secret = st.text(string.ascii_letters + string.digits, min_size=8, max_size=20).map(
    lambda s: SECRET_PREFIX + s
)
secret_value = st.one_of(
    secret,
    st.lists(secret, min_size=1, max_size=3),
    st.dictionaries(st.sampled_from(["pem", "value", "data"]), secret, min_size=1),
)
filler_key = st.text(string.ascii_lowercase, min_size=1, max_size=6)
filler = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),
    st.text(string.ascii_lowercase + " ", max_size=10),
)


def with_plants(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of filler children with sensitive keys planted among them."""
    return st.builds(
        lambda base, planted: {**base, **dict(planted)},
        st.dictionaries(filler_key, children, max_size=3),
        st.lists(st.tuples(spelling(), secret_value), max_size=2),
    )


tree = st.recursive(
    filler,
    lambda children: st.one_of(st.lists(children, max_size=3), with_plants(children)),
    max_leaves=12,
)
service_data = st.builds(
    lambda top, planted: {**top, **dict(planted)},
    st.dictionaries(filler_key, tree, max_size=3),
    st.lists(st.tuples(spelling(), secret_value), min_size=1, max_size=2),
)


def secrets_in(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value} if value.startswith(SECRET_PREFIX) else set()
    if isinstance(value, dict):
        return set().union(*(secrets_in(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(secrets_in(v) for v in value))
    return set()


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def test_no_planted_secret_reaches_any_output(
    start_daemon: StartDaemon,
    receiver_factory: ReceiverFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    siem = await receiver_factory([200])
    refuser = await receiver_factory([400])
    archive = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {
            "targets": [
                file_target("archive", archive),
                http_target("siem", siem.url),
                http_target("refuser", refuser.url) | {"retry": {"max_attempts": 1}},
            ],
            "routes": everything_to("archive", "siem", "refuser"),
            "redaction": {"keys": [{"key": "vault_token", "action": "hash"}]},
        }
    )
    tail = daemon.tail.subscribe(None)
    loop = asyncio.get_running_loop()
    planted: set[str] = set()
    sent = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(request_data=service_data, response_data=st.one_of(st.none(), service_data))
    def send(request_data: dict[str, Any], response_data: dict[str, Any] | None) -> None:
        nonlocal sent
        event = make_event(requestData=request_data, responseData=response_data)
        secrets = secrets_in(event)
        assert secrets, "every example plants at least one secret"
        planted.update(secrets)
        status, body = asyncio.run_coroutine_threadsafe(post(daemon, event), loop).result(30)
        assert status == 202, body
        sent += 1

    await asyncio.to_thread(send)
    assert sent >= EXAMPLES and planted

    await wait_for(
        lambda: (
            len(read_ndjson(archive)) == sent
            and len(siem.delivered_events) == sent
            and len(read_ndjson(tmp_path / "var" / "deadletter" / "refuser.ndjson")) == sent
        ),
        timeout_s=30,
        what="every event at every target and in the dead letters",
    )
    await wait_for(lambda: len(tail.pending) == sent, what="every event at the tail")
    tailed = tail.take()
    outputs: dict[str, bytes] = {
        "siem": orjson.dumps([r.body for r in siem.requests]),
        "refuser": orjson.dumps([r.body for r in refuser.requests]),
        "tail": b"\n".join(tailed),
        "logs": caplog.text.encode(),
        "status": orjson.dumps(daemon.status()),
    }
    outputs |= files_under(tmp_path)  # the journal (db and WAL), archive, dead letters
    assert any("journal" in name for name in outputs)
    for name, data in outputs.items():
        assert SECRET_PREFIX.encode() not in data, f"a planted secret reached {name}"
    # Every archived event says what was taken out, and only the policy's marks remain.
    for event in read_ndjson(archive):
        assert event["redaction"]["by"] == "event-router" and event["redaction"]["count"] >= 1
    marks = orjson.dumps(read_ndjson(archive))
    assert MASK.encode() in marks and HASH_PREFIX.encode() in marks
