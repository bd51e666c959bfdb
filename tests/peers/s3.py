"""A real S3-compatible server on loopback: moto's server mode, behind a forwarder for outages.

moto (`moto[server]`, `python -m moto.server`) answers the S3 REST API with SigV4-signed
requests as botocore makes them: buckets, PUT/GET/LIST, multipart uploads. It keeps objects in
memory only, so a restart of moto itself would lose the bucket a test wrote to. The endpoint
the tests use is therefore a small TCP forwarder in front of moto: `stop()`, `kill()`,
`pause()` and `restart()` act on that front door (connections reset or hang, new ones are
refused) while the store behind it keeps every object, which is what an outage test of the
COS target needs to count "every event arrived once". `store` is moto's own process, for a
test that wants the store itself to die.

moto accepts any access key and secret (it does not check signatures unless told to with IAM
users of its own); a refused write is a bucket that does not exist.
"""

from __future__ import annotations

import http.client
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from tests.peers._process import ServerProcess, free_ports, port_open

ACCESS_KEY_ID = "test-hmac-access-key-id"
SECRET_ACCESS_KEY = "test-hmac-secret-access-key"
REGION = "us-south"
"""An IBM COS region name; moto takes any region in SigV4's scope."""


def http_status(port: int, method: str, path: str, body: bytes | None = None) -> int:
    """The status of a plain request to 127.0.0.1:port (0 when nothing answers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


class MotoServer(ServerProcess):
    """moto's server mode as a process; its state lives in its memory only."""

    name = "moto"
    start_timeout_s: ClassVar[float] = 60.0  # importing moto takes seconds on a busy machine

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.choose_ports()

    def choose_ports(self) -> None:
        self.port = free_ports(1)[0]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self) -> bool:
        # The moto-api's dashboard answers once the app is built and listening.
        return http_status(self.port, "GET", "/moto-api/") == 200

    def reset(self) -> None:
        """Forget every bucket and object (between tests sharing one server)."""
        status = http_status(self.port, "POST", "/moto-api/reset")
        if status != 200:
            raise AssertionError(f"moto reset answered {status}")


class Forwarder(ServerProcess):
    """A TCP forwarder from `port` to `target_port` (tests/peers/_tcp_forward.py)."""

    name = "forwarder"
    start_timeout_s: ClassVar[float] = 15.0
    stop_timeout_s: ClassVar[float] = 5.0

    def __init__(self, workdir: Path, *, target_port: int) -> None:
        super().__init__(workdir)
        self.target_port = target_port
        self.choose_ports()

    def choose_ports(self) -> None:
        self.port = free_ports(1)[0]

    def command(self) -> list[str]:
        script = Path(__file__).with_name("_tcp_forward.py")
        return [sys.executable, str(script), str(self.port), str(self.target_port)]

    def ready(self) -> bool:
        return port_open(self.port)


class S3Server:
    """moto behind a forwarder: an S3 endpoint whose outages keep the objects."""

    def __init__(self, workdir: Path, *, region: str = REGION) -> None:
        self.store = MotoServer(workdir / "moto")
        self.front = Forwarder(workdir / "front", target_port=self.store.port)
        self.region = region
        self.access_key_id = ACCESS_KEY_ID
        self.secret_access_key = SECRET_ACCESS_KEY

    @property
    def endpoint_url(self) -> str:
        """What a client (and the COS target's `endpoint`) connects to."""
        return f"http://127.0.0.1:{self.front.port}"

    @property
    def start_seconds(self) -> list[float]:
        return self.store.start_seconds

    def client_config(self) -> dict[str, Any]:
        """Keyword arguments for botocore's / aiobotocore's `create_client("s3", ...)`."""
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
        }

    def start(self) -> Self:
        self.store.start()
        self.front.target_port = self.store.port  # the store's first start may move it
        self.front.start()
        return self

    def stop(self) -> None:
        """The endpoint goes down cleanly: new connections are refused; objects stay."""
        self.front.stop()

    def kill(self) -> None:
        """The endpoint dies: open connections reset, new ones refused; objects stay."""
        self.front.kill()

    def pause(self) -> None:
        """The endpoint hangs: connections open but nothing answers (timeouts)."""
        self.front.pause()

    def resume(self) -> None:
        self.front.resume()

    def restart(self) -> Self:
        self.front.restart()
        return self

    async def astart(self) -> Self:
        await self.front.astart()
        return self

    async def astop(self) -> None:
        await self.front.astop()

    async def akill(self) -> None:
        await self.front.akill()

    async def arestart(self) -> Self:
        await self.front.arestart()
        return self

    def reset(self) -> None:
        """Forget every bucket and object."""
        self.store.reset()

    def create_bucket(self, name: str) -> None:
        """Make a bucket in `region`, as an operator would before pointing a target at it."""
        # moto does not check signatures and takes an unsigned request as S3's.
        location = (
            '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<LocationConstraint>{self.region}</LocationConstraint></CreateBucketConfiguration>"
        )
        status = http_status(self.store.port, "PUT", f"/{name}", location.encode())
        if status != 200:
            raise AssertionError(f"creating bucket {name} answered {status}")

    def close(self) -> None:
        """Stop both processes."""
        self.front.stop()
        self.store.stop()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
