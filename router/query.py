"""The query language of Activity Tracker's event search (the LogDNA dialect), for route
filters, archive search and the live tail. Pure: `parse(text) -> Query`, no I/O.

    host:secrets-manager action:secrets-manager.secret.create
    host:secrets-manager reason.reasonType:Unauthorized
    app:crn:v1:bluemix:public:secrets-manager:us-south:a/<account>:<instance>::

Terms
    f:v        case-insensitive prefix        f:=v     case-sensitive prefix
    f:==v      case-insensitive exact         f:===v   case-sensitive exact
    f:[a,b]    any of (f:==[a,b] etc.)        f:*      exists (a value other than null)
    f:>N f:>=N f:<N f:<=N   numeric comparison, on JSON numbers only
    word "a phrase"         case-insensitive substring of one of the event's values

`f` is a dotted path into the event (`reason.reasonType`); a list on the way, or at the end,
matches when any element does. `host`, `app` and `location` are derived from `logSourceCRN`
(see `virtual_field`). A value that is not a string is matched by its JSON text (`201`,
`true`, `null`); an object never matches a value.

Operators, tightest first: `NOT`/`-` (prefix), `AND`, `OR`, then juxtaposition (a space),
which is also an AND. So `host:x action:A OR action:B` reads host:x AND (action:A OR
action:B), as Activity Tracker's documented queries imply, while the explicit operators keep
their usual Boolean order: `a AND b OR c` is (a AND b) OR c. `AND`, `OR` and `NOT` are
operators only in upper case; parentheses group.

Parentheses and NOT nest at most MAX_NESTING levels deep: a deeper query is a QueryError at
the column of the level too many, like any other syntax error, rather than a stack overflow in
the recursive parser (or in compiling and printing the tree it would build). A query holds at
most MAX_TERMS terms and MAX_QUERY_CHARS characters: an alert runs its query on every
accepted event, so its size bounds what one API call can add to ingest's cost per event.

A parsed query is compiled once into a tree of closures, so evaluating it costs a few
microseconds; `str(query)` prints a canonical form that parses back to the same query. The
closures read an event through `Fields`, which extracts each dotted path once: queries that
test the same field of one event (route filters, one per route) share the extraction. `assume`
decides the terms on fields whose values are already known (routing knows host, location and
action before it looks at a filter), so a filter those facts rule out never runs.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

import orjson

from router.errors import QueryError
from router.events import GLOBAL, crn_parts

__all__ = [
    "MAX_NESTING",
    "MAX_QUERY_CHARS",
    "MAX_TERMS",
    "And",
    "Compare",
    "Exists",
    "Fields",
    "Match",
    "MatchOp",
    "Node",
    "Not",
    "Or",
    "Query",
    "QueryError",
    "Text",
    "assume",
    "parse",
    "virtual_field",
]


class MatchOp(enum.Enum):
    """How a `field:value` term compares; the value is the operator's spelling after `:`."""

    PREFIX = ""
    PREFIX_CASE = "="
    EXACT = "=="
    EXACT_CASE = "==="


COMPARISONS: Final = (">=", "<=", ">", "<")


@dataclass(frozen=True, slots=True)
class Match:
    """`field:value` or `field:[a,b]`: any of `values` matches under `op`."""

    field: str
    op: MatchOp
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Exists:
    """`field:*`: the field has a value other than null."""

    field: str


@dataclass(frozen=True, slots=True)
class Compare:
    """`field:>=N`: a JSON number at `field` compares true against `number`."""

    field: str
    op: str
    number: float


@dataclass(frozen=True, slots=True)
class Text:
    """A bare word or a quoted phrase: a case-insensitive substring of one of the values."""

    text: str


@dataclass(frozen=True, slots=True)
class Not:
    """`NOT x` or `-x`."""

    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    """Every operand matches; from `AND` or juxtaposition (nested Ands are flattened)."""

    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """Some operand matches (nested Ors are flattened)."""

    operands: tuple[Node, ...]


Node = Match | Exists | Compare | Text | Not | And | Or


class Fields:
    """One event as the queries see it: each dotted path's values extracted once, on first
    use, however many terms (of however many queries) test it."""

    __slots__ = ("_folded", "_leaves", "body")

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body
        self._leaves: dict[str, list[Any]] = {}
        self._folded: str | None = None

    def leaves(self, path: str) -> list[Any]:
        found = self._leaves.get(path)
        if found is None:
            found = self._leaves[path] = _getter(path)(self.body)
        return found

    def folded_text(self) -> str:
        """Every value's text, casefolded, joined by NUL: a word without a NUL is in one of
        the values exactly when it is in this (casefolding maps each character on its own),
        so each word of a query costs one substring search, not a walk of the event."""
        if self._folded is None:
            self._folded = TEXT_SEPARATOR.join(_texts(self.body)).casefold()
        return self._folded


