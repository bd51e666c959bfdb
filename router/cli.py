"""The command line: `event-router serve | check | validate-target | dlq | ...`.
The only place that calls asyncio.run() and sys.exit().

Exit codes, the same for every command (EXIT_CODES, shown in every --help): 0 done, 1 failed
(nothing could be done: a port in use, a daemon out of reach, a target that fails its test
write, letters none of which can be redriven, an archive that fails `verify`), 2 a usage or
config error (argparse's own code: an unknown option or target, a bad query, time or count, a
config that does not load, a storage.path another daemon holds or whose journal a newer
event-router wrote).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import uvloop

from router import __version__
from router.completion import SHELLS, script
from router.config import Config, TargetConfig, config_warnings, load_config_and_data
from router.errors import (
    ConfigError,
    JournalFormatError,
    StorageLockedError,
    StorageUnavailableError,
)
from router.observe.logformat import counted, setup_logging
from router.observe.sdnotify import notify
from router.resources import default_config_path
from router.server import WORKER_COMMAND

if TYPE_CHECKING:
    from datetime import datetime

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from router.evidence.verify import ReceiptDigests, Report, VerifyOptions
    from router.probe import ProbeResult
    from router.query import Query
    from router.targets import Target
    from router.targets.cos import CosTarget
    from router.targets.event_streams import EventStreamsTarget

log = logging.getLogger("router")

EXIT_RUNTIME = 1
# The collector's first threshold once the daemon serves (Python's default: 700). Collections
# start when that many more tracked objects exist than after the last one; the journal owner
# keeps its targets' committed entries in memory (an Entry and an Event each) until they are
# delivered, a few thousand at a time under load, and with 700 each collection walked them
# again and moved them to the older generations, whose collections walked them once more.
# Past 10,000 (about 5,000 events held beyond the last collection) the owner's steady state
# seldom reaches it; cycles (rare on the hot path) wait at most that many objects.
GC_THRESHOLD = 10_000
EXIT_CONFIG = 2
TOKEN_ENV = "EVENT_ROUTER_TOKEN"
EXIT_CODES = """\
exit codes (every command):
  0  done (a search or a redrive that matches nothing is done too)
  1  failed: nothing could be done (a port in use, the daemon out of reach, a target that
     fails its test write, dead letters none of which can be redriven, an archive that
     fails verify)
  2  usage or config error: an unknown option or target, a bad query, time or count,
     a config that does not load or does not pass check, a storage.path another daemon holds
     or whose journal a newer event-router wrote"""


def _positive_count(text: str) -> int:
    """--limit: a count of at least 1; anything else is a usage error (exit 2), not a silent
    empty answer."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count of 1 or more")
    return count


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
) -> argparse.ArgumentParser:
    """A sub-command whose --help ends with the exit codes, like the top-level --help."""
    return commands.add_parser(
        name, help=text, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _config_option(parser: argparse.ArgumentParser, what: str = "YAML config") -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"{what} (default: the embedded config/router.yaml)",
    )


