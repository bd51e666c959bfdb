"""The lock on `storage.path` that every journal backend holds for the life of the process.

A second daemon on the same SQLite journal would hand out the same sequence numbers and settle
the other's deliveries; two routers on one JetStream still each need a directory of their own
for what is local to them. The kernel drops an flock when the process dies, even by kill -9, so
a stale lock cannot exist; the holder's pid is written into the file for the error message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from router.appendfile import make_private_dirs
from router.config import JOURNAL_LOCK_FILE
from router.errors import StorageLockedError


def lock_storage(directory: Path) -> int:
    """Create `directory` (private) and take its lock; the descriptor holds it until closed.
    Raises StorageLockedError naming the holder's pid when another process has it."""
    make_private_dirs(directory)
    fd = os.open(directory / JOURNAL_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        raise StorageLockedError(
            str(directory), int(holder) if holder.isdigit() else None
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
