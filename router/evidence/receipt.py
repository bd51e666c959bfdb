"""Receipts: what a producer keeps for each accepted event, and where that event is now.

With `evidence.receipts` on, every accepted event's result in the ingest answer carries

    {"id": ..., "digest": "sha256:<hex>", "received_at": "<ISO 8601>", "mac": "<hex>"}

`digest` is SHA-256 of the event's canonical bytes (canonical.py: the bytes a file target's
line holds before its `_chain` member), so the receipt names one archive line exactly; `mac`
is HMAC-SHA256 over `id \\n digest \\n received_at` with the daemon's receipt key
(`<storage.path>/receipts.key`, 32 random bytes, 0600, made at the first start), so the router
can tell its own receipts from forged ones. With storage.backend jetstream every router of the
stream issues with one key, the first one put in the stream's chain bucket (Receipts.adopt).
With a signing key (`evidence.signing_key_file`) a receipt also carries `sig`, the Ed25519
signature of the same three lines, and `key`, the key's id: anyone holding the public key can
check it (`event-router verify --receipts`), without the router's secret.
`GET /v1/receipts/{id}` (admin) answers where the event is, per target: pending in the journal,
delivered (for a file target: at which chain place, file and line), or dead-lettered with the
reason.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from router.deadletter import letter_files, object_line_place, read_letters
from router.errors import StorageUnavailableError
from router.events import Event
from router.evidence.canonical import CanonicalError, split_line
from router.evidence.keys import key_id
from router.evidence.verify import archive_order, open_lines
from router.observe.metrics import utc_iso

if TYPE_CHECKING:  # cryptography is loaded where a key is (router/evidence/keys.py)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

KEY_FILE = "receipts.key"
KEY_BYTES = 32


def digest(canonical: bytes) -> str:
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def receipt_message(event_id: str, event_digest: str, received_at: str) -> bytes:
    """The bytes a receipt's mac and sig are over: its three fields, one per line."""
    return f"{event_id}\n{event_digest}\n{received_at}".encode()


