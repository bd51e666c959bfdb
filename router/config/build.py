"""Checked YAML data -> the frozen dataclasses: references resolved, tokens digested, rule
filters parsed, each target's endpoint built by its type; problems collected, not raised."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, cast, get_args, get_type_hints

from router.config.model import (
    AbsenceConfig,
    AlertConfig,
    AuthConfig,
    BatchConfig,
    Config,
    EvidenceConfig,
    IamConfig,
    JetStreamConfig,
    JetStreamTlsConfig,
    RedactionConfig,
    RedactionKeyConfig,
    RefusalEventsConfig,
    ReloadConfig,
    RetryConfig,
    RouteConfig,
    RuleConfig,
    ServerConfig,
    ServerTlsConfig,
    SettingsConfig,
    ShutdownConfig,
    StartupConfig,
    StorageConfig,
    TargetConfig,
    ThresholdConfig,
    TokenConfig,
    ValidationConfig,
    ViewConfig,
)
from router.config.references import resolve, resolve_all
from router.errors import QueryError
from router.iam import PROFILE_SELECTORS, CrTokenError, TrustedProfileConfig, read_cr_token
from router.query import Query, parse
from router.targets import TARGET_TYPES, TargetType
from router.targets._net import AddressBound
from router.targets.event_streams import EventStreamsEndpointConfig
from router.targets.http import HttpAuthConfig, SigningConfig

MIN_SIGNING_SECRET = 16  # an HMAC key shorter than this is guessable


_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers that frame the request or manage the connection: the HTTP client sets them for each
# request. One given as a target header was sent as given: `Content-Length: 1` with the whole
# batch after it had the receiver read the rest as a second request (smuggled, its method and
# path made of event bytes); the others made every delivery unreadable.
_CLIENT_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "content-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
    }
)


def header_problems(endpoint: Mapping[str, Any], where: str) -> list[str]:
    """Headers an endpoint sends (its `headers`, a bearer token, the signature header's name)
    that no HTTP client would send. The value is never shown: it may be a secret."""
    problems = []
    values: dict[str, Any] = {
        f"{where}.headers.{name}": value for name, value in (endpoint.get("headers") or {}).items()
    }
    for name in endpoint.get("headers") or {}:
        if not _HEADER_NAME.fullmatch(name):
            problems.append(f"{where}.headers: {name!r} is not a valid header name")
        elif name.lower() in _CLIENT_HEADERS:
            problems.append(
                f"{where}.headers.{name}: frames the request, which the HTTP client does for "
                "each one; it may not be set"
            )
    auth = endpoint.get("auth")
    if isinstance(auth, HttpAuthConfig) and auth.type == "bearer":
        values[f"{where}.auth.token"] = auth.token
    signing = endpoint.get("signing")
    if isinstance(signing, SigningConfig) and not _HEADER_NAME.fullmatch(signing.header):
        problems.append(f"{where}.signing.header: {signing.header!r} is not a valid header name")
    elif isinstance(signing, SigningConfig) and signing.header.lower() in _CLIENT_HEADERS:
        problems.append(
            f"{where}.signing.header: {signing.header!r} frames the request, which the HTTP "
            "client does for each one"
        )
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


def _identity(
    kind: TargetType,
    endpoint: dict[str, Any],
    where: str,
    iam: IamConfig | None,
    problems: list[str],
) -> None:
    """Fill in the daemon's own identity where a target uses it: an endpoint without an
    api_key, or one that sets service_to_service_enabled, authenticates with the top-level
    `iam` identity (its API key, or its trusted profile), exchanged at the `iam` section's IAM
    URL only: a target that names another would send the daemon's key (or its CR token) to a
    URL of its own choosing, which an admin token could otherwise do through the API. Every
    target with a key of its own and no iam_url exchanges it at the `iam` section's URL."""
    names = {f.name for f in fields(kind.config_class)}
    uses_daemons = (
        iam is not None
        and "api_key" in names
        and ("api_key" not in endpoint or endpoint.get("service_to_service_enabled") is True)
    )
    if iam is not None and uses_daemons:
        if iam.trusted_profile is not None:
            endpoint.pop("api_key", None)
            endpoint["trusted_profile"] = iam.trusted_profile
            problems.extend(_profile_problems(kind, endpoint, where))
        else:
            endpoint["api_key"] = iam.api_key
        daemons_url = iam.iam_url or _default(kind.config_class, "iam_url")
        own = endpoint.get("iam_url")
        if own is not None and own.rstrip("/") != str(daemons_url).rstrip("/"):
            problems.append(
                f"{where}.iam_url: this target uses the daemon's own identity (the top-level "
                f"iam section), which is exchanged for tokens at {daemons_url} only; set "
                "iam.iam_url instead, or give the target an api_key of its own"
            )
        elif "iam_url" in names:
            endpoint["iam_url"] = daemons_url
    if iam is not None and iam.iam_url is not None and "iam_url" in names:
        endpoint.setdefault("iam_url", iam.iam_url)
    if (
        kind.needs_api_key is not None
        and kind.needs_api_key(endpoint)
        and "api_key" not in endpoint
        and "trusted_profile" not in endpoint
    ):
        problems.append(
            f"{where}.api_key: required (or service_to_service_enabled with the daemon's own "
            "identity in the top-level iam section)"
        )
        endpoint["api_key"] = ""  # the dataclass still builds; the problem stops the load


def _default(cls: type[Any], name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)


def _profile_problems(kind: TargetType, endpoint: Mapping[str, Any], where: str) -> list[str]:
    """A trusted profile has no key: Kafka takes its IAM token by SASL OAUTHBEARER only."""
    sasl = endpoint.get("sasl")
    mechanism = sasl.get("mechanism") if isinstance(sasl, Mapping) else None
    if kind.config_class is EventStreamsEndpointConfig and mechanism not in (
        None,
        "oauthbearer",
        "none",
    ):
        return [
            f"{where}.sasl.mechanism: {mechanism!r} needs a password, and the daemon's "
            "identity is a trusted profile, which has none: leave the mechanism unset "
            "(OAUTHBEARER with the profile's IAM token) or give the target an api_key"
        ]
    return []


def _iam(data: Mapping[str, Any] | None, problems: list[str]) -> IamConfig | None:
    """The top-level `iam` section: exactly one of api_key or trusted_profile."""
    if data is None:
        return None
    given = [name for name in ("api_key", "trusted_profile") if name in data]
    if len(given) != 1:
        problems.append(
            "iam: exactly one of api_key or trusted_profile, "
            + ("not both" if given else "and neither is given")
        )
    if "api_key" in data:
        return IamConfig(
            api_key=resolve(data["api_key"], "iam.api_key", problems), iam_url=data.get("iam_url")
        )
    if "trusted_profile" in data:
        profile = _trusted_profile(data["trusted_profile"], problems)
        return IamConfig(trusted_profile=profile, iam_url=data.get("iam_url"))
    return IamConfig(api_key="", iam_url=data.get("iam_url"))


def _trusted_profile(data: Mapping[str, Any], problems: list[str]) -> TrustedProfileConfig:
    """iam.trusted_profile: one profile selector (references allowed), and a token file that
    is readable now, so that `check` finds a wrong path before the first token request. The
    file is read again at every token request, so its path is never a ${file:} reference."""
    where = "iam.trusted_profile"
    chosen = [name for name in PROFILE_SELECTORS if name in data]
    if len(chosen) != 1:
        problems.append(
            f"{where}: exactly one of {', '.join(PROFILE_SELECTORS)}"
            + (f", not {' and '.join(chosen)}" if chosen else "")
        )
    values = {name: resolve(data[name], f"{where}.{name}", problems) for name in chosen}
    if not chosen:
        values["profile_id"] = "unset"  # the dataclass still builds; the problem stops the load
    path = data.get("cr_token_file")
    try:
        read_cr_token(path)
    except CrTokenError as exc:
        problems.append(f"{where}.cr_token_file: {exc}")
    return TrustedProfileConfig(**values, cr_token_file=path)


def build_config(data: Mapping[str, Any], problems: list[str]) -> Config:
    delivery = data.get("delivery") or {}
    iam = _iam(data.get("iam"), problems)
    settings = data.get("settings") or {}
    targets = []
    for i, raw in enumerate(data.get("targets") or []):
        kind = TARGET_TYPES[raw["target_type"]]  # each type's module owns its endpoint
        key, endpoint_cls = kind.endpoint_key, kind.config_class
        before = len(problems)
        endpoint = {
            name: resolve_all(value, f"targets[{i}].{key}.{name}", problems)
            for name, value in raw[key].items()
        }
        _identity(kind, endpoint, f"targets[{i}].{key}", iam, problems)
        # atracker's target region names the objects (COS) and the region header (Event
        # Streams); without one, the metadata region stands in.
        region = raw.get("region") or settings.get("metadata_region_primary")
        if (
            region
            and "region" not in endpoint
            and "region" in {f.name for f in fields(endpoint_cls)}
        ):
            endpoint["region"] = region
        for name, section_cls in _nested_sections(endpoint_cls).items():
            if isinstance(endpoint.get(name), dict):
                endpoint[name] = _section(section_cls, endpoint[name])
        problems.extend(header_problems(endpoint, f"targets[{i}].{key}"))
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
                region=raw.get("region"),
                managed_by=raw.get("managed_by", "account"),
                batch=_section(
                    BatchConfig,
                    {
                        **TARGET_TYPES[raw["target_type"]].batch_defaults,
                        **delivery.get("batch", {}),
                        **raw.get("batch", {}),
                    },
                ),
                retry=_section(RetryConfig, {**delivery.get("retry", {}), **raw.get("retry", {})}),
                bound=_bound(raw, data.get("auth") or {}),
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
            managed_by=raw.get("managed_by", "account"),
        )
        for r, raw in enumerate(data.get("routes") or [])
    )
    views = tuple(
        ViewConfig(name=raw["name"], query=query)
        for v, raw in enumerate(data.get("views") or [])
        if (query := _query(raw["query"], f"views[{v}].query", problems)) is not None
    )
    alerts = tuple(
        _alert(raw, f"alerts[{a}]", views, problems)
        for a, raw in enumerate(data.get("alerts") or [])
    )
    return Config(
        server=_server(data.get("server") or {}, problems),
        storage=_storage(data.get("storage") or {}, problems),
        validation=_section(ValidationConfig, data.get("validation")),
        shutdown=_section(ShutdownConfig, data.get("shutdown")),
        targets=tuple(targets),
        routes=routes,
        views=views,
        alerts=alerts,
        settings=SettingsConfig(
            default_targets=tuple(settings.get("default_targets", ())),
            metadata_region_primary=settings.get("metadata_region_primary"),
            metadata_region_backup=settings.get("metadata_region_backup"),
            permitted_target_regions=tuple(settings.get("permitted_target_regions", ())),
            private_api_endpoint_only=settings.get("private_api_endpoint_only", False),
        ),
        startup=_section(StartupConfig, data.get("startup")),
        reload=_section(ReloadConfig, data.get("reload")),
        auth=_auth(data["auth"], problems) if "auth" in data else None,
        iam=iam,
        redaction=_redaction(data.get("redaction") or {}, problems),
        evidence=_section(EvidenceConfig, data.get("evidence")),
    )


