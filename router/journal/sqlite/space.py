"""The journal file's space: the pages in use (storage.max_bytes is held against them), and
free pages given back to the file system once a backlog has (nearly) drained, so a drained
backlog does not keep its disk space forever.
"""

from __future__ import annotations

import logging
import sqlite3

log = logging.getLogger(__name__)

# Free pages are given back to the file system (see give_back) past
# FREE_BYTES_BEFORE_SHRINK, once they are FREE_PER_USED times the pages in use: by rebuilding
# the file while at most REBUILD_MAX_USED_BYTES are in use, else SHRINK_STEP_BYTES at a time.
FREE_BYTES_BEFORE_SHRINK = 16 * 1024 * 1024
FREE_PER_USED = 16
REBUILD_MAX_USED_BYTES = 16 * 1024 * 1024
SHRINK_STEP_BYTES = 4 * 1024 * 1024


def give_back(db: sqlite3.Connection, free_pages: int, page_size: int, used_bytes: int) -> bool:
    """Once many pages are free and a backlog has (nearly) drained, give them back to the
    file system, at what it costs per page freed. Returns whether it tried (the pages in use
    are to be counted again then).

    While the journal still holds a backlog of more than a sixteenth of what is free,
    nothing is done: the next commits reuse those pages. `incremental_vacuum` costs 8-50 us
    of CPU per page it frees (it takes each one off the freelist, the more the longer the
    list, and moves its pointer map): ~2.5 us per 1 KB event a drain freed, the most of an
    ack's cost in bench.journal_owner. Rebuilding the file (VACUUM) costs about its pages
    in use instead (20-40 us each: a few ms for a drained journal, ~150 ms at most), so a
    drained journal is rebuilt, and only one that keeps a larger backlog in a file mostly
    free shrinks a step at a time, so that no single ack pays for all of it. A failure
    here (a full disk for the rebuild) leaves the space for later: the ack has committed."""
    free_bytes = free_pages * page_size
    if free_bytes <= FREE_BYTES_BEFORE_SHRINK or free_bytes < FREE_PER_USED * used_bytes:
        return False
    if used_bytes <= REBUILD_MAX_USED_BYTES:
        statement = "VACUUM;"
    else:
        # executescript steps the pragma to completion; execute() frees one page only.
        statement = f"PRAGMA incremental_vacuum({SHRINK_STEP_BYTES // page_size});"
    try:
        db.executescript(statement)
    except sqlite3.Error as exc:
        log.warning("journal: could not give free pages back (%s); trying again later", exc)
    return True