Predicate = Callable[[Fields], bool]


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: equal when the ASTs are equal; `matches` runs the compiled form."""

    root: Node
    _predicate: Predicate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_predicate", _compile(self.root))

    def __reduce__(self) -> tuple[type[Query], tuple[Node]]:
        """Pickled as its tree and compiled again on load: the config crosses to each worker
        process by pickle (router/server/workers.py), and a compiled predicate is closures."""
        return (Query, (self.root,))

    def matches(self, event: Mapping[str, Any]) -> bool:
        """Does the event (its JSON body) match? Never raises on odd shapes: they don't match."""
        return self._predicate(Fields(event))

    def matches_fields(self, fields: Fields) -> bool:
        """`matches`, on an event whose fields other queries may have extracted already."""
        return self._predicate(fields)

    def __str__(self) -> str:
        return _print(self.root)


# -- virtual fields --------------------------------------------------------------------------


def virtual_field(name: str, event: Mapping[str, Any]) -> str | None:
    """The value of `host`, `app` or `location` for an event, derived from its logSourceCRN.

    - `host`: the CRN's service name (`secrets-manager`), Activity Tracker's "Source".
    - `location`: the routing location, segment 5 (`us-south`), `global` when empty.
    - `app`: the instance, i.e. the logSourceCRN itself; for a global event (location
      `global`), the account, written as a CRN with only cname, ctype and scope kept:
      `crn:v1:bluemix:public:::a/<account>:::` (Activity Tracker documents that `app` is the
      account's CRN for global events, without spelling it; this is our spelling).
    """
    crn = event.get("logSourceCRN")
    if not isinstance(crn, str) or name not in VIRTUAL_FIELDS:
        return None
    parts = crn_parts(crn)
    if name == "host":
        return parts[4]
    location = parts[5] or GLOBAL
    if name == "location":
        return location
    if location == GLOBAL:
        return f"crn:{parts[1]}:{parts[2]}:{parts[3]}:::{parts[6]}:::"
    return crn


VIRTUAL_FIELDS: Final = frozenset({"host", "app", "location"})


# -- evaluation ------------------------------------------------------------------------------

Getter = Callable[[Mapping[str, Any]], list[Any]]
TEXT_SEPARATOR: Final = "\x00"


def _leaves(value: Any, keys: tuple[str, ...], start: int = 0) -> list[Any]:
    """The values at a dotted path; lists on the way or at the end fan out into their items."""
    for i in range(start, len(keys)):
        if isinstance(value, dict):
            if keys[i] not in value:
                return []
            value = value[keys[i]]
        elif isinstance(value, list):
            return [leaf for item in value for leaf in _leaves(item, keys, i)]
        else:
            return []
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item, ())]
    return [value]


@lru_cache(maxsize=1024)
def _getter(path: str) -> Getter:
    if path in VIRTUAL_FIELDS:

        def virtual(event: Mapping[str, Any]) -> list[Any]:
            value = virtual_field(path, event)
            return [] if value is None else [value]

        return virtual
    keys = tuple(path.split("."))
    if len(keys) == 1:
        key = keys[0]

        def top(event: Mapping[str, Any]) -> list[Any]:
            if key not in event:
                return []
            value = event[key]
            return _leaves(value, ()) if isinstance(value, list) else [value]

        return top
    return lambda event: _leaves(event, keys)


