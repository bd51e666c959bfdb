"""The atracker-compatible management API: `/api/v2/targets`, `/api/v2/routes`, `/api/v2/settings`.

Requests and answers use atracker's v2 models, field names and status codes (201 on create,
201 on PUT settings, 204 on DELETE, errors as `{"trace", "status_code", "errors": [{"code",
"message"}]}`), so IBM's atracker SDKs and tools work against the daemon unchanged. Our own
target types and rule extensions (`actions`, `filter`) appear in the same models.

Every change edits the config *data* (the YAML as written, secrets still `${env:}`/`${file:}`
references), checks it exactly as `check` would, applies it through the hot-reload path, and
then writes the YAML back atomically (temp file, fsync, rename; the previous version kept as
`<file>.prev`) so that a restart comes back with it. Credentials come back masked. Every change
is an audit event from the router itself (event-router.target.create, ...), with the token's
name as the initiator. The admin token guards all of it (router/auth.py).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import yaml
from aiohttp import web

from router.appendfile import replace_atomically
from router.auth import CALLER
from router.config import ENDPOINTS, SECRET_KEYS, Config, parse_config
from router.errors import ConfigError
from router.metrics import utc_iso
from router.reload import config_digest
from router.selfevent import instance_crn, router_event

if TYPE_CHECKING:
    from router.app import Daemon

log = logging.getLogger(__name__)

MASK = "REDACTED"
METADATA_FILE = "api-metadata.json"


@dataclass(slots=True)
class ConfigSource:
    """The running config as data (references unresolved) and the file it came from, if any."""

    path: Path | None
    data: dict[str, Any]


class ApiError(Exception):
    """An answer in atracker's error shape."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(status: int, code: str, message: str) -> bytes:
    return orjson.dumps(
        {
            "trace": str(uuid.uuid4()),
            "status_code": status,
            "errors": [{"code": code, "message": message}],
        }
    )