def _storage(data: Mapping[str, Any], problems: list[str]) -> StorageConfig:
    if "archive_roots" in data:
        data = {**data, "archive_roots": tuple(data["archive_roots"])}
    if "jetstream" in data:
        data = {**data, "jetstream": _jetstream(data["jetstream"] or {}, problems)}
    return cast(StorageConfig, _section(StorageConfig, data))


def _jetstream(data: Mapping[str, Any], problems: list[str]) -> JetStreamConfig:
    """storage.jetstream: secrets (password, token) may be references; files must be readable
    now, so that `check` finds a wrong path before `serve` fails to connect."""
    data = dict(data)
    for key in ("password", "token", "user"):
        if key in data:
            data[key] = resolve(data[key], f"storage.jetstream.{key}", problems)
    if "servers" in data:
        data["servers"] = tuple(data["servers"])
    files = {"credentials_file": data.get("credentials_file")}
    if isinstance(data.get("tls"), dict):
        files.update({f"tls.{k}": v for k, v in data["tls"].items()})
        data["tls"] = JetStreamTlsConfig(**data["tls"])
    for key, path in files.items():
        if path is not None and not os.access(path, os.R_OK):
            problems.append(f"storage.jetstream.{key}: cannot read {path!r}")
    return cast(JetStreamConfig, _section(JetStreamConfig, data))


