"""Salvage: the journal's rows read straight from the pages of a damaged SQLite file.

SQLite reaches a row only through its b-tree: once a file is truncated, or an interior page is
overwritten, every row below the lost page is out of its reach, though the row's bytes are still
on disk. So salvage does not ask SQLite. It reads every page of the file on its own (the format
is documented at https://www.sqlite.org/fileformat2.html), with the newest committed copy of a
page from the write-ahead log in place of the file's, parses the cells of every table and index
page, follows overflow chains as far as they survive, and returns the journal's rows by shape:

    batches     table leaf, (NULL = first seq as rowid, INTEGER, BLOB): one commit's events as a
                frame of records (below), each with its own CRC; a blob whose overflow chain
                is cut still gives every record before the cut
    owed        index page (WITHOUT ROWID), (TEXT, INTEGER, INTEGER, INTEGER, TEXT): a run
                of seqs a target is owed
    events      table leaf, (NULL = seq as rowid, TEXT, REAL, BLOB, INTEGER): the layout before
                batches, one row per event
    deliveries  index page (WITHOUT ROWID), (TEXT, INTEGER, TEXT): the layout before owed runs
    books       table leaf, (TEXT, INTEGER, INTEGER, INTEGER[, INTEGER[, INTEGER]])

Every event found comes back as an EventRow, whether from a batch's frame or an events row;
one that fails its CRC is returned as not intact (the journal dead-letters it).

A frame is COVERED, then its records back to back, each `RECORD` (body length, CRC, seq,
received_at, id length) then the id's UTF-8 bytes then the body. The CRC covers the whole
record but itself (`covered_crc`): a record whose seq, arrival time, id or length was changed
fails it as one whose body was, so a damaged record is not taken for another seq's event and
sent to the targets owed that seq. Frames written before format 3 have no marker and a CRC of
the body alone (an old record header never starts with COVERED: its body length is past
MAX_RECORD_BYTES); they are read by that rule, as before. The journal writes frames and reads
them back with `frame_records`, which is also how salvage reads a torn one. A frame of
PACK_MIN_BYTES or more is stored packed (`pack`): PACKED, then the frame (marker and all) as
raw deflate. A torn packed blob inflates to the records before the cut, as a torn plain one
holds them; garbage inside one inflates to garbage from there on, where a plain frame would
lose only the records the garbage touched: every record after it fails its CRC (its header
is covered too, so one that parses under a seq not its own fails as well) or does not parse,
but for the one garbage in 2**32 that matches a CRC by chance. Garbage over the marker costs
the whole frame: its records are then read by the other rule, and fail it.

Pages on the freelist hold settled rows that were not yet overwritten; they are skipped (by the
freelist and by the pointer map), so salvage never resurrects what was already delivered.
Everything here is pure: bytes in, rows out.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from mmap import mmap
from typing import cast

from isal import isal_zlib
from isal.isal_zlib import crc32

from router.config import ServerConfig

MAGIC = b"SQLite format 3\x00"
WAL_MAGICS = (0x377F0682, 0x377F0683)
WAL_HEADER_BYTES = 32
WAL_FRAME_HEADER_BYTES = 24
DEFAULT_PAGE_SIZE = 4096
PAGE_SIZES = tuple(1 << n for n in range(9, 17))
PTRMAP_PROBE = 8  # pointer-map entries read to tell a page size when the header is damaged
TABLE_LEAF, INDEX_LEAF, INDEX_INTERIOR = 13, 10, 2
PTRMAP_FREE = 2
MAX_RECORD_BYTES = 1 << 30  # no journal record comes near; a larger length is garbage
# A frame's record header: body length, CRC, seq, received_at, id length.
RECORD = struct.Struct("<IIqdH")
# The header as two parts: LEAD (body length, CRC) and TAIL (seq, received_at, id length),
# where the bytes a format-3 CRC covers start (at CRC_END, the seq's offset).
LEAD = struct.Struct("<II")
TAIL = struct.Struct("<qdH")
CRC_END = LEAD.size
# A header's seq, as TAIL writes it (at CRC_END).
SEQ = struct.Struct("<q")
# A frame whose records' CRCs cover their headers too (format 3 on) starts with COVERED; read
# as a record header, a body length no record has (past MAX_RECORD_BYTES, as PACKED), so a
# frame written before, whose records' CRCs cover their bodies only, never starts with it.
COVERED = b"\xfe\xff\xff\xff"
# What a record that fails its CRC is given as its body's CRC once read (EventRow.crc, and the
# events table salvage fills): the body's own CRC with every bit flipped, which never matches.
NOT_INTACT = 0xFFFFFFFF
# A record `frame` was given with a body failing its CRC but whose identity was vouched for
# (an events row of an intact SQLite file, keyed by its seq: `vouched`) is stored with its
# covered CRC XOR this instead of NOT_INTACT: it still fails its CRC, and the reader, finding
# this mark (`vouched_at`), knows the header is the row's own and only the body was damaged.
# Damage matches it by chance as rarely as it matches the CRC itself (1 in 2**32).
VOUCHED_NOT_INTACT = 0x7FFFFFFF

# A packed frame starts with PACKED: read as a record header, a body length no record has (past
# MAX_RECORD_BYTES), so a plain frame never starts with it, and a reader that knew only plain
# frames would find no record in a packed one rather than misread it.
PACKED = b"\xff\xff\xff\xff"
# Frames this large or larger are packed: deflate (ISA-L) cuts a batched commit's pages written
# to the WAL and again to the file at the checkpoint ~10x for JSON audit events, and each of
# those pages costs the journal's thread a copy into SQLite's page, a WAL checksum and a copy
# into the kernel's page cache twice. Each call costs ~13 us of set-up whatever its size, so the
# frames of small commits (single events) stay plain. Level 0, not 1: a 72 KB frame of
# bench.compare's events deflates in 0.23 against 0.39 us an event (best of 200), to 78 against
# 57 bytes an event (15x against 21x: a few more pages, each a fraction of what the deflate
# saved), and bench.journal_owner's writes took 1.2, 1.2, 1.2 against 1.6, 1.5, 1.4 us an event
# (alternated). Any level inflates the same: frames written at level 1 read as before.
PACK_MIN_BYTES = 16 * 1024
# A commit's events are framed into batch rows of about this many bytes of bodies: a frame's
# records are added while the bodies before them come to BATCH_BYTES or less, so a frame holds
# at most BATCH_BYTES of bodies and then one more event. A read of a few events of a large
# commit loads one of them, not all of it; and a frame stays below glibc's mmap threshold
# (128 KiB), which a larger one, once freed, raises for good (1 MiB frames cost
# bench.journal_owner 4-6 MB of peak RSS and saved no CPU there).
BATCH_BYTES = 1 << 16
# An event's id is at most 256 characters (schemas/event.schema.json), each at most 4 bytes.
MAX_ID_BYTES = 4 * 256
# The most records a frame holds: each body is 2 bytes ({}) at least, and a frame's bodies but
# its last come to at most BATCH_BYTES (a frame moved from the layout before batches holds 1,000
# records at most, fewer than this).
MAX_FRAME_RECORDS = BATCH_BYTES // 2 + 1
PACK_LEVEL = 0
RAW_DEFLATE = -15  # window bits: no zlib header or trailer (every record has its own CRC)
# What inflating garbage raises: isal's stubs declare `error` an instance; it is the class.
INFLATE_ERROR = cast("type[Exception]", isal_zlib.error)

Value = int | float | str | bytes | None


@dataclass(frozen=True, slots=True)
class FrameBound:
    """What a frame can legitimately inflate to, from the largest event the router takes
    (ServerConfig.max_event_bytes): a packed frame that inflates past it is damage or a
    deflate bomb (a 0.9 MB blob inflated to 207 MB), and is read as cut there (`unpack`)."""

    max_event_bytes: int

    def of(self, first: int, last: int) -> int:
        """The most bytes the frame of records first..last holds: its marker, BATCH_BYTES of
        bodies and one more event, and for each record its header and the longest id."""
        records = min(max(last - first + 1, 1), MAX_FRAME_RECORDS)
        per_record = RECORD.size + MAX_ID_BYTES
        return len(COVERED) + BATCH_BYTES + self.max_event_bytes + records * per_record


# The bound of a router with the default server limits (salvage's scan, when not told).
DEFAULT_BOUND = FrameBound(ServerConfig().max_event_bytes())


class OverlongFrameError(ValueError):
    """A packed frame inflates past its bound: `prefix` is what inflated up to it, to be read
    as a frame cut there (its records past the cut are missing, so quarantined)."""

    def __init__(self, most: int, prefix: bytes) -> None:
        super().__init__(f"a packed frame inflates past {most} bytes, the most it can hold")
        self.most = most
        self.prefix = prefix


@dataclass(frozen=True, slots=True)
class EventRow:
    """One events row as stored, with whether its CRC matched its body. `crc` is a CRC of the
    body alone, as the events table keeps it: of a record read from a format-3 frame, whose
    CRC covers its header too, the body's CRC when the record passed its own, and one that
    never matches (NOT_INTACT flipped) when it did not."""

    seq: int
    event_id: str
    received_at: float
    body: bytes
    crc: int

    @property
    def intact(self) -> bool:
        return zlib.crc32(self.body) == self.crc


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One delivery still owed: (target, seq, route)."""

    target: str
    seq: int
    route: str


