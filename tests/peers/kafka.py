"""A real Apache Kafka 4.x broker in KRaft mode (one node: broker and controller) on loopback.

It runs from the Maven Central jars (`org.apache.kafka:kafka_2.13` and its runtime
dependencies) that `.ci/fetch-kafka` keeps in the peers cache, on the machine's Java 17:
`java -cp <jars> kafka.Kafka server.properties`, after `kafka.tools.StorageTool format`.
A missing cache is filled by running the script (Maven needed once); a missing `java` or `mvn`
skips the tests that need Kafka, saying what to install.

Listeners, all on 127.0.0.1:
- PLAINTEXT (`bootstrap`): no authentication.
- SASL_PLAINTEXT (`sasl_bootstrap`): SASL PLAIN, user `token`, password the API key, which is
  how IBM Event Streams authenticates (a wrong password is refused); and SCRAM-SHA-256 and
  SCRAM-SHA-512 for the user `scram_user` with the same password (other Kafka clusters). KRaft
  keeps SCRAM credentials in the metadata log, so they are added when the storage is
  formatted (`StorageTool format --add-scram`, KIP-900), before the node first starts.
- SASL_SSL (`sasl_ssl_bootstrap`, `tls=True`): the same over TLS, a certificate for 127.0.0.1
  signed by a CA in `ca_file` (what Event Streams' clients really use).
- PROXIED (`proxied_bootstrap`): PLAINTEXT, advertised at a port where a test runs an
  `AnswerDropper` in front of it, so clients reach the broker only through the test's hands.
- OAUTH (`oauth_bootstrap`, only with `oauth=OAuthValidation(...)`): SASL_PLAINTEXT with
  OAUTHBEARER, each token VALIDATED by Kafka's own OAuthBearerValidatorCallbackHandler: an
  RS256 JWT whose signature checks against the keys the JWKS URL serves (a loopback IAM's
  `/identity/keys`), with the expected issuer and audience and not expired. Kafka 4 fetches
  such a URL only if the JVM's `org.apache.kafka.sasl.oauthbearer.allowed.urls` lists it.
Settings make a small, quick node: one partition per topic, replication 1, no initial
rebalance delay, internal topics with one partition, a 512 MiB heap.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import struct
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tests.peers._process import PeerError, ServerProcess, free_ports, missing, port_open
from tests.peers.tls import ServerTls, make_server_tls

ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = ROOT / ".ci" / "fetch-kafka"
VERSION = (ROOT / ".ci" / "kafka.version").read_text().strip()
"""The one place the version is named; `.ci/fetch-kafka` reads the same file."""

USERNAME = "token"
"""IBM Event Streams' SASL PLAIN user name; the password is an API key."""

SCRAM_USER = "audit-producer"
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")

STARTED = "Kafka Server started"
"""What KafkaRaftServer logs once the broker is registered, unfenced and serving."""

JVM_OPTIONS = (
    "-Xmx512m",
    "-Xms64m",
    # One GC thread and no G1 regions to set up: on a 2-core machine shared with the tests.
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
)

LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
# The started line is what readiness waits for; the rest at INFO is what an outage test reads.
logger.raft.name = kafka.server.KafkaRaftServer
logger.raft.level = info
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = info
"""


def peers_cache() -> Path:
    """Where fetched peers live between runs (the same default as `.ci/fetch-kafka`)."""
    default = Path.home() / ".cache" / "event-router" / "peers"
    return Path(os.environ.get("EVENT_ROUTER_PEERS_CACHE", default))


def kafka_jars(version: str = VERSION) -> list[Path]:
    """The broker's jars, fetched first if the cache lacks them (skips when that cannot be)."""
    libs = peers_cache() / f"kafka-{version}"
    if not (libs / ".complete").exists():
        if shutil.which("java") is None or shutil.which("mvn") is None:
            missing("java or mvn", "apt-get install default-jre-headless maven")
        done = subprocess.run(
            ["bash", str(FETCH_SCRIPT), version], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise PeerError(f"{FETCH_SCRIPT} {version} failed:\n{done.stdout}{done.stderr}")
    return sorted(libs.glob("*.jar"))


def java() -> str:
    path = shutil.which("java")
    if path is None:
        missing("java", "apt-get install default-jre-headless")
    return path


def cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64 without padding (22 characters)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


@dataclass(frozen=True)
class OAuthValidation:
    """What the OAUTH listener checks a bearer token against."""

    jwks_url: str
    issuer: str
    audience: str
    # A session ends when its token expires (KIP-368): a client that cannot re-authenticate,
    # as aiokafka cannot, is disconnected then and must connect again with a new token.
    max_reauth_ms: int = 600_000


class KafkaBroker(ServerProcess):
    """One KRaft node (broker and controller) with PLAINTEXT and SASL PLAIN listeners."""

    name = "kafka"
    start_timeout_s: ClassVar[float] = 120.0  # a cold JVM on two busy cores
    stop_timeout_s: ClassVar[float] = 30.0

    def __init__(
        self,
        workdir: Path,
        *,
        api_key: str = "test-api-key-6a1f0c9e",
        tls: bool = True,
        version: str = VERSION,
        oauth: OAuthValidation | None = None,
        sasl_advertised_host: str = "127.0.0.1",
    ) -> None:
        super().__init__(workdir)
        # The host the SASL_PLAINTEXT listener names in its metadata (a broker name like
        # Event Streams' own, for a client to look up; the broker itself never does).
        self.sasl_advertised_host = sasl_advertised_host
        self.version = version
        self.username = USERNAME
        self.scram_user = SCRAM_USER
        self.api_key = api_key
        self.tls: ServerTls | None = None
        self._with_tls = tls
        self.oauth = oauth
        self._classpath = ""
        self.cluster_id = cluster_id()
        self.choose_ports()

    def choose_ports(self) -> None:
        ports = free_ports(7)
        self.port, self.sasl_port, self.sasl_ssl_port, self.controller_port = ports[:4]
        self.proxied_port, self.proxy_port, self.oauth_port = ports[4:]

    @property
    def bootstrap(self) -> str:
        """PLAINTEXT listener: no authentication."""
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        """SASL_PLAINTEXT listener: PLAIN, user `token`, password `api_key`."""
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        """SASL_SSL listener: PLAIN over TLS; trust `ca_file`."""
        if self.tls is None:
            raise PeerError("this broker was made with tls=False")
        return f"127.0.0.1:{self.sasl_ssl_port}"

    @property
    def proxied_bootstrap(self) -> str:
        """PLAINTEXT, as the broker advertises it: through the `AnswerDropper` on proxy_port."""
        return f"127.0.0.1:{self.proxy_port}"

    @property
    def oauth_bootstrap(self) -> str:
        """SASL_PLAINTEXT listener: OAUTHBEARER, tokens validated against `oauth`."""
        if self.oauth is None:
            raise PeerError("this broker was made without oauth=")
        return f"127.0.0.1:{self.oauth_port}"

    @property
    def ca_file(self) -> Path:
        if self.tls is None:
            raise PeerError("this broker was made with tls=False")
        return self.tls.ca_file

    def prepare(self) -> None:
        jars = kafka_jars(self.version)
        self._classpath = os.pathsep.join(str(jar) for jar in jars)
        if self._with_tls:
            self.tls = make_server_tls(self.workdir / "tls", common_name="kafka")
            keystore = self.workdir / "tls" / "keystore.pem"
            keystore.write_text(self.tls.key_file.read_text() + self.tls.cert_file.read_text())
        (self.workdir / "log4j2.properties").write_text(LOG4J2)
        (self.workdir / "server.properties").write_text(self.properties())
        # --cluster-id=ID in one word: a base64 id may start with "-", which the tool's
        # argument parser would take for an option (1 start in 64 failed that way).
        formatted = subprocess.run(
            [
                java(), *JVM_OPTIONS, "-cp", self._classpath, "kafka.tools.StorageTool",
                "format", "--ignore-formatted", f"--cluster-id={self.cluster_id}",
                "--config", str(self.workdir / "server.properties"),
                *(
                    arg
                    for mechanism in SCRAM_MECHANISMS
                    for arg in (
                        "--add-scram",
                        f"{mechanism}=[name={self.scram_user},password={self.api_key}]",
                    )
                ),
            ],
            capture_output=True, text=True, check=False, cwd=self.workdir,
        )  # fmt: skip
        if formatted.returncode != 0:
            raise PeerError(
                f"formatting Kafka storage failed:\n{formatted.stdout}{formatted.stderr}"
            )

    def properties(self) -> str:
        """server.properties for this node."""
        listeners = {
            "PLAINTEXT": self.port,
            "SASL_PLAINTEXT": self.sasl_port,
            "CONTROLLER": self.controller_port,
            "PROXIED": self.proxied_port,
        }
        if self._with_tls:
            listeners["SASL_SSL"] = self.sasl_ssl_port
        if self.oauth is not None:
            listeners["OAUTH"] = self.oauth_port
        advertised = {name: port for name, port in listeners.items() if name != "CONTROLLER"}
        advertised["PROXIED"] = self.proxy_port
        jaas = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{self.username}="{self.api_key}";'
        )
        scram_jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listeners": ",".join(f"{n}://127.0.0.1:{p}" for n, p in listeners.items()),
            "advertised.listeners": ",".join(
                f"{n}://{self.sasl_advertised_host if n == 'SASL_PLAINTEXT' else '127.0.0.1'}:{p}"
                for n, p in advertised.items()
            ),
            "listener.security.protocol.map": (
                "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL,"
                "CONTROLLER:PLAINTEXT,PROXIED:PLAINTEXT,OAUTH:SASL_PLAINTEXT"
            ),
            "sasl.enabled.mechanisms": ",".join(("PLAIN", *SCRAM_MECHANISMS)),
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": jaas,
            **{
                f"listener.name.sasl_plaintext.{mechanism.lower()}.sasl.jaas.config": scram_jaas
                for mechanism in SCRAM_MECHANISMS
            },
            "log.dirs": str(self.workdir / "data"),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "num.network.threads": "2",
            "num.io.threads": "2",
        }
        if self.tls is not None:
            lines |= {
                "listener.name.sasl_ssl.plain.sasl.jaas.config": jaas,
                **{
                    f"listener.name.sasl_ssl.{mechanism.lower()}.sasl.jaas.config": scram_jaas
                    for mechanism in SCRAM_MECHANISMS
                },
                "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
                "listener.name.sasl_ssl.ssl.keystore.location": str(
                    self.workdir / "tls" / "keystore.pem"
                ),
            }
        if self.oauth is not None:
            lines |= self._oauth_properties(self.oauth)
        return "".join(f"{key}={value}\n" for key, value in lines.items())

    @staticmethod
    def _oauth_properties(oauth: OAuthValidation) -> dict[str, str]:
        """The OAUTH listener: OAUTHBEARER only, validated by Kafka's JWT validator."""
        prefix = "listener.name.oauth"
        return {
            f"{prefix}.sasl.enabled.mechanisms": "OAUTHBEARER",
            f"{prefix}.oauthbearer.sasl.jaas.config": (
                "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;"
            ),
            f"{prefix}.oauthbearer.sasl.server.callback.handler.class": (
                "org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler"
            ),
            f"{prefix}.oauthbearer.sasl.oauthbearer.jwks.endpoint.url": oauth.jwks_url,
            f"{prefix}.oauthbearer.sasl.oauthbearer.expected.issuer": oauth.issuer,
            f"{prefix}.oauthbearer.sasl.oauthbearer.expected.audience": oauth.audience,
            f"{prefix}.oauthbearer.connections.max.reauth.ms": str(oauth.max_reauth_ms),
        }

    def command(self) -> list[str]:
        return [
            java(),
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            *(
                [f"-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls={self.oauth.jwks_url}"]
                if self.oauth is not None
                else []
            ),
            "-cp",
            self._classpath,
            "kafka.Kafka",
            str(self.workdir / "server.properties"),
        ]

    def ready(self) -> bool:
        return (
            STARTED in self.log_since_start()
            and port_open(self.port)
            and port_open(self.sasl_port)
            and (self.tls is None or port_open(self.sasl_ssl_port))
            and (self.oauth is None or port_open(self.oauth_port))
        )