def signed_by(receipt: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    """Whether a receipt carries a valid Ed25519 signature by this key."""
    from cryptography.exceptions import InvalidSignature

    try:
        message = receipt_message(receipt["id"], receipt["digest"], receipt["received_at"])
        signature = base64.b64decode(receipt["sig"], validate=True)
        public_key.verify(signature, message)
    except (KeyError, TypeError, ValueError, InvalidSignature):
        return False
    return receipt.get("key") == key_id(public_key)


def read_receipts(path: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """The receipts a producer kept, with their places: a file of ingest answers or receipts,
    one JSON object a line (an answer's `results[i].receipt`, or the receipt itself)."""
    found: list[tuple[str, Mapping[str, Any]]] = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON") from exc
        results = item.get("results") if isinstance(item, dict) else None
        if isinstance(results, list):
            for i, result in enumerate(results):
                if isinstance(result, dict) and isinstance(result.get("receipt"), dict):
                    found.append((f"{path}:{number}: results[{i}]", result["receipt"]))
        elif isinstance(item, dict):
            found.append((f"{path}:{number}", item.get("receipt", item)))
    return found


class Receipts:
    """Issues and checks receipts with one key (and signs them with the signing key, if any)."""

    def __init__(self, key: bytes, signing_key: Ed25519PrivateKey | None = None) -> None:
        self._key = key
        self._signing_key = signing_key
        self._key_id = key_id(signing_key.public_key()) if signing_key is not None else None

    @classmethod
    def load_or_create(
        cls, directory: Path, signing_key: Ed25519PrivateKey | None = None
    ) -> Receipts:
        """The key in `directory`, made (0600, never overwritten) when there is none: written
        whole to a temp file, fsynced, then linked in place, so a crash or a full disk leaves
        no key file rather than an empty one. A file that does not hold a key of KEY_BYTES is
        StorageUnavailableError naming it: a MAC with an empty key is one anyone can make."""
        path = directory / KEY_FILE
        if not path.exists():
            partial = path.with_name(KEY_FILE + ".new")
            partial.unlink(missing_ok=True)
            try:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(KEY_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):  # another process made one first
                    os.link(partial, path)
            finally:
                partial.unlink(missing_ok=True)
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise StorageUnavailableError(
                f"evidence.receipts: {path} holds {len(key)} bytes, not a {KEY_BYTES}-byte "
                "key (a start cut short as it made it?); remove it and a new key is made, "
                "with which the receipts issued before no longer check"
            )
        return cls(key, signing_key)

    @property
    def key(self) -> bytes:
        return self._key

    @classmethod
    def adopt(
        cls, directory: Path, key: bytes, signing_key: Ed25519PrivateKey | None = None
    ) -> Receipts:
        """A key every router of a JetStream stream shares (its chain bucket holds it), put in
        `directory` in place of this router's own, where its worker processes read it. The
        key it replaces is kept beside it, once (`receipts.key.own`): the receipts this router
        issued with it no longer check by their mac (with a signing key, by their sig)."""
        path = directory / KEY_FILE
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            own = path.read_bytes()
            fd = os.open(
                path.with_name(KEY_FILE + ".own"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
            )
            with os.fdopen(fd, "wb") as f:
                f.write(own)
        partial = path.with_name(KEY_FILE + ".new")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        return cls(key, signing_key)

    def _mac(self, event_id: str, event_digest: str, received_at: str) -> str:
        message = receipt_message(event_id, event_digest, received_at)
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def issue(self, event: Event) -> dict[str, str]:
        event_digest = digest(event.encoded())
        received_at = utc_iso(event.received_at)
        receipt = {
            "id": event.id,
            "digest": event_digest,
            "received_at": received_at,
            "mac": self._mac(event.id, event_digest, received_at),
        }
        if self._signing_key is not None and self._key_id is not None:
            message = receipt_message(event.id, event_digest, received_at)
            receipt["sig"] = base64.b64encode(self._signing_key.sign(message)).decode()
            receipt["key"] = self._key_id
        return receipt

    def genuine(self, receipt: Mapping[str, Any]) -> bool:
        try:
            expected = self._mac(receipt["id"], receipt["digest"], receipt["received_at"])
            return hmac.compare_digest(expected, str(receipt["mac"]))
        except (KeyError, TypeError):
            return False


def find_in_archive(paths: Iterable[Path], event_id: str) -> dict[str, Any] | None:
    """Where a chained archive (live file and rotations) holds the event: place, file, line.
    A file that cannot be read to its end (a rotation gzipped by hand and cut short, or
    being gzipped now) does not keep the others from answering; if none holds the event,
    StorageUnavailableError names it, as the event may be in what could not be read."""
    unreadable: list[str] = []
    for path in archive_order(p for p in paths if p.exists()):
        try:
            hit = _find_in_file(path, event_id)
        except (OSError, EOFError, zlib.error) as exc:
            unreadable.append(f"{path}: {exc}")
            continue
        if hit is not None:
            return hit
    if unreadable:
        raise StorageUnavailableError(f"cannot read {'; '.join(unreadable)}")
    return None


def _find_in_file(path: Path, event_id: str) -> dict[str, Any] | None:
    needle = b'"id":' + orjson.dumps(event_id)
    for number, line in enumerate(open_lines(path), start=1):
        if needle not in line:
            continue
        try:
            found = split_line(line.rstrip(b"\n"))
        except CanonicalError:
            continue
        if found is None:
            continue
        canonical, link = found
        if orjson.loads(canonical).get("id") == event_id:
            return {
                "state": "delivered",
                "seq": link.seq,
                "file": str(path),
                "line": number,
                "digest": digest(canonical),
            }
    return None


def find_in_letters(path: Path, event_id: str) -> dict[str, Any] | None:
    """The event's dead letter in a target's dead-letter file, with its reason and place."""
    for letter in read_letters(path):
        event = letter.get("event")
        if isinstance(event, dict) and event.get("id") == event_id:
            return {
                "state": "dead_lettered",
                "reason": letter.get("reason"),
                "message": letter.get("message"),
                "seq": _letter_seq(letter),
            }
    return None


def _letter_seq(letter: dict[str, Any]) -> int | None:
    """A letter's place: its own link's, or that of the object line it stands at."""
    chain = letter.get("_chain")
    if isinstance(chain, dict):
        seq = chain.get("seq")
        return seq if isinstance(seq, int) else None
    with contextlib.suppress(CanonicalError):
        place = object_line_place(letter)
        return place[1].seq if place is not None else None
    return None


def archive_files(live: Path) -> list[Path]:
    """A file target's live archive and its rotations (gzipped ones too)."""
    return [live, *live.parent.glob(live.name + ".*")]


def locate(
    event_id: str,
    archives: Mapping[str, Path],
    letters_dir: Path,
    *,
    skip: Iterable[str] = (),
) -> dict[str, Any]:
    """Per target (but those in `skip`, already known as pending): the event's archive line
    (file targets, by their live path) or its dead letter. Blocking: run it in a thread."""
    known = set(skip)
    found: dict[str, Any] = {}
    for target_id, live in archives.items():
        if target_id in known:
            continue
        if (hit := find_in_archive(archive_files(live), event_id)) is not None:
            found[target_id] = hit
    for target_id, path in letter_files(letters_dir).items():
        if target_id in known or target_id in found:
            continue
        if (hit := find_in_letters(path, event_id)) is not None:
            found[target_id] = hit
    return found