def _token_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file",
        type=Path,
        help="a file holding an admin token (default: the EVENT_ROUTER_TOKEN variable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="event-router",
        description="Validate, route and deliver IBM Cloud Activity Tracker audit events.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"event-router {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _command(commands, "serve", "run the daemon")
    _config_option(serve)
    serve.add_argument("--host", help="listen on this address instead of server.host")
    serve.add_argument("--port", type=int, help="listen on this port instead of server.port")
    serve.add_argument(
        "--workers",
        type=_workers_setting,
        help="processes taking POST /v1/events instead of server.workers: a number, or auto "
        "(one per CPU this process may use, at most 4)",
    )
    serve.add_argument(
        "--log-format",
        choices=["json", "text"],
        default="json",
        help="log lines on stderr as JSON objects (for journald and log shippers) or as "
        "plain text (default: %(default)s)",
    )
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="the least severe level logged (default: %(default)s)",
    )

    check = _command(
        commands, "check", "validate a config exactly as serve would; exit 0 only when clean"
    )
    _config_option(check)
    validate = _command(
        commands, "validate-target", "send one real test event to a target and report the outcome"
    )
    _config_option(validate)
    validate.add_argument("target_id", metavar="ID", help="the target's id")

    dlq = _command(commands, "dlq", "dead letters: list, show, redrive")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = _command(dlq_commands, "list", "letters per target, by reason")
    dlq_show = _command(dlq_commands, "show", "print a target's letters")
    dlq_redrive = _command(
        dlq_commands, "redrive", "put a target's letters back on the journal, for that target only"
    )
    for sub in (dlq_list, dlq_show, dlq_redrive):
        _config_option(sub)
    for sub in (dlq_show, dlq_redrive):
        sub.add_argument("--target", required=True, help="target id")
        sub.add_argument("--reason", help="only letters with this reason, e.g. retries_exhausted")
        sub.add_argument(
            "--since",
            help="only letters whose last attempt is at or after this "
            "ISO 8601 time, e.g. 2026-11-24T10:00:00Z",
        )
    dlq_show.add_argument("--limit", type=_positive_count, help="at most this many letters")
    dlq_show.add_argument(
        "--format",
        choices=["ndjson", "table"],
        default="table",
        help="the letters as JSON lines or a readable table (default: %(default)s)",
    )
    dlq_redrive.add_argument("--url", help="the daemon's base URL (default: from the config)")
    _token_option(dlq_redrive)
    _add_query_command(commands)
    _add_tail_command(commands)
    _add_evidence_commands(commands)
    completion = _command(
        commands,
        "completion",
        "print a shell completion script: source <(event-router completion bash)",
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    return parser


def _add_query_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    query = _command(
        commands,
        "query",
        "search file-target archives (rotated and gzipped too) or a COS bucket with a query",
    )
    query.add_argument(
        "query",
        metavar="QUERY",
        nargs="?",
        help="e.g. 'host:secrets-manager outcome:failure' (none with --view)",
    )
    query.add_argument(
        "--view",
        metavar="NAME",
        help="the query of this view of the config (--config); every argument is then a PATH",
    )
    query.add_argument(
        "paths",
        metavar="PATH",
        type=Path,  # a file to complete; `cos://` arrives as `cos:/` (see _query)
        nargs="+",
        help="an archive file (its rotations are read too) or a directory of archives; or "
        "cos://TARGET[/PREFIX]: the objects a cloud_object_storage target of --config wrote",
    )
    _config_option(query, "YAML config, for cos:// paths")
    query.add_argument("--since", help="eventTime at or after this ISO 8601 time")
    query.add_argument("--until", help="eventTime before this ISO 8601 time")
    query.add_argument(
        "--limit", type=_positive_count, help="at most this many events (the oldest first)"
    )
    query.add_argument(
        "--format",
        choices=["ndjson", "table"],
        default="ndjson",
        help="the archived lines as they are, or a summary table (default: %(default)s)",
    )
    query.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: on a terminal, for large archives)",
    )


def _add_evidence_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    keygen = _command(
        commands, "keygen", "write an Ed25519 signing key (0600) and KEY.pub for checkpoints"
    )
    keygen.add_argument("--out", type=Path, required=True, help="the private key file to create")
    verify = _command(
        commands,
        "verify",
        "check a target's hash chain and signed checkpoints; exit 1 at the first break",
    )
    verify.add_argument(
        "paths",
        metavar="PATH",
        type=Path,  # `cos://` arrives as `cos:/`, `kafka://` as `kafka:/` (see _verify)
        nargs="+",
        help="the target's archive files (rotated and gzipped too) and its dead-letter file; "
        "or cos://TARGET[/PREFIX]: the objects a cloud_object_storage target of --config wrote; "
        "or kafka://TARGET: the topic of an event_streams target of --config "
        "(evidence.event_streams); with their dead-letter files, given or found under the "
        "config's storage.path",
    )
    _config_option(verify, "YAML config, for cos:// and kafka:// paths")
    verify.add_argument(
        "--receipts",
        type=Path,
        metavar="FILE",
        help="receipts a producer kept (ingest answers or receipts, one JSON a line): check "
        "each one's Ed25519 signature with --public-key and find its event in the chain",
    )
    verify.add_argument(
        "--expect-head",
        metavar="SEQ[:HASH]",
        help="the chain head the daemon reports (/v1/status: chain_seq, chain_hash): fail when "
        "the files stop short of it (places cut off the end)",
    )
    verify.add_argument(
        "--public-key", type=Path, help="KEY.pub: check every checkpoint's signature"
    )
    verify.add_argument(
        "--max-age-s",
        type=float,
        help="fail when the last checkpoint is older than this many seconds",
    )
    verify.add_argument(
        "--partial",
        action="store_true",
        help="the oldest files are gone (rotated away): start at the first place given",
    )


