"""TLS on the listener, with and without client certificates, with certificates made by
openssl (the `pki` fixture)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.config import ServerTlsConfig, parse_config
from router.daemon import Daemon
from router.errors import ConfigError
from router.server.servertls import server_context
from tests.conftest import StartDaemon
from tests.fakes import make_event
from tests.helpers import file_target


def tls_config(pki: Path, tmp_path: Path, **tls: Any) -> dict[str, Any]:
    return {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "tls": {
                "cert_file": str(pki / "server.pem"),
                "key_file": str(pki / "server.key"),
                **tls,
            },
        },
        "targets": [file_target("archive", tmp_path / "archive.ndjson")],
        "routes": [{"name": "all", "rules": [{"locations": ["*"], "target_ids": ["archive"]}]}],
    }


def client_context(pki: Path, *, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if with_cert:
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return context


async def post_event(url: str, context: ssl.SSLContext | None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/events", json=make_event(), ssl=context or False) as resp,
    ):
        return resp.status


async def test_the_listener_speaks_tls(
    start_daemon: StartDaemon, pki: Path, tmp_path: Path
) -> None:
    daemon: Daemon = await start_daemon(tls_config(pki, tmp_path))
    url = f"https://127.0.0.1:{daemon.port}"
    assert await post_event(url, client_context(pki, with_cert=False)) == 202
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await post_event(url, ssl.create_default_context())  # the system CAs do not know ours
    # Plain HTTP on the TLS port gets no HTTP answer.
    with pytest.raises(aiohttp.ClientError):
        await post_event(f"http://127.0.0.1:{daemon.port}", None)


async def test_client_certificates_are_required_with_a_client_ca(
    start_daemon: StartDaemon, pki: Path, tmp_path: Path
) -> None:
    daemon = await start_daemon(tls_config(pki, tmp_path, client_ca_file=str(pki / "ca.pem")))
    url = f"https://127.0.0.1:{daemon.port}"
    assert await post_event(url, client_context(pki, with_cert=True)) == 202
    with pytest.raises(aiohttp.ClientError):
        await post_event(url, client_context(pki, with_cert=False))


def test_unreadable_tls_files_are_config_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "server": {
                    "tls": {
                        "cert_file": str(tmp_path / "missing.pem"),
                        "key_file": str(tmp_path / "missing.key"),
                    }
                }
            }
        )
    assert info.value.problems == [
        f"server.tls.cert_file: cannot read '{tmp_path / 'missing.pem'}'",
        f"server.tls.key_file: cannot read '{tmp_path / 'missing.key'}'",
    ]


def test_a_key_that_does_not_match_is_a_config_error(pki: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load"):
        server_context(
            ServerTlsConfig(cert_file=str(pki / "server.pem"), key_file=str(pki / "client.key"))
        )
