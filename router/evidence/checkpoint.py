"""Signed checkpoints: a target's chain head at a moment, signed with Ed25519.

A checkpoint line is

    {"_checkpoint":<P>,"sig":"<base64 Ed25519 signature of P>"}     ("sig":null when unsigned)

where P is the compact JSON `{"target":...,"seq":...,"hash":"<64 hex>","time":"<ISO 8601 UTC>",
"key":"<key id>"}` exactly as written: a verifier takes the bytes between `{"_checkpoint":` and
the last `,"sig":` and checks the signature over them. It says: "the chain of `target` had
`seq` links, the last one being `hash`, at `time`". The key id is the first 16 hex digits of
SHA-256 of the raw 32-byte public key, so an auditor holding several keys knows which applies.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from router.evidence.keys import key_id

if TYPE_CHECKING:  # cryptography is loaded where a key is (router/evidence/keys.py)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

PREFIX = b'{"_checkpoint":'
SIG_MEMBER = b',"sig":'


class CheckpointError(ValueError):
    """A line that starts as a checkpoint but cannot be read as one."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A parsed checkpoint line."""

    target: str
    seq: int
    hash: bytes
    time: str
    key: str | None
    payload: bytes
    signature: bytes | None

    def signed_by(self, public_key: Ed25519PublicKey) -> bool:
        from cryptography.exceptions import InvalidSignature

        if self.signature is None:
            return False
        try:
            public_key.verify(self.signature, self.payload)
        except InvalidSignature:
            return False
        return True


def checkpoint_line(
    target: str, seq: int, head_hash: bytes, time_iso: str, key: Ed25519PrivateKey | None
) -> bytes:
    """The line (no newline) for a checkpoint of `target` at `seq`, signed when a key is given."""
    body: dict[str, Any] = {"target": target, "seq": seq, "hash": head_hash.hex(), "time": time_iso}
    if key is not None:
        body["key"] = key_id(key.public_key())
    payload = orjson.dumps(body)
    sig = b"null"
    if key is not None:
        sig = b'"%s"' % base64.b64encode(key.sign(payload))
    return PREFIX + payload + SIG_MEMBER + sig + b"}"


def is_checkpoint(line: bytes) -> bool:
    return line.startswith(PREFIX)


def parse_checkpoint(line: bytes) -> Checkpoint:
    """The checkpoint in a line that starts with `{"_checkpoint":`; the line must be exactly
    what checkpoint_line writes for it."""
    cut = line.rfind(SIG_MEMBER)
    if cut < 0 or not line.endswith(b"}"):
        raise CheckpointError("a checkpoint line without its sig member")
    payload = line[len(PREFIX) : cut]
    try:
        body = orjson.loads(payload)
        raw_sig = orjson.loads(line[cut + len(SIG_MEMBER) : -1])
        signature = None if raw_sig is None else base64.b64decode(raw_sig, validate=True)
        checkpoint = Checkpoint(
            target=str(body["target"]),
            seq=int(body["seq"]),
            hash=bytes.fromhex(body["hash"]),
            time=str(body["time"]),
            key=body.get("key"),
            payload=payload,
            signature=signature,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError("the checkpoint cannot be read") from exc
    if orjson.dumps(body) != payload or (
        raw_sig is not None
        and b'"%s"' % base64.b64encode(signature or b"") != line[cut + len(SIG_MEMBER) : -1]
    ):
        raise CheckpointError("the checkpoint is not in the canonical form")
    return checkpoint
