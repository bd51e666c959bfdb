"""validation.EventValidator and the CRN/action helpers of events.py, as tables."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from router.events import Event, action_service, crn_location, crn_parts, crn_service
from router.intake.validation import EventValidator, Problem, load_catalogues
from router.resources import schemas_dir
from tests.fakes import ACCOUNT, INSTANCE, make_event, sm_crn

# The Secrets Manager documentation page the catalogue was written from (kept beside the repo).
SEED = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "seed"
    / "secrets-manager-activity-tracker-events.md"
)

TIME_ERROR = (
    "must be an ISO 8601 time such as 2024-05-01T12:00:00.12+0000 "
    "(any fraction digits; Z, +0000 or +00:00)"
)
LOG_SOURCE_CRN_ERROR = (
    "must be the CRN of the producing instance, "
    "crn:v1:bluemix:public:<service>:<location>:a/<account>:<instance>::"
)
TARGET_CRN_ERROR = (
    "must be a CRN, "
    "crn:v1:<cname>:<ctype>:<service>:<location>:<scope>:<instance>:<resource-type>:<resource>"
)
SHORT_ACCOUNT = "acc1"  # keeps rejected CRNs under the 80-character excerpt limit
ACTION_ERROR = "must be a dotted name <service>.<object>.<verb>, e.g. secrets-manager.secret.create"


# The 38 actions of the seed's four tables (secrets, secret groups, secret locks, instance
# operations), written out so the suite does not depend on the seed file being beside the repo.
SECRETS_MANAGER_ACTIONS = (
    "secrets-manager.configuration-action.create",
    "secrets-manager.configuration.create",
    "secrets-manager.configuration.delete",
    "secrets-manager.configuration.read",
    "secrets-manager.configuration.update",
    "secrets-manager.configurations.list",
    "secrets-manager.endpoints.view",
    "secrets-manager.instance.login",
    "secrets-manager.notifications-registration.create",
    "secrets-manager.notifications-registration.delete",
    "secrets-manager.notifications-registration.read",
    "secrets-manager.notifications-registration.test",
    "secrets-manager.secret-action.create",
    "secrets-manager.secret-group.create",
    "secrets-manager.secret-group.delete",
    "secrets-manager.secret-group.read",
    "secrets-manager.secret-group.update",
    "secrets-manager.secret-groups.list",
    "secrets-manager.secret-locks.create",
    "secrets-manager.secret-locks.delete",
    "secrets-manager.secret-locks.list",
    "secrets-manager.secret-metadata.read",
    "secrets-manager.secret-metadata.update",
    "secrets-manager.secret-version-action.create",
    "secrets-manager.secret-version-data.delete",
    "secrets-manager.secret-version-locks.create",
    "secrets-manager.secret-version-locks.delete",
    "secrets-manager.secret-version-locks.list",
    "secrets-manager.secret-version-metadata.read",
    "secrets-manager.secret-version-metadata.update",
    "secrets-manager.secret-version.create",
    "secrets-manager.secret-version.read",
    "secrets-manager.secret-versions.list",
    "secrets-manager.secret.create",
    "secrets-manager.secret.delete",
    "secrets-manager.secret.read",
    "secrets-manager.secrets-locks.list",
    "secrets-manager.secrets.list",
)

needs_seed = pytest.mark.skipif(not SEED.exists(), reason=f"the seed is not at {SEED}")


@pytest.fixture(scope="module")
def validator() -> EventValidator:
    return EventValidator(schemas_dir())


@pytest.fixture(scope="module")
def lenient_validator() -> EventValidator:
    return EventValidator(schemas_dir(), unknown_actions="accept")


def seed_actions() -> list[str]:
    """Every backticked `secrets-manager.*` name in the seed's markdown tables."""
    text = SEED.read_text(encoding="utf-8")
    return [
        name
        for line in text.splitlines()
        if line.lstrip().startswith("|")
        for name in re.findall(r"`(secrets-manager\.[^`]+)`", line)
    ]


def without(event: dict[str, Any], pointer: str) -> dict[str, Any]:
    """A copy of `event` with the field at JSON pointer `pointer` removed."""
    event = copy.deepcopy(event)
    *parents, last = pointer.strip("/").split("/")
    node = event
    for part in parents:
        node = node[part]
    del node[last]
    return event


