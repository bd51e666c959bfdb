"""What every target that speaks HTTP shares: its session, client TLS, the POST, and how an
answer is classified.

Failures are classified like Fluent Bit's out_http: connection errors, timeouts, 408, 429 and
5xx may pass and are retryable (a Retry-After header is honoured); any other non-2xx answer is
permanent. Redirects are never followed: a client that follows a 301/302/303 turns the POST
into a body-less GET whose 200 would count as delivered (an SSO gateway or an http->https
proxy does this), so a 3xx is a permanent failure that names its Location. A batch's
idempotency key is derived from its event ids, so a receiver (or an object name) can recognise
a batch it already took when a retry follows a lost response.

Where a target the management API made may connect is checked twice: on its addresses when
the API takes it (router/config/crosscheck.py), and on every address its names resolve to when
it connects (`AddressBound`), since a name's owner may point it elsewhere in between (DNS
rebinding). One rule, `api_refusal`, serves both.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import hashlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from router import __version__
from router.errors import PermanentDeliveryError, RetryableDeliveryError
from router.events import Event
from router.masking import mask_url

RETRYABLE_STATUSES = frozenset({408, 429})
EXCERPT_BYTES = 512


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsClientConfig:
    """A CA bundle to trust instead of the system's, and a client certificate for mTLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


# The keys of a `tls` object that name files on the daemon's host, read when the target
# starts: the operator's to set; the management API refuses them (router/server/fileguard.py).
TLS_FILE_KEYS: Final = frozenset({"ca_file", "cert_file", "key_file"})

# The JSON Schema of a `tls` object (the http and syslog endpoints have one).
TLS_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "ca_file": {"type": "string", "minLength": 1},
        "cert_file": {"type": "string", "minLength": 1},
        "key_file": {"type": "string", "minLength": 1},
    },
    "dependentRequired": {"key_file": ["cert_file"]},
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def batch_key(batch: Sequence[Event]) -> str:
    """The same events in the same order always give the same key."""
    digest = hashlib.sha256()
    for event in batch:
        digest.update(event.id.encode())
        digest.update(b"\n")
    return digest.hexdigest()


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Addresses of cloud metadata services outside the link-local ranges (AWS's IPv6 one,
# Alibaba's): they answer an instance's credentials to whoever asks from the host.
METADATA_ADDRESSES: frozenset[IpAddress] = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200")
)
# IPv4 addresses written inside IPv6 ones that reach them: NAT64's well-known prefix.
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