def _add_tail_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tail = _command(commands, "tail", "follow the accepted events that match a query")
    tail.add_argument("query", metavar="QUERY", nargs="?", default="", help="default: every event")
    tail.add_argument(
        "--view",
        metavar="NAME",
        help="the query of this view of the running daemon (a QUERY given too narrows it)",
    )
    _config_option(tail, "YAML config, for the daemon's address")
    tail.add_argument("--url", help="the daemon's base URL (default: from the config)")
    tail.add_argument("--limit", type=_positive_count, help="stop after this many events")
    _token_option(tail)


def main(argv: Sequence[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == [WORKER_COMMAND]:
        sys.exit(_worker(arguments[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        print(script(parser, args.shell), end="")
        return
    if args.command == "query":
        sys.exit(_query(args))
    if args.command == "keygen":
        sys.exit(_keygen(args.out))
    if args.command == "verify":
        sys.exit(_verify(args))
    config_path = args.config or default_config_path()
    try:
        config, data = load_config_and_data(config_path)
    except ConfigError as exc:
        print(f"{exc.source}: {counted(len(exc.problems), 'problem')}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if args.command == "validate-target":
        sys.exit(asyncio.run(_validate_target(config, args.target_id)))
    if args.command == "dlq":
        sys.exit(_dlq(args, config))
    if args.command == "tail":
        sys.exit(_tail(args, config))
    if args.command == "check":
        for warning in config_warnings(config):
            print(f"warning: {warning}", file=sys.stderr)
        print(
            f"{config_path}: OK ({counted(len(config.targets), 'target')}, "
            f"{counted(len(config.routes), 'route')}, "
            + "".join(
                f"{counted(len(items), kind)}, "
                for kind, items in (("view", config.views), ("alert", config.alerts))
                if items
            )
            + f"{counted(len(config.settings.default_targets), 'default target')})"
        )
        from router.server.workercount import resolve_workers

        print(resolve_workers(config.server.workers).describe())
        return

    def overrides(loaded: Config) -> Config:
        """--host/--port/--workers win over the file, at start and at every reload (where
        the file's server.workers alone changing is then no change)."""
        return replace(
            loaded,
            server=replace(
                loaded.server,
                host=args.host or loaded.server.host,
                port=loaded.server.port if args.port is None else args.port,
                workers=loaded.server.workers if args.workers is None else args.workers,
            ),
        )

    server = overrides(config).server
    setup_logging(args.log_format, args.log_level)
    try:
        # uvloop: the event loop's socket and timer work in C. Measured with bench.compare
        # (two A/B runs on one invocation each): 0.59x and 0.94x the CPU per event of asyncio's
        # loop with one event per POST, no difference beyond noise with 100 per POST.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(config_path, data, replace(config, server=server), overrides))
    except (ConfigError, JournalFormatError, StorageLockedError) as exc:
        log.error("cannot start: %s", exc)
        sys.exit(EXIT_CONFIG)
    except (OSError, StorageUnavailableError) as exc:
        log.error("cannot start: %s", exc)
        sys.exit(EXIT_RUNTIME)


def _workers_setting(text: str) -> int | Literal["auto"]:
    """--workers: `auto`, or a number of processes within server.workers' bounds."""
    from router.server.workercount import MAX_WORKERS

    if text == "auto":
        return "auto"
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"auto or a number from 1 to {MAX_WORKERS}: {text!r}")
    return count


def _worker(argv: Sequence[str]) -> int:
    """A worker process of `server.workers` (router/server/workers.py starts it; not a command
    for people, so not in --help): its setup comes over the inherited socket `--fd`."""
    from router.server.worker import run_worker

    parser = argparse.ArgumentParser(prog=f"event-router {WORKER_COMMAND}")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--log-format", choices=["json", "text"], default="json")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_worker(args.fd))


async def _validate_target(config: Config, target_id: str) -> int:
    from router.probe import probe
    from router.targets import build_target

    try:
        target_config = config.target(target_id)
    except KeyError:
        known = ", ".join(t.id for t in config.targets) or "none"
        print(f"no target {target_id!r} in the config (targets: {known})", file=sys.stderr)
        return EXIT_CONFIG
    target = build_target(target_config)
    try:
        if target_config.target_type == "file" and config.evidence.enabled:
            result = await _open_chained_archive(target)
        else:
            result = await probe(target)
    finally:
        await target.close()
    print(f"{'OK' if result.ok else 'FAILED'}: {result.message}")
    return 0 if result.ok else EXIT_RUNTIME


def _keygen(out: Path) -> int:
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


def _verify(args: argparse.Namespace) -> int:
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

    found = _cos_target(args, path, "verify")
    if isinstance(found, int):
        return found
    target, prefix, config = found
    letters = letters or _own_letters(config, target.id)
    verifier = BucketVerifier(options)
    return _run_verify(lambda: verify_bucket(target.objects(prefix), letters, verifier), target)


def _run_verify(
    check: Callable[[], Awaitable[Report]], target: CosTarget | EventStreamsTarget
) -> Report | int:
    """Run a bucket's or a topic's check and close the target's client; a store that cannot
    be read is said on stderr (exit 1)."""
    from router.errors import DeliveryError

    async def run() -> Report:
        try:
            return await check()
        finally:
            await target.close()

    try:
        return asyncio.run(run())
    except DeliveryError as exc:
        print(f"verify: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


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
    found = _config_target(args, target_id, EventStreamsEndpointConfig, "event_streams")
    if isinstance(found, int):
        return found
    target, config = found
    assert isinstance(target.endpoint, EventStreamsEndpointConfig)
    topic = EventStreamsTarget(target_id, target.endpoint)
    letters = letters or _own_letters(config, target_id)
    verifier = BucketVerifier(options)
    return _run_verify(lambda: verify_topic(read_topic(topic), letters, verifier), topic)


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


async def _open_chained_archive(target: Target) -> ProbeResult:
    """A file target whose archive is an evidence chain gets no test line from here: only the
    daemon, which holds the chain's head, may take a place in it (its start-up validation and
    the API's validate do write one). Opening the file for appending is the test."""
    from router.probe import ProbeResult

    try:
        await target.start()
    except OSError as exc:
        return ProbeResult(target.id, False, f"target {target.id}: {exc}")
    return ProbeResult(
        target.id,
        True,
        f"target {target.id} can be written (no test event: its archive is an evidence chain, "
        "written by the daemon only)",
    )


def _dlq(args: argparse.Namespace, config: Config) -> int:
    from router.clients import dlq
    from router.deadletter import LetterFilter, parse_since

    stored = None
    if config.storage.backend == "jetstream" and args.dlq_command != "redrive":
        from router.journal.jetstream import all_letters

        stored = asyncio.run(all_letters(config.storage.jetstream))
    if args.dlq_command == "list":
        return dlq.list_letters(config, stored=stored)
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    if args.dlq_command == "show":
        return dlq.show_letters(
            config,
            args.target,
            LetterFilter(args.reason, since),
            limit=args.limit,
            fmt=args.format,
            stored=stored,
        )
    query = {k: v for k, v in (("reason", args.reason), ("since", args.since)) if v}
    try:
        token = admin_token(args.token_file)
    except OSError as exc:
        print(f"cannot read the token file: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(dlq.redrive(config, args.target, query, url=args.url, token=token))


def admin_token(token_file: Path | None) -> str | None:
    """The token a client command sends: from --token-file, else $EVENT_ROUTER_TOKEN. Never
    an argument of its own, which `ps` would show to every user."""
    if token_file is not None:
        return token_file.read_text(encoding="utf-8").strip()
    return os.environ.get(TOKEN_ENV) or None


async def _serve(
    path: Path, data: dict[str, Any], config: Config, overrides: Callable[[Config], Config]
) -> None:
    from router.daemon import Daemon
    from router.server.api import ConfigSource

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    daemon = Daemon(config, ConfigSource(path, data))
    reloads: set[asyncio.Task[bool]] = set()

    async def reload() -> bool:
        notify("RELOADING=1", "STATUS=reloading the config")
        applied = await daemon.reload_from(path, initiator="signal", adjust=overrides)
        notify("READY=1", f"STATUS={'reloaded' if applied else 'reload refused; see the log'}")
        return applied

    def reload_requested() -> None:
        """SIGHUP (systemd's ExecReload): reload the config file; reloads run one at a time."""
        task = asyncio.create_task(reload(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_requested)
    watcher: asyncio.Task[None] | None = None
    if config.reload.watch:
        # The file as it is now, before start-up yields: a change made while the daemon starts
        # (say, just after /readyz turned 200) is one the watch must see.
        seen = _fingerprint(path)
        watcher = asyncio.create_task(
            _watch(path, config.reload.watch_interval_s, reload_requested, seen),
            name="config-watch",
        )
    try:
        await daemon.start()
        # What start-up built (modules, config, schemas, validators, routes) lives as long as
        # the process: frozen out of the collector's sight, a full collection walks only what
        # came after. Measured with bench.compare's load (gc callbacks in the daemon): the
        # collector's CPU per event 19-23 -> 9-12 us with 100 events per POST (full
        # collections 12-14 -> 2-3 us: each walked ~82,000 objects, ~50 ms), 14 -> 0.3 us of
        # full collections with one event per POST. Collected first: no garbage is frozen.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD)
        # READY=1 exactly when /readyz turns 200: systemd starts dependent units only then.
        notify(
            "READY=1",
            f"STATUS=serving on port {daemon.port} with {counted(len(daemon.targets), 'target')}",
        )
        await stop.wait()
        log.info("stop requested; draining")
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.gather(*reloads, return_exceptions=True)
        notify("STOPPING=1", "STATUS=draining: delivering what the workers hold, then stopping")
        await daemon.stop()


def _fingerprint(path: Path) -> tuple[float, int, str] | None:
    """The file's mtime, size and content digest; None while it is being replaced."""
    try:
        stat = path.stat()
        return stat.st_mtime, stat.st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def _watch(
    path: Path,
    interval_s: float,
    changed: Callable[[], None],
    last: tuple[float, int, str] | None,
) -> None:
    """reload.watch: call `changed` when the file's content changes from `last` (checked by
    mtime and size first, then by digest, so a touch alone does not reload)."""
    while True:
        await asyncio.sleep(interval_s)
        current = await asyncio.to_thread(_fingerprint, path)
        if current is None or last is None or current[:2] == last[:2]:
            last = current or last
            continue
        if current[2] != last[2]:
            log.info("config file %s changed; reloading", path)
            changed()
        last = current


def _query(args: argparse.Namespace) -> int:
    """`query` reads archives directly: it needs no config and no running daemon."""
    from router.clients.search import describe_query_error, parse_time, search
    from router.query import QueryError, parse

    if args.view is not None:
        # Every positional is a PATH: argparse gave the first to QUERY.
        args.paths = [Path(args.query), *args.paths] if args.query is not None else args.paths
        args.query = _view_query(args.view, args.config)
        if args.query is None:
            return EXIT_CONFIG
    elif args.query is None:
        print("query: give a QUERY, or --view NAME", file=sys.stderr)
        return EXIT_CONFIG
    try:
        query = parse(args.query)
    except QueryError as exc:
        print(describe_query_error(args.query, exc), file=sys.stderr)
        return EXIT_CONFIG
    try:
        since = parse_time(args.since, "--since") if args.since else None
        until = parse_time(args.until, "--until") if args.until else None
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    # A Path keeps one slash of `cos://`, and no trailing slash (a key prefix either way).
    buckets = [str(path) for path in args.paths if str(path).startswith(COS_SCHEME)]
    if buckets:
        if len(buckets) != len(args.paths) or len(buckets) > 1:
            print("query: give one cos://TARGET[/PREFIX] and no other PATH", file=sys.stderr)
            return EXIT_CONFIG
        return _query_bucket(args, query, buckets[0], since, until)
    return search(
        query,
        args.paths,
        since=since,
        until=until,
        limit=args.limit,
        fmt=args.format,
        progress=args.progress,
    )


COS_SCHEME = "cos:/"
KAFKA_SCHEME = "kafka:/"


def _view_query(name: str, config_path: Path | None) -> str | None:
    """The query of the config's view `name` (None, said on stderr, when there is none)."""
    path = config_path or default_config_path()
    try:
        config, _ = load_config_and_data(path)
    except ConfigError as exc:
        print(f"{exc.source}: {counted(len(exc.problems), 'problem')}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None
    view = config.view(name)
    if view is None:
        known = ", ".join(v.name for v in config.views) or "none"
        print(f"query: no view {name!r} in {path} (views: {known})", file=sys.stderr)
        return None
    return str(view.query)


def _query_bucket(
    args: argparse.Namespace,
    query: Query,
    path: str,
    since: datetime | None,
    until: datetime | None,
) -> int:
    """Search the objects of a cloud_object_storage target, with its endpoint and
    credentials from the config, as the daemon resolves them."""
    from router.clients.search import search_bucket
    from router.errors import DeliveryError

    found = _cos_target(args, path, "query")
    if isinstance(found, int):
        return found
    target, prefix, _ = found

    async def run() -> int:
        try:
            return await search_bucket(
                query,
                target.objects(prefix),
                since=since,
                until=until,
                limit=args.limit,
                fmt=args.format,
            )
        finally:
            await target.close()

    try:
        return asyncio.run(run())
    except DeliveryError as exc:
        print(f"query: {exc}", file=sys.stderr)
        return 1


def _cos_target(
    args: argparse.Namespace, path: str, command: str
) -> tuple[CosTarget, str, Config] | int:
    """The cloud_object_storage target `cos://TARGET[/PREFIX]` names in --config, the prefix,
    and the config; or the exit code of a config that does not load or has no such target."""
    from router.targets.cos import CosEndpointConfig, CosTarget

    target_id, _, prefix = path.removeprefix(COS_SCHEME).lstrip("/").partition("/")
    found = _config_target(args, target_id, CosEndpointConfig, "cloud_object_storage", command)
    if isinstance(found, int):
        return found
    target, config = found
    assert isinstance(target.endpoint, CosEndpointConfig)
    return CosTarget(target_id, target.endpoint), prefix, config


def _config_target(
    args: argparse.Namespace,
    target_id: str,
    endpoint_type: type,
    type_name: str,
    command: str = "verify",
) -> tuple[TargetConfig, Config] | int:
    """The target `target_id` of --config (of the type whose endpoint is `endpoint_type`)
    and the config; or the exit code of a config that does not load or has no such target."""
    try:
        config, _ = load_config_and_data(args.config or default_config_path())
    except ConfigError as exc:
        print(f"{exc.source}: {counted(len(exc.problems), 'problem')}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    found = [t for t in config.targets if t.id == target_id]
    if not found or not isinstance(found[0].endpoint, endpoint_type):
        print(f"{command}: no {type_name} target {target_id!r} in the config", file=sys.stderr)
        return EXIT_CONFIG
    return found[0], config


def _tail(args: argparse.Namespace, config: Config) -> int:
    from router.clients import base_url
    from router.clients.tail import follow

    url = base_url(config, args.url)
    try:
        token = admin_token(args.token_file)
    except OSError as exc:
        print(f"cannot read the token file: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(follow(url, args.query, limit=args.limit, token=token, view=args.view))
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a tail ends
