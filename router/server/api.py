"""The atracker-compatible management API: `/api/v2/targets`, `/api/v2/routes`, `/api/v2/settings`,
and our own `/api/v2/views` and `/api/v2/alerts` in the same conventions.

Requests and answers use atracker's v2 models, field names and status codes (201 on create,
201 on PUT settings, 204 on DELETE, errors as `{"trace", "status_code", "errors": [{"code",
"message"}]}`), so IBM's atracker SDKs and tools work against the daemon unchanged. Our own
target types and rule extensions (`actions`, `filter`) appear in the same models.

Every change edits the config *data* (the YAML as written, secrets still `${env:}`/`${file:}`
references), checks it exactly as `check` would, writes the YAML back atomically (temp file,
fsync, rename; the previous version kept as `<file>.prev`) so that a restart comes back with
it, and then applies it through the hot-reload path: a file that cannot be written changes
nothing (503 `config_not_written`), and a change refused as it is applied puts the previous
file back. Credentials come back masked. Every change
is an audit event from the router itself (event-router.target.create, ...), with the token's
name as the initiator. The admin token guards all of it (router/server/auth.py).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web

from router.config import (
    API_METADATA_FILE,
    Config,
    TargetConfig,
    archive_roots,
    daemons_iam_url,
    operators_hosts,
    parse_config,
    references,
    target_hosts,
    target_listener_problems,
    target_network_problems,
)
from router.errors import ConfigError, ConfigWriteError
from router.masking import keep_masked, masked
from router.observe.metrics import WriteStatus
from router.probe import ProbeResult, probe
from router.reload import config_digest
from router.selfevent import change_event, instance_crn
from router.server.answers import api_error_json, json_error, too_large_text
from router.server.auth import CALLER
from router.server.fileguard import daemon_file_problem, host_files, root_problem, same_at
from router.server.metadata import Metadata
from router.targets import TARGET_TYPES, build_target
from router.targets._net import AddressBound
from router.targets.file import FileEndpointConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ConfigSource:
    """The running config as data (references unresolved) and the file it came from, if any."""

    path: Path | None
    data: dict[str, Any]


Change = Callable[[Config, ConfigSource], Awaitable[tuple[Config, ConfigSource]]]


class ConfigEditor(Protocol):
    """The running config as the API sees it: read it, and change it through `edit`."""

    @property
    def config(self) -> Config:
        """The config running now."""

    @property
    def source(self) -> ConfigSource:
        """The running config as data, and its file."""

    async def edit(self, change: Change, *, initiator: str) -> None:
        """Under the config lock: `change` builds the new config and its data from the running
        ones; apply it through the reload path (raising ConfigError if refused), adopt the
        data, and write it back to the file. Nothing else changes the config in between."""

    async def share_metadata(self, document: dict[str, Any]) -> None:
        """Hand the API's metadata to every router that runs the same shared config (so each
        answers the same timestamps and versions); nothing without one. Never raises."""


class ApiError(Exception):
    """An answer in atracker's error shape."""

    def __init__(self, status: int, code: str, message: str, subject: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.subject = subject  # what a refused change was about, for its audit event


Handler = Callable[[web.Request], Awaitable[web.Response]]

# atracker's own words for a failed test write to a COS bucket (its ts-07).
COS_WRITE_TEST_FAILED = (
    "Your request to test a target has failed because the target details are not valid. "
    "The service could not write to the Cloud Object Storage bucket that is configured."
)
# The test writes atracker runs on create, update and validate, and how it answers a failed
# one (its ts-07 and ts-17). atracker documents no code for Event Streams; ours follows COS's.
WRITE_TESTS: dict[str, tuple[str, str]] = {
    "cloud_object_storage": ("cos_write_test_failed", COS_WRITE_TEST_FAILED),
    "event_streams": (
        "event_streams_write_test_failed",
        "Your request to test a target has failed because the target details are not valid. "
        "The service could not write to the Event Streams topic that is configured.",
    ),
}


def write_test_failed(target_type: str, why: str) -> ApiError:
    """The 400 atracker answers for a test write the destination refused, with our reason."""
    code, message = WRITE_TESTS[target_type]
    return ApiError(400, code, f"{message} ({why})")


# atracker's target types this daemon does not deliver to, and why.
UNSUPPORTED_TYPES = {
    "app_config": (
        "target_type 'app_config' is not supported: atracker sends App Configuration events "
        "from its own source regions under its service-to-service authorisation, which a "
        "self-hosted router cannot act for; use an http target to the instance instead"
    ),
}
# What the management API returns but keeps outside the endpoint: atracker's target fields.
MANAGED_BY = ("account", "enterprise")
_REQUIRED = re.compile(r"^(?P<where>[^:]*): '(?P<name>[^']+)' is a required property$")


def as_sent(problem: str, prefix: str) -> str:
    """A config problem about the item a request sent, named as the caller sent it
    (`cos_endpoint.bucket: a required property`, not `targets[3].cos_endpoint: ...`)."""
    if not problem.startswith(prefix):
        return problem
    problem = problem[len(prefix) :]
    required = _REQUIRED.match(problem)
    if required:
        where = required["where"]
        name = (
            f"{where}.{required['name']}" if where and where != "(top level)" else required["name"]
        )
        return f"{name}: required"
    return problem


class ManagementApi:
    """The handlers, over the config editor and four questions for the running daemon."""

    def __init__(
        self,
        editor: ConfigEditor,
        *,
        port: Callable[[], int],
        write_status: Callable[[str], WriteStatus | None],
        probe: Callable[[str], Awaitable[ProbeResult]],
        record: Callable[[dict[str, Any]], Awaitable[None]],
        alert_states: Callable[[], dict[str, dict[str, Any]]] = dict,
        can_record: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.editor = editor
        # False while the journal cannot write: a change would run with its audit event only
        # kept in memory (the daemon's OwnEvents), so none is applied then.
        self.can_record = can_record
        self.alert_states = alert_states  # per alert: state, matches in window, last firing
        self.port = port  # the bound port: a target must not point back at it
        self.write_status = write_status
        self.probe = probe
        self.record = record  # journals an event of the router itself, never raises
        # API edits one at a time: a refused one puts the metadata back as it found it.
        self._editing = asyncio.Lock()
        storage = Path(editor.config.storage.path)
        self.meta = Metadata.load(storage / API_METADATA_FILE if editor.source.path else None)

    def routes(self, app: web.Application) -> None:
        add = app.router.add_route
        add("POST", "/api/v2/targets", self._wrap(self.create_target, "target.create"))
        add("GET", "/api/v2/targets", self._wrap(self.list_targets))
        add("GET", "/api/v2/targets/{id}", self._wrap(self.get_target))
        add("PUT", "/api/v2/targets/{id}", self._wrap(self.replace_target, "target.update"))
        add("DELETE", "/api/v2/targets/{id}", self._wrap(self.delete_target, "target.delete"))
        add(
            "POST",
            "/api/v2/targets/{id}/validate",
            self._wrap(self.validate_target, "target.validate"),
        )
        add("POST", "/api/v2/routes", self._wrap(self.create_route, "route.create"))
        add("GET", "/api/v2/routes", self._wrap(self.list_routes))
        add("GET", "/api/v2/routes/{id}", self._wrap(self.get_route))
        add("PUT", "/api/v2/routes/{id}", self._wrap(self.replace_route, "route.update"))
        add("DELETE", "/api/v2/routes/{id}", self._wrap(self.delete_route, "route.delete"))
        for kind in ("view", "alert"):
            base = f"/api/v2/{kind}s"
            add("POST", base, self._wrap(self._create_named(kind), f"{kind}.create"))
            add("GET", base, self._wrap(self._list_named(kind)))
            add("GET", base + "/{id}", self._wrap(self._get_named(kind)))
            add("PUT", base + "/{id}", self._wrap(self._replace_named(kind), f"{kind}.update"))
            add("DELETE", base + "/{id}", self._wrap(self._delete_named(kind), f"{kind}.delete"))
        add("GET", "/api/v2/settings", self._wrap(self.get_settings))
        add("PUT", "/api/v2/settings", self._wrap(self.put_settings, "setting.update"))

    def _wrap(self, handler: Handler, action: str | None = None) -> Handler:
        """Errors in atracker's shape; a refused change (`action`) is always audited, whatever
        refused it: the body, a lookup or the config check."""

        async def wrapped(request: web.Request) -> web.Response:
            try:
                return await handler(request)
            except ApiError as exc:
                if action is not None:
                    kind = action.split(".", 1)[0]
                    subject = exc.subject or f"{kind}:{request.match_info.get('id', 'account')}"
                    config = self.editor.config
                    await self._audit(
                        request, action, subject, config, None, exc.message, status=exc.status
                    )
                return json_error(
                    exc.status,
                    exc.code,
                    exc.message,
                    # As ingest's 503s: a full disk or a failing journal passes.
                    headers={"Retry-After": "1"} if exc.status == 503 else None,
                    body=api_error_json,
                )

        return wrapped

    # -- helpers -------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            # A browser may send text/plain across sites without asking first; JSON it may not.
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type {request.content_type!r}: send application/json",
            )
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            # The body is read as it came (the server does not inflate): say so, rather than
            # call the compressed bytes broken JSON.
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Encoding {encoding!r}: the management API takes uncompressed JSON",
            )
        try:
            body = orjson.loads(await request.read())
        except web.HTTPRequestEntityTooLarge as exc:
            # aiohttp's own refusal (client_max_size), made an ApiError so that it is audited.
            raise ApiError(
                413, "body_too_large", too_large_text(self.editor.config.server.max_body_bytes)
            ) from exc
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
        key = TARGET_TYPES[raw["target_type"]].endpoint_key
        status = self.write_status(target_id)
        model: dict[str, Any] = {
            "id": target_id,
            "name": raw.get("name", target_id),
            "crn": instance_crn(f"target:{target_id}"),
            "target_type": raw["target_type"],
            **({"region": raw["region"]} if "region" in raw else {}),
            key: masked(raw[key], key),
            "write_status": status.as_dict() if status else {"status": "success"},
            "created_at": self.meta.created.get(f"target:{target_id}", ""),
            "updated_at": self.meta.updated.get(f"target:{target_id}", ""),
            "api_version": 2,
            "managed_by": raw.get("managed_by", "account"),
        }
        return model

    async def _first_seen(self) -> None:
        """Give the YAML's targets and routes their creation time the first time the API
        shows them (kept in the metadata file, so a restart shows the same)."""
        data = self.editor.source.data
        keys = [f"target:{t['id']}" for t in data.get("targets") or []]
        keys += [f"route:{r.get('id', r['name'])}" for r in data.get("routes") or []]
        async with self._editing:
            if self.meta.seen(keys):
                await self._save_meta()

    async def _save_meta(self) -> None:
        """Save what a read added (first sightings), and share it."""
        await self._write_meta(self.meta.save)
        await self.editor.share_metadata(copy.deepcopy(self.meta.document()))

    async def _commit_meta(self, staged: list[Path]) -> None:
        """Put the metadata staged for an applied change in place, and share it."""
        await self._write_meta(self.meta.commit, staged)
        await self.editor.share_metadata(copy.deepcopy(self.meta.document()))

    async def _write_meta(self, write: Callable[..., None], *args: Any) -> None:
        """Save the metadata, or put a change's staged file in place: a failure (a full
        disk; for the rename, not expected) is a warning, not a failed read or change: the
        metadata stays in memory and goes out with the next write."""
        try:
            await asyncio.to_thread(write, *args)
        except OSError as exc:
            log.warning("the API's metadata could not be saved (kept in memory): %s", exc)

    async def adopt_meta(self, document: Mapping[str, Any]) -> None:
        """Metadata another router shared (see ConfigEditor.share_metadata). Between API
        edits, so a refused one does not put back what was shared meanwhile. The caller must
        not hold the config lock, which an edit takes inside this one."""
        async with self._editing:
            self.meta.adopt(document)
            await self._write_meta(self.meta.save)

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
            "managed_by": raw.get("managed_by", "account"),
        }

    async def _apply(
        self,
        request: web.Request,
        action: str,
        subject: str,
        edit: Callable[[dict[str, Any]], Any],
        *,
        sent: Callable[[dict[str, Any]], str] | None = None,
    ) -> Any:
        """Edit a copy of the config data, check it as `check` would, apply it through the
        reload path, persist it, and audit the change. Nothing changes if any step refuses."""
        if self.can_record is not None and not await self.can_record():
            raise ApiError(
                503,
                "journal_unavailable",
                "the journal cannot write now (storage.path full or failing), so this change "
                "could not be audited; nothing was changed: retry later",
                subject,
            )
        # The config lock is held (by the editor) from the copy to the write: a SIGHUP reload
        # waiting for it applies on top of this edit, and this edit waits for a reload under
        # way. API edits take turns, so a refused one restores the metadata it found.
        async with self._editing:
            saved = self.meta.snapshot()
            result: Any = None
            configs: list[Config] = []  # the running one and the edited one, for the audit

            prefix = ""  # where the item the caller sent sits in the config
            staged: list[Path] = []  # the metadata's temp file, put in place once applied

            async def change(old: Config, source: ConfigSource) -> tuple[Config, ConfigSource]:
                nonlocal result, prefix
                data = copy.deepcopy(source.data)
                result = edit(data)
                prefix = sent(data) if sent is not None else ""
                # In a thread: the config's own ${file:} references are read again, and a
                # target's host may be looked up.
                new = await asyncio.to_thread(self._check, old, source.data, data)
                await self._test_write(old, new)
                staged[:] = await asyncio.to_thread(self.meta.stage)
                configs[:] = [old, new]
                return new, ConfigSource(source.path, data)

            try:
                try:
                    await self.editor.edit(change, initiator=self._who(request))
                except BaseException:
                    for temp in staged:
                        temp.unlink(missing_ok=True)
                    raise
            except ConfigWriteError as exc:
                self.meta.restore(saved)
                raise ApiError(
                    503,
                    "config_not_written",
                    f"{exc}; nothing was changed: try again once it can be written",
                    subject,
                ) from exc
            except ConfigError as exc:
                self.meta.restore(saved)
                problems = (
                    [as_sent(problem, prefix) for problem in exc.problems]
                    if prefix
                    else exc.problems
                )
                raise ApiError(400, "invalid_value", "; ".join(problems), subject) from exc
            except ApiError as exc:
                self.meta.restore(saved)  # a refused change changes nothing, versions included
                exc.subject = subject
                raise
            except BaseException:
                self.meta.restore(saved)
                raise
            await self._commit_meta(staged)
            old, new = configs
            await self._audit(request, action, subject, old, new, None)
            return result

    @staticmethod
    async def _test_write(running: Config, new: Config) -> None:
        """atracker test-writes to a COS bucket or an Event Streams topic when a target is
        created or updated and refuses the change when the write fails (its ts-06, ts-07,
        ts-17): a new or changed target of those types writes its test record before the
        change is applied, from a target of its own, so a refused write changes nothing."""
        was = {t.id: t for t in running.targets}
        for target in new.targets:
            before = was.get(target.id)
            if target.target_type not in WRITE_TESTS or (
                before is not None and before.endpoint == target.endpoint
            ):
                continue
            trial = build_target(target)
            try:
                result = await probe(trial)
            finally:
                await trial.close()
            if not result.ok:
                raise write_test_failed(target.target_type, result.message)

    def _check(self, running: Config, before: dict[str, Any], after: dict[str, Any]) -> Config:
        """The edited config, checked as `check` would and, for what the API changed, as an
        admin token's reach requires: no references, file targets under the archive roots,
        no target pointing back at this daemon."""
        old = {str(t.get("id")): t for t in before.get("targets") or []}
        raw = after.get("targets") or []
        problems = [
            f"{where}: a reference; ${{env:}} and ${{file:}} are for the operator's config "
            "file, the API does not resolve them"
            for i, target in enumerate(raw)
            for where in references(target, f"targets[{i}]")
            if not same_at(where.removeprefix(f"targets[{i}]"), target, old.get(target.get("id")))
        ]
        problems.extend(
            f"{where}: a file on the daemon's host, which the API does not read; TLS files "
            "are the operator's to set in the config file"
            for i, target in enumerate(raw)
            for where in host_files(target, f"targets[{i}]")
            if not same_at(where.removeprefix(f"targets[{i}]"), target, old.get(target.get("id")))
        )
        if problems:
            raise ConfigError("api", problems)
        new = parse_config(after, "api")
        roots = archive_roots(running)
        networks = running.auth.api_target_networks if running.auth is not None else ()
        was = {t.id: t for t in running.targets}
        bounded = list(new.targets)
        for i, target in enumerate(new.targets):
            before_target = was.get(target.id)
            if before_target is not None and before_target.endpoint == target.endpoint:
                continue  # the same endpoint: the operator's own, or checked when it came
            daemons_iam = daemons_iam_url(running, target)
            bounded[i] = self._mark_api_hosts(raw[i], target, before_target, networks, daemons_iam)
            endpoint = target.endpoint
            if isinstance(endpoint, FileEndpointConfig):
                others = new.targets[:i] + new.targets[i + 1 :]
                problem = root_problem(endpoint.path, roots) or daemon_file_problem(
                    endpoint.path, after, self.editor.source.path, others
                )
                if problem is not None:
                    problems.append(f"targets[{i}].file_endpoint.path: {problem}")
            problems.extend(target_listener_problems(i, target, running.server.host, self.port()))
            problems.extend(
                target_network_problems(i, target, before_target, networks, daemons_iam)
            )
        if problems:
            raise ConfigError("api", problems)
        return dataclasses.replace(new, targets=tuple(bounded))

    @staticmethod
    def _mark_api_hosts(
        raw: dict[str, Any],
        target: TargetConfig,
        before: TargetConfig | None,
        networks: tuple[str, ...],
        daemons_iam: str | None,
    ) -> TargetConfig:
        """Write down in the target's YAML (`api_hosts`) the hosts this change set, those the
        operator did not: each time the target connects, they are checked again against
        auth.api_target_networks (a name may resolve elsewhere later, DNS rebinding), also
        after a restart or a reload, which read them back from the YAML. The daemon's own
        IAM (`daemons_iam`) is the operator's, not this change's."""
        hosts = sorted(target_hosts(target, daemons_iam) - operators_hosts(before))
        if not hosts:
            raw.pop("api_hosts", None)
            return dataclasses.replace(target, bound=None)
        raw["api_hosts"] = hosts
        return dataclasses.replace(target, bound=AddressBound.build(hosts, networks))

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
        *,
        status: int = 400,
    ) -> None:
        caller = request.get(CALLER)
        who = self._who(request)
        body = change_event(
            action=action,
            subject=subject,
            who=who,
            address=caller.address if caller else request.remote or "",
            initial=config_digest(old),
            new=config_digest(new) if new is not None else None,
            failure=failure,
            status=status,
        )
        await self.record(body)

    # -- targets -------------------------------------------------------------------------------

    def _region_of(self, raw: dict[str, Any]) -> str | None:
        """A target's region: its own, else the metadata region (atracker's default)."""
        settings = self.editor.source.data.get("settings") or {}
        region = raw.get("region") or settings.get("metadata_region_primary")
        return str(region) if region else None

    async def list_targets(self, request: web.Request) -> web.Response:
        await self._first_seen()
        raw = self._targets(copy.deepcopy(self.editor.source.data))
        region = request.query.get("region")
        if region is not None:  # atracker: "Limit the query to the specified region"
            raw = [t for t in raw if self._region_of(t) == region]
        return self._json({"targets": [self.target_model(t) for t in raw]})

    async def get_target(self, request: web.Request) -> web.Response:
        await self._first_seen()
        raw = self._targets(copy.deepcopy(self.editor.source.data))
        return self._json(self.target_model(self._find(raw, request.match_info["id"], "target")))

    async def create_target(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        target_id = str(uuid.uuid4())
        target_type = str(body.get("target_type"))
        if target_type in UNSUPPORTED_TYPES:
            raise ApiError(400, "invalid_value", UNSUPPORTED_TYPES[target_type])
        if target_type not in TARGET_TYPES:
            raise ApiError(
                400,
                "invalid_value",
                f"target_type {target_type!r} is not one of {sorted(TARGET_TYPES)}",
            )
        key = TARGET_TYPES[target_type].endpoint_key
        raw: dict[str, Any] = {
            "id": target_id,
            "name": body.get("name", target_id),
            "target_type": target_type,
            # atracker's target fields, kept in the config beside the endpoint
            **{name: body[name] for name in ("region", "managed_by") if name in body},
            key: body.get(key),
        }
        self._permitted(raw)

        def edit(data: dict[str, Any]) -> dict[str, Any]:
            self._within_limit("target", len(self._targets(data)), code="target_limit_reached")
            self._targets(data).append(raw)
            if "region" in raw and not (data.get("settings") or {}).get("metadata_region_primary"):
                # atracker: "the location where the first target is created is automatically
                # configured as the metadata location".
                data.setdefault("settings", {})["metadata_region_primary"] = raw["region"]
            self.meta.touch(f"target:{target_id}", created=True)
            return raw

        await self._apply(
            request,
            "target.create",
            f"target:{target_id}",
            edit,
            sent=lambda data: f"targets[{len(self._targets(data)) - 1}].",
        )
        return self._json(self.target_model(raw), status=201)

    def _permitted(self, raw: dict[str, Any]) -> None:
        """atracker's region_not_allowed: a target's region outside permitted_target_regions."""
        settings = self.editor.source.data.get("settings") or {}
        permitted = settings.get("permitted_target_regions") or []
        region = self._region_of(raw)
        if permitted and region is not None and region not in permitted:
            raise ApiError(
                400,
                "region_not_allowed",
                "Your request has failed due to the region requested not being permitted. "
                f"Requested: {region}, Permitted: [{' '.join(permitted)}]",
            )

    async def replace_target(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        target_id = request.match_info["id"]
        self._find(self._targets(self.editor.source.data), target_id, "target")

        def edit(data: dict[str, Any]) -> dict[str, Any]:
            raw = self._find(self._targets(data), target_id, "target")
            if "target_type" in body and body["target_type"] != raw["target_type"]:
                raise ApiError(400, "invalid_value", "the target_type of a target cannot change")
            for name in ("region", "managed_by"):
                if name in body and body[name] != raw.get(
                    name, MANAGED_BY[0] if name == "managed_by" else None
                ):
                    raise ApiError(400, "invalid_value", f"the {name} of a target cannot change")
            key = TARGET_TYPES[raw["target_type"]].endpoint_key
            if "name" in body:
                raw["name"] = body["name"]
            if key in body:
                # atracker's SDK never sends a secret back, nor our extension fields: what
                # the body leaves out of the endpoint stays as it was.
                sent = body[key]
                if isinstance(sent, dict) and isinstance(raw[key], dict):
                    raw[key] = {**raw[key], **keep_masked(sent, raw[key])}
                else:
                    raw[key] = sent
            self.meta.touch(f"target:{target_id}")
            return raw

        def where(data: dict[str, Any]) -> str:
            ids = [str(t.get("id")) for t in self._targets(data)]
            return f"targets[{ids.index(target_id)}]." if target_id in ids else ""

        raw = await self._apply(request, "target.update", f"target:{target_id}", edit, sent=where)
        return self._json(self.target_model(raw))

    async def delete_target(self, request: web.Request) -> web.Response:
        target_id = request.match_info["id"]
        data = self.editor.source.data
        self._find(self._targets(data), target_id, "target")
        users = [
            f"route {route['name']!r}"
            for route in data.get("routes") or []
            if any(target_id in rule.get("target_ids", []) for rule in route["rules"])
        ]
        users += [
            f"alert {alert['name']!r}"
            for alert in data.get("alerts") or []
            if target_id in alert.get("target_ids", [])
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
        raw = self._find(self._targets(self.editor.source.data), target_id, "target")
        result = await self.probe(target_id)
        if not result.ok and raw["target_type"] in WRITE_TESTS:
            # atracker answers a failed test write with this error, not a target (the refusal
            # is audited by _wrap, with this message).
            raise write_test_failed(raw["target_type"], result.message)
        await self._audit(
            request,
            "target.validate",
            f"target:{target_id}",
            self.editor.config,
            self.editor.config,
            None if result.ok else result.message,
        )
        return self._json(self.target_model(raw))

    # -- routes --------------------------------------------------------------------------------

    async def list_routes(self, request: web.Request) -> web.Response:
        await self._first_seen()
        routes = self.editor.source.data.get("routes") or []
        return self._json({"routes": [self.route_model(r) for r in routes]})

    async def get_route(self, request: web.Request) -> web.Response:
        await self._first_seen()
        routes = self.editor.source.data.get("routes") or []
        return self._json(self.route_model(self._find(routes, request.match_info["id"], "route")))

    def _route_body(self, body: dict[str, Any], route_id: str) -> dict[str, Any]:
        if not isinstance(body.get("rules"), list) or "name" not in body:
            raise ApiError(400, "binding_error", "a route needs a name and a list of rules")
        self._within_route_limits(body["rules"])
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
        managed = {"managed_by": body["managed_by"]} if "managed_by" in body else {}
        return {"id": route_id, "name": body["name"], "rules": rules, **managed}

    def _within_route_limits(self, rules: list[Any]) -> None:
        """atracker's limits on one route (server.max_rules_per_route, max_locations_per_rule,
        max_target_ids_per_rule), in its words ("rules per route limit 10 is reached"), so an
        admin token cannot make a route that every event is planned against thousands of
        times. A route of no rules, and a rule's other faults, are left to the config check
        (the schema's `minItems: 1`, for the YAML too), which names them.

        The YAML is not refused past these, as it is not past server.max_routes or outside the
        archive roots: they bound what a token may make, while the file is the operator's, whose
        rules (with our `actions` and `filter`) may need more than atracker's, and a config that
        ran before an upgrade must not stop loading. A YAML route past them can be read through
        the API but replaced only within them."""
        server = self.editor.config.server
        if len(rules) > server.max_rules_per_route:
            raise ApiError(
                400,
                "invalid_value",
                f"rules per route limit {server.max_rules_per_route} is reached "
                f"({len(rules)} given; server.max_rules_per_route)",
            )
        for n, rule in enumerate(rules):
            for name in ("locations", "target_ids"):
                given = rule.get(name) if isinstance(rule, dict) else None
                limit: int = getattr(server, f"max_{name}_per_rule")
                if isinstance(given, list) and len(given) > limit:
                    raise ApiError(
                        400,
                        "invalid_value",
                        f"rules[{n}].{name}: {name} per rule limit {limit} is reached "
                        f"({len(given)} given; server.max_{name}_per_rule)",
                    )

    async def create_route(self, request: web.Request) -> web.Response:
        route_id = str(uuid.uuid4())
        raw = self._route_body(await self._body(request), route_id)

        def edit(data: dict[str, Any]) -> dict[str, Any]:
            self._within_limit("route", len(data.get("routes") or []))
            data.setdefault("routes", []).append(raw)
            self.meta.touch(f"route:{route_id}", created=True)
            self.meta.versions[route_id] = 0
            return raw

        await self._apply(
            request,
            "route.create",
            f"route:{route_id}",
            edit,
            sent=lambda data: f"routes[{len(data['routes']) - 1}].",
        )
        return self._json(self.route_model(raw), status=201)

    async def replace_route(self, request: web.Request) -> web.Response:
        route_id = request.match_info["id"]
        self._find(self.editor.source.data.get("routes") or [], route_id, "route")
        raw = self._route_body(await self._body(request), route_id)

        def edit(data: dict[str, Any]) -> dict[str, Any]:
            routes = data.setdefault("routes", [])
            old = self._find(routes, route_id, "route")
            raw["id"] = old.get("id", old["name"])
            if raw.setdefault("managed_by", old.get("managed_by", "account")) != old.get(
                "managed_by", "account"
            ):
                raise ApiError(400, "invalid_value", "the managed_by of a route cannot change")
            routes[routes.index(old)] = raw
            self.meta.touch(f"route:{route_id}")
            self.meta.versions[route_id] = self.meta.versions.get(route_id, 0) + 1
            return raw

        def where(data: dict[str, Any]) -> str:
            ids = [str(r.get("id", r["name"])) for r in data.get("routes") or []]
            return f"routes[{ids.index(route_id)}]." if route_id in ids else ""

        await self._apply(request, "route.update", f"route:{route_id}", edit, sent=where)
        return self._json(self.route_model(raw))

    async def delete_route(self, request: web.Request) -> web.Response:
        route_id = request.match_info["id"]
        self._find(self.editor.source.data.get("routes") or [], route_id, "route")

        def edit(data: dict[str, Any]) -> None:
            data["routes"] = [
                r for r in data.get("routes") or [] if str(r.get("id", r["name"])) != route_id
            ]

        await self._apply(request, "route.delete", f"route:{route_id}", edit)
        return web.Response(status=204)

    # -- views and alerts (ours; named, not numbered) --------------------------------------------

    VIEW_FIELDS = ("query",)
    ALERT_FIELDS = ("query", "view", "threshold", "absence", "target_ids", "cooldown_s")
    READ_ONLY = frozenset(
        {
            "crn",
            "created_at",
            "updated_at",
            "effective_query",
            "condition",
            "window_s",
            "state",
            "matches_in_window",
            "last_fired_at",
            "last_match_at",
            "changed_at",
            "watched_since",
            "matches",
            "firings",
        }
    )

    def named_model(self, kind: str, raw: dict[str, Any]) -> dict[str, Any]:
        """A view or an alert as the YAML holds it, with its CRN and timestamps; an alert
        also with the query it runs and its live state (for the console)."""
        name = str(raw["name"])
        fields = self.VIEW_FIELDS if kind == "view" else self.ALERT_FIELDS
        model: dict[str, Any] = {
            "name": name,
            "crn": instance_crn(f"{kind}:{name}"),
            **{k: raw[k] for k in fields if k in raw},
        }
        if kind == "alert":
            config = next((a for a in self.editor.config.alerts if a.name == name), None)
            if config is not None:
                model["cooldown_s"] = config.cooldown_s
                model["effective_query"] = str(config.query)
                model["condition"] = "presence" if config.threshold else "absence"
                model["window_s"] = config.window_s
                if config.threshold is not None:
                    model["threshold"] = {
                        "count": config.threshold.count,
                        "window_s": config.threshold.window_s,
                    }
                else:
                    model["absence"] = {"window_s": config.window_s}
            model.update(self.alert_states().get(name, {"state": "ok"}))
        model["created_at"] = self.meta.created.get(f"{kind}:{name}", "")
        model["updated_at"] = self.meta.updated.get(f"{kind}:{name}", "")
        return model

    def _named_body(self, kind: str, body: dict[str, Any], name: str | None) -> dict[str, Any]:
        """The YAML entry for a view or an alert: its name and the fields of its kind (the
        config check says what is wrong with them, naming the field)."""
        given = body.get("name", name)
        if not isinstance(given, str) or not given:
            raise ApiError(400, "binding_error", f"a {kind} needs a name (a string)")
        if name is not None and given != name:
            raise ApiError(400, "invalid_value", f"the name of a {kind} cannot change")
        fields = self.VIEW_FIELDS if kind == "view" else self.ALERT_FIELDS
        # What a read answers besides the fields is ignored: a client may send back what it
        # read, as with targets.
        unknown = sorted(set(body) - {"name", *fields, *self.READ_ONLY})
        if unknown:
            raise ApiError(
                400, "invalid_value", f"unknown field(s) of the {kind}: {', '.join(unknown)}"
            )
        return {"name": given, **{k: body[k] for k in fields if k in body}}

    def _list_named(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            items = self.editor.source.data.get(f"{kind}s") or []
            return self._json({f"{kind}s": [self.named_model(kind, raw) for raw in items]})

        return handler

    def _get_named(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            items = self.editor.source.data.get(f"{kind}s") or []
            raw = self._find(items, request.match_info["id"], kind)
            return self._json(self.named_model(kind, raw))

        return handler

    def _create_named(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            body = await self._body(request)
            try:
                raw = self._named_body(kind, body, None)
            except ApiError as exc:  # audited under the name it asked for, if it gave one
                exc.subject = (
                    f"{kind}:{body.get('name') if isinstance(body.get('name'), str) else '-'}"
                )
                raise
            subject = f"{kind}:{raw['name']}"

            def edit(data: dict[str, Any]) -> None:
                items = data.setdefault(f"{kind}s", [])
                self._within_limit(kind, len(items))
                items.append(raw)
                self.meta.touch(subject, created=True)

            await self._apply(request, f"{kind}.create", subject, edit)
            return self._json(self.named_model(kind, raw), status=201)

        return handler

    def _within_limit(self, kind: str, count: int, *, code: str = "limit_reached") -> None:
        """server.max_alerts / max_views / max_targets / max_routes: how many the API lets
        exist before it creates one."""
        limit: int = getattr(self.editor.config.server, f"max_{kind}s")
        if count >= limit:
            raise ApiError(
                400,
                code,
                f"{kind}s: there are {count} {kind}s, at most server.max_{kind}s ({limit}) "
                f"through the management API; delete a {kind} first",
            )

    def _replace_named(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            name = request.match_info["id"]
            self._find(self.editor.source.data.get(f"{kind}s") or [], name, kind)
            raw = self._named_body(kind, await self._body(request), name)

            def edit(data: dict[str, Any]) -> None:
                items = data.setdefault(f"{kind}s", [])
                items[items.index(self._find(items, name, kind))] = raw
                self.meta.touch(f"{kind}:{name}")

            await self._apply(request, f"{kind}.update", f"{kind}:{name}", edit)
            return self._json(self.named_model(kind, raw))

        return handler

    def _delete_named(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            name = request.match_info["id"]
            data = self.editor.source.data
            self._find(data.get(f"{kind}s") or [], name, kind)
            users = [
                f"alert {alert['name']!r}"
                for alert in data.get("alerts") or []
                if kind == "view" and alert.get("view") == name
            ]
            if users:
                raise ApiError(
                    409, "view_in_use", f"view {name} is still used by {', '.join(users)}"
                )

            def edit(data: dict[str, Any]) -> None:
                data[f"{kind}s"] = [i for i in data.get(f"{kind}s") or [] if i["name"] != name]

            await self._apply(request, f"{kind}.delete", f"{kind}:{name}", edit)
            return web.Response(status=204)

        return handler

    # -- settings ------------------------------------------------------------------------------

    def settings_model(self) -> dict[str, Any]:
        """atracker's settings from the config's `settings` (older daemons kept the atracker
        fields in the metadata file: read there when the config has none). An unset metadata
        region is left out, as atracker leaves it until the first target is created."""
        settings = {**self.meta.settings, **(self.editor.source.data.get("settings") or {})}
        return {
            "default_targets": list(settings.get("default_targets", [])),
            "permitted_target_regions": list(settings.get("permitted_target_regions", [])),
            **{
                name: settings[name]
                for name in ("metadata_region_primary", "metadata_region_backup")
                if settings.get(name) and settings[name] != "local"
            },
            "private_api_endpoint_only": settings.get("private_api_endpoint_only", False),
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
            # A full replacement, as atracker's: what the body leaves out is reset.
            settings = data.setdefault("settings", {})
            settings["default_targets"] = defaults
            settings["permitted_target_regions"] = body.get("permitted_target_regions", [])
            for name in ("metadata_region_primary", "private_api_endpoint_only"):
                settings[name] = body[name]
            if "metadata_region_backup" in body:
                settings["metadata_region_backup"] = body["metadata_region_backup"]
            else:
                settings.pop("metadata_region_backup", None)
            self.meta.settings.clear()  # the config holds them now

        await self._apply(
            request, "setting.update", "setting:account", edit, sent=lambda data: "settings."
        )
        return self._json(self.settings_model(), status=201)
