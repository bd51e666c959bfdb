"""The bodies of the daemon's error answers, in one place for every layer of the server that
answers one (the listener's middleware, auth's refusals, the management API, ingest's 413).

Two shapes: the daemon's own `{"error": {"code", "message"}}`, and under API_PREFIX atracker's
(a trace id, the status and a list of errors), so that atracker's SDKs pointed at the
management API read our refusals as theirs. Which shape an answer takes depends only on its
path: `error_body(path)`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Final

import orjson
from aiohttp import web

API_PREFIX: Final = "/api/v2/"

ErrorBody = Callable[[int, str, str], bytes]


def too_large_text(max_body_bytes: int) -> str:
    """What a 413 says, wherever the body was refused (aiohttp's reader, ingest, the API)."""
    return f"the body is larger than server.max_body_bytes ({max_body_bytes} bytes)"


def error_json(status: int, code: str, message: str) -> bytes:
    """The daemon's error body (router/intake/http.py's `error_response` writes the same)."""
    return orjson.dumps({"error": {"code": code, "message": message}})


def api_error_json(status: int, code: str, message: str) -> bytes:
    """The management API's error body, in atracker's shape."""
    return orjson.dumps(
        {
            "trace": str(uuid.uuid4()),
            "status_code": status,
            "errors": [{"code": code, "message": message}],
        }
    )


def error_body(path: str) -> ErrorBody:
    """The shape of an error answer to a request for `path`."""
    return api_error_json if path.startswith(API_PREFIX) else error_json


def json_error(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: ErrorBody = error_json,
) -> web.Response:
    """An error answer: `body` (`error_json`, or the management API's `api_error_json`)."""
    return web.Response(
        body=body(status, code, message),
        status=status,
        content_type="application/json",
        headers=headers,
    )
