"""The config's frozen dataclasses: the one place defaults live.

`schemas/config.schema.json` checks the shape and names but repeats no default; the names of
what lives under storage.path are here too, so the journal, dead letters and the API agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from router.iam import TrustedProfileConfig
from router.query import Query
from router.targets._net import AddressBound

MiB = 1024 * 1024
# The names of what lives under storage.path (router/journal/sqlite/, router/deadletter.py, api).
JOURNAL_FILE = "journal.db"
JOURNAL_LOCK_FILE = "journal.lock"  # held by the one daemon that owns the journal
DEAD_LETTER_DIR = "deadletter"
API_METADATA_FILE = "api-metadata.json"
ALERTS_FILE = "alerts.db"  # the alerts' windows and states (router/journal/alertstate.py)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTlsConfig:
    """TLS for the listener (TLS 1.2 at least). With `client_ca_file`, every client must show a
    certificate that CA signed (mutual TLS), before any token is looked at."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


# How much larger than the body it came in an event can be once journaled: compact JSON is no
# larger than its text but for a few spellings (1E5 becomes 100000.0), and intake adds an id to
# an event without one and may put a mask, a hash or a redaction record in place of a value. A
# few percent in practice; this bound is what a journal frame and a worker's hand-off of one
# request are allowed to hold beyond the body itself (ServerConfig.max_event_bytes).
STORED_GROWTH = 2


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
    # Bytes of events one tail client may have waiting (queued, or written and not yet read
    # by it); past it, events are dropped for that client and counted (router/server/tail.py).
    tail_queue_bytes: int = 4 * MiB
    # Alerts and views the management API creates no more of (each alert runs its query on
    # every accepted event; each view is held and parsed for the tail): an admin token may not
    # add them without end. The operator's YAML is not bounded by these.
    max_alerts: int = 100
    max_views: int = 100
    # Targets and routes the management API creates no more of, counting the YAML's (each
    # target runs a delivery worker with its own connections; each route is planned for every
    # event): atracker's own limits per account, 16 and 30.
    max_targets: int = 16
    max_routes: int = 30
    # What one route the management API creates or replaces may hold (routing tries each rule,
    # and each rule's locations, for every event; each target id is a copy): atracker's limits,
    # 10 rules per route, 8 locations and 3 target_ids per rule. A route needs 1 rule anyway.
    # The operator's YAML is not bounded by these (its routes are not the API's to limit).
    max_rules_per_route: int = 10
    max_locations_per_rule: int = 8
    max_target_ids_per_rule: int = 3
    # Names besides host, localhost and this host's name that a daemon without auth answers
    # to (the Host header; a DNS rebinding defence, router/auth.py). IP addresses always pass.
    allowed_hosts: tuple[str, ...] = ()
    tls: ServerTlsConfig | None = None
    # Processes that take POST /v1/events (router/server/workers.py): 1 is one process doing
    # everything; N > 1 starts N worker processes sharing the port (SO_REUSEPORT) that read,
    # decode, validate, redact and route, and hand finished records to this process, the one
    # journal owner, which also answers every other endpoint through them. "auto": one per CPU
    # this process may use (its affinity, bounded by a cgroup CPU quota), at most 4, resolved
    # once when the daemon starts (router/server/workercount.py); one usable CPU is one process.
    workers: int | Literal["auto"] = "auto"

    def max_event_bytes(self) -> int:
        """The most bytes one request's events can take once journaled (one event: at most
        as many), derived from the largest body a request may have, as sent or inflated: what
        bounds the inflation of a journal frame (router/journal/salvage.py FrameBound) and a
        worker's hand-off frame (router/intake/handoff.py)."""
        return STORED_GROWTH * max(self.max_body_bytes, self.max_inflated_bytes)


