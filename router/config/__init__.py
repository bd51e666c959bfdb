"""Loads a YAML config into frozen dataclasses: YAML -> JSON Schema -> dataclasses -> cross-checks.

The dataclasses below are the one place defaults live; `schemas/config.schema.json` checks the
shape and names but repeats no default. A target's endpoint belongs to its type: the dataclass
and the JSON Schema of each endpoint live in its module under router/targets/, and
`config_schema()` completes the schema's target section from `TARGET_TYPES`.
`event-router check` and `serve` share `load_config`, so a config that passes `check` is
exactly a config that `serve` runs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast, get_args, get_type_hints
from urllib.parse import urlsplit

import jsonschema
import yaml

from router.errors import ConfigError, QueryError
from router.masking import SECRET_KEYS
from router.query import Query, parse
from router.resources import schemas_dir
from router.targets import TARGET_TYPES
from router.targets.cloud_logs import CloudLogsEndpointConfig
from router.targets.cos import CosEndpointConfig, endpoint_url
from router.targets.file import FileEndpointConfig
from router.targets.http import HttpAuthConfig, HttpEndpointConfig, SigningConfig

MiB = 1024 * 1024
# The names of what lives under storage.path (router/journal/sqlite.py, router/deadletter.py, api).
JOURNAL_FILE = "journal.db"
JOURNAL_LOCK_FILE = "journal.lock"  # held by the one daemon that owns the journal
DEAD_LETTER_DIR = "deadletter"
API_METADATA_FILE = "api-metadata.json"
# A ${file:} reference is a secret, not a document: past this it is refused, not read.
MAX_REFERENCE_BYTES = 64 * 1024
MIN_SIGNING_SECRET = 16  # an HMAC key shorter than this is guessable


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTlsConfig:
    """TLS for the listener (TLS 1.2 at least). With `client_ca_file`, every client must show a
    certificate that CA signed (mutual TLS), before any token is looked at."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """The ingest listener and the limits it enforces on a request."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 5 * MiB
    # A gzip body may inflate to this much; past it the request is a 413 (gzip bomb guard).
    max_inflated_bytes: int = 20 * MiB
    max_events_per_request: int = 10_000
    # Requests decoded, validated and journaled at once, once their body has arrived; more
    # wait their turn with their body in memory (a slow sender holds no turn while it sends).
    max_concurrent_requests: int = 16
    # Bytes of request bodies held at once, arriving or waiting for a turn; past it a request
    # is a 503 server_busy with Retry-After (memory stays bounded however many clients send).
    max_body_bytes_in_flight: int = 64 * MiB
    # Bodies one client address sends at once; more from it wait, unread, within
    # read_timeout_s (one address holds at most this many times max_body_bytes).
    max_bodies_per_client: int = 8
    # An event nesting deeper, or holding a longer string or key, is rejected on its own.
    max_depth: int = 32
    max_string_chars: int = 64 * 1024
    # The request line and each header line; past it the request is a 400 before any handler.
    max_header_bytes: int = 8190
    # The whole body must arrive within this, or the request is a 408 (slow clients hold a
    # request slot while they send).
    read_timeout_s: float = 30.0
    # A connection must send its first request's headers within this (slowloris guard).
    header_timeout_s: float = 10.0
    # An idle keep-alive connection is closed after this.
    keepalive_timeout_s: float = 75.0
    # Clients of GET /v1/tail at once; past it, 503 too_many_tail_clients.
    max_tail_clients: int = 32
    # A tail client that takes nothing for this long (it stopped reading) is dropped.
    tail_write_timeout_s: float = 10.0
    # Names besides host, localhost and this host's name that a daemon without auth answers
    # to (the Host header; a DNS rebinding defence, router/auth.py). IP addresses always pass.
    allowed_hosts: tuple[str, ...] = ()
    tls: ServerTlsConfig | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    """The durable journal and the dead letters, under `path`.

    fsync: `always` — a 2xx means the events are on disk (concurrent requests share one fsync);
    `interval` — on disk within fsync_interval_ms, safe against a process crash at once;
    `never` — the OS decides, safe against a process crash, not a power cut.
    """

    path: str = "./var"
    fsync: Literal["always", "interval", "never"] = "always"
    fsync_interval_ms: int = 1000
    max_bytes: int = 1024 * MiB
    # reject: 503 + Retry-After. drop_oldest_per_target: dead-letter the oldest events of the
    # largest backlog (reason dropped_buffer_full) to make room; only if an operator chooses it.
    when_full: Literal["reject", "drop_oldest_per_target"] = "reject"
    # Told to producers in Retry-After when the journal is full.
    full_retry_after_s: int = 5
    # Where the management API may put file targets (symlinks followed). Empty: the
    # directories of the file targets this config defines, the operator's own choice.
    archive_roots: tuple[str, ...] = ()

    def journal_files(self) -> tuple[Path, ...]:
        """The journal's own files (and the API's metadata), which no target may write."""
        base = Path(self.path)
        names = (
            JOURNAL_FILE,
            f"{JOURNAL_FILE}-wal",
            f"{JOURNAL_FILE}-shm",
            JOURNAL_LOCK_FILE,
            API_METADATA_FILE,
        )
        return tuple(base / name for name in names)

    def dead_letter_dir(self) -> Path:
        return Path(self.path) / DEAD_LETTER_DIR


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidationConfig:
    """How strictly events are checked beyond the base event schema."""

    unknown_actions: Literal["reject", "accept"] = "reject"
    schemas_dir: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownConfig:
    """How long SIGTERM waits for the workers to deliver what they hold."""

    drain_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class EvidenceConfig:
    """Hash-chained archives and signed checkpoints (router/evidence). Without a signing key
    the chain and its checkpoints are written unsigned; `verify` says so."""

    enabled: bool = True
    signing_key_file: str | None = None
    checkpoint_every_events: int = 10_000
    checkpoint_every_s: float = 60.0
    # A MAC'd receipt per accepted event in the ingest answer (router/evidence/receipt.py).
    receipts: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchConfig:
    """A batch goes out when full (max_events or max_bytes) or max_wait_s after its first event."""

    max_events: int = 500
    max_bytes: int = 1 * MiB
    max_wait_s: float = 0.2


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """Exponential backoff with full jitter, bounded both by attempts and by age."""

    max_attempts: int = 8
    max_age_s: float = 300.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetConfig:
    """A destination, named the atracker way (`id`, `name`, `target_type`, `<type>_endpoint`)."""

    id: str
    name: str
    target_type: str
    endpoint: object  # the config_class of its type in TARGET_TYPES
    batch: BatchConfig = field(default_factory=BatchConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleConfig:
    """One routing rule: atracker's `locations` + `target_ids`, plus our `actions` globs and
    `filter`, a query (router.query) parsed and compiled when the config is loaded."""

    locations: tuple[str, ...]
    target_ids: tuple[str, ...]
    actions: tuple[str, ...] = ()
    filter: Query | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    """An independent route; its rules are tried in order and the first match wins."""

    id: str
    name: str
    rules: tuple[RuleConfig, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadConfig:
    """Reload the config file when it changes (opt-in; SIGHUP always reloads). The file's
    modification time, size and content digest are checked every `watch_interval_s`: the
    standard library has no file-change notification, and a check every few seconds costs
    nothing next to ingest."""

    watch: bool = False
    watch_interval_s: float = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StartupConfig:
    """What the daemon checks as it starts."""

    # Send each target one real test event (event-router.target.validate) before its backlog.
    # Off by default, as atracker validates on request (`event-router validate-target`, the
    # API's validate): on every start it would put a synthetic event at the top of archives.
    validate_targets: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SettingsConfig:
    """Account-wide settings; `default_targets` take events that no rule sent anywhere."""

    default_targets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenConfig:
    """A bearer token, kept only as the SHA-256 digest of its value (given as `sha256:` or
    hashed from a `${env:}`/`${file:}` reference when the config is loaded)."""

    name: str
    digest: bytes = field(repr=False)
    # An ingest token limited to these services (logSourceCRN segment 4); empty means any.
    services: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RefusalEventsConfig:
    """How many refused attempts become self-events: a token bucket per client address and
    one for all clients; what the buckets refuse is counted and summed up in one event per
    `summary_interval_s`."""

    per_client_burst: int = 5
    per_client_per_s: float = 0.2
    global_burst: int = 50
    global_per_s: float = 5.0
    summary_interval_s: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """Who may send (ingest tokens) and who may administer (admin tokens). Without an `auth`
    section the daemon is open, as it is bound to loopback by default."""

    ingest_tokens: tuple[TokenConfig, ...] = ()
    admin_tokens: tuple[TokenConfig, ...] = ()
    refusal_events: RefusalEventsConfig = field(default_factory=RefusalEventsConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class RedactionKeyConfig:
    """An extra key to redact: a name (at any depth of requestData/responseData, in any
    spelling) or a dotted path from the event root (`requestData.vault.unseal_key`)."""

    key: str
    action: Literal["drop", "mask", "hash"] = "mask"


@dataclass(frozen=True, slots=True, kw_only=True)
class RedactionConfig:
    """Keys redacted at ingest beside those the event schema marks `x-sensitive`. `hash_key`
    keys the HMAC of `hash`; without one a random key is drawn at each start, so hashes
    correlate within one run only."""

    keys: tuple[RedactionKeyConfig, ...] = ()
    hash_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything `serve` needs, checked and resolved."""

    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    targets: tuple[TargetConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    settings: SettingsConfig = field(default_factory=SettingsConfig)
    startup: StartupConfig = field(default_factory=StartupConfig)
    reload: ReloadConfig = field(default_factory=ReloadConfig)
    auth: AuthConfig | None = None
    redaction: RedactionConfig = field(default_factory=RedactionConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)

    def target(self, target_id: str) -> TargetConfig:
        """The target with this id (the config's cross-checks guarantee it exists)."""
        for target in self.targets:
            if target.id == target_id:
                return target
        raise KeyError(target_id)


def format_path(parts: Iterable[str | int]) -> str:
    """`["routes", 1, "rules", 0]` -> `routes[1].rules[0]`: how every problem names its place."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, check and resolve the YAML file at `path`; raise ConfigError listing every problem."""
    return load_config_and_data(path)[0]


def load_config_and_data(path: str | os.PathLike[str]) -> tuple[Config, dict[str, Any]]:
    """The config and the data it came from (references unresolved), read once, through the
    same checks at start-up, on `check` and on every reload."""
    data = read_config_data(path)
    exposed = secret_literals(data)
    if exposed:
        mode = os.stat(path).st_mode
        if mode & 0o044:
            raise ConfigError(
                str(path),
                [
                    f"{where}: a secret written in a file other users can read (mode "
                    f"{mode & 0o777:04o}); chmod 600 the file, or use ${{env:NAME}} or "
                    "${file:/path}"
                    for where in exposed
                ],
            )
    return parse_config(data, str(path)), data


def secret_literals(data: Any, where: str = "") -> list[str]:
    """The paths of secrets written as literals rather than `${env:}`/`${file:}` references."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if key in SECRET_KEYS and isinstance(value, str) and "${" not in value:
                found.append(path)
            else:
                found.extend(secret_literals(value, path))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.extend(secret_literals(value, f"{where}[{i}]"))
    return found


# Nodes that aliases may repeat, in all, and levels a document may nest: far more than a config
# needs, far less than a "billion laughs" file expands to (every walk over the data, from the
# secret check to the schema, would take minutes) or the loader's recursion can take.
MAX_ALIAS_NODES: Final = 10_000
MAX_YAML_DEPTH: Final = 64


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that counts, as it composes, the nodes aliases repeat: an alias
    costs the size of what it names, written out. Past MAX_ALIAS_NODES, or past MAX_YAML_DEPTH
    levels, or an alias inside the node it names (a loop), the file is refused before any of it
    is built, so the refusal costs what the file's text costs, not what it would expand to."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._repeated = 0
        self._depth = 0
        self._open_anchors: set[str] = set()
        self._sizes: dict[int, int] = {}  # id(node) -> nodes written out; composed nodes live on

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise self._refuse(
                    f"alias *{event.anchor} refers to a node that holds it (a loop)", event
                )
            node = super().compose_node(parent, index)
            assert node is not None  # an alias names a composed node, or PyYAML refused it
            self._repeated += self._size(node)
            if self._repeated > MAX_ALIAS_NODES:
                raise self._refuse(
                    f"aliases here expand to more than {MAX_ALIAS_NODES} nodes in all (a YAML "
                    "alias bomb?); write the repeated parts out, or repeat less",
                    event,
                )
            return node
        anchor = event.anchor
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise self._refuse(f"nested deeper than {MAX_YAML_DEPTH} levels", event)
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)

    def _size(self, node: yaml.Node) -> int:
        """How many nodes `node` stands for once its aliases are written out (memoised, so a
        shared node is counted once however often it is shared)."""
        size = self._sizes.get(id(node))
        if size is None:
            if isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._size(item) for item in node.value)
            elif isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
        return size

    @staticmethod
    def _refuse(problem: str, event: yaml.Event) -> yaml.YAMLError:
        mark = cast(yaml.Mark | None, event.start_mark)
        return yaml.composer.ComposerError(None, None, problem, mark)


def read_config_data(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The YAML file as data, references unresolved: what the management API edits and
    writes back, so secrets stay references in the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from exc
    loader = BoundedLoader(text)
    loader.name = source  # a problem's mark names the operator's file, not "<unicode string>"
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
    finally:
        loader.dispose()
    if data is not None and not isinstance(data, dict):
        raise ConfigError(source, ["(top level): the config must be a mapping"])
    return data or {}


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Check `data` (parsed YAML) against the config schema and cross-check it."""
    problems = _schema_problems(data)
    if problems:
        raise ConfigError(source, problems)
    problems = []
    config = _build(data, problems)
    problems.extend(_cross_check(config))
    if problems:
        raise ConfigError(source, problems)
    return config


MAX_QUOTED_VALUE_CHARS = 100
# The validator, and the registry of target types it was built from (a test may add a type).
_CONFIG_VALIDATOR: tuple[tuple[tuple[str, int], ...], jsonschema.protocols.Validator] | None = None


def config_schema() -> dict[str, Any]:
    """schemas/config.schema.json with its target section completed from TARGET_TYPES:
    target_type's enum, and one `allOf` entry per type. An entry applies when target_type
    names its type; it requires the type's endpoint object, checks it against the schema the
    type's module ships, and refuses any other key (so another type's endpoint too). Each
    entry names only its own type, so the section grows by one entry per type."""
    schema: dict[str, Any] = json.loads(
        (schemas_dir() / "config.schema.json").read_text(encoding="utf-8")
    )
    target = schema["$defs"]["target"]
    common = dict.fromkeys(target["properties"], True)
    target["properties"]["target_type"] = {"enum": list(TARGET_TYPES)}
    target["allOf"] = [
        {
            "if": {"properties": {"target_type": {"const": name}}, "required": ["target_type"]},
            "then": {
                "properties": {**common, kind.endpoint_key: kind.schema},
                "required": [kind.endpoint_key],
                "additionalProperties": False,
            },
        }
        for name, kind in TARGET_TYPES.items()
    ]
    return schema


def _validator() -> jsonschema.protocols.Validator:
    global _CONFIG_VALIDATOR
    registry = tuple((name, id(kind)) for name, kind in TARGET_TYPES.items())
    if _CONFIG_VALIDATOR is None or _CONFIG_VALIDATOR[0] != registry:
        schema = config_schema()
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        _CONFIG_VALIDATOR = (registry, cls(schema))
    return _CONFIG_VALIDATOR[1]


def _schema_problems(data: Any) -> list[str]:
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.path)))
    return [f"{format_path(error.absolute_path)}: {_describe(error)}" for error in errors]


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        schema = error.schema if isinstance(error.schema, dict) else {}
        extra = sorted(
            set(cast(dict[str, Any], error.instance)) - set(schema.get("properties", {}))
        )
        return "unknown key " + ", ".join(repr(k) for k in extra)
    message = str(error.message)
    if isinstance(error.instance, str) and len(error.instance) > MAX_QUOTED_VALUE_CHARS:
        # A problem names the place; a 100,000-character value quoted whole helps nobody.
        short = f"{error.instance[:MAX_QUOTED_VALUE_CHARS]!r}... ({len(error.instance)} characters)"
        message = message.replace(repr(error.instance), short)
    return message


_REF = re.compile(r"\$\{(env|file):([^}]+)\}")


def references(value: Any, where: str) -> list[str]:
    """The places in `value` (any depth) that hold a `${env:}`/`${file:}` reference."""
    if isinstance(value, str):
        return [where] if _REF.search(value) else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in references(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for n, v in enumerate(value) for p in references(v, f"{where}[{n}]")]
    return []


def _resolve(value: str, where: str, problems: list[str]) -> str:
    """Expand `${env:NAME}` and `${file:/path}` so secrets stay out of the YAML."""

    def expand(match: re.Match[str]) -> str:
        kind, ref = match.group(1), match.group(2)
        if kind == "env":
            if ref not in os.environ:
                problems.append(f"{where}: environment variable {ref!r} is not set")
                return ""
            return os.environ[ref]
        try:
            return read_reference(ref)
        except (OSError, ValueError) as exc:
            problems.append(f"{where}: cannot read {ref!r}: {getattr(exc, 'strerror', 0) or exc}")
            return ""

    return _REF.sub(expand, value)


def read_reference(path: str) -> str:
    """The value of `${file:path}`: a regular file of at most MAX_REFERENCE_BYTES, read
    without blocking on a FIFO (opened non-blocking, refused by its type) and without
    filling memory from a device such as /dev/zero."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        data = b""
        while len(data) <= MAX_REFERENCE_BYTES and (
            chunk := os.read(fd, MAX_REFERENCE_BYTES + 1 - len(data))
        ):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_REFERENCE_BYTES:
        raise ValueError(f"larger than {MAX_REFERENCE_BYTES} bytes")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ValueError("not UTF-8 text") from exc


def _resolve_all(value: Any, where: str, problems: list[str]) -> Any:
    """References may stand in any string of an endpoint, and in its headers' values."""
    if isinstance(value, str):
        return _resolve(value, where, problems)
    if isinstance(value, dict):
        return {k: _resolve_all(v, f"{where}.{k}", problems) for k, v in value.items()}
    return value


# What an HTTP client refuses to put in a header (it raises at send time, so a target would
# fail on every batch): control characters other than HTAB in a value, and names that are not
# RFC 9110 tokens. A newline is the usual culprit, from an ${env:} value; ${file:} values are
# stripped of surrounding whitespace already, so only a control character inside remains.
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_problems(endpoint: Mapping[str, Any], where: str) -> list[str]:
    """Headers an endpoint sends (its `headers`, a bearer token, the signature header's name)
    that no HTTP client would send. The value is never shown: it may be a secret."""
    problems = []
    values: dict[str, Any] = {
        f"{where}.headers.{name}": value for name, value in (endpoint.get("headers") or {}).items()
    }
    for name in endpoint.get("headers") or {}:
        if not _HEADER_NAME.fullmatch(name):
            problems.append(f"{where}.headers: {name!r} is not a valid header name")
    auth = endpoint.get("auth")
    if isinstance(auth, HttpAuthConfig) and auth.type == "bearer":
        values[f"{where}.auth.token"] = auth.token
    signing = endpoint.get("signing")
    if isinstance(signing, SigningConfig) and not _HEADER_NAME.fullmatch(signing.header):
        problems.append(f"{where}.signing.header: {signing.header!r} is not a valid header name")
    for path, value in values.items():
        found = _HEADER_VALUE_FORBIDDEN.search(value) if isinstance(value, str) else None
        if found:
            problems.append(
                f"{path}: a control character ({found.group()!r}) in a header value, which "
                "an HTTP client refuses to send (an ${env:} value ending in a newline?)"
            )
    return problems


def _section(cls: type[Any], data: Mapping[str, Any] | None) -> Any:
    """Build a dataclass from a mapping whose keys the schema has already checked."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (data or {}).items() if k in known})


def _nested_sections(cls: type[Any]) -> dict[str, type[Any]]:
    """The fields of an endpoint dataclass that are dataclasses of their own (`auth`,
    `signing`, `tls`): their mappings become those dataclasses."""
    hints = get_type_hints(cls)
    nested = {}
    for f in fields(cls):
        for kind in get_args(hints[f.name]) or (hints[f.name],):
            if isinstance(kind, type) and is_dataclass(kind):
                nested[f.name] = kind
    return nested


def _build(data: Mapping[str, Any], problems: list[str]) -> Config:
    delivery = data.get("delivery") or {}
    targets = []
    for i, raw in enumerate(data.get("targets") or []):
        kind = TARGET_TYPES[raw["target_type"]]  # each type's module owns its endpoint
        key, endpoint_cls = kind.endpoint_key, kind.config_class
        before = len(problems)
        endpoint = {
            name: _resolve_all(value, f"targets[{i}].{key}.{name}", problems)
            for name, value in raw[key].items()
        }
        for name, section_cls in _nested_sections(endpoint_cls).items():
            if isinstance(endpoint.get(name), dict):
                endpoint[name] = _section(section_cls, endpoint[name])
        problems.extend(_header_problems(endpoint, f"targets[{i}].{key}"))
        signing = endpoint.get("signing")
        where = f"targets[{i}].{key}.signing.secret"
        # A reference that did not resolve is reported once, as such, not also as too short.
        unresolved = any(p.startswith(f"{where}: ") for p in problems[before:])
        if (
            isinstance(signing, SigningConfig)
            and not unresolved
            and len(signing.secret) < MIN_SIGNING_SECRET
        ):
            problems.append(f"{where}: at least {MIN_SIGNING_SECRET} characters")
        targets.append(
            TargetConfig(
                id=raw["id"],
                name=raw.get("name", raw["id"]),
                target_type=raw["target_type"],
                endpoint=_section(endpoint_cls, endpoint),
                batch=_section(
                    BatchConfig,
                    {
                        **TARGET_TYPES[raw["target_type"]].batch_defaults,
                        **delivery.get("batch", {}),
                        **raw.get("batch", {}),
                    },
                ),
                retry=_section(RetryConfig, {**delivery.get("retry", {}), **raw.get("retry", {})}),
            )
        )
    routes = tuple(
        RouteConfig(
            id=str(raw.get("id", raw["name"])),
            name=raw["name"],
            rules=tuple(
                RuleConfig(
                    locations=tuple(rule["locations"]),
                    target_ids=tuple(rule["target_ids"]),
                    actions=tuple(rule.get("actions", ())),
                    filter=_rule_filter(rule, f"routes[{r}].rules[{k}].filter", problems),
                )
                for k, rule in enumerate(raw["rules"])
            ),
        )
        for r, raw in enumerate(data.get("routes") or [])
    )
    settings = data.get("settings") or {}
    return Config(
        server=_server(data.get("server") or {}, problems),
        storage=_storage(data.get("storage") or {}),
        validation=_section(ValidationConfig, data.get("validation")),
        shutdown=_section(ShutdownConfig, data.get("shutdown")),
        targets=tuple(targets),
        routes=routes,
        settings=SettingsConfig(default_targets=tuple(settings.get("default_targets", ()))),
        startup=_section(StartupConfig, data.get("startup")),
        reload=_section(ReloadConfig, data.get("reload")),
        auth=_auth(data["auth"], problems) if "auth" in data else None,
        redaction=_redaction(data.get("redaction") or {}, problems),
        evidence=_section(EvidenceConfig, data.get("evidence")),
    )


def _storage(data: Mapping[str, Any]) -> StorageConfig:
    if "archive_roots" in data:
        data = {**data, "archive_roots": tuple(data["archive_roots"])}
    return cast(StorageConfig, _section(StorageConfig, data))


MIN_HASH_KEY_CHARS = 16


def _redaction(data: Mapping[str, Any], problems: list[str]) -> RedactionConfig:
    keys = tuple(
        RedactionKeyConfig(key=raw) if isinstance(raw, str) else RedactionKeyConfig(**raw)
        for raw in data.get("keys", ())
    )
    hash_key = None
    if "hash_key" in data:
        before = len(problems)
        hash_key = _resolve(data["hash_key"], "redaction.hash_key", problems)
        if len(problems) == before and len(hash_key) < MIN_HASH_KEY_CHARS:
            problems.append(f"redaction.hash_key: at least {MIN_HASH_KEY_CHARS} characters")
    return RedactionConfig(keys=keys, hash_key=hash_key)


MIN_TOKEN_CHARS = 16  # a bearer token shorter than this is guessable


def _auth(data: Mapping[str, Any] | None, problems: list[str]) -> AuthConfig:
    """Tokens become digests here; the plain value of a referenced token is not kept."""
    data = data or {}
    kinds: dict[str, tuple[TokenConfig, ...]] = {}
    for kind in ("ingest_tokens", "admin_tokens"):
        tokens = []
        for i, raw in enumerate(data.get(kind) or []):
            where = f"auth.{kind}[{i}]"
            if "sha256" in raw:
                digest = bytes.fromhex(raw["sha256"])
            else:
                before = len(problems)
                value = _resolve(raw["token"], f"{where}.token", problems)
                if len(problems) == before and len(value) < MIN_TOKEN_CHARS:
                    problems.append(f"{where}.token: at least {MIN_TOKEN_CHARS} characters")
                if len(problems) > before:
                    continue  # reported; an unresolved token must not look like a duplicate
                digest = hashlib.sha256(value.encode()).digest()
            tokens.append(
                TokenConfig(
                    name=raw["name"], digest=digest, services=tuple(raw.get("services", ()))
                )
            )
        kinds[kind] = tuple(tokens)
    return AuthConfig(
        ingest_tokens=kinds["ingest_tokens"],
        admin_tokens=kinds["admin_tokens"],
        refusal_events=_section(RefusalEventsConfig, data.get("refusal_events")),
    )


def _server(data: Mapping[str, Any], problems: list[str]) -> ServerConfig:
    """The listener; its TLS files must be readable now, so that `check` finds a wrong path."""
    if "allowed_hosts" in data:
        data = {**data, "allowed_hosts": tuple(data["allowed_hosts"])}
    tls = data.get("tls")
    if tls is None:
        return cast(ServerConfig, _section(ServerConfig, data))
    for key in ("cert_file", "key_file", "client_ca_file"):
        if key in tls and not os.access(tls[key], os.R_OK):
            problems.append(f"server.tls.{key}: cannot read {tls[key]!r}")
    return cast(ServerConfig, _section(ServerConfig, {**data, "tls": ServerTlsConfig(**tls)}))


def _rule_filter(rule: Mapping[str, Any], where: str, problems: list[str]) -> Query | None:
    """Parse a rule's filter once, at load time, so a bad one stops `check` and `serve`."""
    if "filter" not in rule:
        return None
    try:
        return parse(rule["filter"])
    except QueryError as exc:
        problems.append(f"{where}: {exc} in {_excerpt(rule['filter'], exc.column)}")
        return None


def _excerpt(text: str, column: int, around: int = 40) -> str:
    """A long filter quoted only around the column a problem names (a problem is one line)."""
    start, end = max(column - 1 - around, 0), column - 1 + around
    if start == 0 and end >= len(text):
        return repr(text)
    return ("..." if start else "") + repr(text[start:end]) + ("..." if end < len(text) else "")


def _cross_check(config: Config) -> list[str]:
    """What a schema cannot say: ids must be unique and every reference must resolve."""
    problems: list[str] = []
    server = config.server
    if server.max_body_bytes_in_flight < server.max_body_bytes:
        problems.append(
            f"server.max_body_bytes_in_flight: {server.max_body_bytes_in_flight} is less than "
            f"server.max_body_bytes ({server.max_body_bytes}), so a body of the largest size "
            "allowed could never be taken"
        )
    known: dict[str, int] = {}
    for i, target in enumerate(config.targets):
        if target.id in known:
            first = known[target.id]
            problems.append(
                f"targets[{i}].id: duplicate target id {target.id!r} (also targets[{first}])"
            )
        known.setdefault(target.id, i)
    route_ids: dict[str, int] = {}
    for r, route in enumerate(config.routes):
        if route.id in route_ids:
            problems.append(
                f"routes[{r}]: duplicate route id {route.id!r} (also routes[{route_ids[route.id]}])"
            )
        route_ids.setdefault(route.id, r)
        for k, rule in enumerate(route.rules):
            for t, target_id in enumerate(rule.target_ids):
                if target_id not in known:
                    problems.append(
                        f"routes[{r}].rules[{k}].target_ids[{t}]: unknown target {target_id!r}"
                    )
    for t, target_id in enumerate(config.settings.default_targets):
        if target_id not in known:
            problems.append(f"settings.default_targets[{t}]: unknown target {target_id!r}")
    if config.auth is not None:
        problems.extend(_token_problems(config.auth))
    problems.extend(file_target_problems(config))
    if config.server.port:
        problems.extend(listener_problems(config, config.server.host, config.server.port))
    return problems


def file_target_problems(config: Config) -> list[str]:
    """What no file target may write, wherever its config came from: something that is not a
    regular file (a directory, a device, a FIFO), the journal's own files or the dead-letter
    directory, or the same file as another target."""
    problems: list[str] = []
    reserved = {path.resolve() for path in config.storage.journal_files()}
    dead_letters = config.storage.dead_letter_dir().resolve()
    seen: dict[Path, int] = {}
    for i, target in enumerate(config.targets):
        if not isinstance(target.endpoint, FileEndpointConfig):
            continue
        where = f"targets[{i}].file_endpoint.path"
        problem = file_path_problem(target.endpoint.path)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        path = Path(target.endpoint.path).resolve()
        if path in reserved:
            problems.append(f"{where}: {str(path)!r} is one of the journal's own files")
        elif path.is_relative_to(dead_letters):
            problems.append(f"{where}: {str(path)!r} is in the dead-letter directory")
        elif path in seen:
            problems.append(
                f"{where}: targets[{seen[path]}] already writes {str(path)!r}; two targets "
                "writing one file interleave and rotate each other's lines"
            )
        seen.setdefault(path, i)
    return problems


def file_path_problem(path: str) -> str | None:
    """Why `path` cannot be an archive (None if it can): a NUL byte, or an existing
    non-regular file. A file that does not exist yet is created at start."""
    if "\x00" in path:
        return "a NUL byte in the path"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot look at {path!r}: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "a device, FIFO or socket"
    return f"{path!r} is {kind}, not a regular file"


def archive_roots(config: Config) -> tuple[Path, ...]:
    """Where the management API may put file targets: storage.archive_roots, or else the
    directories of the config's own file targets; resolved, symlinks followed."""
    roots = config.storage.archive_roots or tuple(
        str(Path(t.endpoint.path).parent)
        for t in config.targets
        if isinstance(t.endpoint, FileEndpointConfig) and "\x00" not in t.endpoint.path
    )
    return tuple(dict.fromkeys(Path(root).resolve() for root in roots))


def listener_problems(config: Config, host: str, port: int) -> list[str]:
    """A target that would send events back to this daemon's own listener loops them for
    ever (each delivery is a new ingest)."""
    problems: list[str] = []
    for i, target in enumerate(config.targets):
        problems.extend(target_listener_problems(i, target, host, port))
    return problems


def target_listener_problems(i: int, target: TargetConfig, host: str, port: int) -> list[str]:
    endpoint = target.endpoint
    urls: list[tuple[str, str]] = []
    if isinstance(endpoint, HttpEndpointConfig):
        urls.append(("http_endpoint.url", endpoint.url))
    elif isinstance(endpoint, CloudLogsEndpointConfig):
        if endpoint.ingress_url:
            urls.append(("cloudlogs_endpoint.ingress_url", endpoint.ingress_url))
        urls.append(("cloudlogs_endpoint.iam_url", endpoint.iam_url))
    elif isinstance(endpoint, CosEndpointConfig):
        urls.append(("cos_endpoint.endpoint", endpoint_url(endpoint.endpoint)))
        if endpoint.hmac_keys is None:
            urls.append(("cos_endpoint.iam_url", endpoint.iam_url))
    return [
        f"targets[{i}].{key}: points at this daemon's own listener ({host}:{port}); its "
        "events would come back as new events for ever"
        for key, url in urls
        if reaches_listener(url, host, port)
    ]


def reaches_listener(url: str, host: str, port: int) -> bool:
    """Whether `url` names the address and port this daemon listens on (a wildcard listen
    address is reached through loopback and this host's own addresses)."""
    try:
        parts = urlsplit(url)
        target_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if target_port != port or not parts.hostname:
        return False
    target = _addresses(parts.hostname)
    listen = _addresses(host)
    if any(address.is_unspecified for address in listen):
        own = _addresses(socket.gethostname())
        return any(a.is_loopback or a.is_unspecified or a in own for a in target)
    return bool(target & listen)


def _addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos}


def config_warnings(config: Config) -> list[str]:
    """What `check` questions without refusing: the config works, but likely not as meant."""
    warnings = []
    if not config.targets:
        warnings.append(
            "targets: none; accepted events go nowhere (counted as unrouted in /v1/status)"
        )
    return warnings


def _token_problems(auth: AuthConfig) -> list[str]:
    """A name must say which token was used, and a value must say which token it is."""
    problems: list[str] = []
    names: dict[str, str] = {}
    digests: dict[bytes, str] = {}
    for kind, tokens in (
        ("ingest_tokens", auth.ingest_tokens),
        ("admin_tokens", auth.admin_tokens),
    ):
        for i, token in enumerate(tokens):
            where = f"auth.{kind}[{i}]"
            if token.name in names:
                problems.append(
                    f"{where}.name: duplicate token name {token.name!r} (also {names[token.name]})"
                )
            names.setdefault(token.name, where)
            if token.digest in digests:
                problems.append(f"{where}: the same token as {digests[token.digest]}")
            digests.setdefault(token.digest, where)
    return problems
