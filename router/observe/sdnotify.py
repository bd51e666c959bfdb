"""Tells the service manager how start-up and shutdown are going (systemd's sd_notify protocol).

Under `Type=notify`, systemd passes `NOTIFY_SOCKET`: a unix datagram socket, a path or, when it
starts with `@`, a name in the abstract namespace. Each message is one datagram of newline-
separated `KEY=value` lines: `READY=1` once the daemon serves (what /readyz reports),
`STOPPING=1` when it starts to drain, `STATUS=...` a line `systemctl status` shows. Without
`NOTIFY_SOCKET` (a terminal, a container, the tests) every call does nothing. The protocol is a
few lines, so it is written here rather than taken as a dependency.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address(name: str) -> str | bytes:
    """A NOTIFY_SOCKET value as a socket address: `@name` is abstract (a leading NUL byte)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(*lines: str) -> bool:
    """Send `lines` (such as "READY=1", "STATUS=...") as one datagram; True if it was sent.

    A failure to send is logged, never raised: the service manager's bookkeeping must not
    stop the daemon."""
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    message = "\n".join(line.replace("\n", " ") for line in lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(name))
            sock.sendall(message)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", name, exc)
        return False
    return True