def with_value(event: dict[str, Any], pointer: str, value: Any) -> dict[str, Any]:
    """A copy of `event` with the field at JSON pointer `pointer` set to `value`."""
    event = copy.deepcopy(event)
    *parents, last = pointer.strip("/").split("/")
    node = event
    for part in parents:
        node = node[part]
    node[last] = value
    return event


def test_valid_event_has_no_problems(validator: EventValidator) -> None:
    assert validator.validate(make_event()) == []


# -- required fields -------------------------------------------------------------------------

REQUIRED_FIELDS = [
    "/action",
    "/eventTime",
    "/initiator",
    "/initiator/id",
    "/initiator/name",
    "/initiator/typeURI",
    "/initiator/credential",
    "/initiator/credential/type",
    "/target",
    "/target/id",
    "/target/name",
    "/target/typeURI",
    "/outcome",
    "/reason",
    "/reason/reasonCode",
    "/severity",
    "/observer",
    "/observer/name",
    "/logSourceCRN",
    "/message",
    "/saveServiceCopy",
    "/dataEvent",
]


@pytest.mark.parametrize("pointer", REQUIRED_FIELDS)
def test_missing_required_field_is_reported_at_its_own_pointer(
    validator: EventValidator, pointer: str
) -> None:
    assert validator.validate(without(make_event(), pointer)) == [
        Problem(pointer, "required field is missing")
    ]


@pytest.mark.parametrize("pointer", ["/id", "/correlationId", "/tags", "/initiator/host"])
def test_optional_field_may_be_missing(validator: EventValidator, pointer: str) -> None:
    event = make_event(id="e-1", correlationId="c-1", tags=["a"])
    assert validator.validate(without(event, pointer)) == []


def test_unknown_extra_fields_are_allowed(validator: EventValidator) -> None:
    assert validator.validate(make_event(producerSpecific={"anything": [1, 2]})) == []


# -- enums, types, const ---------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["success", "failure", "pending", "unknown"])
def test_outcome_enum_values_are_accepted(validator: EventValidator, outcome: str) -> None:
    assert validator.validate(make_event(outcome=outcome)) == []


@pytest.mark.parametrize(
    ("outcome", "shown"),
    [("Success", '"Success"'), ("ok", '"ok"'), ("", '""'), (None, "null"), (1, "1")],
)
def test_outcome_outside_enum_is_rejected(
    validator: EventValidator, outcome: Any, shown: str
) -> None:
    assert validator.validate(make_event(outcome=outcome)) == [
        Problem("/outcome", f"{shown} is not one of: success, failure, pending, unknown")
    ]


@pytest.mark.parametrize("severity", ["normal", "warning", "critical"])
def test_severity_enum_values_are_accepted(validator: EventValidator, severity: str) -> None:
    assert validator.validate(make_event(severity=severity)) == []


@pytest.mark.parametrize("severity", ["info", "Critical", "error", ""])
def test_severity_outside_enum_is_rejected(validator: EventValidator, severity: str) -> None:
    assert validator.validate(make_event(severity=severity)) == [
        Problem("/severity", f'"{severity}" is not one of: normal, warning, critical')
    ]


@pytest.mark.parametrize("address_type", ["IPv4", "IPv6", "CSE", "subnet"])
def test_initiator_host_address_type_enum_is_accepted(
    validator: EventValidator, address_type: str
) -> None:
    event = with_value(make_event(), "/initiator/host/addressType", address_type)
    assert validator.validate(event) == []


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("200", "must be of type integer, not string"),
        (True, "must be of type integer, not boolean"),
        (200.5, "must be of type integer, not number"),
        (None, "must be of type integer, not null"),
    ],
)
def test_reason_code_must_be_an_integer(validator: EventValidator, code: Any, message: str) -> None:
    event = with_value(make_event(), "/reason/reasonCode", code)
    assert validator.validate(event) == [Problem("/reason/reasonCode", message)]


@pytest.mark.parametrize("code", [100, 200, 403, 599])
def test_reason_code_in_http_range_is_accepted(validator: EventValidator, code: int) -> None:
    event = with_value(make_event(), "/reason/reasonCode", code)
    assert validator.validate(event) == []


@pytest.mark.parametrize("code", [99, 600, 0, -1])
def test_reason_code_outside_http_range_is_rejected(validator: EventValidator, code: int) -> None:
    event = with_value(make_event(), "/reason/reasonCode", code)
    assert [p.path for p in validator.validate(event)] == ["/reason/reasonCode"]


def test_reason_type_is_required_when_outcome_is_failure(validator: EventValidator) -> None:
    event = without(make_event(outcome="failure"), "/reason/reasonType")
    assert validator.validate(event) == [Problem("/reason/reasonType", "required field is missing")]


