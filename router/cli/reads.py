"""The commands that read what the daemon keeps or serves: `dlq` (dead letters: list, show,
redrive), `query` (archives and COS buckets, no daemon needed) and `tail` (the live stream)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from router.cli.common import COS_SCHEME, EXIT_CONFIG, admin_token, cos_target, loaded, on_store
from router.config import Config
from router.resources import default_config_path

if TYPE_CHECKING:
    from datetime import datetime

    from router.query import Query


def dlq(args: argparse.Namespace, config: Config) -> int:
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


def query(args: argparse.Namespace) -> int:
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
    # A Path keeps no trailing slash: a key prefix either way.
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


def _view_query(name: str, config_path: Path | None) -> str | None:
    """The query of the config's view `name` (None, said on stderr, when there is none)."""
    path = config_path or default_config_path()
    found = loaded(path)
    if found is None:
        return None
    config, _ = found
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

    found = cos_target(args, path, "query")
    if isinstance(found, int):
        return found
    target, prefix, _ = found
    return on_store(
        "query",
        lambda: search_bucket(
            query,
            target.objects(prefix),
            since=since,
            until=until,
            limit=args.limit,
            fmt=args.format,
        ),
        target,
    )


def tail(args: argparse.Namespace, config: Config) -> int:
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