@dataclass(frozen=True, slots=True)
class BooksRow:
    """One target's counters: received, delivered, dead_lettered and, when present, lost;
    and the seq up to which it settled everything (0 when the row predates that column)."""

    target: str
    counts: tuple[int, ...]
    settled: int = 0


@dataclass(frozen=True, slots=True)
class OwedRow:
    """A run of seqs owed to a target: first..last, all in the batch starting at `batch`."""

    target: str
    first: int
    last: int
    batch: int
    route: str


Row = EventRow | DeliveryRow | OwedRow | BooksRow


def covered_crc(seq: int, raw_id: bytes, received_at: float, body: bytes) -> int:
    """A format-3 record's CRC: CRC32 of its bytes from the seq to the end of the body (its
    TAIL, id and body), started from the body length (crc32's `value`): every field of the
    record but the CRC. Chained (the body is not copied to compute it); the journal inlines
    it in its append."""
    return crc32(body, crc32(TAIL.pack(seq, received_at, len(raw_id)) + raw_id, len(body)))


def frame(records: Iterable[tuple[int, str, float, bytes, int]], *, vouched: bool = False) -> bytes:
    """A batch's blob (format 3): each (seq, event_id, received_at, body, crc) as one record,
    `crc` the body's alone (EventRow's): a record whose body fails it fails its CRC here too,
    marked VOUCHED_NOT_INTACT when its seq and id are `vouched` for (an intact SQLite file's
    events rows), else NOT_INTACT. (Salvage frames what it found this way, not vouched: a
    record found in a format-2 frame had its body checked, not its header, which its new
    CRC then covers as found.)"""
    parts: list[bytes] = [COVERED]
    for seq, event_id, received_at, body, crc in records:
        raw_id = event_id.encode()
        stored = covered_crc(seq, raw_id, received_at, body)
        if crc32(body) != crc:
            stored ^= VOUCHED_NOT_INTACT if vouched else NOT_INTACT
        parts += (RECORD.pack(len(body), stored, seq, received_at, len(raw_id)), raw_id, body)
    return b"".join(parts)


