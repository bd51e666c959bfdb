"""Durable appends to a private file: what file targets and dead letters have in common.

Files are created 0600 and missing directories 0700, because audit archives are evidence and
may name people. Every append is one `write` loop followed, when asked, by `fsync`, so a line
that was reported written survives a crash of the process or of the machine. An append is all
or nothing: one that fails part-way (a full disk writes what fits, then raises) cuts the file
back to its length before the append, so the caller's retry neither tears a line nor repeats
the lines that did fit.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and any missing parents with mode 0700 (existing ones are left alone)."""
    missing = []
    for parent in [directory, *directory.parents]:
        if parent.exists():
            break
        missing.append(parent)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)


class AppendOnlyFile:
    """One file opened for appending; blocking calls, meant to run in a worker thread."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self._fd: int | None = None
        # Where a failed append began, when cutting the file back failed too: done first next time.
        self._cut_to: int | None = None

    def open(self) -> None:
        if self._fd is None:
            make_private_dirs(self.path.parent)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)

    def size(self) -> int:
        self.open()
        assert self._fd is not None
        return os.fstat(self._fd).st_size

    def append(self, data: bytes) -> None:
        """Write all of `data` at the end of the file, then fsync if configured; on failure
        the file is as it was before (the error is raised)."""
        self.open()
        fd = self._fd
        assert fd is not None
        start = os.fstat(fd).st_size
        if self._cut_to is not None:
            if self._cut_to < start:  # never grow a file that was meanwhile replaced
                os.ftruncate(fd, self._cut_to)
                start = self._cut_to
            self._cut_to = None
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        except OSError:
            self._cut_back(fd, start)
            raise

    def fsync_now(self) -> None:
        """fsync what was appended (for a file opened with fsync=False, once at the end)."""
        self.open()
        assert self._fd is not None
        os.fsync(self._fd)

    def _cut_back(self, fd: int, length: int) -> None:
        """Drop what a failed append wrote. If even that fails, the next append does it first
        (a write there cannot start past `length` meanwhile: this object is the only writer)."""
        try:
            os.ftruncate(fd, length)
            if self.fsync:
                os.fsync(fd)
        except OSError:
            self._cut_to = length

    def close(self) -> None:
        if self._fd is not None:
            if self._cut_to is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._cut_to)
                self._cut_to = None
            os.close(self._fd)
            self._fd = None


def replace_atomically(path: Path, data: bytes, *, keep_previous: bool = False) -> None:
    """Write a private temp file, fsync it, rename it over `path`: a crash leaves the old file
    or the new one, never half of either. `keep_previous` keeps the old one as `<path>.prev`."""
    replace_with_staged(path, write_staged(path, data), keep_previous=keep_previous)


def write_staged(path: Path, data: bytes) -> Path:
    """The first half of replace_atomically: `data` in a private temp file beside `path`,
    fsynced, returned. A write that fails (a full disk) leaves no temp file behind."""
    temp = path.with_name(path.name + ".tmp")
    temp.unlink(missing_ok=True)
    staged = AppendOnlyFile(temp)
    try:
        staged.append(data)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        staged.close()
    return temp


def replace_with_staged(path: Path, temp: Path, *, keep_previous: bool = False) -> bool:
    """The second half of replace_atomically: the staged temp file renamed over `path`.
    Whether there was a file at `path` (with `keep_previous`, now `<path>.prev`). A rename
    that fails leaves `path` as it was (the previous file renamed back) and raises."""
    existed = path.exists()
    if keep_previous and existed:
        os.replace(path, _previous(path))
    try:
        os.replace(temp, path)
    except BaseException:
        if keep_previous:
            restore_previous(path, existed)
        raise
    return existed


def restore_previous(path: Path, existed: bool) -> None:
    """Undo replace_with_staged(keep_previous=True), given what it returned: `<path>.prev`
    back in place, or no file where there was none."""
    if existed:
        os.replace(_previous(path), path)
    else:
        path.unlink(missing_ok=True)


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")
