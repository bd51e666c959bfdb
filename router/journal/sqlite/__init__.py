"""The durable hand-off between ingest and delivery: one backlog (cursor) per target, on disk.

Ingest calls `append` with every accepted event and the targets its routes chose; `append`
returns only once those events are durable under `storage.path` (per `storage.fsync`), and only
then does the producer get its 2xx. Each delivery worker reads its own target's backlog with
`next_batch` and settles a batch with `ack` once the target took it or it was dead-lettered, so
targets progress independently and a target that took an event never gets it again because
another target failed. After a crash at most the batch in flight per target is sent again.

Storage is SQLite in WAL mode (stdlib, crash-safe, checksummed WAL frames, so a torn tail is
discarded by SQLite itself) with our own CRC32 per record on top, over its seq, id, arrival
time and body (salvage.covered_crc), checked on every read. Each commit is a `batches` row
(more when large), its events as a frame of records, and an `owed` run per target and route
(database.py lists the tables). An ack deletes the target's runs up to the batch's last seq
(trimming the run it ends in) and then every batch of those runs that no run points into any
more: a few rows per commit, not two per event. `events(seq, ...)` and `deliveries(target,
seq, route)` are the layout before batches, one row per event and per delivery: a journal
written that way (or rebuilt by salvage) is moved into batches when it opens, and they stay
empty.

Concurrent `append` calls share one transaction and one fsync (group commit). All SQLite work
runs on one dedicated thread so the event loop never blocks on disk. While a target keeps up,
its worker takes its batches from memory (the committed events' bytes, kept per target up to
MEMORY_BYTES or MEMORY_BATCHES of its batches): the database stays the record, read only for
what memory did not hold (events committed while the target was further behind than that) or
after a restart. A record whose CRC does not match is quarantined with a log line and a
counter, and dead-lettered. A database file that fails its integrity check at start-up is
moved aside and every record whose bytes survive is read back from its pages
(router/journal/salvage.py); what did not survive is counted as lost in the books, so
received = delivered + dead_lettered + pending + lost still holds. The process holds an
exclusive lock on the directory for its life: one journal, one daemon.

One module per job:

- journal.py: SqliteJournal, the Journal protocol: lifecycle, the group commit's queue, the
  batches handed to workers, acks, shedding, retiring, health; the rest is functions of the
  connection (or small objects) in the modules below, run on the journal's thread.
- database.py: the tables, the format (user_version), opening a connection, the integrity
  check, `transaction`, SQLite's errors as JournalUnavailableError.
- migrate.py: the layout before batches moved into batches; a damaged file salvaged.
- backlog.py: each target's state (TargetState): books, cursor, the entries kept in memory
  for its worker and what they cost (`held_bytes`).
- commit.py: one commit's rows (frames, owed runs, the entries to remember) and its write;
  `make_entry`, an Entry made cheaply.
- frames.py: a backlog read back from the frames (FrameReader), damaged records quarantined.
- settle.py: an ack, a shed or a retire in the database; the books read at open.
- space.py: free pages given back to the file system after a backlog drains.
- chains.py: router/evidence's chain heads and planned objects.
- lookup.py: a receipt's lookup, the targets an event is still owed to (`pending_for`).

The names below are the ones the daemon, alertstate and the tests import from the package.
The tunables are not among them: patched here they would change nothing. Each is read at call
time from the one module that defines it: MEMORY_BYTES, MEMORY_BATCHES and MOVING_S from
backlog.py; BATCH_BYTES (salvage's, as the commit cuts frames) and Entry from commit.py, whose
BATCH_BYTES migrate.py reads too; PAGE_BYTES from database.py; FREE_BYTES_BEFORE_SHRINK and
REBUILD_MAX_USED_BYTES from space.py; GROUP_LINGER_S, LINGER_MIN_EVENTS, HEALTH_PROBE_S and
RETIRE_CHUNK from journal.py; MIGRATE_CHUNK and `_move_chunk` from migrate.py.
"""

from router.journal.sqlite.backlog import held_bytes
from router.journal.sqlite.database import (
    DB_NAME,
    FORMAT,
    PAGE_BYTES,
    SCHEMA,
    close_checkpointed,
    transaction,
)
from router.journal.sqlite.journal import SqliteJournal
from router.journal.sqlite.space import FREE_BYTES_BEFORE_SHRINK

__all__ = [
    "DB_NAME",
    "FORMAT",
    "FREE_BYTES_BEFORE_SHRINK",
    "PAGE_BYTES",
    "SCHEMA",
    "SqliteJournal",
    "close_checkpointed",
    "held_bytes",
    "transaction",
]