PRODUCE_API_KEY = 0
"""Kafka's request type for Produce (the first int16 of a request header)."""


class AnswerDropper:
    """A loopback TCP proxy in front of the broker's PROXIED listener that reads Kafka's
    framing (a 4-byte size, then for a request its api key and correlation id, for a response
    its correlation id). While `dropping` is set, every Produce request still reaches the
    broker, which stores it, but its answer never reaches the client: the connection is cut
    instead. That is the case an idempotent producer exists for (the broker took a batch,
    the client cannot know), made to happen on purpose rather than by a lucky kill."""

    def __init__(self, broker: KafkaBroker) -> None:
        self.broker = broker
        self.dropping = False
        self.dropped = 0  # Produce answers cut so far
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> AnswerDropper:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.broker.proxy_port)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.broker.proxied_port
            )
        except OSError:
            writer.close()
            self._connections.discard(task)
            return
        kinds: dict[int, int] = {}  # correlation id -> api key, for the answers to come
        try:
            await asyncio.gather(
                self._requests(reader, up_writer, kinds), self._answers(up_reader, writer, kinds)
            )
        except (OSError, asyncio.IncompleteReadError, _Cut):
            pass
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(OSError, RuntimeError):
                    w.close()
            self._connections.discard(task)

    @staticmethod
    async def _frame(reader: asyncio.StreamReader) -> bytes:
        size = await reader.readexactly(4)
        return size + await reader.readexactly(struct.unpack(">i", size)[0])

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, kinds: dict[int, int]
    ) -> None:
        while True:
            frame = await self._frame(reader)
            api_key, _, correlation = struct.unpack(">hhi", frame[4:12])
            kinds[correlation] = api_key
            up.write(frame)
            await up.drain()

    async def _answers(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, kinds: dict[int, int]
    ) -> None:
        while True:
            frame = await self._frame(up)
            (correlation,) = struct.unpack(">i", frame[4:8])
            if self.dropping and kinds.pop(correlation, None) == PRODUCE_API_KEY:
                self.dropped += 1
                raise _Cut
            kinds.pop(correlation, None)
            writer.write(frame)
            await writer.drain()


class _Cut(Exception):
    """An answer was dropped: the connection ends here, as a lost network would end it."""
