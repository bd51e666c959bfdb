"""The bytes a chain hashes, defined once, so a verifier in any language can recompute them.

A chained line is its canonical bytes C with one member added before the closing brace:

    line = C[:-1] + b',"_chain":{"seq":<n>,"prev":"<64 hex>","hash":"<64 hex>"}}'

C is the JSON object exactly as the router wrote it without that member: for an archive line,
the event's compact JSON as the journal stored it; for a dead-letter line, the dead letter's
compact JSON. To get C back from a line, cut at the LAST occurrence of `,"_chain":` and put the
closing `}` back; the `_chain` value contains no such text, so the cut is unambiguous. Then

    hash = SHA-256(prev as 32 raw bytes || C)       prev of seq 1 is 32 zero bytes

A line is accepted only if rebuilding it from C and its link gives the very same bytes, so no
byte of a line (in C or in its link) can change unnoticed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

CHAIN_MEMBER = b',"_chain":'
GENESIS = bytes(32)


class CanonicalError(ValueError):
    """A line is not a chained line in the canonical form."""


@dataclass(frozen=True, slots=True)
class Link:
    """One place in a target's chain."""

    seq: int
    prev: bytes  # 32 bytes
    hash: bytes  # 32 bytes


def link_hash(prev: bytes, canonical: bytes) -> bytes:
    """SHA-256(prev || canonical bytes)."""
    return hashlib.sha256(prev + canonical).digest()


def next_link(head: Link | None, canonical: bytes) -> Link:
    """The link that follows `head` (None: the chain's first) for these canonical bytes."""
    seq, prev = (head.seq, head.hash) if head is not None else (0, GENESIS)
    return Link(seq + 1, prev, link_hash(prev, canonical))


def chained_line(canonical: bytes, link: Link) -> bytes:
    """The line written for canonical bytes C at `link` (no trailing newline)."""
    if not canonical.startswith(b"{") or not canonical.endswith(b"}") or canonical == b"{}":
        raise CanonicalError("canonical bytes must be a JSON object with at least one member")
    return b'%s,"_chain":{"seq":%d,"prev":"%s","hash":"%s"}}' % (
        canonical[:-1],
        link.seq,
        link.prev.hex().encode(),
        link.hash.hex().encode(),
    )


def split_line(line: bytes) -> tuple[bytes, Link] | None:
    """(canonical bytes, link) of a chained line; None for a line without a `_chain` member.
    Raises CanonicalError when the line has one but is not in the canonical form."""
    cut = line.rfind(CHAIN_MEMBER)
    if cut < 0:
        return None
    canonical = line[:cut] + b"}"
    try:
        chain = orjson.loads(line[cut + len(CHAIN_MEMBER) : -1])
        link = Link(int(chain["seq"]), bytes.fromhex(chain["prev"]), bytes.fromhex(chain["hash"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CanonicalError("its _chain member cannot be read") from exc
    try:
        rebuilt = chained_line(canonical, link)
    except CanonicalError:
        rebuilt = b""
    if rebuilt != line:
        raise CanonicalError("it is not in the canonical form (bytes changed around _chain)")
    return canonical, link


# A chained Kafka message (the event_streams target) keeps its value, the event's canonical
# bytes C, unchanged, and carries its link in three headers, the numbers as ASCII digits and
# the hashes as 64 lowercase hex digits; its line is then chained_line(C, link), the same bytes
# a file line or dead letter would be. A checkpoint is a message whose value is the checkpoint
# line and whose `type` header is `checkpoint` (an event's is `audit`).
SEQ_HEADER = "chain_seq"
PREV_HEADER = "chain_prev"
HASH_HEADER = "chain_hash"
TYPE_HEADER = "type"
CHECKPOINT_TYPE = b"checkpoint"


def link_headers(link: Link) -> list[tuple[str, bytes]]:
    """The headers that carry a message's link."""
    return [
        (SEQ_HEADER, b"%d" % link.seq),
        (PREV_HEADER, link.prev.hex().encode()),
        (HASH_HEADER, link.hash.hex().encode()),
    ]


def header_link(headers: dict[str, bytes]) -> Link | None:
    """The link a message's headers carry; None for a message without any chain header.
    Raises CanonicalError for headers that are not exactly what link_headers writes."""
    found = [headers.get(name) for name in (SEQ_HEADER, PREV_HEADER, HASH_HEADER)]
    if all(value is None for value in found):
        return None
    seq, prev, digest = found
    if seq is None or prev is None or digest is None:
        raise CanonicalError("one of its chain headers is missing")
    try:
        link = Link(int(seq), bytes.fromhex(prev.decode()), bytes.fromhex(digest.decode()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CanonicalError("its chain headers cannot be read") from exc
    if link_headers(link) != [(SEQ_HEADER, seq), (PREV_HEADER, prev), (HASH_HEADER, digest)]:
        raise CanonicalError("its chain headers are not in the canonical form")
    return link


def chained_block(canonicals: Sequence[bytes], head: Link | None) -> tuple[bytes, Link | None]:
    """The lines for these canonical bytes from `head` on, each ended by a newline and joined
    into the one buffer a write takes, and the head they lead to: byte for byte
    b"".join(chained_line(c, link) + b"\\n" ...) over `next_link`'s links. A file target's
    batch is linked here (a third of the CPU of linking event by event): each canonical is
    copied once, into the buffer (through a view of all but its closing brace: a slice of
    it was a copy of its own, as much CPU as its hash, 2 MB of fresh pages for a batch of
    2,000 1 KB events), and its hash and hex made once (a link's hash is the next one's
    prev), with one Link, the head, made for the whole batch."""
    if not canonicals:
        return b"", head
    seq, prev = (head.seq, head.hash) if head is not None else (0, GENESIS)
    prev_hex = prev.hex().encode()
    parts: list[bytes | memoryview] = []
    sha256 = hashlib.sha256
    for canonical in canonicals:
        if canonical[:1] != b"{" or canonical[-1:] != b"}" or canonical == b"{}":
            raise CanonicalError("canonical bytes must be a JSON object with at least one member")
        seq += 1
        digest = sha256(prev)
        digest.update(canonical)
        last, prev = prev, digest.digest()
        hash_hex = prev.hex().encode()
        parts.append(memoryview(canonical)[:-1])  # a view: join copies it, once
        parts.append(b',"_chain":{"seq":%d,"prev":"%s","hash":"%s"}}\n' % (seq, prev_hex, hash_hex))
        prev_hex = hash_hex
    return b"".join(parts), Link(seq, last, prev)