def _as_ipv4(address: IpAddress) -> IpAddress:
    """The IPv4 address an IPv6 one reaches when it carries one (mapped, or NAT64)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in NAT64_PREFIX:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def kept_by_the_host(address: IpAddress) -> bool:
    """An address no target set through the API may reach: link-local (169.254.0.0/16, where
    clouds answer instance metadata and credentials; fe80::/10), a metadata service's,
    unspecified, multicast or IPv4's reserved 240.0.0.0/4; also when written inside an IPv6
    address. (IPv6's "reserved" ::/8 holds loopback, which `api_refusal` treats on its own.)"""
    address = _as_ipv4(address)
    return (
        address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or (isinstance(address, ipaddress.IPv4Address) and address.is_reserved)  # 240/4
        or address in METADATA_ADDRESSES
    )


def within(address: IpAddress, network: IpNetwork) -> bool:
    address = _as_ipv4(address) if address.version != network.version else address
    return address.version == network.version and address in network


def api_refusal(address: IpAddress, networks: Sequence[IpNetwork]) -> str | None:
    """Why a target the management API made may not connect to `address` (None: it may).
    Never an address the host keeps for itself; with `networks` (auth.api_target_networks)
    only inside them; without, anywhere but loopback, so that an admin token cannot make the
    daemon probe its own host's ports (the operator opens loopback by listing it)."""
    if kept_by_the_host(address):
        return (
            f"{address} is a link-local, metadata-service, multicast or unspecified address, "
            "where no target the management API made connects"
        )
    if networks:
        if not any(within(address, network) for network in networks):
            listed = ", ".join(str(n) for n in networks)
            return f"{address} is outside auth.api_target_networks ({listed})"
        return None
    if _as_ipv4(address).is_loopback:
        return (
            f"{address} is a loopback address, which targets the management API made reach "
            "only when auth.api_target_networks lists it"
        )
    return None


@dataclass(frozen=True, slots=True)
class AddressBound:
    """The bound on a target the management API made, applied when it connects: `hosts` are
    the names and addresses the API set (the rest of its endpoint is the operator's), and
    each address they resolve to must pass `api_refusal` with `networks`."""

    hosts: frozenset[str]
    networks: tuple[IpNetwork, ...] = ()

    @classmethod
    def build(cls, hosts: Sequence[str], networks: Sequence[str]) -> AddressBound:
        return cls(
            frozenset(host.lower() for host in hosts),
            tuple(ipaddress.ip_network(network, strict=False) for network in networks),
        )

    def applies(self, host: str) -> bool:
        return host.lower().strip("[]") in self.hosts

    def refusal(
        self, host: str, addresses: Sequence[str], *, every_host: bool = False
    ) -> str | None:
        """Why `host`, resolved to `addresses`, may not be connected to (None: it may). Only
        the hosts the API set are bounded, unless `every_host` (a Kafka broker a bootstrap
        broker the API set names: the API's choice too)."""
        if not (every_host or self.applies(host)):
            return None
        for text in addresses:
            why = api_refusal(ipaddress.ip_address(text.partition("%")[0]), self.networks)
            if why is not None:
                return (
                    f"not connected: {host!r} now resolves to {why} (a host the management "
                    "API set is checked again at each connection, against "
                    "auth.api_target_networks and the addresses a host keeps for itself)"
                )
        return None


class AddressRefusedError(OSError):
    """A resolved address a target's AddressBound refuses: no connection is made. EACCES with
    the reason as strerror, which aiohttp's connection error quotes."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EACCES, why)


def address_refused(exc: BaseException) -> AddressRefusedError | None:
    """The AddressRefusedError behind an error a client library wrapped (aiohttp's connection
    error, botocore's EndpointConnectionError), so its reason reaches write_status."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        error = stack.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, AddressRefusedError):
            return error
        kwargs = getattr(error, "kwargs", None)
        wrapped = kwargs.get("error") if isinstance(kwargs, dict) else None
        for inner in (error.__cause__, error.__context__, wrapped):
            if isinstance(inner, BaseException):
                stack.append(inner)
    return None


class BoundResolver(AbstractResolver):
    """aiohttp's resolver, checking every answer against a target's AddressBound before the
    connector may connect (the connector caches what passed, for its DNS cache's lifetime)."""

    def __init__(self, bound: AddressBound) -> None:
        self.bound = bound
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        why = self.bound.refusal(host, [result["host"] for result in results])
        if why is not None:
            raise AddressRefusedError(why)
        return results

    async def close(self) -> None:
        await self._resolver.close()


async def bound_address(
    host: str, port: int, bound: AddressBound | None, *, every_host: bool = False
) -> str:
    """Where to open a plain socket to `host` (syslog): the host itself when no bound applies,
    else the one address it resolved to and passed the bound, so the connection goes where
    the check looked (a second lookup could answer otherwise). Raises AddressRefusedError."""
    if bound is None or not (every_host or bound.applies(host)):
        return host
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    addresses = [str(info[4][0]) for info in infos]
    why = bound.refusal(host, addresses, every_host=every_host)
    if why is not None:
        raise AddressRefusedError(why)
    return addresses[0]


def new_session(
    timeout_s: float, tls: bool | ssl.SSLContext, bound: AddressBound | None = None
) -> aiohttp.ClientSession:
    """A keep-alive session for one target, with its timeout and TLS settings; a target the
    management API made checks where its names resolve before it connects (`bound`)."""
    resolver = BoundResolver(bound) if bound is not None and bound.hosts else None
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=aiohttp.TCPConnector(ssl=tls, resolver=resolver),
        headers={"User-Agent": f"event-router/{__version__}"},
    )


def tls_context(verify: bool, tls: TlsClientConfig | None) -> bool | ssl.SSLContext:
    """aiohttp's `ssl=`: the default checks, none, or a context with our CA and client cert."""
    if tls is None:
        return verify
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def raise_for_status(target_id: str, url: str, resp: aiohttp.ClientResponse) -> None:
    """Classify an answer: 2xx returns; 408, 429 and 5xx are retryable (with Retry-After);
    any other status is permanent, a redirect included (it is never followed, see above)."""
    if 200 <= resp.status < 300:
        return
    excerpt = (await resp.content.read(EXCERPT_BYTES)).decode("utf-8", "replace")
    message = f"HTTP {resp.status} from {url}"
    if 300 <= resp.status < 400:
        location = mask_url(resp.headers.get("Location", "(none)"))
        message += f": a redirect to {location}, not followed (configure the final URL)"
    if resp.status in RETRYABLE_STATUSES or resp.status >= 500:
        raise RetryableDeliveryError(
            target_id,
            message,
            status=resp.status,
            response_excerpt=excerpt,
            retry_after_s=parse_retry_after(resp.headers.get("Retry-After")),
        )
    raise PermanentDeliveryError(target_id, message, status=resp.status, response_excerpt=excerpt)


async def post(
    session: aiohttp.ClientSession,
    target_id: str,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    on_status: Callable[[aiohttp.ClientResponse], Awaitable[None]] | None = None,
) -> None:
    """POST one body; connection errors and timeouts become retryable errors. `on_status` may
    look at the answer first (e.g. a 401 that calls for a new token)."""
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            if on_status is not None:
                await on_status(resp)
            await raise_for_status(target_id, url, resp)
    except (aiohttp.ClientError, TimeoutError) as exc:
        kind = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        raise RetryableDeliveryError(
            target_id, f"POST {url}: {kind or type(exc).__name__}"
        ) from exc