@pytest.mark.parametrize("outcome", ["success", "pending", "unknown"])
def test_reason_type_is_optional_when_outcome_is_not_failure(
    validator: EventValidator, outcome: str
) -> None:
    event = without(make_event(outcome=outcome), "/reason/reasonType")
    assert validator.validate(event) == []


@pytest.mark.parametrize(
    ("pointer", "value", "message"),
    [
        ("/message", 1, "must be of type string, not integer"),
        ("/saveServiceCopy", "true", "must be of type boolean, not string"),
        ("/dataEvent", 0, "must be of type boolean, not integer"),
        ("/initiator", "alice", "must be of type object, not string"),
        ("/requestData", [], "must be of type ['object', 'null'], not array"),
        ("/tags", "a,b", "must be of type array, not string"),
    ],
)
def test_field_of_wrong_type_is_rejected_with_its_type(
    validator: EventValidator, pointer: str, value: Any, message: str
) -> None:
    assert validator.validate(with_value(make_event(), pointer, value)) == [
        Problem(pointer, message)
    ]


def test_request_data_may_be_null(validator: EventValidator) -> None:
    assert validator.validate(make_event(requestData=None, responseData=None)) == []


def test_tag_of_wrong_type_is_reported_at_its_index(validator: EventValidator) -> None:
    assert validator.validate(make_event(tags=["ok", 7])) == [
        Problem("/tags/1", "must be of type string, not integer")
    ]


@pytest.mark.parametrize("name", ["activitytracker", "Activity Tracker", "LogDNA", ""])
def test_observer_name_must_be_activity_tracker(validator: EventValidator, name: str) -> None:
    assert validator.validate(make_event(observer={"name": name})) == [
        Problem("/observer/name", "must be 'ActivityTracker'")
    ]


# -- eventTime -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event_time",
    [
        "2024-05-01T12:00:00+0000",
        "2024-05-01T12:00:00.1+0000",
        "2024-05-01T12:00:00.123456789+0000",
        "2024-05-01T12:00:00+00:00",
        "2024-05-01T12:00:00Z",
        "2024-05-01T12:00:00.5Z",
        "2024-05-01T07:00:00-0500",
        "2024-05-01T07:00:00-05:00",
        "2024-02-29T23:59:59+0530",
        "2016-12-31T23:59:60Z",
    ],
)
def test_event_time_accepted_forms(validator: EventValidator, event_time: str) -> None:
    assert validator.validate(make_event(eventTime=event_time)) == []


@pytest.mark.parametrize(
    "event_time",
    [
        pytest.param("2024-05-01 12:00:00+0000", id="space-instead-of-T"),
        pytest.param("2024-05-01t12:00:00+0000", id="lower-case-t"),
        pytest.param("2024-13-01T12:00:00+0000", id="month-13"),
        pytest.param("2024-00-01T12:00:00+0000", id="month-0"),
        pytest.param("2024-05-32T12:00:00+0000", id="day-32"),
        pytest.param("2024-05-01T24:00:00+0000", id="hour-24"),
        pytest.param("2024-05-01T12:00:00", id="missing-offset"),
        pytest.param("2024-05-01T12:00:00.123", id="fraction-missing-offset"),
        pytest.param("2024-05-01", id="date-only"),
        pytest.param("2024-05-01T12:00:00.+0000", id="empty-fraction"),
        pytest.param("2024-05-01T12:00:00z", id="lower-case-z"),
        pytest.param("2024-05-01T12:00:00+2400", id="offset-24h"),
        pytest.param("1714564800", id="epoch-seconds"),
        pytest.param("", id="empty"),
    ],
)
def test_event_time_rejected_forms(validator: EventValidator, event_time: str) -> None:
    assert validator.validate(make_event(eventTime=event_time)) == [
        Problem("/eventTime", f'"{event_time}" {TIME_ERROR}')
    ]


def test_event_time_that_is_not_a_string_is_a_type_problem(validator: EventValidator) -> None:
    assert validator.validate(make_event(eventTime=1714564800)) == [
        Problem("/eventTime", "must be of type string, not integer")
    ]


