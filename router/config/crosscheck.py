"""What a schema cannot say: unique ids, references that resolve, file targets that may
write where they point, target addresses that can be connected to, no target looping back to
this daemon's own listener; and warnings. What bounds an admin token further (no target on
an address a host keeps for itself, such as a cloud's metadata service) is here too, for the
management API to apply."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import fields, is_dataclass
from pathlib import Path
from urllib.parse import urlsplit

from router.config.model import (
    AuthConfig,
    Config,
    TargetConfig,
)
from router.targets._net import IpAddress, api_refusal
from router.targets.cloud_logs import CloudLogsEndpointConfig
from router.targets.cos import CosEndpointConfig, endpoint_url
from router.targets.event_streams import EventStreamsEndpointConfig, sasl_mechanism
from router.targets.file import FileEndpointConfig
from router.targets.http import HttpEndpointConfig
from router.targets.syslog import SyslogEndpointConfig


def cross_check(config: Config) -> list[str]:
    """What a schema cannot say: ids must be unique and every reference must resolve."""
    problems: list[str] = []
    server = config.server
    if server.max_body_bytes_in_flight < server.max_body_bytes:
        problems.append(
            f"server.max_body_bytes_in_flight: {server.max_body_bytes_in_flight} is less than "
            f"server.max_body_bytes ({server.max_body_bytes}), so a body of the largest size "
            "allowed could never be taken"
        )
    known = _first_places([t.id for t in config.targets], "targets", ".id", "target id", problems)
    _first_places([r.id for r in config.routes], "routes", "", "route id", problems)
    for r, route in enumerate(config.routes):
        for k, rule in enumerate(route.rules):
            for t, target_id in enumerate(rule.target_ids):
                if target_id not in known:
                    problems.append(
                        f"routes[{r}].rules[{k}].target_ids[{t}]: unknown target {target_id!r}"
                    )
    problems.extend(_view_and_alert_problems(config, known))
    for t, target_id in enumerate(config.settings.default_targets):
        if target_id not in known:
            problems.append(f"settings.default_targets[{t}]: unknown target {target_id!r}")
    if config.auth is not None:
        problems.extend(_token_problems(config.auth))
    problems.extend(file_target_problems(config))
    for i, target in enumerate(config.targets):
        problems.extend(target_address_problems(i, target))
    problems.extend(storage_problems(config))
    if config.server.port:
        problems.extend(listener_problems(config, config.server.host, config.server.port))
    return problems


def _first_places(
    names: list[str], section: str, field: str, kind: str, problems: list[str]
) -> dict[str, int]:
    """Each name's first place in `section`; a problem for every later place that repeats
    it, naming the first (ids and names are how the API, routes and alerts refer to them)."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            problems.append(
                f"{section}[{i}]{field}: duplicate {kind} {name!r} (also {section}[{first[name]}])"
            )
        first.setdefault(name, i)
    return first


def _view_and_alert_problems(config: Config, targets: dict[str, int]) -> list[str]:
    """Names are unique, an alert's view exists, its targets too."""
    problems: list[str] = []
    views = _first_places([v.name for v in config.views], "views", ".name", "view name", problems)
    _first_places([a.name for a in config.alerts], "alerts", ".name", "alert name", problems)
    for a, alert in enumerate(config.alerts):
        if alert.view is not None and alert.view not in views:
            problems.append(f"alerts[{a}].view: unknown view {alert.view!r}")
        for t, target_id in enumerate(alert.target_ids):
            if target_id not in targets:
                problems.append(f"alerts[{a}].target_ids[{t}]: unknown target {target_id!r}")
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
    # The addresses spoken to over HTTP (a broker or a syslog host, written `//host:port`,
    # would not take a POST as an event).
    urls = [(key, url) for key, url in destinations(target) if not url.startswith("//")]
    return [
        f"targets[{i}].{key}: points at this daemon's own listener ({host}:{port}); its "
        "events would come back as new events for ever"
        for key, url in urls
        if reaches_listener(url, host, port)
    ]


