"""RFC 5424 formatting details of the syslog target."""

from __future__ import annotations

import pytest

from router.events import Event
from router.targets.syslog import SyslogEndpointConfig, SyslogTarget, header_token, sd_escape
from tests.fakes import make_event


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [('say "hi"', 'say \\"hi\\"'), ("a]b", "a\\]b"), ("back\\slash", "back\\\\slash"), ("", "")],
)
def test_structured_data_values_are_escaped(raw: str, escaped: str) -> None:
    assert sd_escape(raw) == escaped


@pytest.mark.parametrize(
    ("value", "limit", "token"),
    [("my host", 255, "myhost"), ("", 48, "-"), ("é-only", 48, "-only"), ("x" * 40, 32, "x" * 32)],
)
def test_header_fields_are_printable_ascii_without_spaces(
    value: str, limit: int, token: str
) -> None:
    assert header_token(value, limit) == token


def test_a_long_action_is_cut_to_32_characters_in_msgid_but_kept_whole_in_sd() -> None:
    action = "secrets-manager.notifications-registration.create"
    event = Event.from_body(make_event(action=action, id="x"))
    target = SyslogTarget("siem", SyslogEndpointConfig(host="h", hostname="r1", bom=False))
    message = target.message(event).decode()
    assert message.split(" ")[5] == action[:32]
    assert f'action="{action}"' in message


@pytest.mark.parametrize(
    ("severity", "pri"), [("normal", 110), ("warning", 108), ("critical", 106)]
)
def test_pri_is_log_audit_plus_the_event_severity(severity: str, pri: int) -> None:
    event = Event.from_body(make_event(severity=severity))
    target = SyslogTarget("siem", SyslogEndpointConfig(host="h"))
    assert target.message(event).startswith(f"<{pri}>1 ".encode())
