"""The command line's clients: of a running daemon (dlq's redrive, tail) and of the archives
on disk (search, dlq's list and show).
"""

from __future__ import annotations

from router.config import Config


def base_url(config: Config, url: str | None = None) -> str:
    """Where a client finds the running daemon: `--url` when given, else the config's
    listener, over https when server.tls is on. Every client asks here, so `tail` and
    `dlq redrive` reach a TLS daemon alike."""
    if url:
        return url
    scheme = "https" if config.server.tls else "http"
    return f"{scheme}://{config.server.host}:{config.server.port}"
