"""Real peers for the tests: servers the targets and journal backends talk to, run as processes.

One module per peer, each a `ServerProcess` that starts the real server on 127.0.0.1 on free
ports in a directory of its own, waits until it answers (a condition with a deadline), and can
be stopped, killed, paused or restarted mid-test on the same ports and data, as outage tests
need:

- `kafka.KafkaBroker`: Apache Kafka 4.x in KRaft mode (one broker+controller) from the Maven
  Central jars that `.ci/fetch-kafka` caches; PLAINTEXT, SASL_PLAINTEXT and SASL_SSL (PLAIN,
  user `token` and an API key, as IBM Event Streams authenticates; SCRAM-SHA-256/512), and a
  PROXIED listener reached through `kafka.AnswerDropper`, which can cut the answers to
  produce requests (the broker stored them; the client cannot know).
- `s3.S3Server`: moto's server mode, an S3-compatible store; it keeps its objects across a
  restart.
- `nats.NatsServer` / `nats.NatsCluster`: nats-server with JetStream, one node or three.

Each peer is a context manager for fixtures (`with KafkaBroker(tmp) as kafka: ...`); its
blocking `start/stop/kill/restart` have `astart/astop/akill/arestart` twins that run in a
thread, so a daemon on the test's event loop keeps working while its peer goes down and up.
A peer whose software is missing skips the test with what to install (fails it in CI, where
`.ci/run` installs everything).
"""

from tests.peers._process import PeerError, ServerProcess, free_ports

__all__ = ["PeerError", "ServerProcess", "free_ports"]