def _json_text(value: Any) -> str | None:
    """How a scalar is matched as text: strings as they are, others as their JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) or value is None:
        return orjson.dumps(value).decode()
    return None  # an object has no text to match


def _text_test(op: MatchOp, values: tuple[str, ...]) -> Callable[[str], bool]:
    if op is MatchOp.PREFIX:
        folded = tuple(v.casefold() for v in values)
        return lambda text: text.casefold().startswith(folded)
    if op is MatchOp.PREFIX_CASE:
        return lambda text: text.startswith(values)
    if op is MatchOp.EXACT:
        folded_set = frozenset(v.casefold() for v in values)
        return lambda text: text.casefold() in folded_set
    exact = frozenset(values)
    return lambda text: text in exact


def _compile(node: Node) -> Predicate:
    if isinstance(node, Match):
        path, test = node.field, _text_test(node.op, node.values)

        def match(event: Fields) -> bool:
            for leaf in event.leaves(path):
                text = _json_text(leaf)
                if text is not None and test(text):
                    return True
            return False

        return match
    if isinstance(node, Exists):
        path = node.field
        return lambda event: any(leaf is not None for leaf in event.leaves(path))
    if isinstance(node, Compare):
        return _compile_compare(node)
    if isinstance(node, Text):
        needle = node.text.casefold()
        if TEXT_SEPARATOR in needle:
            return lambda event: any(needle in text.casefold() for text in _texts(event.body))
        return lambda event: needle in event.folded_text()
    if isinstance(node, Not):
        operand = _compile(node.operand)
        return lambda event: not operand(event)
    operands = tuple(_compile(operand) for operand in node.operands)
    if isinstance(node, And):
        return lambda event: all(p(event) for p in operands)
    return lambda event: any(p(event) for p in operands)


_COMPARE: Final[Mapping[str, Callable[[float, float], bool]]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
}


def _compile_compare(node: Compare) -> Predicate:
    path, compare, number = node.field, _COMPARE[node.op], node.number

    def match(event: Fields) -> bool:
        for leaf in event.leaves(path):
            is_number = isinstance(leaf, int | float) and not isinstance(leaf, bool)
            if is_number and compare(leaf, number):
                return True
        return False

    return match


def assume(node: Node, known: Mapping[str, str]) -> Node | bool:
    """`node` with every term on a field of `known` (field -> its one string value) decided:
    True or False when that decides the whole node, else the node that is left to evaluate.
    For an event whose fields in `known` have those values, the result (a bool, or the
    remaining node's match) is what `node` gives."""
    if isinstance(node, Match):
        if node.field not in known:
            return node
        return _text_test(node.op, node.values)(known[node.field])
    if isinstance(node, Exists):
        return True if node.field in known else node  # a string is a value other than null
    if isinstance(node, Compare):
        return False if node.field in known else node  # a string is never a JSON number
    if isinstance(node, Text):
        return node
    if isinstance(node, Not):
        operand = assume(node.operand, known)
        return (not operand) if isinstance(operand, bool) else Not(operand)
    decides = isinstance(node, Or)  # the value that decides an Or (True) or an And (False)
    left: list[Node] = []
    for part in node.operands:
        value = assume(part, known)
        if isinstance(value, bool):
            if value is decides:
                return decides
            continue
        left.append(value)
    if not left:
        return not decides
    return left[0] if len(left) == 1 else type(node)(tuple(left))


def _texts(value: Any) -> Iterator[str]:
    """The text of every scalar value in an event, at any depth (keys and nulls excluded)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif value is not None:
        text = _json_text(value)
        if text is not None:
            yield text


# -- printing --------------------------------------------------------------------------------

KEYWORDS: Final = frozenset({"AND", "OR", "NOT"})
# What may stand unquoted: no space, quote, backslash, parenthesis, bracket, comma, `*`, `=`,
# `<`, `>` (they would read as syntax).
_SAFE = re.compile(r"[\w@/+.:~%#$&!?^'{}|;-]+")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _value(text: str) -> str:
    return text if _SAFE.fullmatch(text) else _quote(text)


def _word(text: str) -> str:
    bare = _SAFE.fullmatch(text) and ":" not in text and text[0] != "-" and text not in KEYWORDS
    return text if bare else _quote(text)


def _number(number: float) -> str:
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number)


def _print(node: Node) -> str:
    if isinstance(node, Match):
        if len(node.values) == 1:
            return f"{node.field}:{node.op.value}{_value(node.values[0])}"
        return f"{node.field}:{node.op.value}[{','.join(_value(v) for v in node.values)}]"
    if isinstance(node, Exists):
        return f"{node.field}:*"
    if isinstance(node, Compare):
        return f"{node.field}:{node.op}{_number(node.number)}"
    if isinstance(node, Text):
        return _word(node.text)
    if isinstance(node, Not):
        inner = node.operand
        return "-" + (f"({_print(inner)})" if isinstance(inner, And | Or) else _print(inner))
    if isinstance(node, And):
        # Or binds tighter than juxtaposition, so an Or inside an And needs no parentheses.
        return " ".join(_print(operand) for operand in node.operands)
    return " OR ".join(
        f"({_print(operand)})" if isinstance(operand, And) else _print(operand)
        for operand in node.operands
    )


# -- parsing ---------------------------------------------------------------------------------

_FIELD = re.compile(r"[\w@$][\w@$-]*(?:\.[\w@$][\w@$-]*)*:")
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_ENDS_TERM = frozenset("()")
# Levels of parentheses and NOT, together: far more than a person writes, far less than the
# interpreter's stack (each level costs the parser four frames).
MAX_NESTING: Final = 100
# Terms (a list `f:[a,b]` is one) and characters in one query: far more than a person
# writes (a flat OR of 5,000 ids parses), few enough that running it on every event stays
# within milliseconds.
MAX_TERMS: Final = 5000
MAX_QUERY_CHARS: Final = 65536


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "(" ")" "AND" "OR" "NOT" "term"
    column: int
    node: Node | None = None


class _Lexer:
    """Splits a query into tokens; field terms are read whole, their values included."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.terms = 0

    def error(self, message: str, pos: int | None = None) -> QueryError:
        return QueryError(message, (self.pos if pos is None else pos) + 1)

    def tokens(self) -> list[_Token]:
        out: list[_Token] = []
        text = self.text
        while True:
            while self.pos < len(text) and text[self.pos].isspace():
                self.pos += 1
            if self.pos >= len(text):
                return out
            start, char = self.pos, text[self.pos]
            if char in "()":
                self.pos += 1
                out.append(_Token(char, start + 1))
            elif char == "-":
                following = text[start + 1 : start + 2]
                if not following or following.isspace() or following == ")":
                    raise self.error("'-' must be followed by the term it excludes", start)
                self.pos += 1
                out.append(_Token("NOT", start + 1))
            elif char == '"':
                phrase = self.quoted()
                if not phrase:
                    raise self.error("an empty phrase matches everything; remove it", start)
                self.end_of_term()
                out.append(self.term(start, Text(phrase)))
            elif found := _FIELD.match(text, start):
                self.pos = found.end()
                out.append(self.term(start, self.field_term(found.group()[:-1], start)))
            else:
                word = self.bare("")
                if word in KEYWORDS:
                    out.append(_Token(word, start + 1))
                elif ":" in word:
                    raise self.error(
                        "a field name is letters, digits, '_', '-', '@', '$' and dots; "
                        "quote a word that contains ':' (\"...\")",
                        start,
                    )
                else:
                    out.append(self.term(start, Text(word)))

    def term(self, start: int, node: Node) -> _Token:
        """A term's token, counted: past MAX_TERMS the query is refused at this one."""
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise self.error(f"a query holds at most {MAX_TERMS} terms", start)
        return _Token("term", start + 1, node)

    def bare(self, stop: str) -> str:
        """A run of characters up to a space, a parenthesis or one of `stop`."""
        text, start = self.text, self.pos
        while self.pos < len(text):
            char = text[self.pos]
            if char.isspace() or char in _ENDS_TERM or char in stop:
                break
            if char == '"':
                raise self.error("a quote can only start a term or a value; quote the whole of it")
            self.pos += 1
        return text[start : self.pos]

    def quoted(self) -> str:
        """A double-quoted string; `\\"` and `\\\\` are the escapes."""
        text, start = self.text, self.pos
        self.pos += 1
        out: list[str] = []
        while self.pos < len(text):
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\\" and self.pos + 1 < len(text):
                self.pos += 1
                char = text[self.pos]
            out.append(char)
            self.pos += 1
        raise self.error("this quote is never closed", start)

    def end_of_term(self) -> None:
        """After a quoted string or a list, a term must end (no `"a"b`)."""
        if self.pos < len(self.text):
            char = self.text[self.pos]
            if not (char.isspace() or char in _ENDS_TERM):
                raise self.error(f"expected a space or a parenthesis, found {char!r}")

    def field_term(self, name: str, start: int) -> Node:
        text = self.text
        for comparison in COMPARISONS:
            if text.startswith(comparison, self.pos):
                self.pos += len(comparison)
                number_at = self.pos
                literal = self.bare("")
                if not _NUMBER.fullmatch(literal):
                    raise self.error(f"expected a number after '{name}:{comparison}'", number_at)
                number = float(literal)
                if math.isinf(number):
                    raise self.error(f"{literal} is too large a number", number_at)
                return Compare(name, comparison, number)
        op_text = ""
        for candidate in ("===", "==", "="):
            if text.startswith(candidate, self.pos):
                op_text = candidate
                self.pos += len(candidate)
                break
        op = MatchOp(op_text)
        value_at = self.pos
        if value_at >= len(text) or text[value_at].isspace() or text[value_at] in _ENDS_TERM:
            raise self.error(f"expected a value after '{name}:{op_text}'", value_at)
        if text[value_at] == "[":
            return Match(name, op, self.value_list(name))
        if text[value_at] == '"':
            value = self.quoted()
            self.end_of_term()
            return Match(name, op, (value,))
        value = self.bare("")
        if value == "*" and op is MatchOp.PREFIX:
            return Exists(name)
        return Match(name, op, (value,))

    def value_list(self, name: str) -> tuple[str, ...]:
        """`[a,"b c", d]`: spaces around the commas are allowed."""
        text, opened = self.text, self.pos
        self.pos += 1
        values: list[str] = []
        while True:
            while self.pos < len(text) and text[self.pos].isspace():
                self.pos += 1
            if self.pos >= len(text):
                raise self.error(f"the list of '{name}:' is never closed with ']'", opened)
            if text[self.pos] == '"':
                values.append(self.quoted())
            else:
                item_at = self.pos
                item = self.bare(",]")
                if not item:
                    raise self.error("expected a value in the list", item_at)
                values.append(item)
            while self.pos < len(text) and text[self.pos].isspace():
                self.pos += 1
            if self.pos >= len(text):
                raise self.error(f"the list of '{name}:' is never closed with ']'", opened)
            if text[self.pos] == "]":
                self.pos += 1
                self.end_of_term()
                return tuple(values)
            if text[self.pos] != ",":
                raise self.error(f"expected ',' or ']', found {text[self.pos]!r}")
            self.pos += 1


class _Parser:
    """Recursive descent over the tokens, one method per precedence level."""

    def __init__(self, text: str) -> None:
        self.end_column = len(text) + 1
        self.tokens = _Lexer(text).tokens()
        self.index = 0
        self.depth = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def parse(self) -> Node:
        if not self.tokens:
            raise QueryError("the query is empty", 1)
        node = self.juxtaposed()
        token = self.peek()
        if token is not None:  # only a ')' stops juxtaposed() early
            raise QueryError("this ')' closes nothing", token.column)
        return node

    def juxtaposed(self) -> Node:
        operands = [self.or_()]
        while (token := self.peek()) is not None and token.kind != ")":
            operands.append(self.or_())
        return _join(And, operands)

    def or_(self) -> Node:
        operands = [self.and_()]
        while (token := self.peek()) is not None and token.kind == "OR":
            self.take()
            operands.append(self.and_("OR"))
        return _join(Or, operands)

    def and_(self, after: str | None = None) -> Node:
        operands = [self.unary(after)]
        while (token := self.peek()) is not None and token.kind == "AND":
            self.take()
            operands.append(self.unary("AND"))
        return _join(And, operands)

    def unary(self, after: str | None) -> Node:
        token = self.peek()
        if token is None:
            what = f"after {after}" if after else "here"
            raise QueryError(f"expected a term {what}, found the end of the query", self.end_column)
        if token.kind == "term":
            self.take()
            assert token.node is not None
            return token.node
        if token.kind in ("NOT", "("):
            self.take()
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise QueryError(
                    f"parentheses and NOT nested deeper than {MAX_NESTING} levels", token.column
                )
            node = Not(self.unary("NOT")) if token.kind == "NOT" else self.group(token)
            self.depth -= 1
            return node
        if token.kind == ")" and after is None:
            raise QueryError("this ')' closes nothing", token.column)
        if after is None:
            raise QueryError(f"{token.kind} needs a term on its left", token.column)
        raise QueryError(f"expected a term after {after}, found {token.kind}", token.column)

    def group(self, opened: _Token) -> Node:
        """What a '(' holds, up to and including its ')'."""
        if (inner := self.peek()) is not None and inner.kind == ")":
            raise QueryError("empty parentheses", opened.column)
        if inner is None:
            raise QueryError("this '(' is never closed", opened.column)
        node = self.juxtaposed()
        if self.peek() is None:
            raise QueryError("this '(' is never closed", opened.column)
        self.take()
        return node


def _join(kind: type[And] | type[Or], operands: list[Node]) -> Node:
    """One operand stands alone; nested nodes of the same kind are flattened."""
    if len(operands) == 1:
        return operands[0]
    flat: list[Node] = []
    for operand in operands:
        flat.extend(operand.operands if isinstance(operand, kind) else (operand,))
    return kind(tuple(flat))


def parse(text: str) -> Query:
    """Parse and compile a query; raise QueryError naming the 1-based column of the problem."""
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"a query is at most {MAX_QUERY_CHARS} characters", MAX_QUERY_CHARS + 1)
    return Query(_Parser(text).parse())
