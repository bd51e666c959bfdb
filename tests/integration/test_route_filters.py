"""Route rule filters in a real daemon: an alerting route gets only what passes its query."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from router.query import MAX_NESTING
from tests.conftest import StartDaemon
from tests.fakes import make_event, read_ndjson, wait_for
from tests.helpers import ReceiverFactory, file_target, http_target, post, settled
from tests.integration.test_api import Client, auth


def unauthorized(**fields: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "action": "secrets-manager.secret.read",
        "outcome": "failure",
        "reason": {"reasonCode": 401, "reasonType": "Unauthorized"},
        "severity": "warning",
    }
    return make_event(**(defaults | fields))


async def test_alerting_route_gets_only_unauthorized_events_and_the_archive_gets_all(
    start_daemon: StartDaemon, receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    webhook = await receiver_factory([200])
    archive = tmp_path / "archive.ndjson"
    daemon = await start_daemon(
        {
            "targets": [http_target("webhook", webhook.url), file_target("archive", archive)],
            "routes": [
                {
                    "name": "alerts",
                    "rules": [
                        {
                            "locations": ["*"],
                            "target_ids": ["webhook"],
                            "filter": "reason.reasonType:Unauthorized",
                        }
                    ],
                },
                {"name": "archive", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]},
            ],
        }
    )
    events = [
        make_event(id="ok-1"),
        unauthorized(id="denied-1"),
        make_event(id="ok-2", location="eu-de"),
        # Vault's lower-case reasonType: the dialect's prefix match is case-insensitive
        unauthorized(id="denied-2", reason={"reasonCode": 401, "reasonType": "unauthorized"}),
        make_event(id="ok-3", outcome="failure", reason={"reasonCode": 500, "reasonType": "Err"}),
    ]
    status, body = await post(daemon, events)
    assert status == 202 and body["accepted"] == 5
    await wait_for(lambda: settled(daemon), what="both targets to drain")
    assert [e["id"] for e in webhook.delivered_events] == ["denied-1", "denied-2"]
    assert [e["id"] for e in read_ndjson(archive)] == [
        "ok-1",
        "denied-1",
        "ok-2",
        "denied-2",
        "ok-3",
    ]
    assert daemon.status()["targets"]["webhook"]["received"] == 2
    assert daemon.status()["targets"]["archive"]["received"] == 5


async def test_filter_failing_falls_through_to_the_next_rule_of_the_route(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    alerts, rest = tmp_path / "alerts.ndjson", tmp_path / "rest.ndjson"
    daemon = await start_daemon(
        {
            "targets": [file_target("alerts", alerts), file_target("rest", rest)],
            "routes": [
                {
                    "name": "split",
                    "rules": [
                        {
                            "locations": ["us-south"],
                            "target_ids": ["alerts"],
                            "filter": "host:secrets-manager reason.reasonCode:>=400",
                        },
                        {"locations": ["*"], "target_ids": ["rest"]},
                    ],
                }
            ],
        }
    )
    await post(
        daemon, [unauthorized(id="a"), make_event(id="b"), unauthorized(id="c", location="eu-de")]
    )
    await wait_for(lambda: settled(daemon))
    assert [e["id"] for e in read_ndjson(alerts)] == ["a"]
    assert [e["id"] for e in read_ndjson(rest)] == ["b", "c"]


async def test_a_route_filter_nested_too_deep_is_refused_by_the_api_with_the_column(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    # It used to overflow the parser's stack: a 500 from the management API.
    daemon = await start_daemon(
        {
            "auth": auth(),
            "targets": [file_target("archive", tmp_path / "archive.ndjson")],
            "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
        }
    )
    deep = "(" * 10_000 + "outcome:failure" + ")" * 10_000
    rule = {"locations": ["*"], "target_ids": ["archive"], "filter": deep}
    status, body = await Client(daemon).call(
        "POST", "/api/v2/routes", {"name": "deep", "rules": [rule]}
    )
    assert status == 400
    assert f"column {MAX_NESTING + 1}: parentheses and NOT nested deeper" in str(body)
    assert [route.name for route in daemon.config.routes] == ["all"]