def pack(plain: bytes) -> bytes:
    """A frame as the journal stores it: packed when it is PACK_MIN_BYTES or larger (its
    marker, COVERED or none, packed with it)."""
    if len(plain) < PACK_MIN_BYTES:
        return plain
    return PACKED + isal_zlib.compress(plain, PACK_LEVEL, RAW_DEFLATE)


def unpack(blob: bytes, most: int) -> bytes:
    """A stored frame's records (see `pack`); of a packed one cut short or damaged, what
    inflates before the cut or the damage (a decompressor object yields that much). Never
    more than `most` bytes (FrameBound.of): a packed frame that inflates past it raises
    OverlongFrameError, holding its first `most` bytes. A plain one is as long as stored."""
    if not blob.startswith(PACKED):
        return blob
    inflate = isal_zlib.decompressobj(RAW_DEFLATE)
    try:
        plain = inflate.decompress(memoryview(blob)[len(PACKED) :], most)
    except INFLATE_ERROR:
        plain = _inflate_prefix(blob, most)
        if len(plain) >= most:
            raise OverlongFrameError(most, plain) from None
        return plain
    # A legitimate frame stays below its bound (every id counted at its longest), so one
    # that fills it and has not ended goes on past it.
    if len(plain) >= most and not inflate.eof:
        raise OverlongFrameError(most, plain)
    return plain