# -- CRNs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "crn",
    [
        pytest.param(sm_crn("us-south"), id="region"),
        pytest.param(sm_crn("eu-de-1"), id="zone"),
        pytest.param(sm_crn(""), id="empty-location"),
        pytest.param(sm_crn("global"), id="global"),
        pytest.param(f"crn:v1:staging:dedicated:secrets-manager:eu-gb:a/{ACCOUNT}:x::", id="ded"),
        pytest.param(
            f"crn:v1:bluemix:public:secrets-manager:us-south:a/{ACCOUNT}:{INSTANCE}:secret:abc:d",
            id="resource-with-colons",
        ),
    ],
)
def test_log_source_crn_accepted_forms(validator: EventValidator, crn: str) -> None:
    assert validator.validate(make_event(logSourceCRN=crn)) == []


@pytest.mark.parametrize(
    "crn",
    [
        pytest.param("", id="empty"),
        pytest.param("secrets-manager", id="not-a-crn"),
        pytest.param(
            f"CRN:v1:bluemix:public:secrets-manager:us-south:a/{SHORT_ACCOUNT}:x::", id="upper"
        ),
        pytest.param(
            f"crn:v2:bluemix:public:secrets-manager:us-south:a/{SHORT_ACCOUNT}:x::", id="v2"
        ),
        pytest.param(
            f"crn:v1:bluemix:private:secrets-manager:us-south:a/{SHORT_ACCOUNT}:x::", id="ctype"
        ),
        pytest.param(
            f"crn:v1:bluemix:public:Secrets:us-south:a/{SHORT_ACCOUNT}:x::", id="upper-service"
        ),
        pytest.param(f"crn:v1:bluemix:public::us-south:a/{SHORT_ACCOUNT}:x::", id="no-service"),
        pytest.param(
            f"crn:v1:bluemix:public:secrets-manager:US South:a/{SHORT_ACCOUNT}:x::", id="loc"
        ),
        pytest.param(
            f"crn:v1:bluemix:public:secrets-manager:us-south:o/{SHORT_ACCOUNT}:x::", id="org"
        ),
        pytest.param("crn:v1:bluemix:public:secrets-manager:us-south:a/:x::", id="no-account"),
        pytest.param(
            f"crn:v1:bluemix:public:secrets-manager:us-south:a/{SHORT_ACCOUNT}", id="short"
        ),
    ],
)
def test_log_source_crn_rejected_forms(validator: EventValidator, crn: str) -> None:
    assert validator.validate(make_event(logSourceCRN=crn)) == [
        Problem("/logSourceCRN", f'"{crn}" {LOG_SOURCE_CRN_ERROR}')
    ]


@pytest.mark.parametrize(
    "crn",
    [
        pytest.param(make_event()["target"]["id"], id="secret"),
        pytest.param(sm_crn(""), id="empty-location"),
        pytest.param(f"crn:v1:bluemix:public:iam-identity:global:a/{ACCOUNT}:::", id="global"),
        pytest.param("crn:v1:bluemix:public:cloud-object-storage:global::::", id="no-scope"),
        pytest.param("crn:v1:bluemix:public:cf:us-south:s/0f1e2d:::", id="space-scope"),
        pytest.param(
            f"crn:v1:bluemix:public:is:us-south-1:a/{ACCOUNT}::instance:0717_a:b:c",
            id="resource-with-colons",
        ),
    ],
)
def test_target_id_crn_accepted_forms(validator: EventValidator, crn: str) -> None:
    assert validator.validate(with_value(make_event(), "/target/id", crn)) == []


@pytest.mark.parametrize(
    "crn",
    [
        pytest.param("db-password", id="name"),
        pytest.param("", id="empty"),
        pytest.param("crn:v1:bluemix:public:secrets-manager:us-south", id="six-segments"),
        pytest.param(
            f"crn:v1:bluemix:public:secrets-manager:us-south:a/{SHORT_ACCOUNT}:x", id="eight"
        ),
        pytest.param(
            f"crn:v1:bluemix:cloud:secrets-manager:us-south:a/{SHORT_ACCOUNT}:x::", id="ctype"
        ),
        pytest.param(
            f"crn:v1:bluemix:public:secrets-manager:Dallas:a/{SHORT_ACCOUNT}:x::", id="loc"
        ),
    ],
)
def test_target_id_crn_rejected_forms(validator: EventValidator, crn: str) -> None:
    assert validator.validate(with_value(make_event(), "/target/id", crn)) == [
        Problem("/target/id", f'"{crn}" {TARGET_CRN_ERROR}')
    ]