@dataclass(frozen=True, slots=True, kw_only=True)
class JetStreamTlsConfig:
    """TLS to the NATS servers: a CA to trust, and a client certificate where they ask for one."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JetStreamConfig:
    """storage.backend: jetstream (router/journal/jetstream/): the journal is a replicated
    JetStream stream shared by every router that names it, so several routers take and deliver
    one backlog. Authentication as nats-py supports it: a creds file (JWT + nkey seed), a user
    and password, or a token; and TLS."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    # Each target's backlog is the stream `<stream>_<target>`, its dead letters
    # `<stream>_DLQ_<target>`; both created if missing, checked if present.
    stream: str = "EVENT_ROUTER"
    # Replicas of each stream: 3 in a three-node cluster keeps every acknowledged event
    # through the loss of one node (a publish is acknowledged once a quorum stored it).
    replicas: int = 1
    # Each target's stream holds at most this much; full -> 503 + Retry-After, as the SQLite
    # journal's storage.max_bytes.
    max_bytes: int = 1024 * MiB
    credentials_file: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls: JetStreamTlsConfig | None = None
    # How long a publish waits for the stream's acknowledgement before ingest answers 503.
    publish_timeout_s: float = 10.0
    # How long a starting router tries the servers, and waits for a cluster that cannot place
    # its streams yet (a node still joining), before it gives up (exit 1, naming them;
    # systemd's Restart= then tries again): long enough for NATS started beside it. Once
    # connected, it reconnects for ever (the journal answers 503 while NATS is away).
    start_timeout_s: float = 30.0
    # How long a fetched message stays with one router unacknowledged before JetStream gives
    # it to another (JetStream's own default). The router keeps what it holds (a long send, a
    # target's retries) with in-progress acks every quarter of it. Shorter brings a dead
    # router's batches back sooner, but not below what a NATS node's death takes (the new
    # consumer leader's election and the routers' reconnection): 5 s had batches that live
    # routers held redelivered, and sent twice, after a node was killed under load.
    ack_wait_s: float = 30.0
    # A producer's retry (same event id) within this window is stored once.
    duplicate_window_s: float = 120.0
    # The management API on any router puts the config into the KV bucket `<stream>_CONFIG`
    # and every router applies it (its own server and storage sections stay its own). Off:
    # each router runs its own file, as with SQLite (say, file targets on local disks).
    share_config: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    """The durable journal and the dead letters, under `path`.

    fsync: `always` — a 2xx means the events are on disk (concurrent requests share one fsync);
    `interval` — on disk within fsync_interval_ms, safe against a process crash at once;
    `never` — the OS decides, safe against a process crash, not a power cut.
    """

    # sqlite: one router, the journal under `path` (the embedded default). jetstream: several
    # routers over one NATS JetStream (storage.jetstream); `path` keeps what is local to one
    # router (its lock, the evidence keys), nothing acknowledged.
    backend: Literal["sqlite", "jetstream"] = "sqlite"
    jetstream: JetStreamConfig = field(default_factory=JetStreamConfig)
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
            ALERTS_FILE,
            f"{ALERTS_FILE}-wal",
            f"{ALERTS_FILE}-shm",
            # The receipt key (router/evidence/receipt.py), the one it replaced, the one being
            # made, and the metadata's temp file: events appended to any of them would stop
            # the next start, or be read as the next metadata.
            "receipts.key",
            "receipts.key.own",
            "receipts.key.new",
            f"{API_METADATA_FILE}.tmp",
        )
        return tuple(base / name for name in names)

    def dead_letter_dir(self) -> Path:
        return Path(self.path) / DEAD_LETTER_DIR

    def journal_max_bytes(self) -> int:
        """The journal's limit: max_bytes, or each target stream's on JetStream."""
        return self.jetstream.max_bytes if self.backend == "jetstream" else self.max_bytes


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
    # Chain the event_streams targets too: each message's place in Kafka headers, checkpoints
    # as messages of their own in the topic (consumers skip header type=checkpoint). Off by
    # default: those checkpoint messages are new to a topic's consumers.
    event_streams: bool = False


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
    # atracker's target region (COS object names, Event Streams' region header); unset, the
    # settings' metadata_region_primary stands in where a region is needed.
    region: str | None = None
    managed_by: Literal["account", "enterprise"] = "account"  # atracker's, kept and returned
    batch: BatchConfig = field(default_factory=BatchConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    # The hosts the management API set on this target (its YAML `api_hosts`, written by the
    # API) and auth.api_target_networks: checked again each time it connects (DNS rebinding).
    # None: every host is the operator's.
    bound: AddressBound | None = None


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
    managed_by: Literal["account", "enterprise"] = "account"  # atracker's, kept and returned


@dataclass(frozen=True, slots=True, kw_only=True)
class ViewConfig:
    """A saved query, by name: `event-router query --view`, `tail --view`, an alert's `view`."""

    name: str
    query: Query


@dataclass(frozen=True, slots=True, kw_only=True)
class ThresholdConfig:
    """Presence: the alert fires when at least `count` events matched within `window_s`."""

    count: int = 1
    window_s: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AbsenceConfig:
    """Absence: the alert fires when no event matched for `window_s`."""

    window_s: float = 900.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertConfig:
    """An alert on accepted events (router/alerts). `query` is the one it runs: its own, or
    its `view`'s (None only in a config that its cross-checks refuse). Exactly one of
    `threshold` and `absence`. Its trigger and resolve events go to `target_ids`; after a
    trigger it does not trigger again for `cooldown_s`."""

    name: str
    query: Query | None
    view: str | None = None
    threshold: ThresholdConfig | None = None
    absence: AbsenceConfig | None = None
    target_ids: tuple[str, ...] = ()
    cooldown_s: float = 300.0

    @property
    def window_s(self) -> float:
        """The window of either kind."""
        kind = self.threshold or self.absence
        return kind.window_s if kind is not None else 0.0


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
    """Account-wide settings; `default_targets` take events that no rule sent anywhere. The
    rest are atracker's: the metadata region is the region of targets that name none;
    `permitted_target_regions`, if not empty, bounds where targets may be created."""

    default_targets: tuple[str, ...] = ()
    metadata_region_primary: str | None = None
    metadata_region_backup: str | None = None
    permitted_target_regions: tuple[str, ...] = ()
    private_api_endpoint_only: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class IamConfig:
    """The daemon's own IBM Cloud identity: what authenticates targets that have no api_key
    of their own or set `service_to_service_enabled`, as atracker's own service identity does
    for its targets. Exactly one of an API key (of a service ID) or a trusted profile that the
    daemon's compute resource assumes with its compute-resource token (no key to keep at all).
    `iam_url` (unset: IBM's) is where the daemon's identity is exchanged for tokens, and where
    every target without an iam_url of its own exchanges its key."""

    api_key: str | None = field(default=None, repr=False)
    trusted_profile: TrustedProfileConfig | None = None
    iam_url: str | None = None


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
    # Where a target the management API creates or changes may connect (CIDR networks);
    # empty: anywhere but loopback and the addresses a host keeps for itself (targets/_net.py
    # api_refusal, applied when the API takes a target and again each time it connects).
    api_target_networks: tuple[str, ...] = ()


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
    views: tuple[ViewConfig, ...] = ()
    alerts: tuple[AlertConfig, ...] = ()
    settings: SettingsConfig = field(default_factory=SettingsConfig)
    startup: StartupConfig = field(default_factory=StartupConfig)
    reload: ReloadConfig = field(default_factory=ReloadConfig)
    auth: AuthConfig | None = None
    iam: IamConfig | None = None
    redaction: RedactionConfig = field(default_factory=RedactionConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)

    def view(self, name: str) -> ViewConfig | None:
        """The view of this name, if the config has one."""
        return next((view for view in self.views if view.name == name), None)

    def target(self, target_id: str) -> TargetConfig:
        """The target with this id (the config's cross-checks guarantee it exists)."""
        for target in self.targets:
            if target.id == target_id:
                return target
        raise KeyError(target_id)