def _inflate_prefix(blob: bytes, most: int) -> bytes:
    """What a damaged packed frame inflates to before the damage, `most` bytes at most: fed
    a piece at a time, so the output of the pieces before the error is kept."""
    inflate = isal_zlib.decompressobj(RAW_DEFLATE)
    out: list[bytes] = []
    got = 0
    for at in range(len(PACKED), len(blob), 512):
        piece = blob[at : at + 512]
        try:
            while piece and got < most:
                inflated = inflate.decompress(piece, most - got)
                out.append(inflated)
                got += len(inflated)
                piece = inflate.unconsumed_tail
        except INFLATE_ERROR:
            break
        if got >= most:
            break
    return b"".join(out)


def frame_offsets(blob: bytes, first: int, last: int) -> dict[int, int]:
    """Where each record of a batch (seqs first..last, ascending) starts in its blob. A
    header that cannot be a record's (its seq out of order or its bytes past the end: a
    damaged or torn frame) is skipped by searching on for the next whole record whose CRC
    matches, so damage costs the records it touched and no more. A header is not checked
    against its CRC here (the reader checks it): one whose seq was changed to a later seq of
    the batch takes that seq's place, and fails its CRC there."""
    offsets: dict[int, int] = {}
    unpack = RECORD.unpack_from
    size = RECORD.size
    end = len(blob)
    covered = blob.startswith(COVERED)
    at, previous = len(COVERED) if covered else 0, first - 1
    while at + size <= end:
        length, _, seq, _, id_length = unpack(blob, at)
        stop = at + size + id_length + length
        if previous < seq <= last and stop <= end:
            offsets[seq] = at
            previous, at = seq, stop
            if seq == last:
                break  # no record can come after the last: what follows is not searched
        else:
            at = _resync(blob, at + 1, previous, last, covered)
    return offsets


def _resync(blob: bytes, at: int, previous: int, last: int, covered: bool) -> int:
    """The next offset from `at` where a whole record with a later seq and a matching CRC
    (by the frame's rule, `covered` or not) starts; the end of the blob if there is none.

    Every seq of (previous, last] ends, little-endian, in the same high bytes (zeros, for any
    journal under 2**56 events), and a header holds its seq CRC_END bytes in: only where those
    bytes stand can a record start, so the search goes from one to the next with bytes.find
    (JSON bodies hold no zero byte) instead of trying every offset in Python, which took the
    journal's thread ~0.5 us per damaged byte (20 s for a frame of the largest size)."""
    size = RECORD.size
    end = len(blob)
    if previous >= last:
        return end
    low, high = SEQ.pack(previous + 1), SEQ.pack(last)
    shared = next((n for n in range(SEQ.size) if low[-1 - n] != high[-1 - n]), SEQ.size)
    tail, before = high[SEQ.size - shared :], CRC_END + SEQ.size - shared
    while at + size <= end:
        if shared:
            found = blob.find(tail, at + before)
            if found < 0:
                return end
            at = found - before
            if at + size > end:
                return end
        length, crc, seq, _, id_length = RECORD.unpack_from(blob, at)
        start = at + size + id_length
        if (
            previous < seq <= last
            and start + length <= end
            and _crc_of(blob, at, start, length, covered) == crc
        ):
            return at
        at += 1
    return end


def _crc_of(blob: bytes, at: int, start: int, length: int, covered: bool) -> int:
    """The CRC the record at `at` (its body at `start`) should have by its frame's rule."""
    body = blob[start : start + length]
    if covered:
        return crc32(body, crc32(blob[at + CRC_END : start], length))
    return crc32(body)


def record_at(blob: bytes, at: int) -> tuple[int, str | None, float, bytes, int]:
    """The record starting at `at`: (seq, event_id or None if it is not UTF-8, received_at,
    body, crc). `crc` is a CRC of the body alone, as EventRow's: in a frame of format 3
    (COVERED) the record's own CRC, over its header and body, is checked here, and a record
    that fails it is given one its body never matches."""
    length, crc, seq, received_at, id_length = RECORD.unpack_from(blob, at)
    start = at + RECORD.size
    raw_id = blob[start : start + id_length]
    try:
        event_id: str | None = raw_id.decode()
    except UnicodeDecodeError:
        event_id = None
    start += id_length
    body = blob[start : start + length]
    if blob.startswith(COVERED):
        intact = _crc_of(blob, at, start, length, True) == crc
        crc = crc32(body) ^ (0 if intact else NOT_INTACT)
    return seq, event_id, received_at, body, crc