def masked(value: Any) -> Any:
    """Endpoint data with every credential replaced by REDACTED, at any depth."""
    if isinstance(value, dict):
        return {k: MASK if k in SECRET_KEYS else masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


@dataclass(slots=True)
class Metadata:
    """What atracker returns but our YAML does not hold: timestamps, route versions and the
    settings fields we accept and echo. Kept beside the journal."""

    path: Path | None
    created: dict[str, str] = field(default_factory=dict)
    updated: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> Metadata:
        if path is None or not path.exists():
            return cls(path)
        data = orjson.loads(path.read_bytes())
        return cls(path, data["created"], data["updated"], data["versions"], data["settings"])

    def touch(self, key: str, *, created: bool = False) -> None:
        now = utc_iso(time.time())
        if created or key not in self.created:
            self.created[key] = now
        self.updated[key] = now

    def save(self) -> None:
        if self.path is None:
            return
        body = orjson.dumps(
            {
                "created": self.created,
                "updated": self.updated,
                "versions": self.versions,
                "settings": self.settings,
            }
        )
        replace_atomically(self.path, body)


Handler = Callable[[web.Request], Awaitable[web.Response]]


class ManagementApi:
    """The handlers, bound to one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        storage = Path(daemon.config.storage.path)
        self.meta = Metadata.load(storage / METADATA_FILE if daemon.source.path else None)

    def routes(self, app: web.Application) -> None:
        add = app.router.add_route
        add("POST", "/api/v2/targets", self._wrap(self.create_target))
        add("GET", "/api/v2/targets", self._wrap(self.list_targets))
        add("GET", "/api/v2/targets/{id}", self._wrap(self.get_target))
        add("PUT", "/api/v2/targets/{id}", self._wrap(self.replace_target))
        add("DELETE", "/api/v2/targets/{id}", self._wrap(self.delete_target))
        add("POST", "/api/v2/targets/{id}/validate", self._wrap(self.validate_target))
        add("POST", "/api/v2/routes", self._wrap(self.create_route))
        add("GET", "/api/v2/routes", self._wrap(self.list_routes))
        add("GET", "/api/v2/routes/{id}", self._wrap(self.get_route))
        add("PUT", "/api/v2/routes/{id}", self._wrap(self.replace_route))
        add("DELETE", "/api/v2/routes/{id}", self._wrap(self.delete_route))
        add("GET", "/api/v2/settings", self._wrap(self.get_settings))
        add("PUT", "/api/v2/settings", self._wrap(self.put_settings))

    def _wrap(self, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return web.Response(
                    body=error_body(exc.status, exc.code, exc.message),
                    status=exc.status,
                    content_type="application/json",
                )

        return wrapped

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                400,
                "binding_error",
                "The input parameters in the request body are either incomplete or in the "
                f"wrong format: {exc.msg} at line {exc.lineno} column {exc.colno}",
            ) from exc
        if not isinstance(body, dict):
            raise ApiError(400, "binding_error", "the request body must be a JSON object")
        return body

    def _targets(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = data.setdefault("targets", [])
        return targets

    def _find(self, items: list[dict[str, Any]], item_id: str, kind: str) -> dict[str, Any]:
        for item in items:
            if str(item.get("id", item.get("name"))) == item_id:
                return item
        raise ApiError(
            404,
            "not_found",
            f"Your request has failed because the {kind} id {item_id} is not valid.",
        )

    def _json(self, body: Any, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")

    def target_model(self, raw: dict[str, Any]) -> dict[str, Any]:
        target_id = raw["id"]
        key = ENDPOINTS[raw["target_type"]][0]
        stats = self.daemon.target_stats.get(target_id)
        model: dict[str, Any] = {
            "id": target_id,
            "name": raw.get("name", target_id),
            "crn": instance_crn(f"target:{target_id}"),
            "target_type": raw["target_type"],
            key: masked(raw[key]),
            "write_status": stats.write_status.as_dict() if stats else {"status": "success"},
            "created_at": self.meta.created.get(f"target:{target_id}", ""),
            "updated_at": self.meta.updated.get(f"target:{target_id}", ""),
            "api_version": 2,
            "managed_by": "account",
        }
        return model

    def route_model(self, raw: dict[str, Any]) -> dict[str, Any]:
        route_id = str(raw.get("id", raw["name"]))
        return {
            "id": route_id,
            "name": raw["name"],
            "crn": instance_crn(f"route:{route_id}"),
            "version": self.meta.versions.get(route_id, 0),
            "rules": [
                {
                    "target_ids": list(rule.get("target_ids", [])),
                    "locations": list(rule.get("locations", [])),
                    **{k: rule[k] for k in ("actions", "filter") if k in rule},
                }
                for rule in raw["rules"]
            ],
            "created_at": self.meta.created.get(f"route:{route_id}", ""),
            "updated_at": self.meta.updated.get(f"route:{route_id}", ""),
            "api_version": 2,
            "managed_by": "account",
        }

    async def _apply(
        self, request: web.Request, action: str, subject: str, edit: Callable[[dict[str, Any]], Any]
    ) -> Any:
        """Edit a copy of the config data, check it as `check` would, apply it through the
        reload path, persist it, and audit the change. Nothing changes if any step refuses."""
        # The daemon's config lock, held from the copy to the write: a SIGHUP reload waiting
        # for it applies on top of this edit, and this edit waits for a reload under way.
        async with self.daemon.config_lock:
            source = self.daemon.source
            data = copy.deepcopy(source.data)
            result = edit(data)
            old = self.daemon.config
            try:
                new = parse_config(data, "api")
                await self.daemon.apply(new, initiator=self._who(request), audit=False)
            except ConfigError as exc:
                await self._audit(request, action, subject, old, None, "; ".join(exc.problems))
                raise ApiError(400, "invalid_value", "; ".join(exc.problems)) from exc
            self.daemon.source = ConfigSource(source.path, data)
            if source.path is not None:
                text = yaml.safe_dump(data, sort_keys=False).encode()
                await asyncio.to_thread(replace_atomically, source.path, text, keep_previous=True)
            await asyncio.to_thread(self.meta.save)
            await self._audit(request, action, subject, old, new, None)
            return result

    @staticmethod
    def _who(request: web.Request) -> str:
        caller = request.get(CALLER)
        principal = caller.principal if caller is not None else None
        return principal.name if principal is not None else "anonymous"

    async def _audit(
        self,
        request: web.Request,
        action: str,
        subject: str,
        old: Config,
        new: Config | None,
        failure: str | None,
    ) -> None:
        caller = request.get(CALLER)
        who = self._who(request)
        body = router_event(
            action=f"event-router.{action}",
            message=f"event-router: {action.replace('.', ' ')} {subject}"
            + (" -failure" if failure else ""),
            target={
                "id": instance_crn(subject),
                "name": subject.split(":", 1)[-1],
                "typeURI": f"event-router/{subject.split(':', 1)[0]}",
            },
            outcome="failure" if failure else "success",
            reason_code=400 if failure else 200,
            reason_type="Bad Request" if failure else "OK",
            severity="warning" if failure or action.endswith("delete") else "normal",
            initiator={
                "id": f"token-{who}",
                "name": who,
                "typeURI": "service/security/clientid",
                "credential": {"type": "token"},
                "host": {"address": caller.address if caller else request.remote or ""},
            },
            extra={
                "requestData": {
                    "updateType": action.rsplit(".", 1)[-1],
                    "initialValue": config_digest(old),
                    "newValue": config_digest(new) if new is not None else None,
                    **({"reasonForFailure": failure} if failure else {}),
                }
            },
        )
        await self.daemon.record_own(body)

    # -- targets -------------------------------------------------------------------------------

    async def list_targets(self, request: web.Request) -> web.Response:
        raw = self._targets(copy.deepcopy(self.daemon.source.data))
        return self._json({"targets": [self.target_model(t) for t in raw]})

    async def get_target(self, request: web.Request) -> web.Response:
        raw = self._targets(copy.deepcopy(self.daemon.source.data))
        return self._json(self.target_model(self._find(raw, request.match_info["id"], "target")))

    async def create_target(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        target_id = str(uuid.uuid4())
        target_type = str(body.get("target_type"))
        if target_type not in ENDPOINTS:
            raise ApiError(
                400,
                "invalid_value",
                f"target_type {target_type!r} is not one of {sorted(ENDPOINTS)}",
            )
        key = ENDPOINTS[target_type][0]
        raw = {
            "id": target_id,
            "name": body.get("name", target_id),
            "target_type": target_type,
            key: body.get(key),
        }

        def edit(data: dict[str, Any]) -> dict[str, Any]:
            self._targets(data).append(raw)
            self.meta.touch(f"target:{target_id}", created=True)
            return raw

        await self._apply(request, "target.create", f"target:{target_id}", edit)
        return self._json(self.target_model(raw), status=201)

    async def replace_target(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        target_id = request.match_info["id"]
        self._find(self._targets(self.daemon.source.data), target_id, "target")

        def edit(data: dict[str, Any]) -> dict[str, Any]:
            raw = self._find(self._targets(data), target_id, "target")
            if "target_type" in body and body["target_type"] != raw["target_type"]:
                raise ApiError(400, "invalid_value", "the target_type of a target cannot change")
            key = ENDPOINTS[raw["target_type"]][0]
            if "name" in body:
                raw["name"] = body["name"]
            if key in body:
                raw[key] = _keep_masked(body[key], raw[key])
            self.meta.touch(f"target:{target_id}")
            return raw

        raw = await self._apply(request, "target.update", f"target:{target_id}", edit)
        return self._json(self.target_model(raw))

    async def delete_target(self, request: web.Request) -> web.Response:
        target_id = request.match_info["id"]
        data = self.daemon.source.data
        self._find(self._targets(data), target_id, "target")
        users = [
            f"route {route['name']!r}"
            for route in data.get("routes") or []
            if any(target_id in rule.get("target_ids", []) for rule in route["rules"])
        ]
        if target_id in (data.get("settings") or {}).get("default_targets", []):
            users.append("the default targets")
        if users:
            raise ApiError(
                409, "target_in_use", f"target {target_id} is still used by {', '.join(users)}"
            )

        def edit(data: dict[str, Any]) -> None:
            data["targets"] = [t for t in self._targets(data) if t["id"] != target_id]

        await self._apply(request, "target.delete", f"target:{target_id}", edit)
        return web.Response(status=204)

    async def validate_target(self, request: web.Request) -> web.Response:
        target_id = request.match_info["id"]
        raw = self._find(self._targets(self.daemon.source.data), target_id, "target")
        result = await self.daemon.probe_target(target_id)
        await self._audit(
            request,
            "target.validate",
            f"target:{target_id}",
            self.daemon.config,
            self.daemon.config,
            None if result.ok else result.message,
        )
        return self._json(self.target_model(raw))

    # -- routes --------------------------------------------------------------------------------

    async def list_routes(self, request: web.Request) -> web.Response:
        routes = self.daemon.source.data.get("routes") or []
        return self._json({"routes": [self.route_model(r) for r in routes]})

    async def get_route(self, request: web.Request) -> web.Response:
        routes = self.daemon.source.data.get("routes") or []
        return self._json(self.route_model(self._find(routes, request.match_info["id"], "route")))

    @staticmethod
    def _route_body(body: dict[str, Any], route_id: str) -> dict[str, Any]:
        if not isinstance(body.get("rules"), list) or "name" not in body:
            raise ApiError(400, "binding_error", "a route needs a name and a list of rules")
        rules = []
        for rule in body["rules"]:
            if not isinstance(rule, dict):
                raise ApiError(400, "binding_error", "each rule must be an object")
            rules.append(
                {
                    "locations": rule.get("locations", ["*"]),
                    "target_ids": rule.get("target_ids", []),
                    **{k: rule[k] for k in ("actions", "filter") if k in rule},
                }
            )
        return {"id": route_id, "name": body["name"], "rules": rules}

    async def create_route(self, request: web.Request) -> web.Response:
        route_id = str(uuid.uuid4())
        raw = self._route_body(await self._body(request), route_id)

        def edit(data: dict[str, Any]) -> dict[str, Any]:
            data.setdefault("routes", []).append(raw)
            self.meta.touch(f"route:{route_id}", created=True)
            self.meta.versions[route_id] = 0
            return raw

        await self._apply(request, "route.create", f"route:{route_id}", edit)
        return self._json(self.route_model(raw), status=201)

    async def replace_route(self, request: web.Request) -> web.Response:
        route_id = request.match_info["id"]
        self._find(self.daemon.source.data.get("routes") or [], route_id, "route")
        raw = self._route_body(await self._body(request), route_id)

        def edit(data: dict[str, Any]) -> dict[str, Any]:
            routes = data.setdefault("routes", [])
            old = self._find(routes, route_id, "route")
            raw["id"] = old.get("id", old["name"])
            routes[routes.index(old)] = raw
            self.meta.touch(f"route:{route_id}")
            self.meta.versions[route_id] = self.meta.versions.get(route_id, 0) + 1
            return raw

        await self._apply(request, "route.update", f"route:{route_id}", edit)
        return self._json(self.route_model(raw))

    async def delete_route(self, request: web.Request) -> web.Response:
        route_id = request.match_info["id"]
        self._find(self.daemon.source.data.get("routes") or [], route_id, "route")

        def edit(data: dict[str, Any]) -> None:
            data["routes"] = [
                r for r in data.get("routes") or [] if str(r.get("id", r["name"])) != route_id
            ]

        await self._apply(request, "route.delete", f"route:{route_id}", edit)
        return web.Response(status=204)

    # -- settings ------------------------------------------------------------------------------

    def settings_model(self) -> dict[str, Any]:
        settings = self.daemon.source.data.get("settings") or {}
        return {
            "default_targets": list(settings.get("default_targets", [])),
            "permitted_target_regions": self.meta.settings.get("permitted_target_regions", []),
            "metadata_region_primary": self.meta.settings.get("metadata_region_primary", "local"),
            **(
                {"metadata_region_backup": self.meta.settings["metadata_region_backup"]}
                if "metadata_region_backup" in self.meta.settings
                else {}
            ),
            "private_api_endpoint_only": self.meta.settings.get("private_api_endpoint_only", False),
            "api_version": 2,
        }

    async def get_settings(self, request: web.Request) -> web.Response:
        return self._json(self.settings_model())

    async def put_settings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        for required in ("metadata_region_primary", "private_api_endpoint_only"):
            if required not in body:
                raise ApiError(400, "binding_error", f"{required} is required (a full replacement)")
        defaults = body.get("default_targets", [])
        if not isinstance(defaults, list) or len(defaults) > 2:
            raise ApiError(
                400,
                "invalid_value",
                "Your request has failed because default_targets per setting limit 2 is reached.",
            )

        def edit(data: dict[str, Any]) -> None:
            data.setdefault("settings", {})["default_targets"] = defaults
            for name in (
                "metadata_region_primary",
                "metadata_region_backup",
                "private_api_endpoint_only",
                "permitted_target_regions",
            ):
                if name in body:
                    self.meta.settings[name] = body[name]

        await self._apply(request, "setting.update", "setting:account", edit)
        return self._json(self.settings_model(), status=201)


def _keep_masked(new: Any, old: Any) -> Any:
    """A client that read a target back sends REDACTED for its secrets: keep the old value."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {
            k: old.get(k) if v == MASK and k in SECRET_KEYS else _keep_masked(v, old.get(k))
            for k, v in new.items()
        }
    return new
