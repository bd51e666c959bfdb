"""Certificates for peers that speak TLS on loopback: a CA and a server certificate, by openssl."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers._process import missing


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A CA (what clients trust) and a certificate for IP 127.0.0.1 signed by it."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    """Unencrypted PKCS#8, the form Java's PEM keystores and Go's crypto/tls both read."""


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_server_tls(directory: Path, *, common_name: str = "peer") -> ServerTls:
    """Make (or reuse) a throwaway CA and a 127.0.0.1 server certificate in `directory`."""
    if shutil.which("openssl") is None:
        missing("openssl", "apt-get install openssl")
    tls = ServerTls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if tls.cert_file.exists():
        return tls
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, csr, ext = directory / "ca.key", directory / "server.csr", directory / "server.ext"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={common_name}-test-ca", "-keyout", str(ca_key), "-out", str(tls.ca_file),
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common_name}",
        "-keyout", str(tls.key_file), "-out", str(csr),
    )  # fmt: skip
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(tls.ca_file), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(tls.cert_file),
    )  # fmt: skip
    return tls