def vouched_at(blob: bytes, at: int) -> bool:
    """Whether the record at `at` is the one written under the seq its header names: its
    frame's CRCs cover their headers (format 3) and its CRC matches, or is `frame`'s mark of
    a vouched-for record whose body failed its CRC before it was framed."""
    if not blob.startswith(COVERED):
        return False  # a CRC of the body alone says nothing of the seq beside it
    length, crc, _, _, id_length = RECORD.unpack_from(blob, at)
    start = at + RECORD.size + id_length
    return _crc_of(blob, at, start, length, True) ^ crc in (0, VOUCHED_NOT_INTACT)


def record_bytes(blob: bytes, at: int) -> bytes:
    """The record starting at `at` as it lies in its frame: its header, then as many bytes
    as its header says its id and body hold (cut at the frame's end)."""
    length, _, _, _, id_length = RECORD.unpack_from(blob, at)
    return blob[at : at + RECORD.size + id_length + length]


def frame_records(
    blob: bytes, first: int, last: int, bound: FrameBound = DEFAULT_BOUND
) -> Iterator[EventRow]:
    """Every record a batch's blob (as stored: plain or packed) still holds, as EventRows
    (intact or not); one whose id is not even text is garbage, not a record. A packed blob
    that inflates past its `bound` is read as cut there."""
    try:
        blob = unpack(blob, bound.of(first, last))
    except OverlongFrameError as exc:
        blob = exc.prefix
    for at in frame_offsets(blob, first, last).values():
        seq, event_id, received_at, body, crc = record_at(blob, at)
        if event_id is not None:
            yield EventRow(seq, event_id, received_at, body, crc)


class Pages(Mapping[int, bytes]):
    """The file's whole pages by number (from 1), read on demand so that a large journal is
    never in memory at once; the log's newest committed copy of a page wins over the file's."""

    def __init__(self, db: bytes | mmap, wal: bytes) -> None:
        self.db = db
        self.size = _page_size(db, wal)
        self.header = bytes(db[:100])
        self.count = len(db) // self.size  # a torn last page is dropped
        self.logged = _wal_pages(wal, self.size)
        self.usable = self.size - (self.header[20] if self.header.startswith(MAGIC) else 0)

    def __getitem__(self, number: int) -> bytes:
        if number in self.logged:
            return self.logged[number]
        if not 1 <= number <= self.count:
            raise KeyError(number)
        return bytes(self.db[(number - 1) * self.size : number * self.size])

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(set(range(1, self.count + 1)) | set(self.logged)))

    def __len__(self) -> int:
        return len(set(range(1, self.count + 1)) | set(self.logged))


def scan(db: bytes | mmap, wal: bytes = b"", bound: FrameBound = DEFAULT_BOUND) -> Iterator[Row]:
    """Every journal row whose bytes survive in the database file `db` (bytes or an mmap) and
    its write-ahead log `wal`, in page order. An events row may come more than once (a page
    and an older copy of it elsewhere); prefer the intact one. A packed frame is inflated no
    further than its `bound`."""
    pages = Pages(db, wal)
    skip = _free_pages(pages) | _ptrmap_pages(pages) | {1}
    for number in pages:
        if number in skip:
            continue
        for kind, rowid, values, whole in _cells(pages[number], pages, pages.usable):
            yield from _classify(kind, rowid, values, whole, bound)


def _classify(
    kind: int, rowid: int | None, values: list[Value], whole: bool, bound: FrameBound
) -> Iterator[Row]:
    """The rows a cell holds by its shape; a cell cut short (`whole` false) only when it is a
    batch, whose records before the cut are still whole."""
    if kind == TABLE_LEAF and rowid is not None:
        match values:
            case [None, int(last), bytes(blob)]:
                yield from frame_records(blob, rowid, last, bound)
            case [None, str(event_id), int() | float() as at, bytes(body), int(crc)] if whole:
                yield EventRow(rowid, event_id, float(at), body, crc)
            case [str(target), int(), int(), int(), *rest] if whole and all(
                type(v) is int for v in rest
            ):
                counts = tuple(v for v in values[1:] if isinstance(v, int))
                yield BooksRow(target, counts[:4], counts[4] if len(counts) > 4 else 0)
    elif kind in (INDEX_LEAF, INDEX_INTERIOR) and whole:
        match values:
            case [str(target), int(seq), str(route)]:
                yield DeliveryRow(target, seq, route)
            case [str(target), int(last), int(first), int(batch), str(route)]:
                yield OwedRow(target, first, last, batch, route)


