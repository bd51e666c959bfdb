"""router.query: the Activity Tracker (LogDNA) query dialect, as (query, event) -> bool tables."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.query import (
    MAX_NESTING,
    MAX_QUERY_CHARS,
    MAX_TERMS,
    And,
    Compare,
    Exists,
    Match,
    MatchOp,
    Node,
    Not,
    Or,
    Query,
    QueryError,
    Text,
    parse,
    virtual_field,
)
from tests.fakes import ACCOUNT, INSTANCE, make_event, sm_crn

INSTANCE_CRN = sm_crn("us-south")
EVENT = make_event(
    tags=["prod", "PCI", {"team": "sec"}],
    ratio=0.25,
    nothing=None,
    members=[{"name": "alice", "role": "admin"}, {"name": "bob", "role": "reader"}],
)


def matches(query: str, event: dict[str, Any] = EVENT) -> bool:
    return parse(query).matches(event)


# -- field terms -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # f:v — case-insensitive prefix
        ("outcome:success", True),
        ("outcome:SUCC", True),
        ("outcome:failure", False),
        ("reason.reasonType:created", True),
        ("reason.reasonType:Createdx", False),
        # f:=v — case-sensitive prefix
        ("reason.reasonType:=Crea", True),
        ("reason.reasonType:=crea", False),
        # f:==v — case-insensitive exact
        ("reason.reasonType:==created", True),
        ("reason.reasonType:==creat", False),
        # f:===v — case-sensitive exact
        ("reason.reasonType:===Created", True),
        ("reason.reasonType:===created", False),
        ("reason.reasonType:===Creat", False),
        # f:[a,b] — any of, the operator applying to every item
        ("severity:[warning,normal]", True),
        ("severity:[warning,critical]", False),
        ("severity:[WARN, NORM]", True),
        ("severity:=[warning,NORMAL]", False),
        ("severity:==[warning,NORMAL]", True),
        ("severity:==[warning,norm]", False),
        ("severity:===[warning,normal]", True),
        ("severity:===[Normal]", False),
        # f:* — exists (not null)
        ("requestData.secret_type:*", True),
        ("responseData:*", True),
        ("reason.reasonForFailure:*", False),
        ("nothing:*", False),
        # quoted values
        ('message:"Secrets Manager: create"', True),
        ('message:=="secrets manager: create secret db-password"', True),
        ('message:"Secrets Manager: delete"', False),
        # numbers: compared as their JSON text for prefix and exact
        ("reason.reasonCode:201", True),
        ("reason.reasonCode:20", True),
        ("reason.reasonCode:==20", False),
        ("reason.reasonCode:===201", True),
        ("ratio:0.25", True),
        ("saveServiceCopy:true", True),
        ("dataEvent:==false", True),
        ("nothing:null", True),
        # an object has no text
        ("reason:reason", False),
        # a path through something that is not an object
        ("outcome.deep:x", False),
        ("absent.deep:x", False),
    ],
)
def test_field_operators(query: str, expected: bool) -> None:
    assert matches(query) is expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("reason.reasonCode:>200", True),
        ("reason.reasonCode:>201", False),
        ("reason.reasonCode:>=201", True),
        ("reason.reasonCode:>=202", False),
        ("reason.reasonCode:<202", True),
        ("reason.reasonCode:<201", False),
        ("reason.reasonCode:<=201", True),
        ("reason.reasonCode:<=200.5", False),
        ("reason.reasonCode:>2.01e2", False),
        ("reason.reasonCode:>-1", True),
        ("ratio:<0.5", True),
        # a string is not a number, even when it looks like one; a boolean is not a number
        ("outcome:>0", False),
        ("saveServiceCopy:>0", False),
        ("absent:>0", False),
    ],
)
def test_numeric_comparisons_apply_to_json_numbers_only(query: str, expected: bool) -> None:
    assert matches(query) is expected


def test_numeric_comparison_does_not_take_numeric_strings() -> None:
    assert matches("code:>=400", make_event(code="500")) is False
    assert matches("code:>=400", make_event(code=500)) is True


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("tags:pci", True),
        ("tags:===PCI", True),
        ("tags:===pci", False),
        ("tags.team:sec", True),
        ("members.name:bob", True),
        ("members.role:==admin", True),
        ("members.name:carol", False),
        ("tags:*", True),
    ],
)
def test_a_list_matches_when_any_element_matches(query: str, expected: bool) -> None:
    assert matches(query) is expected


def test_an_empty_list_does_not_exist() -> None:
    assert matches("tags:*", make_event(tags=[])) is False


# -- virtual fields --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "location", "expected"),
    [
        ("host:secrets-manager", "us-south", True),
        ("host:secrets", "us-south", True),
        ("host:==secrets", "us-south", False),
        ("host:kms", "us-south", False),
        ("location:us-south", "us-south", True),
        ("location:==us", "us-south", False),
        ("location:==global", "", True),
        ("location:eu-de", "eu-de-1", True),
        (f"app:{INSTANCE_CRN}", "us-south", True),
        (f"app:==crn:v1:bluemix:public:secrets-manager:us-south:a/{ACCOUNT}", "us-south", False),
        (f"app:crn:v1:bluemix:public:secrets-manager:us-south:a/{ACCOUNT}", "us-south", True),
        (f"app:{INSTANCE_CRN}", "eu-de", False),
    ],
)
def test_host_app_and_location_come_from_log_source_crn(
    query: str, location: str, expected: bool
) -> None:
    assert matches(query, make_event(location=location)) is expected


def test_app_of_a_global_event_is_the_account_crn() -> None:
    event = make_event(logSourceCRN=f"crn:v1:bluemix:public:iam-groups:global:a/{ACCOUNT}:::")
    assert virtual_field("app", event) == f"crn:v1:bluemix:public:::a/{ACCOUNT}:::"
    assert matches(f"app:===crn:v1:bluemix:public:::a/{ACCOUNT}:::", event)
    assert (
        virtual_field("app", make_event(location="")) == f"crn:v1:bluemix:public:::a/{ACCOUNT}:::"
    )


def test_virtual_fields_of_an_event_without_log_source_crn_do_not_exist() -> None:
    assert matches("host:*", {"action": "x.y.z"}) is False
    assert matches("-app:*", {"action": "x.y.z"}) is True


# -- bare words ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("alice", True),
        ("ALICE@EXAMPLE", True),
        ('"create secret db"', True),
        ('"create  secret"', False),
        ("db-password", True),
        ("201", True),
        (INSTANCE, True),
        # keys are not text: only values are searched
        ("reasonType", False),
        ("initiator", False),
        # a phrase must lie inside one value, not across two
        ('"Created 201"', False),
        ("null", False),
    ],
)
def test_bare_words_are_case_insensitive_substrings_of_a_value(query: str, expected: bool) -> None:
    assert matches(query) is expected


# -- Boolean operators and precedence ------------------------------------------------------

# Terms whose truth on EVENT is known: T1, T2 true; F1, F2 false.
T1, T2, F1, F2 = "outcome:success", "severity:normal", "outcome:failure", "severity:critical"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (f"{T1} {T2}", True),
        (f"{T1} {F1}", False),
        (f"{T1} AND {T2}", True),
        (f"{T1} AND {F1}", False),
        (f"{F1} OR {T1}", True),
        (f"{F1} OR {F2}", False),
        (f"NOT {F1}", True),
        (f"NOT {T1}", False),
        (f"-{F1}", True),
        (f"-{T1}", False),
        (f"--{T1}", True),
        (f"NOT NOT {T1}", True),
        (f"-({F1} OR {F2})", True),
        (f"-({T1} {F1})", True),
        (f"({F1} OR {T1}) {T2}", True),
    ],
)
def test_boolean_operators(query: str, expected: bool) -> None:
    assert matches(query) is expected


@pytest.mark.parametrize(
    ("query", "tree"),
    [
        # juxtaposition is the loosest: the seed's `host:x action:A OR action:B`
        (
            "h:x a:A OR a:B",
            And(
                (
                    Match("h", MatchOp.PREFIX, ("x",)),
                    Or((Match("a", MatchOp.PREFIX, ("A",)), Match("a", MatchOp.PREFIX, ("B",)))),
                )
            ),
        ),
        # explicit AND binds tighter than OR
        ("a AND b OR c", Or((And((Text("a"), Text("b"))), Text("c")))),
        ("a OR b AND c", Or((Text("a"), And((Text("b"), Text("c")))))),
        # ... and juxtaposition looser than both
        ("x a AND b OR c", And((Text("x"), Or((And((Text("a"), Text("b"))), Text("c")))))),
        ("a OR b c OR d", And((Or((Text("a"), Text("b"))), Or((Text("c"), Text("d")))))),
        # NOT and - bind tightest
        ("NOT a OR b", Or((Not(Text("a")), Text("b")))),
        ("-a b", And((Not(Text("a")), Text("b")))),
        ("-a AND b", And((Not(Text("a")), Text("b")))),
        ("NOT a AND b", And((Not(Text("a")), Text("b")))),
        # parentheses group; nested groups of the same kind flatten
        ("NOT (a OR b)", Not(Or((Text("a"), Text("b"))))),
        ("(a OR b) AND c", And((Or((Text("a"), Text("b"))), Text("c")))),
        ("a AND (b OR c)", And((Text("a"), Or((Text("b"), Text("c")))))),
        ("(a b) c", And((Text("a"), Text("b"), Text("c")))),
        ("a AND b c", And((Text("a"), Text("b"), Text("c")))),
        ("a OR (b OR c)", Or((Text("a"), Text("b"), Text("c")))),
        ("((a))", Text("a")),
        # operators are upper case only: `or`, `and`, `not` are bare words
        ("a or b", And((Text("a"), Text("or"), Text("b")))),
        ("not a and b", And((Text("not"), Text("a"), Text("and"), Text("b")))),
    ],
)
def test_precedence(query: str, tree: Node) -> None:
    assert parse(query).root == tree


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # the same three terms, read two ways: juxtaposition keeps the OR-group together
        (f"{F1} {F2} OR {T1}", False),  # F1 AND (F2 OR T1)
        (f"{F1} AND {F2} OR {T1}", True),  # (F1 AND F2) OR T1
        (f"{T1} OR {F1} AND {F2}", True),  # T1 OR (F1 AND F2)
        (f"NOT {T1} OR {T2}", True),  # (NOT T1) OR T2
        (f"NOT ({T1} OR {T2})", False),
    ],
)
def test_precedence_decides_the_outcome(query: str, expected: bool) -> None:
    assert matches(query) is expected


# -- the seed's queries ----------------------------------------------------------------------

UNAUTHORIZED = make_event(
    action="secrets-manager.secret.read",
    outcome="failure",
    reason={"reasonCode": 401, "reasonType": "Unauthorized"},
    severity="warning",
)
VAULT_UNAUTHORIZED = make_event(
    action="secrets-manager.secret.read",
    outcome="failure",
    reason={"reasonCode": 401, "reasonType": "unauthorized"},
)
KMS_UNAUTHORIZED = make_event(
    action="kms.secrets.read",
    outcome="failure",
    reason={"reasonCode": 401, "reasonType": "Unauthorized"},
    logSourceCRN=sm_crn("us-south", service="kms"),
)
OTHER_INSTANCE = make_event(
    logSourceCRN=f"crn:v1:bluemix:public:secrets-manager:us-south:a/{ACCOUNT}:other-instance::"
)


@pytest.mark.parametrize(
    ("query", "event", "expected"),
    [
        ("host:secrets-manager action:secrets-manager.secret.create", make_event(), True),
        (
            "host:secrets-manager action:secrets-manager.secret.create",
            make_event(action="secrets-manager.secret.delete"),
            False,
        ),
        (
            "host:secrets-manager action:secrets-manager.secret.create",
            make_event(action="secrets-manager.secret-group.create"),
            False,
        ),
        ("host:secrets-manager reason.reasonType:Unauthorized", UNAUTHORIZED, True),
        # the dialect is case-insensitive: Vault's lower-case reasonType matches too
        ("host:secrets-manager reason.reasonType:Unauthorized", VAULT_UNAUTHORIZED, True),
        ("host:secrets-manager reason.reasonType:Unauthorized", KMS_UNAUTHORIZED, False),
        ("host:secrets-manager reason.reasonType:Unauthorized", make_event(), False),
        (f"app:{INSTANCE_CRN}", make_event(), True),
        (f"app:{INSTANCE_CRN}", UNAUTHORIZED, True),
        (f"app:{INSTANCE_CRN}", OTHER_INSTANCE, False),
        (f"app:{INSTANCE_CRN}", make_event(location="eu-de"), False),
        (
            "host:secrets-manager action:secrets-manager.secret.create OR "
            "action:secrets-manager.secret.delete",
            make_event(action="secrets-manager.secret.delete"),
            True,
        ),
        (
            "host:secrets-manager action:secrets-manager.secret.create OR "
            "action:secrets-manager.secret.delete",
            KMS_UNAUTHORIZED | {"action": "secrets-manager.secret.delete"},
            False,
        ),
    ],
)
def test_seed_queries_on_real_looking_events(
    query: str, event: dict[str, Any], expected: bool
) -> None:
    assert matches(query, event) is expected


# -- errors point at the column ------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "column", "message"),
    [
        ("", 1, "the query is empty"),
        ("   ", 1, "the query is empty"),
        ("a AND", 6, "expected a term after AND"),
        ("a OR", 5, "expected a term after OR"),
        ("a OR OR b", 6, "expected a term after OR, found OR"),
        ("a AND ) b", 7, "expected a term after AND, found )"),
        ("OR a", 1, "OR needs a term on its left"),
        ("a (AND b)", 4, "AND needs a term on its left"),
        ("NOT", 4, "expected a term after NOT"),
        ("a - b", 3, "'-' must be followed"),
        ("a -", 3, "'-' must be followed"),
        ("(a b", 1, "this '(' is never closed"),
        ("x (a (b)", 3, "this '(' is never closed"),
        ("a b)", 4, "this ')' closes nothing"),
        (")", 1, "this ')' closes nothing"),
        ("a ()", 3, "empty parentheses"),
        ('a "bc', 3, "this quote is never closed"),
        ('a ""', 3, "an empty phrase"),
        ('"a"b', 4, "expected a space or a parenthesis"),
        ('ab"c"', 3, "a quote can only start a term"),
        ("outcome:", 9, "expected a value after 'outcome:'"),
        ("outcome:== x", 11, "expected a value after 'outcome:=='"),
        ("reason.reasonCode:>", 20, "expected a number after 'reason.reasonCode:>'"),
        ("reason.reasonCode:>=4xx", 21, "expected a number"),
        ("n:>1e999", 4, "too large a number"),
        ("severity:[a,b", 10, "never closed with ']'"),
        ("severity:[a,,b]", 13, "expected a value in the list"),
        ("severity:[a b]", 13, "expected ',' or ']'"),
        ('severity:["a" x]', 15, "expected ',' or ']'"),
        ("severity:[a]x", 13, "expected a space or a parenthesis"),
        ("crn:v1 :x", 8, "quote a word that contains ':'"),
        ("a..b:c", 1, "quote a word that contains ':'"),
    ],
)
def test_bad_query_raises_query_error_at_the_column(query: str, column: int, message: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse(query)
    assert caught.value.column == column, caught.value
    assert message in caught.value.message
    assert str(caught.value).startswith(f"column {column}: ")


# -- nesting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opener", "closer"),
    [("(", ")"), ("NOT ", ""), ("-", ""), ("(-", ")"), ("NOT (", ")")],
    ids=["parentheses", "NOT", "minus", "parenthesis-minus", "NOT-parenthesis"],
)
def test_nesting_past_the_limit_is_a_query_error_at_the_column(opener: str, closer: str) -> None:
    # 10,000 levels used to overflow the interpreter's stack (RecursionError, an HTTP 500).
    text = opener * 10_000 + "outcome:success" + closer * 10_000
    with pytest.raises(QueryError) as caught:
        parse(text)
    levels_per_opener = opener.count("(") + opener.count("NOT") + opener.count("-")
    allowed_openers = MAX_NESTING // levels_per_opener
    assert caught.value.column == len(opener) * allowed_openers + 1, caught.value
    assert f"nested deeper than {MAX_NESTING} levels" in caught.value.message


def test_nesting_up_to_the_limit_parses_and_matches() -> None:
    half = MAX_NESTING // 2
    text = "(NOT " * half + "outcome:success" + ")" * half
    query = parse(text)
    assert query.matches(EVENT) is (half % 2 == 0)
    assert parse(str(query)) == query
    # Siblings are not nesting: a long flat query is fine.
    assert parse(" OR ".join(f"(id:{i})" for i in range(5000))).matches(EVENT) is False


# -- printing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "printed"),
    [
        (
            "host:secrets-manager   action:secrets-manager.secret.create",
            "host:secrets-manager action:secrets-manager.secret.create",
        ),
        ("a AND b OR c", "(a b) OR c"),
        ("x (a OR b)", "x a OR b"),
        ("NOT a", "-a"),
        ("NOT (a b)", "-(a b)"),
        ("f:[a]", "f:a"),
        ('f:==[ a , "b c" ]', 'f:==[a,"b c"]'),
        ('f:"*"', 'f:"*"'),
        ("f:==*", 'f:=="*"'),
        ("f:>=4e2", "f:>=400"),
        ("f:<0.5", "f:<0.5"),
        ('"say \\"hi\\""', '"say \\"hi\\""'),
        ('"-x"', '"-x"'),
        ('"OR"', '"OR"'),
        ('"a:b"', '"a:b"'),
        ('f:"=x"', 'f:"=x"'),
    ],
)
def test_canonical_form(query: str, printed: str) -> None:
    parsed = parse(query)
    assert str(parsed) == printed
    assert f"{parsed}" == printed
    assert parse(printed) == parsed


# -- properties ----------------------------------------------------------------------------

FIELDS = st.from_regex(r"[a-zA-Z_@$][\w@$-]{0,6}(\.[a-zA-Z_][\w-]{0,6}){0,2}", fullmatch=True)
VALUES = st.text(max_size=12)
NUMBERS = st.floats(allow_nan=False, allow_infinity=False)

ATOMS: st.SearchStrategy[Node] = st.one_of(
    st.builds(
        Match, FIELDS, st.sampled_from(MatchOp), st.lists(VALUES, min_size=1, max_size=3).map(tuple)
    ),
    st.builds(Exists, FIELDS),
    st.builds(Compare, FIELDS, st.sampled_from([">", ">=", "<", "<="]), NUMBERS),
    st.builds(Text, st.text(min_size=1, max_size=12)),
)


def _trees(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    # Normal form, as parse builds it: no And directly inside And, no Or directly inside Or.
    return st.one_of(
        st.builds(Not, children),
        st.lists(children.filter(lambda n: not isinstance(n, And)), min_size=2, max_size=4).map(
            lambda ops: And(tuple(ops))
        ),
        st.lists(children.filter(lambda n: not isinstance(n, Or)), min_size=2, max_size=4).map(
            lambda ops: Or(tuple(ops))
        ),
    )


TREES = st.recursive(ATOMS, _trees, max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(TREES)
def test_print_then_parse_gives_back_the_same_tree(tree: Node) -> None:
    printed = str(Query(tree))
    assert parse(printed).root == tree, printed


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(["AND", "OR", "NOT", "-", "(", ")", " ", '"', ":", "[", "]", ","]),
            st.sampled_from(["==", "===", "=", ">", ">=", "<=", "*", "\\"]),
            st.from_regex(r"[a-z.]{1,5}:?", fullmatch=True),
            st.text(max_size=4),
        ),
        max_size=12,
    ).map(" ".join)
)
def test_any_string_parses_to_a_stable_query_or_fails_at_a_column(text: str) -> None:
    try:
        query = parse(text)
    except QueryError as exc:
        assert 1 <= exc.column <= len(text) + 1
        return
    again = parse(str(query))
    assert again == query
    assert str(again) == str(query)


def test_a_query_of_more_terms_than_the_limit_is_a_query_error_at_the_first_one_too_many() -> None:
    words = [f"w{i}" for i in range(MAX_TERMS + 1)]
    assert parse(" ".join(words[:-1])).matches(EVENT) is False
    with pytest.raises(QueryError) as caught:
        parse(" ".join(words))
    assert caught.value.column == len(" ".join(words[:-1])) + 2
    assert f"at most {MAX_TERMS} terms" in caught.value.message


def test_a_query_longer_than_the_limit_is_a_query_error() -> None:
    with pytest.raises(QueryError) as caught:
        parse("x:" + "a" * MAX_QUERY_CHARS)
    assert caught.value.column == MAX_QUERY_CHARS + 1
    assert f"at most {MAX_QUERY_CHARS} characters" in caught.value.message


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("STRASSE", True),  # casefolded: ß is ss
        ("ab", False),  # never across two values
        ('"a\x00b"', False),  # nor across them with the separator a search may use
        ('"e\x00x"', True),  # a NUL within one value is matched
    ],
)
def test_a_word_is_matched_within_one_value_after_casefolding(query: str, expected: bool) -> None:
    event = {"a": "Straße", "b": ["xa", "by"], "c": "the\x00x"}
    assert parse(query).matches(event) is expected