# -- action ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "action",
    [
        pytest.param("secrets-manager", id="service-only"),
        pytest.param("secrets-manager.secret", id="two-parts"),
        pytest.param("secrets-manager.secret.", id="trailing-dot"),
        pytest.param("Secrets-Manager.secret.create", id="upper-service"),
        pytest.param("-sm.secret.create", id="leading-dash"),
        pytest.param("secrets manager.secret.create", id="space"),
        pytest.param("secrets-manager..create", id="empty-part"),
        pytest.param("", id="empty"),
    ],
)
def test_action_must_be_a_dotted_name(validator: EventValidator, action: str) -> None:
    assert validator.validate(make_event(action=action)) == [
        Problem("/action", f'"{action}" {ACTION_ERROR}')
    ]


@needs_seed
def test_seed_tables_list_the_38_secrets_manager_actions() -> None:
    actions = seed_actions()
    assert len(actions) == 38
    assert sorted(set(actions)) == sorted(SECRETS_MANAGER_ACTIONS)


def test_catalogue_holds_exactly_the_38_secrets_manager_actions() -> None:
    catalogue = load_catalogues(schemas_dir())["secrets-manager"]
    assert len(SECRETS_MANAGER_ACTIONS) == 38
    assert catalogue.actions == frozenset(SECRETS_MANAGER_ACTIONS)
    assert catalogue.source == "secrets-manager.json"


@pytest.mark.parametrize("action", SECRETS_MANAGER_ACTIONS)
def test_every_secrets_manager_action_of_the_seed_is_accepted(
    validator: EventValidator, action: str
) -> None:
    assert validator.validate(make_event(action=action)) == []


@pytest.mark.parametrize(
    ("action", "crn"),
    [
        pytest.param("secrets-manager.secret.explode", sm_crn(), id="unknown-verb"),
        pytest.param("secrets-manager.secrets.create", sm_crn(), id="near-miss"),
        pytest.param("kms.key.create", sm_crn(), id="other-service-action-on-sm-crn"),
        pytest.param(
            "secrets-manager.secret.explode", sm_crn(service="kms"), id="sm-action-on-kms-crn"
        ),
    ],
)
def test_action_outside_the_catalogue_is_rejected(
    validator: EventValidator, action: str, crn: str
) -> None:
    assert validator.validate(make_event(action=action, logSourceCRN=crn)) == [
        Problem(
            "/action",
            f"{action!r} is not an action of the secrets-manager catalogue (secrets-manager.json)",
        )
    ]


def test_action_outside_the_catalogue_passes_when_unknown_actions_are_accepted(
    lenient_validator: EventValidator,
) -> None:
    event = make_event(action="secrets-manager.secret.explode")
    assert lenient_validator.validate(event) == []


def test_lenient_validator_still_applies_the_base_schema(
    lenient_validator: EventValidator,
) -> None:
    assert lenient_validator.validate(make_event(severity="info")) == [
        Problem("/severity", '"info" is not one of: normal, warning, critical')
    ]


@pytest.mark.parametrize(
    ("service", "action"),
    [
        ("kms", "kms.key.create"),
        ("is", "is.instance.instance.create"),
        ("iam-identity", "iam-identity.apikey.login"),
    ],
)
def test_service_without_catalogue_is_checked_on_the_base_schema_only(
    validator: EventValidator, service: str, action: str
) -> None:
    event = make_event(action=action, logSourceCRN=sm_crn(service=service))
    assert validator.validate(event) == []


# -- several problems, non-objects -----------------------------------------------------------


def test_event_with_several_problems_reports_all_sorted_by_path(
    validator: EventValidator,
) -> None:
    event = make_event(outcome="ok", severity="bad", message=1, eventTime="2024-05-01")
    event = with_value(event, "/reason/reasonCode", "200")
    event = without(event, "/initiator/credential/type")
    event = without(event, "/dataEvent")
    assert validator.validate(event) == [
        Problem("/dataEvent", "required field is missing"),
        Problem("/eventTime", f'"2024-05-01" {TIME_ERROR}'),
        Problem("/initiator/credential/type", "required field is missing"),
        Problem("/message", "must be of type string, not integer"),
        Problem("/outcome", '"ok" is not one of: success, failure, pending, unknown'),
        Problem("/reason/reasonCode", "must be of type integer, not string"),
        Problem("/severity", '"bad" is not one of: normal, warning, critical'),
    ]