def _page_size(db: bytes | mmap, wal: bytes) -> int:
    """The file's page size: from its header; if the header is damaged, from the log's header,
    then from where the first pointer-map page is (every journal since auto_vacuum has one at
    page 2); else SQLite's default, the size of journals older than both."""
    header = bytes(db[:100])
    if header.startswith(MAGIC) and len(header) == 100:
        size = int.from_bytes(header[16:18], "big")
        size = 65536 if size == 1 else size
        if _a_page_size(size):
            return size
    if len(wal) >= WAL_HEADER_BYTES and int.from_bytes(wal[:4], "big") in WAL_MAGICS:
        size = int.from_bytes(wal[8:12], "big")
        if _a_page_size(size):
            return size
    for size in PAGE_SIZES:
        if _looks_like_ptrmap(db, size):
            return size
    return DEFAULT_PAGE_SIZE


def _a_page_size(size: int) -> bool:
    return 512 <= size <= 65536 and size & (size - 1) == 0


def _looks_like_ptrmap(db: bytes | mmap, size: int) -> bool:
    """Whether page 2 at this page size reads as a pointer map: an entry (a type and a parent
    page within the file) for each of the first pages after it. At a wrong size, that place
    lies inside page 1's unused middle, all zeros, or inside some other page's bytes."""
    count = len(db) // size
    entries = min(PTRMAP_PROBE, count - 2)
    if entries < 1:
        return False
    page = bytes(db[size : size + 5 * entries])
    return all(
        1 <= page[5 * i] <= 5 and int.from_bytes(page[5 * i + 1 : 5 * i + 5], "big") <= count
        for i in range(entries)
    )


def _wal_pages(wal: bytes, page_size: int) -> dict[int, bytes]:
    """The newest copy of each page in the log, counting only frames up to the last commit
    of the log's current generation (its salt); frames after it were never committed."""
    if len(wal) < WAL_HEADER_BYTES:
        return {}
    magic, _, wal_page_size, _, salt1, salt2 = struct.unpack(">6I", wal[:24])
    if magic not in WAL_MAGICS or wal_page_size != page_size:
        return {}
    committed: dict[int, bytes] = {}
    pending: dict[int, bytes] = {}
    offset = WAL_HEADER_BYTES
    while offset + WAL_FRAME_HEADER_BYTES + page_size <= len(wal):
        number, commit, frame_salt1, frame_salt2 = struct.unpack(">4I", wal[offset : offset + 16])
        if (frame_salt1, frame_salt2) != (salt1, salt2):
            break
        start = offset + WAL_FRAME_HEADER_BYTES
        pending[number] = wal[start : start + page_size]
        if commit:
            committed.update(pending)
            pending.clear()
        offset = start + page_size
    return committed