def destinations(target: TargetConfig) -> list[tuple[str, str]]:
    """Where a target connects, as (field, URL); a Kafka broker or a syslog host is written
    `//host:port`, so every one reads with urlsplit."""
    endpoint = target.endpoint
    if isinstance(endpoint, HttpEndpointConfig):
        return [("http_endpoint.url", endpoint.url)]
    if isinstance(endpoint, CloudLogsEndpointConfig):
        urls = [("cloudlogs_endpoint.iam_url", endpoint.iam_url)]
        if endpoint.ingress_url:
            urls.insert(0, ("cloudlogs_endpoint.ingress_url", endpoint.ingress_url))
        return urls
    if isinstance(endpoint, CosEndpointConfig):
        urls = [("cos_endpoint.endpoint", endpoint_url(endpoint.endpoint))]
        if endpoint.hmac_keys is None:
            urls.append(("cos_endpoint.iam_url", endpoint.iam_url))
        return urls
    if isinstance(endpoint, EventStreamsEndpointConfig):
        urls = [
            (f"eventstreams_endpoint.brokers[{b}]", f"//{broker}")
            for b, broker in enumerate(endpoint.brokers)
        ]
        if sasl_mechanism(endpoint) == "oauthbearer":
            urls.append(("eventstreams_endpoint.iam_url", endpoint.iam_url))
        return urls
    if isinstance(endpoint, SyslogEndpointConfig):
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        return [("syslog_endpoint.host", f"//{host}:{endpoint.port or 514}")]
    return []


def address_problem(url: str) -> str | None:
    """Why no connection can be made to `url` (None if one can be tried): it does not parse,
    names no host, or a port outside 1-65535. Such a target would fail every attempt."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r} is not a URL one can connect to ({exc})"
    if not parts.hostname:
        return f"{url!r} names no host"
    if port == 0:
        return f"{url!r}: port 0 cannot be connected to"
    return None


def target_address_problems(i: int, target: TargetConfig) -> list[str]:
    """Every address of a target that cannot be connected to, with its field."""
    return [
        f"targets[{i}].{key}: {problem}"
        for key, url in destinations(target)
        if (problem := address_problem(url)) is not None
    ]


def daemons_iam_url(config: Config, target: TargetConfig) -> str | None:
    """The target's iam_url when it is where the daemon's own identity is exchanged (the
    top-level iam section's iam_url, IBM's when it names none): the loader puts it into a
    target that uses that identity or names no IAM of its own, so it is the operator's
    choice, not the management API's, whatever host it has."""
    endpoint = target.endpoint
    url = getattr(endpoint, "iam_url", None)
    if config.iam is None or not isinstance(url, str) or not is_dataclass(endpoint):
        return None
    field = next(f for f in fields(endpoint) if f.name == "iam_url")
    daemons = config.iam.iam_url or str(field.default)
    return url if url.rstrip("/") == daemons.rstrip("/") else None


def target_network_problems(
    i: int,
    target: TargetConfig,
    before: TargetConfig | None,
    networks: tuple[str, ...] = (),
    daemons_iam: str | None = None,
) -> list[str]:
    """The management API's bound on where a target may connect, as its names resolve now
    (`api_refusal`: never an address a host keeps for itself; inside `networks`,
    auth.api_target_networks, when the operator lists some; else anywhere but loopback). A
    host of the running target that the API did not set is the operator's choice and stays
    (the YAML is not bounded by this), as does the daemon's own IAM (`daemons_iam`, from
    daemons_iam_url). The same rule is applied again when the target connects
    (targets/_net.AddressBound), as a name may resolve elsewhere by then."""
    allowed = [ipaddress.ip_network(network, strict=False) for network in networks]
    problems = []
    for key, url in destinations(target):
        if address_problem(url) is not None:
            continue  # said by target_address_problems
        if key.endswith(".iam_url") and url == daemons_iam:
            continue
        host = urlsplit(url).hostname
        if host is None or host in operators_hosts(before):
            continue
        addresses = _addresses(host)
        refusals = [why for a in sorted(addresses, key=str) if (why := api_refusal(a, allowed))]
        if refusals:
            problems.append(f"targets[{i}].{key}: {host!r}: {refusals[0]}")
        elif allowed and not addresses:
            problems.append(
                f"targets[{i}].{key}: {host!r} does not resolve, so it is not inside "
                f"auth.api_target_networks ({', '.join(networks)}), where the operator lets the "
                "management API point targets"
            )
    return problems


