"""router/evidence's records in the journal: each target's chain head and its last checkpoint
(`chains`), and the object a bucket target is about to PUT (`planned`), read and written on
the journal's thread, in transactions of their own (a head kept with each ack is written in
the ack's: settle.py).
"""

from __future__ import annotations

import sqlite3

from router.journal.sqlite.database import transaction

Plan = tuple[str, str, int, bytes, int, bytes, bytes, bytes, str]


def keep_chain_head(db: sqlite3.Connection, target_id: str, seq: int, head_hash: bytes) -> None:
    """Move a target's kept chain head forward (never back), keeping its last checkpoint
    (a row made here holds an empty one, b"", as a bucket target's row before its first)."""
    db.execute(
        "INSERT INTO chains VALUES (?, ?, ?, x'', 0) ON CONFLICT (target) DO UPDATE SET "
        "seq = excluded.seq, hash = excluded.hash WHERE excluded.seq > chains.seq",
        (target_id, seq, head_hash),
    )


def read_heads(db: sqlite3.Connection) -> dict[str, tuple[int, bytes, bytes | None, float | None]]:
    """Per target: its kept chain head, its last checkpoint and when."""
    rows = db.execute("SELECT target, seq, hash, checkpoint, checkpoint_at FROM chains").fetchall()
    return {target: (seq, bytes(h), cp, at) for target, seq, h, cp, at in rows}


def write_chain(
    db: sqlite3.Connection,
    target_id: str,
    seq: int,
    head_hash: bytes,
    checkpoint: bytes,
    at: float,
) -> None:
    """Keep a target's chain head and the checkpoint just written for it."""
    with transaction(db):
        db.execute(
            "INSERT OR REPLACE INTO chains VALUES (?, ?, ?, ?, ?)",
            (target_id, seq, head_hash, checkpoint, at),
        )


def read_planned(db: sqlite3.Connection) -> dict[str, Plan]:
    """Per bucket target: the object planned before its last PUT."""
    rows = db.execute("SELECT * FROM planned").fetchall()
    return {
        target: (key, name, bs, bytes(bh), hs, bytes(hp), bytes(hh), bytes(body), md5)
        for target, key, name, bs, bh, hs, hp, hh, body, md5 in rows
    }


def write_planned(db: sqlite3.Connection, target_id: str, plan: Plan) -> None:
    """Keep the object a bucket target is about to PUT (one per target)."""
    with transaction(db):
        db.execute(
            "INSERT OR REPLACE INTO planned VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (target_id, *plan),
        )


def delete_planned(db: sqlite3.Connection, target_id: str) -> None:
    """Forget a target's planned object."""
    with transaction(db):
        db.execute("DELETE FROM planned WHERE target = ?", (target_id,))