def _free_pages(pages: Pages) -> set[int]:
    """Trunk and leaf pages of the freelist, as far as its chain survives."""
    header = pages.header
    if not header.startswith(MAGIC):
        return set()
    free: set[int] = set()
    trunk = int.from_bytes(header[32:36], "big")
    while trunk and trunk in pages and trunk not in free:
        free.add(trunk)
        page = pages[trunk]
        count = min(int.from_bytes(page[4:8], "big"), (pages.usable - 8) // 4)
        free.update(int.from_bytes(page[8 + 4 * i : 12 + 4 * i], "big") for i in range(count))
        trunk = int.from_bytes(page[:4], "big")
    return free


def _ptrmap_pages(pages: Pages) -> set[int]:
    """With auto_vacuum the pointer map pages say which pages are free: those, and the map's
    own pages (which are no b-tree)."""
    header = pages.header
    if not header.startswith(MAGIC) or not int.from_bytes(header[52:56], "big"):
        return set()
    per_map = pages.usable // 5
    skip: set[int] = set()
    number = 2
    last = max(pages, default=0)
    while number <= last:
        skip.add(number)
        page = pages.get(number)
        if page is not None:
            for i in range(per_map):
                if page[5 * i] == PTRMAP_FREE:
                    skip.add(number + 1 + i)
        number += per_map + 1
    return skip


def _cells(
    page: bytes, pages: Mapping[int, bytes], usable: int
) -> Iterator[tuple[int, int | None, list[Value], bool]]:
    """(page kind, rowid of a table cell, column values, whether the cell is whole) for each
    cell that parses; a cell whose overflow chain is cut gives what comes before the cut, its
    last value short."""
    kind = page[0]
    if kind not in (TABLE_LEAF, INDEX_LEAF, INDEX_INTERIOR):
        return
    count = int.from_bytes(page[3:5], "big")
    pointers = 8 if kind != INDEX_INTERIOR else 12
    for i in range(count):
        at = pointers + 2 * i
        if at + 2 > len(page):
            return
        cell = int.from_bytes(page[at : at + 2], "big")
        try:
            yield _cell(kind, page, cell, pages, usable)
        except (IndexError, ValueError, UnicodeDecodeError, struct.error):
            continue  # a damaged cell: the others on the page may still be whole


def _cell(
    kind: int, page: bytes, at: int, pages: Mapping[int, bytes], usable: int
) -> tuple[int, int | None, list[Value], bool]:
    if kind == INDEX_INTERIOR:
        at += 4  # the left child's page number
    size, at = _varint(page, at)
    if size > MAX_RECORD_BYTES:
        raise ValueError("not a record")
    rowid = None
    if kind == TABLE_LEAF:
        rowid, at = _varint(page, at)
    payload = _payload(kind, page, at, size, pages, usable)
    whole = len(payload) == size
    return kind, rowid, _record(payload, whole), whole


def _payload(
    kind: int, page: bytes, at: int, size: int, pages: Mapping[int, bytes], usable: int
) -> bytes:
    """The cell's payload: the part on the page, then its overflow pages in turn, as far as
    the chain survives (shorter than `size` where it is cut)."""
    most = usable - 35 if kind == TABLE_LEAF else (usable - 12) * 64 // 255 - 23
    least = (usable - 12) * 32 // 255 - 23
    if size <= most:
        if at + size > len(page):
            raise ValueError("cell runs past its page")
        return page[at : at + size]
    local = least + (size - least) % (usable - 4)
    if local > most:
        local = least
    parts = [page[at : at + local]]
    got = local
    overflow = int.from_bytes(page[at + local : at + local + 4], "big")
    seen: set[int] = set()
    while got < size:
        next_page = pages.get(overflow)
        if next_page is None or overflow in seen:
            break  # the chain is cut: what came before it is all there is
        seen.add(overflow)
        take = min(size - got, usable - 4)
        parts.append(next_page[4 : 4 + take])
        got += take
        overflow = int.from_bytes(next_page[:4], "big")
    return b"".join(parts)


def _record(payload: bytes, whole: bool = True) -> list[Value]:
    """The record's values; from a payload cut short (not `whole`), the values before the cut
    and the one it cut, short."""
    header_size, at = _varint(payload, 0)
    if header_size > len(payload):
        raise ValueError("record header runs past the payload")
    types = []
    while at < header_size:
        serial, at = _varint(payload, at)
        types.append(serial)
    values: list[Value] = []
    at = header_size
    for serial in types:
        if not whole and serial >= 12 and at + (serial - 12) // 2 > len(payload):
            values.append(payload[at:])  # cut: only a blob (a batch's frame) is kept so
            return values
        value, at = _value(payload, at, serial)
        values.append(value)
    if at != len(payload):
        raise ValueError("record length does not match its header")
    return values


INT_BYTES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def _value(data: bytes, at: int, serial: int) -> tuple[Value, int]:
    if serial == 0:
        return None, at
    if serial in INT_BYTES:
        end = at + INT_BYTES[serial]
        if end > len(data):
            raise ValueError("value runs past the payload")
        return int.from_bytes(data[at:end], "big", signed=True), end
    if serial == 7:
        return struct.unpack(">d", data[at : at + 8])[0], at + 8
    if serial in (8, 9):
        return serial - 8, at
    if serial >= 12:
        length = (serial - 12) // 2
        end = at + length
        if end > len(data):
            raise ValueError("value runs past the payload")
        raw = data[at:end]
        return (raw if serial % 2 == 0 else raw.decode("utf-8")), end
    raise ValueError(f"reserved serial type {serial}")


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """SQLite's big-endian varint: 7 bits a byte, the ninth byte whole."""
    value = 0
    for i in range(9):
        byte = data[at + i]
        if i == 8:
            return (value << 8) | byte, at + 9
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, at + i + 1
    raise ValueError("unreachable")
