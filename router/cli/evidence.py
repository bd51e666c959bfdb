"""`keygen` and `verify`: the signing key for checkpoints, and the check of a target's hash
chain (archive files, a COS bucket or an Event Streams topic, with their dead letters and the
receipts producers kept)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from router.cli.common import (
    COS_SCHEME,
    EXIT_CONFIG,
    EXIT_RUNTIME,
    KAFKA_SCHEME,
    config_target,
    cos_target,
    on_store,
)
from router.config import Config

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from router.evidence.verify import ReceiptDigests, Report, VerifyOptions


def keygen(out: Path) -> int:
    from router.evidence.keys import generate

    try:
        private, public = generate(out)
    except FileExistsError:
        print(f"{out} exists; keygen never overwrites a key", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"cannot write {out}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"wrote {private} (private, 0600: evidence.signing_key_file) and {public} (for auditors)")
    return 0


def verify(args: argparse.Namespace) -> int:
    from router.evidence.keys import SigningKeyError, load_public
    from router.evidence.verify import ExpectedHead, Verifier, VerifyOptions, verify_files

    schemes = (COS_SCHEME, KAFKA_SCHEME)
    stores = [str(path) for path in args.paths if str(path).startswith(schemes)]
    files = [path for path in args.paths if not str(path).startswith(schemes)]
    if len(stores) > 1:
        print("verify: give at most one cos://TARGET[/PREFIX] or kafka://TARGET", file=sys.stderr)
        return EXIT_CONFIG
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        print(f"no such file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        key = load_public(args.public_key) if args.public_key else None
        expect = ExpectedHead.parse(args.expect_head) if args.expect_head else None
    except (SigningKeyError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    receipts = _signed_receipts(args.receipts, key) if args.receipts else None
    if isinstance(receipts, int):
        return receipts

    def progress(lines: int) -> None:
        print(f"\rverified {lines} lines", end="", file=sys.stderr, flush=True)

    show = sys.stderr.isatty()
    options = VerifyOptions(
        public_key=key,
        partial=args.partial,
        max_age_s=args.max_age_s,
        progress=progress if show else None,
        expect_head=expect,
        receipts=receipts,
    )
    try:
        report: Report | int
        if not stores:
            report = verify_files(files, Verifier(options))
        elif stores[0].startswith(KAFKA_SCHEME):
            report = _verify_topic(args, stores[0], files, options)
        else:
            report = _verify_bucket(args, stores[0], files, options)
    except OSError as exc:
        print(f"cannot read: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    if isinstance(report, int):
        return report
    if show:
        print("\r\033[K", end="", file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.broken is not None:
        print(f"BROKEN: {report.broken}")
        print(f"before the break: {report.summary()}")
        return EXIT_RUNTIME
    print(f"OK: {report.summary()}")
    return 0


def _verify_bucket(
    args: argparse.Namespace, path: str, letters: list[Path], options: VerifyOptions
) -> Report | int:
    """Verify the objects of a cloud_object_storage target of the config, with the
    dead-letter files given, or else the target's own (and its redriven ones) when present."""
    from router.evidence.bucket import BucketVerifier, verify_bucket

    found = cos_target(args, path, "verify")
    if isinstance(found, int):
        return found
    target, prefix, config = found
    letters = letters or _own_letters(config, target.id)
    verifier = BucketVerifier(options)
    return on_store(
        "verify", lambda: verify_bucket(target.objects(prefix), letters, verifier), target
    )


def _own_letters(config: Config, target_id: str) -> list[Path]:
    """A target's dead-letter files under the config's storage.path (and its redriven ones),
    those that exist, each said on stderr: for verifying a bucket or topic without them."""
    from router.deadletter import letters_path, redriven_path

    directory = config.storage.dead_letter_dir()
    own = [letters_path(directory, target_id), redriven_path(directory, target_id)]
    letters = [letter for letter in own if letter.is_file()]
    for letter in letters:
        print(f"dead letters: {letter}", file=sys.stderr)
    return letters


def _verify_topic(
    args: argparse.Namespace, path: str, letters: list[Path], options: VerifyOptions
) -> Report | int:
    """Verify the topic of an event_streams target of the config (every partition, from its
    start to its end offsets when read), with the target's dead-letter files."""
    from router.evidence.bucket import BucketVerifier, verify_topic
    from router.targets.event_streams import (
        EventStreamsEndpointConfig,
        EventStreamsTarget,
        read_topic,
    )

    target_id = path.removeprefix(KAFKA_SCHEME).strip("/")
    found = config_target(args, target_id, EventStreamsEndpointConfig, "event_streams")
    if isinstance(found, int):
        return found
    target, config = found
    assert isinstance(target.endpoint, EventStreamsEndpointConfig)
    topic = EventStreamsTarget(target_id, target.endpoint)
    letters = letters or _own_letters(config, target_id)
    verifier = BucketVerifier(options)
    return on_store("verify", lambda: verify_topic(read_topic(topic), letters, verifier), topic)


def _signed_receipts(path: Path, key: Ed25519PublicKey | None) -> ReceiptDigests | int:
    """The digests of the receipts in `path`, each signature checked with the public key; or
    the exit code: 2 without a key or a readable file, 1 for a receipt that is not signed by
    it (printed as BROKEN, with its place)."""
    from router.evidence.receipt import read_receipts, signed_by
    from router.evidence.verify import ReceiptDigests

    if key is None:
        print("verify: --receipts needs --public-key (the signatures are checked)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        receipts = read_receipts(path)
    except (OSError, ValueError) as exc:
        print(f"verify: cannot read the receipts: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for place, receipt in receipts:
        if not signed_by(receipt, key):
            print(
                f"BROKEN: {place}: the receipt of {receipt.get('id')!r} is not signed by the "
                "public key (forged, changed, or issued without a signing key)"
            )
            return EXIT_RUNTIME
    return ReceiptDigests(str(receipt.get("digest")) for _, receipt in receipts)