def target_hosts(target: TargetConfig, daemons_iam: str | None = None) -> set[str]:
    """The names and addresses a target connects to (but for the daemon's own IAM, when
    `daemons_iam` names it: see daemons_iam_url)."""
    return {
        host
        for key, url in destinations(target)
        if not (key.endswith(".iam_url") and url == daemons_iam)
        and (host := _hostname(url)) is not None
    }


def operators_hosts(before: TargetConfig | None) -> set[str]:
    """The hosts of a running target that the management API did not set (its YAML's)."""
    if before is None:
        return set()
    api_hosts = before.bound.hosts if before.bound is not None else frozenset()
    return {host for host in target_hosts(before) if host not in api_hosts}


def _hostname(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


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


def _addresses(host: str) -> set[IpAddress]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos}


def storage_problems(config: Config) -> list[str]:
    """storage.backend: jetstream: one way to authenticate, whole pairs, and only what a
    stream shared by several routers can do."""
    storage = config.storage
    if storage.backend != "jetstream":
        return []
    js = storage.jetstream
    problems = []
    if storage.when_full == "drop_oldest_per_target":
        problems.append(
            "storage.when_full: drop_oldest_per_target needs storage.backend sqlite; a full "
            "JetStream stream answers 503 + Retry-After (when_full: reject)"
        )
    problems.extend(_shared_chain_problems(config))
    ways = [
        name
        for name, given in (
            ("credentials_file", js.credentials_file),
            ("user", js.user),
            ("token", js.token),
        )
        if given is not None
    ]
    if len(ways) > 1:
        problems.append(
            f"storage.jetstream: {' and '.join(ways)} are given; name one way to authenticate"
        )
    if (js.user is None) != (js.password is None):
        missing = "password" if js.password is None else "user"
        problems.append(f"storage.jetstream.{missing}: user and password go together")
    tls = js.tls
    if tls is not None and (tls.cert_file is None) != (tls.key_file is None):
        missing = "key_file" if tls.key_file is None else "cert_file"
        problems.append(f"storage.jetstream.tls.{missing}: cert_file and key_file go together")
    return problems


def _shared_chain_problems(config: Config) -> list[str]:
    """Evidence on JetStream chains a file target per router (each router's file is a chain
    of its own, its record in the stream's KV bucket); a chain that every router writes (a
    bucket's objects, a topic's messages) would need a lease shared by the routers: refused,
    naming what works."""
    evidence = config.evidence
    if not evidence.enabled:
        return []
    problems = [
        f"targets[{i}]: evidence.enabled chains a cloud_object_storage target's objects, "
        "which every router of a JetStream stream writes into one bucket: one chain written "
        "by several routers is not supported with storage.backend jetstream (file targets "
        "are, a chain per router); set evidence.enabled: false, or use storage.backend sqlite"
        for i, target in enumerate(config.targets)
        if target.target_type == "cloud_object_storage"
    ]
    if evidence.event_streams:
        problems.append(
            "evidence.event_streams: every router of a JetStream stream writes an event_streams "
            "target's topic: one chain written by several routers is not supported with "
            "storage.backend jetstream (file targets are, a chain per router); set "
            "evidence.event_streams: false"
        )
    return problems


def config_warnings(config: Config) -> list[str]:
    """What `check` questions without refusing: the config works, but likely not as meant."""
    warnings = []
    if not config.targets:
        warnings.append(
            "targets: none; accepted events go nowhere (counted as unrouted in /v1/status)"
        )
    js = config.storage.jetstream
    if config.storage.backend == "jetstream" and js.replicas > len(js.servers):
        warnings.append(
            f"storage.jetstream.replicas: {js.replicas} replicas, but only "
            f"{len(js.servers)} listed in servers; the cluster must have that many nodes"
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
