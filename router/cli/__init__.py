"""The command line: `event-router serve | check | validate-target | dlq | query | tail |
keygen | verify | completion`. The only place that calls asyncio.run() and sys.exit().

One module per kind of command: `parser` (the grammar and every --help), `serve` (the daemon's
process, and a worker's), `checks` (check, validate-target), `reads` (dlq, query, tail),
`evidence` (keygen, verify); `common` holds what they share.

Exit codes, the same for every command (EXIT_CODES, shown in every --help): 0 done, 1 failed
(nothing could be done: a port in use, a daemon out of reach, a target that fails its test
write, letters none of which can be redriven, an archive that fails `verify`), 2 a usage or
config error (argparse's own code: an unknown option or target, a bad query, time or count, a
config that does not load, a storage.path another daemon holds or whose journal a newer
event-router wrote).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from router.cli.checks import check, validate_target
from router.cli.common import EXIT_CODES, EXIT_CONFIG, loaded
from router.cli.evidence import keygen, verify
from router.cli.parser import build_parser
from router.cli.reads import dlq, query, tail
from router.cli.serve import serve, worker
from router.completion import script
from router.resources import default_config_path
from router.server import WORKER_COMMAND

__all__ = ["EXIT_CODES", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == [WORKER_COMMAND]:
        sys.exit(worker(arguments[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        print(script(parser, args.shell), end="")
        return
    if args.command == "query":
        sys.exit(query(args))
    if args.command == "keygen":
        sys.exit(keygen(args.out))
    if args.command == "verify":
        sys.exit(verify(args))
    config_path = args.config or default_config_path()
    found = loaded(config_path)
    if found is None:
        sys.exit(EXIT_CONFIG)
    config, data = found
    if args.command == "validate-target":
        sys.exit(asyncio.run(validate_target(config, args.target_id)))
    if args.command == "dlq":
        sys.exit(dlq(args, config))
    if args.command == "tail":
        sys.exit(tail(args, config))
    if args.command == "check":
        check(config_path, config)
        return
    failed = serve(args, config_path, config, data)
    if failed:
        sys.exit(failed)
