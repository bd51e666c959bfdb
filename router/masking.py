"""What a secret looks like when it is shown: the one place that masks URLs, headers and
endpoint data before they reach a log line, `/v1/status`, a dead letter or an API answer.

A URL can carry a secret two ways: its userinfo (`https://svc:<password>@host/`) and a query
value whose name says it is one (`?token=`, `&sig=`, `api_key=`). `mask_url` replaces both
and leaves everything else as written, so a masked URL still says where events go.
`mask_text` does the same for every URL inside a message (an aiohttp error quotes the URL
it failed on). Endpoint data shown by the API also hides the credential keys
(`SECRET_KEYS`) and the headers that carry credentials, or whose value came from a
`${env:}`/`${file:}` reference. This module imports nothing from the router, so the error
classes can mask their own messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

MASK: Final = "REDACTED"

# Config keys whose values are credentials, at any depth of an endpoint (and of `auth`).
SECRET_KEYS: Final = frozenset(
    {"api_key", "token", "password", "secret", "hash_key", "secret_access_key"}
)

# A header carrying a credential by its name; any header whose name looks like a secret
# (below) counts too.
SENSITIVE_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)

# Parts of a query or header name that mark its value as a secret (compared lower case,
# without `-`/`_`): `access_token`, `X-Auth-Token`, `apiKey`, `sig`, `client_secret`, ...
SECRET_NAME_PARTS: Final = (
    "token",
    "key",
    "secret",
    "password",
    "passwd",
    "pwd",
    "sig",
    "auth",
    "credential",
    "session",
)

_REFERENCE = re.compile(r"\$\{(?:env|file):[^}]*\}")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_USERINFO = re.compile(r"(//)[^/@?#]*@")


def secret_name(name: str) -> bool:
    """Whether a query parameter or header named `name` holds a secret."""
    flat = re.sub(r"[^a-z0-9]", "", name.lower())
    return any(part in flat for part in SECRET_NAME_PARTS)


def mask_url(url: str) -> str:
    """`url` with its userinfo and secret-named query values replaced by REDACTED; the URL
    unchanged, character for character, when it holds neither."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:
        return _USERINFO.sub(r"\1" + MASK + "@", url)
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if has_password else f"{MASK}@{hostport}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(secret_name(name) for name, _ in pairs):
        query = "&".join(
            f"{quote(name, safe='')}={MASK if secret_name(name) else quote(value, safe='')}"
            for name, value in pairs
        )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_text(text: str) -> str:
    """A message with every URL in it masked (error messages quote the URL they failed on)."""
    if "://" not in text:
        return text
    return _URL.sub(_mask_match, text)


def _mask_match(match: re.Match[str]) -> str:
    """A URL found in prose, without the punctuation that ends its sentence."""
    url = match.group(0)
    core = url.rstrip(".,;:!?)")
    return mask_url(core) + url[len(core) :]


def mask_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Headers as the API shows them: credentials and referenced values are REDACTED."""
    return {
        name: MASK
        if name.lower() in SENSITIVE_HEADERS
        or secret_name(name)
        or (isinstance(value, str) and "${" in value)
        else value
        for name, value in headers.items()
    }


def masked(value: Any, key: str = "") -> Any:
    """Endpoint data (at any depth) as the API shows it: credential keys REDACTED, headers
    masked, every URL masked. `key` is the name `value` is stored under."""
    if isinstance(value, dict):
        if key == "headers":
            return mask_headers(value)
        return {k: MASK if k in SECRET_KEYS else masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, key) for v in value]
    if isinstance(value, str):
        # A reference is shown masked too: in a URL it may stand for the password, and a
        # reference's value is an operator's secret even where its name is not.
        return mask_text(_REFERENCE.sub(MASK, value))
    return value


def keep_masked(new: Any, old: Any, key: str = "") -> Any:
    """A client that read a target back sends what it was shown (REDACTED secrets, masked
    URLs and headers): where a value is exactly the masked form of the stored one, keep the
    stored one."""
    if isinstance(new, dict) and isinstance(old, dict):
        shown = masked(old, key)
        return {
            k: old[k] if k in old and v == shown.get(k) else keep_masked(v, old.get(k), k)
            for k, v in new.items()
        }
    return new
