"""GET /console: the operator's page, static files shipped in the package (server/static/).

The page carries no data. Its scripts ask the admin endpoints for everything they show
(/v1/status, /v1/tail, /v1/search, /v1/deadletters, /api/v2/...), with the admin token the
operator typed once per browser session (kept in sessionStorage, sent as `Authorization:
Bearer`, never put in a URL). So the page and its files are open routes (server/auth.py),
like /openapi.json, and every byte of data stays behind the guard.

The files are read once, when the app is built, and served only by name from that set: no
path from a request ever reaches the file system. Every answer carries a strict
Content-Security-Policy (scripts and styles from this origin only, no inline script, calls
to this origin only, never framed) and tells browsers not to sniff, frame or refer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Final

from aiohttp import web

from router.errors import RequestError
from router.intake.http import error_response

CONTENT_TYPES: Final = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
CSP: Final = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # A daemon upgrade ships new files: the browser asks again rather than mixing versions.
    "Cache-Control": "no-cache",
}
INDEX: Final = "index.html"


def load_files() -> dict[str, tuple[bytes, str]]:
    """The page's files by name, with their content types (only the types above)."""
    found: dict[str, tuple[bytes, str]] = {}
    for item in resources.files("router.server").joinpath("static").iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in CONTENT_TYPES:
            found[item.name] = (item.read_bytes(), CONTENT_TYPES[suffix])
    return found


@dataclass(slots=True)
class ConsolePage:
    """The handlers, over the files read at start."""

    files: dict[str, tuple[bytes, str]] = field(default_factory=load_files)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/console", self.index)
        app.router.add_get("/console/{name}", self.file)

    async def index(self, request: web.Request) -> web.Response:
        return self._serve(INDEX)

    async def file(self, request: web.Request) -> web.Response:
        return self._serve(request.match_info["name"])

    def _serve(self, name: str) -> web.Response:
        found = self.files.get(name)
        if found is None:
            response = error_response(RequestError(404, "not_found", f"no console file {name!r}"))
        else:
            body, content_type = found
            response = web.Response(body=body, content_type=content_type, charset="utf-8")
        response.headers.update(SECURITY_HEADERS)
        return response
