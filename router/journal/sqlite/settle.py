"""Settling in the database, inside the journal's transactions: an ack deletes the target's runs
up to the batch's last seq (trimming the run it ends in) and moves its books; a shed or a
retire takes given seqs out of the target's runs; then every batch of those runs that no run
points into any more is deleted: a few rows per commit, not two per event. And a target's
books as the database has them at open.
"""

from __future__ import annotations

import sqlite3

from router.journal import Books
from router.journal.sqlite.chains import keep_chain_head


def ack(
    db: sqlite3.Connection,
    target_id: str,
    last: int,
    delivered: int,
    dead_lettered: int,
    head: tuple[int, bytes] | None,
) -> set[int]:
    """Settle the target's rows up to `last` (and keep its chain head, when it has one to
    keep); returns the batches its deleted runs were in (drop_unowned's to look at)."""
    if head is not None:
        keep_chain_head(db, target_id, *head)
    touched = db.execute(
        "DELETE FROM owed WHERE target = ? AND last_seq <= ? RETURNING batch",
        (target_id, last),
    ).fetchall()
    # The run the batch ends in, if it goes on past it, now starts after it.
    trimmed = db.execute(
        "UPDATE owed SET first_seq = ?1 + 1 WHERE target = ?2 AND first_seq <= ?1 AND "
        "last_seq = (SELECT MIN(last_seq) FROM owed WHERE target = ?2 AND last_seq > ?1)",
        (last, target_id),
    ).rowcount
    if touched or trimmed > 0:  # none: an earlier attempt committed, then failed after
        db.execute(
            "UPDATE books SET delivered = delivered + ?, "
            "dead_lettered = dead_lettered + ?, settled = MAX(settled, ?) WHERE target = ?",
            (delivered, dead_lettered, last, target_id),
        )
    return {batch for (batch,) in touched}


def shed(
    db: sqlite3.Connection, target_id: str, seqs: list[int], delivered: int
) -> tuple[int, set[int]]:
    """Take these seqs out of the target's runs (splitting a run around them); the books move
    by the seqs actually removed: `delivered` of them (a retire's, which the target had taken)
    as delivered, the rest as dead-lettered. Returns how many were removed, and the batches
    of the runs it touched (drop_unowned's to look at)."""
    gone = set(seqs)
    runs = db.execute(
        "SELECT last_seq, first_seq, batch, route FROM owed WHERE target = ?1 AND "
        "last_seq BETWEEN ?2 AND "
        "(SELECT MIN(last_seq) FROM owed WHERE target = ?1 AND last_seq >= ?3)",
        (target_id, min(gone), max(gone)),
    ).fetchall()
    removed = 0
    kept: list[tuple[str, int, int, int, str]] = []
    for last, first, batch, route in runs:
        piece: list[int] = []
        for seq in [*range(first, last + 1), None]:
            if seq is not None and seq not in gone:
                piece.append(seq)
                continue
            if piece:
                kept.append((target_id, piece[-1], piece[0], batch, route))
                piece = []
            removed += seq is not None
    db.executemany(
        "DELETE FROM owed WHERE target = ? AND last_seq = ?",
        [(target_id, last) for last, *_ in runs],
    )
    db.executemany("INSERT INTO owed VALUES (?, ?, ?, ?, ?)", kept)
    delivered = min(delivered, removed)
    db.execute(
        "UPDATE books SET dead_lettered = dead_lettered + ?, delivered = delivered + ? "
        "WHERE target = ?",
        (removed - delivered, delivered, target_id),
    )
    return removed, {batch for _, _, batch, _ in runs}


def drop_unowned(db: sqlite3.Connection, batches: set[int]) -> None:
    """Delete those of these batches that no target is owed anything of any more."""
    db.executemany(
        "DELETE FROM batches WHERE first_seq = ?1 AND NOT EXISTS "
        "(SELECT 1 FROM owed WHERE batch = ?1)",
        [(batch,) for batch in batches],
    )


def read_books(db: sqlite3.Connection, target_id: str) -> Books:
    """The target's books (a row made for a target new to the journal), its pending counted
    from its runs."""
    db.execute("INSERT OR IGNORE INTO books(target) VALUES (?)", (target_id,))
    received, delivered, dead, lost = db.execute(
        "SELECT received, delivered, dead_lettered, lost FROM books WHERE target = ?",
        (target_id,),
    ).fetchone()
    pending = db.execute(
        "SELECT COALESCE(SUM(last_seq - first_seq + 1), 0) FROM owed WHERE target = ?",
        (target_id,),
    ).fetchone()[0]
    return Books(received, delivered, dead, pending, lost=lost)