MIN_HASH_KEY_CHARS = 16


def _redaction(data: Mapping[str, Any], problems: list[str]) -> RedactionConfig:
    keys = tuple(
        RedactionKeyConfig(key=raw) if isinstance(raw, str) else RedactionKeyConfig(**raw)
        for raw in data.get("keys", ())
    )
    hash_key = None
    if "hash_key" in data:
        before = len(problems)
        hash_key = resolve(data["hash_key"], "redaction.hash_key", problems)
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
                value = resolve(raw["token"], f"{where}.token", problems)
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
    networks = tuple(data.get("api_target_networks") or ())
    for i, network in enumerate(networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            problems.append(f"auth.api_target_networks[{i}]: {exc}")
    return AuthConfig(
        ingest_tokens=kinds["ingest_tokens"],
        admin_tokens=kinds["admin_tokens"],
        refusal_events=_section(RefusalEventsConfig, data.get("refusal_events")),
        api_target_networks=networks,
    )


def _bound(raw: Mapping[str, Any], auth: Mapping[str, Any]) -> AddressBound | None:
    """Where a target the management API set hosts on may connect (None: the YAML's own).
    A network that does not parse is reported by _auth; it bounds nothing here."""
    hosts = raw.get("api_hosts") or ()
    if not hosts:
        return None
    networks = []
    for network in auth.get("api_target_networks") or ():
        with contextlib.suppress(ValueError):
            networks.append(str(ipaddress.ip_network(network, strict=False)))
    return AddressBound.build(hosts, networks)


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
    return _query(rule["filter"], where, problems)


def _query(text: str, where: str, problems: list[str]) -> Query | None:
    """A query parsed at load time; a problem names its place, column and excerpt."""
    try:
        return parse(text)
    except QueryError as exc:
        problems.append(f"{where}: {exc} in {_excerpt(text, exc.column)}")
        return None


def _alert(
    raw: Mapping[str, Any], where: str, views: tuple[ViewConfig, ...], problems: list[str]
) -> AlertConfig:
    """An alert with the query it runs: its own, or its view's (an unknown view is the
    cross-check's to name). What the schema cannot say about its shape is said here."""
    query: Query | None = None
    if ("query" in raw) == ("view" in raw):
        problems.append(f"{where}: give either query or view (one of them, not both)")
    if "query" in raw:
        query = _query(raw["query"], f"{where}.query", problems)
    elif "view" in raw:
        query = next((v.query for v in views if v.name == raw["view"]), None)
    if ("threshold" in raw) == ("absence" in raw):
        problems.append(
            f"{where}: give either threshold (presence: count in window_s) or absence "
            "(no match for window_s), one of them, not both"
        )
    return AlertConfig(
        name=raw["name"],
        query=query,
        view=raw.get("view"),
        threshold=_section(ThresholdConfig, raw["threshold"]) if "threshold" in raw else None,
        absence=_section(AbsenceConfig, raw["absence"]) if "absence" in raw else None,
        target_ids=tuple(raw["target_ids"]),
        **({"cooldown_s": raw["cooldown_s"]} if "cooldown_s" in raw else {}),
    )


def _excerpt(text: str, column: int, around: int = 40) -> str:
    """A long filter quoted only around the column a problem names (a problem is one line)."""
    start, end = max(column - 1 - around, 0), column - 1 + around
    if start == 0 and end >= len(text):
        return repr(text)
    return ("..." if start else "") + repr(text[start:end]) + ("..." if end < len(text) else "")
