"""The command line's grammar: every command, its options and its --help (each ending with
the exit codes)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from router import __version__
from router.cli.common import EXIT_CODES
from router.completion import SHELLS


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
        type=workers_setting,
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
        type=Path,  # a file to complete; `cos://` arrives as `cos:/` (see query)
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
        type=Path,  # `cos://` arrives as `cos:/`, `kafka://` as `kafka:/` (see verify)
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


def workers_setting(text: str) -> int | Literal["auto"]:
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
