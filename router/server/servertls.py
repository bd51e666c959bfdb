"""The listener's TLS context, from `server.tls`.

TLS 1.2 at least, the ssl module's default ciphers. With `client_ca_file` the handshake itself
requires a client certificate signed by that CA (mutual TLS), so a client without one never
reaches a handler; bearer tokens are still checked after it. A certificate or key that does
not load is a ConfigError, so `serve` stops with exit code 2 and says which file.
"""

from __future__ import annotations

import ssl

from router.config import ServerTlsConfig
from router.errors import ConfigError


def server_context(tls: ServerTlsConfig) -> ssl.SSLContext:
    """A server-side context with the certificate chain loaded and, optionally, client auth."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "server.tls", [f"cannot load {tls.cert_file!r} / {tls.key_file!r}: {exc}"]
        ) from exc
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "server.tls", [f"cannot load client_ca_file {tls.client_ca_file!r}: {exc}"]
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context
