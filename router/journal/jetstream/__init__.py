"""storage.backend jetstream: the journal on NATS JetStream, several routers sharing one
replicated backlog per target. One module per job:

- streams.py: the names of the streams and subjects, the connection, setting up the streams and
  the shared consumer (waiting for a cluster that cannot place them yet), publishing until
  acknowledged; what the other modules and `event-router dlq` share.
- journal.py: JetStreamJournal, the Journal protocol over those streams: append (published,
  acknowledged by a quorum), the batches each router fetches and acks, what a router holds
  kept in progress and handed back at stop, the books read from the streams, the live tail
  shared between routers.
- letters.py: the dead letters, a stream per target (StreamDeadLetters), and reading them.
- chains.py: router/evidence's chain records in the KV bucket `<stream>_CHAIN`, fenced per
  process (ChainRecords), and this router's chain id.
- sharedconfig.py: the config every router of the stream runs, in the KV bucket
  `<stream>_CONFIG` (SharedConfig).

The names below are the ones the daemon, the CLI and the tests import from the package. The
tunables are not among them: patched here they would change nothing. Each is read at call time
from its own module's globals: FETCH_WAIT_S, BOOKS_EVERY_S and the other journal ones from
journal.py; LETTERS_PER_FETCH from letters.py; those streams.py defines and others use too
(READ_TRY_S, PUBLISH_TRY_S, PUBLISH_RETRY_S) are imported by name, so a patch has to reach
each module that reads one.
"""

from router.journal.jetstream.chains import CHAIN_ID_FILE, chain_key
from router.journal.jetstream.journal import JetStreamJournal
from router.journal.jetstream.letters import all_letters, read_stream_letters
from router.journal.jetstream.sharedconfig import SharedConfig
from router.journal.jetstream.streams import (
    STREAM_ERRORS,
    letters_stream,
    queue_stream,
    queue_subject,
    stream_token,
)

__all__ = [
    "CHAIN_ID_FILE",
    "STREAM_ERRORS",
    "JetStreamJournal",
    "SharedConfig",
    "all_letters",
    "chain_key",
    "letters_stream",
    "queue_stream",
    "queue_subject",
    "read_stream_letters",
    "stream_token",
]