def test_uncatalogued_action_is_reported_together_with_schema_problems(
    validator: EventValidator,
) -> None:
    event = make_event(action="secrets-manager.secret.explode", severity="bad")
    assert [p.path for p in validator.validate(event)] == ["/action", "/severity"]


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ([], "array"),
        ([make_event()], "array"),
        (42, "integer"),
        (1.5, "number"),
        ("event", "string"),
        (None, "null"),
        (True, "boolean"),
    ],
)
def test_non_object_gives_one_problem_at_the_root(
    validator: EventValidator, body: Any, kind: str
) -> None:
    assert validator.validate(body) == [Problem("", f"an event must be a JSON object, not {kind}")]


def test_problem_as_dict_has_path_and_message() -> None:
    assert Problem("/a", "b").as_dict() == {"path": "/a", "message": "b"}


# -- events.py: CRN and action helpers -------------------------------------------------------


@pytest.mark.parametrize(
    ("crn", "location"),
    [
        (sm_crn("us-south"), "us-south"),
        (sm_crn("eu-de-1"), "eu-de-1"),
        (sm_crn(""), "global"),
        (sm_crn("global"), "global"),
        ("crn:v1:bluemix:public:is:jp-tok:a/acc::instance:a:b:c", "jp-tok"),
    ],
)
def test_crn_location(crn: str, location: str) -> None:
    assert crn_location(crn) == location


@pytest.mark.parametrize(
    ("crn", "service"),
    [
        (sm_crn(), "secrets-manager"),
        (sm_crn(service="kms"), "kms"),
        ("crn:v1:bluemix:public:is:us-south-1:a/acc::instance:x", "is"),
        ("crn:v1:bluemix", ""),
    ],
)
def test_crn_service(crn: str, service: str) -> None:
    assert crn_service(crn) == service


def test_crn_resource_keeps_its_extra_colons() -> None:
    parts = crn_parts("crn:v1:bluemix:public:is:us-south-1:a/acc::instance:0717_a:b:c")
    assert len(parts) == 10
    assert parts[8] == "instance"
    assert parts[9] == "0717_a:b:c"
    assert crn_location("crn:v1:bluemix:public:is:us-south-1:a/acc::instance:0717_a:b:c") == (
        "us-south-1"
    )


def test_short_crn_is_padded_to_ten_segments() -> None:
    assert crn_parts("crn:v1:bluemix") == ["crn", "v1", "bluemix", "", "", "", "", "", "", ""]


@pytest.mark.parametrize(
    ("action", "service"),
    [
        ("secrets-manager.secret.create", "secrets-manager"),
        ("kms.key.create", "kms"),
        ("is.instance.instance.create", "is.instance"),
        ("is.vpc.vpc.delete", "is.vpc"),
        ("is", "is"),
        ("isx.thing.create", "isx"),
        ("iam-identity.apikey.login", "iam-identity"),
    ],
)
def test_action_service(action: str, service: str) -> None:
    assert action_service(action) == service


def test_event_from_body_derives_location_and_service_and_assigns_an_id() -> None:
    event = Event.from_body(make_event(location=""))
    assert (event.location, event.service, event.action) == (
        "global",
        "secrets-manager",
        "secrets-manager.secret.create",
    )
    assert event.id
    assert event.body["id"] == event.id


def test_event_from_body_keeps_the_producer_id() -> None:
    assert Event.from_body(make_event(id="evt-1")).id == "evt-1"


def test_long_rejected_value_is_shown_as_an_excerpt(validator: EventValidator) -> None:
    crn = "crn:v2:" + "x" * 100
    excerpt = ('"' + crn)[:77] + "..."
    assert validator.validate(make_event(logSourceCRN=crn)) == [
        Problem("/logSourceCRN", f"{excerpt} {LOG_SOURCE_CRN_ERROR}")
    ]


@pytest.mark.parametrize(
    ("change", "clean"),
    [
        ({}, True),
        ({"reason": {"reasonCode": 201.0, "reasonType": "Created"}}, True),  # fast: unsure
        ({"outcome": None}, False),
        ({"message": 5}, False),
    ],
)
def test_clean_is_true_exactly_when_validate_finds_nothing(
    validator: EventValidator, change: dict[str, Any], clean: bool
) -> None:
    """clean asks the compiled fast function first and the exact code when it is unsure
    (an integer written as 201.0, which jsonschema calls an integer), or when a required key
    is missing (the fast function's KeyError): its answer is validate's, either way."""
    event = make_event(**change)
    assert validator.clean(event) is clean and (validator.validate(event) == []) is clean
    missing = make_event()
    del missing["severity"]
    assert validator.clean(missing) is False and validator.validate(missing) != []
