"""Builds the daemon from a Config and runs its lifecycle.

Start inside-out: validator and routes, journal (recovering what a previous run left, and
dead-lettering the backlog of targets the config no longer has), targets, delivery workers,
then the HTTP runner and finally the listening socket; /readyz turns 200 last. Stop in reverse:
close the socket and finish in-flight requests, let each worker deliver what it holds within
`shutdown.drain_timeout_s` (what is left stays in the journal for the next start), close the
targets and the journal, and log one summary line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from router import __version__
from router.alerts.watch import AlertWatch
from router.config import (
    Config,
    RefusalEventsConfig,
    TargetConfig,
    config_warnings,
    load_config_and_data,
    parse_config,
    undo_write_back,
    write_back,
)
from router.deadletter import DeadLetters, target_removed
from router.delivery import DeliveryWorker, Unrecorded
from router.errors import ConfigError, ConfigWriteError
from router.evidence.receipt import Receipts
from router.evidence.registry import Evidence
from router.intake.accept import Acceptor, Outcome
from router.intake.http import Ingest
from router.intake.redaction import Redactor
from router.intake.validation import EventValidator
from router.journal import Entry
from router.journal.alertstate import AlertStore
from router.journal.salvage import FrameBound
from router.journal.sqlite import SqliteJournal
from router.observe.logformat import counted
from router.observe.metrics import IngestStats, TargetStats, WriteStatus, utc_iso
from router.observe.prometheus import DaemonMetrics
from router.ownevents import OwnEvents
from router.probe import ProbeResult, probe
from router.reload import (
    ReloadPlan,
    apply_reload,
    config_digest,
    plan_reload,
    redactor_for,
    validator_for,
)
from router.routing import RouteTable
from router.selfevent import chain_missing_event, reload_event
from router.server.api import Change, ConfigSource, ManagementApi
from router.server.app import build_app
from router.server.auth import Guard, Refusals
from router.server.listener import ClientFaultLog, DeadlineSite, DeadlineUnixSite
from router.server.servertls import server_context
from router.server.tail import TailHub
from router.server.workercount import resolve_workers
from router.server.workers import WorkerPool
from router.targets import Target, build_target
from router.targets.cos import CosTarget
from router.targets.event_streams import EventStreamsTarget
from router.targets.file import FileEndpointConfig, FileTarget

if TYPE_CHECKING:
    # Imported where storage.backend jetstream asks for it: NATS's client costs every process
    # that imports it about a megabyte.
    from router.journal.jetstream import JetStreamJournal, SharedConfig

log = logging.getLogger(__name__)


class _Swaps:
    """The daemon's side of a reload (router/reload.py's Swaps): each step on its parts."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def add_target(self, target_id: str) -> None:
        await self.daemon.journal.add_target(target_id)
        self.daemon.target_stats[target_id] = TargetStats()

    def leave(self, target: TargetConfig) -> None:
        self.daemon._leaving[target.id] = target

    async def swap(
        self, new: Config, validator: EventValidator, routes: RouteTable, redactor: Redactor
    ) -> None:
        daemon = self.daemon
        await daemon.acceptor.swap(validator=validator, routes=routes, redactor=redactor)
        daemon.config = new  # no await since the swap: no offer sees one without the other
        daemon.validator, daemon.routes, daemon.redactor = validator, routes, redactor
        daemon.alerts.configure(new.alerts)
        if daemon.worker_pool is not None:  # the workers route with it too before this returns
            await daemon.worker_pool.configure(new)

    async def stop_worker(self, target_id: str, *, drain: bool = True) -> None:
        await self.daemon._stop_worker(target_id, drain=drain)

    async def retire(self, target_id: str) -> None:
        await self.daemon._retire(target_id)
        self.daemon.target_stats.pop(target_id, None)
        del self.daemon._leaving[target_id]

    async def start_target(self, config: TargetConfig, target: Target) -> None:
        daemon = self.daemon
        daemon._chain(target)
        daemon.targets[target.id] = target
        try:
            await target.start()
        except Exception:
            log.exception("target %s failed to start", target.id)
        await daemon._announce_missing()
        daemon._start_worker(config)


class Daemon:
    """One running event-router: its components, its HTTP app, and their lifecycle."""

    def __init__(self, config: Config, source: ConfigSource | None = None) -> None:
        self.config = config
        # The config as data and its file: what the management API edits and writes back.
        self.source = source or ConfigSource(None, {})
        self.validator = validator_for(config)
        self.redactor = redactor_for(config)
        if config.redaction.hash_key is None:
            log.info("redaction.hash_key is not set: hashed values correlate within this run only")
        self.routes = RouteTable(config.routes, config.settings.default_targets)
        target_ids = [target.id for target in config.targets]
        self.journal: SqliteJournal | JetStreamJournal
        self.dead_letters: DeadLetters
        if config.storage.backend == "jetstream":
            from router.journal.jetstream import JetStreamJournal

            self.journal = JetStreamJournal(config.storage, target_ids)
            self.dead_letters = self.journal.dead_letters
        else:
            self.journal = SqliteJournal(
                config.storage, target_ids, bound=FrameBound(config.server.max_event_bytes())
            )
            self.dead_letters = DeadLetters(config.storage.dead_letter_dir())
        self.evidence = Evidence(config.evidence, self.journal, config.storage.dead_letter_dir())
        self.dead_letters.chain_for = self.evidence.letters_chain
        # A file target's head, kept with each ack (SQLite: in its transaction; JetStream: in
        # the router's chain record after it).
        self.journal.chain_head = self.evidence.head_of
        self._ingest = IngestStats()  # this process's; with workers, theirs too: ingest_stats
        # server.workers as processes, resolved here once ("auto": the CPUs this process may
        # use); a reload compares the setting, so it never starts or stops workers.
        self.worker_count = resolve_workers(config.server.workers)
        self.worker_pool: WorkerPool | None = None
        self.target_stats = {target_id: TargetStats() for target_id in target_ids}
        self.targets: dict[str, Target] = {t.id: build_target(t) for t in config.targets}
        self.workers: dict[str, DeliveryWorker] = {}
        # What stopped workers settled but left pending (a stop mid-batch, an ack the journal
        # could not take): their next worker and a retire go by it, so nothing is sent twice
        # and nothing delivered is dead-lettered.
        self.unrecorded = Unrecorded()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._runner: web.AppRunner | None = None
        self._stopped = False
        self._site: DeadlineSite | DeadlineUnixSite | None = None
        self.ready = False
        # Loaded before anything starts: a certificate that does not load stops `serve` early.
        tls = config.server.tls
        self._ssl = server_context(tls) if tls is not None else None
        self._retiring: set[asyncio.Task[None]] = set()
        self._orphan_watch: asyncio.Task[None] | None = None
        self._config_watch: asyncio.Task[None] | None = None
        # Held across every read-edit-apply of the running config: start-up, reloads (SIGHUP,
        # reload.watch) and management API edits, so none of them sees another half done.
        self.config_lock = asyncio.Lock()
        # Targets a reload removed whose backlog is still being retired: shown until gone.
        self._leaving: dict[str, TargetConfig] = {}
        self._swaps = _Swaps(self)
        self.tail = TailHub(
            max_clients=config.server.max_tail_clients,
            write_timeout_s=config.server.tail_write_timeout_s,
            queue_bytes=config.server.tail_queue_bytes,
            view=self._view_query,
        )
        # Alerts on accepted events, their state beside the journal; their events go to
        # their targets through the acceptor, as the router's own (router/alerts).
        self.alerts = AlertWatch(
            AlertStore(config.storage),
            lambda body, targets: self.acceptor.accept_own(body, targets),
        )
        if self.jetstream is not None:
            self.jetstream.tail_sink = self.tail.publish  # the other routers' events too
        auth = config.auth
        self.client_faults = ClientFaultLog(auth.refusal_events if auth else RefusalEventsConfig())
        self.metrics = DaemonMetrics(self)
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        async def journal_own(body: dict[str, Any]) -> Outcome:
            # Bound below; called only once requests arrive.
            return await acceptor.accept([body], own=True)

        self.own_events = OwnEvents(journal_own, lambda: self.config.server.max_string_chars)
        self.guard = Guard.build(self.config.auth, self.own_events.record, self.config.server)
        self.acceptor = acceptor = Acceptor(
            server=self.config.server,
            validator=self.validator,
            routes=self.routes,
            journal=self.journal,
            stats=self._ingest,
            storage=self.config.storage,
            dead_letters=self.dead_letters,
            tail=self.tail,
            refusals=self.guard.refusals,
            redactor=self.redactor,
        )
        self.ingest = ingest = Ingest(
            server=self.config.server, stats=self._ingest, acceptor=acceptor
        )
        if self.worker_count.count > 1:
            self.worker_pool = WorkerPool(
                count=self.worker_count.count,
                config=lambda: self.config,
                acceptor=acceptor,
                refusals=self.guard.refusals,
                drain_timeout_s=self.config.shutdown.drain_timeout_s,
            )
        self.api = ManagementApi(
            self,
            port=lambda: self.port,
            write_status=self._write_status,
            probe=self.probe_target,
            record=self.record_own,
            alert_states=self.alerts.snapshot,
            can_record=self._can_record,
        )
        return build_app(
            server=self.config.server,
            guard=self.guard,
            ingest=ingest,
            tail=self.tail,
            dead_letters=self.dead_letters,
            journal=self.journal,
            pending_for=self.journal.pending_for,
            health=self,
            render_metrics=self.metrics.render,
            is_target=lambda target_id: target_id in self.targets,
            is_invalid=lambda body: bool(self.validator.validate(body)),
            file_archives=self._file_archives,
            letters_dir=self.config.storage.dead_letter_dir(),
            api=self.api,
            client_faults=self.client_faults,
            middlewares=[self.worker_pool.middleware] if self.worker_pool is not None else [],
        )

    @property
    def port(self) -> int:
        """The bound port (useful when the config asks for port 0)."""
        assert self._runner is not None, "the daemon is not started"
        if self.worker_pool is not None:
            return self.worker_pool.port
        return int(self._runner.addresses[0][1])

    @property
    def ingest_stats(self) -> IngestStats:
        """What ingest did, summed over this process and its workers (server.workers)."""
        if self.worker_pool is None:
            return self._ingest
        return self.worker_pool.ingest_stats(self._ingest)

    async def start(self) -> None:
        """Start inside-out. A start that fails lets go of what it took (the journal's lock
        and files, threads, tasks, the port): the command line exits after one, but a process
        that embeds the daemon, or a test, may start another on the same journal."""
        # A reload asked for during start-up (SIGHUP, reload.watch) waits until it is done,
        # then applies to the config start-up ran with.
        async with self.config_lock:
            try:
                await self._start()
            except BaseException:
                try:
                    await self._stop()  # config_lock is ours: no reload is under way
                except Exception:
                    log.exception("a failed start could not let go of everything it took")
                raise

    async def _start(self) -> None:
        await self.journal.open()
        await self.alerts.open(self.config.alerts)
        self.acceptor.observer = self.alerts
        await self.evidence.open()
        if self.config.evidence.enabled and self.config.evidence.receipts:
            await self._load_receipts()
        for target in self.targets.values():
            self._chain(target)
        for target_id in sorted(self.journal.orphans):
            await self._retire(target_id, orphan=True)
        self._orphan_watch = asyncio.create_task(self._retire_orphans(), name="retire-orphans")
        await self.guard.start()
        self.tail.start()
        for warning in config_warnings(self.config):
            log.warning("config: %s", warning)
        for target_id, target in self.targets.items():
            try:
                await target.start()
            except Exception:
                # One broken target must not keep the others from starting; its worker will
                # keep retrying and its write_status tells the story.
                log.exception("target %s failed to start", target_id)
        await self._announce_missing()
        for target_config in self.config.targets:
            self._start_worker(target_config)
        # We inflate gzip ourselves, with a cap; aiohttp's own inflation has none.
        self._runner = web.AppRunner(
            self.app,
            auto_decompress=False,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=self.config.shutdown.drain_timeout_s,
            max_line_size=self.config.server.max_header_bytes,
            max_field_size=self.config.server.max_header_bytes,
            keepalive_timeout=self.config.server.keepalive_timeout_s,
            logger=self.client_faults,
        )
        await self._runner.setup()
        server = self.config.server
        if self.worker_pool is not None:
            # The workers take the port; this process answers them on its own socket.
            self._site = DeadlineUnixSite(
                self._runner,
                self.worker_pool.owner_socket,
                header_timeout_s=server.header_timeout_s,
            )
            await self._site.start()
            await self.worker_pool.start(server.host, server.port)
        else:
            self._site = DeadlineSite(
                self._runner,
                server.host,
                server.port,
                ssl_context=self._ssl,
                header_timeout_s=server.header_timeout_s,
            )
            await self._site.start()
        self.alerts.start()  # events come in from here on
        shared = self._shared_config()
        if shared is not None:
            await self._join_shared_config(shared)
        self.ready = True
        log.info(
            "event-router %s ready on %s://%s:%d with %s and %s; %s",
            __version__,
            "https" if self._ssl else "http",
            server.host,
            self.port,
            counted(len(self.targets), "target"),
            counted(len(self.config.routes), "route"),
            self.worker_count.describe(),
        )

    @property
    def jetstream(self) -> JetStreamJournal | None:
        """The journal when storage.backend is jetstream (only then is its module imported)."""
        return None if isinstance(self.journal, SqliteJournal) else self.journal

    def _shared_config(self) -> SharedConfig | None:
        """The config the routers share (storage.jetstream.share_config), if they share one."""
        jetstream = self.jetstream
        if jetstream is None or not jetstream.js_config.share_config:
            return None
        return jetstream.shared_config

    async def _join_shared_config(self, shared: SharedConfig) -> None:
        """storage.backend jetstream: run the config the routers share (the bucket's, else
        this router's YAML, which it then shares), and follow what the others put there."""
        data = await shared.open()
        if data is None:
            await shared.put(self.source.data)
        elif data != shared.shareable(self.source.data):
            await self._apply_shared(data)
        if shared.metadata is None:
            await shared.share_metadata(self.api.meta.document())
        else:  # not adopt_meta: an API edit may be waiting, with its lock, for the config lock
            self.api.meta.adopt(shared.metadata)
            await asyncio.to_thread(self.api.meta.save)
        self._config_watch = asyncio.create_task(
            shared.watch(self._on_shared_config, self.api.adopt_meta), name="shared-config"
        )

    async def _on_shared_config(self, data: dict[str, Any]) -> None:
        async with self.config_lock:
            await self._apply_shared(data)

    async def _apply_shared(self, data: dict[str, Any]) -> None:
        """Apply a config another router shared, with this router's own server and storage
        (and their command-line overrides); one that does not load or apply is logged, and
        this router keeps running what it ran."""
        from router.journal.jetstream import SharedConfig  # the journal imported it

        merged = SharedConfig.merged(data, self.source.data)
        try:
            new = await asyncio.to_thread(parse_config, merged)
            new = replace(new, server=self.config.server, storage=self.config.storage)
            await self.apply(new, initiator="shared_config")
        except ConfigError as exc:
            log.error("shared config refused, still running the previous config: %s", exc)
            return
        self.source = ConfigSource(self.source.path, merged)
        log.info("applied the config another router shared")

    async def stop(self) -> None:
        """Stop in reverse, once a reload or an API change under way is done (it stops and
        starts workers and retires targets: cut off, the journal closed under it and a worker
        it started was left running); none starts after this (`apply` refuses it)."""
        if self._stopped:
            return
        self._stopped = True
        self.ready = False
        async with self.config_lock:
            pass
        await self._stop()

    async def _stop(self) -> None:
        """Stop in reverse; once (a failed start has stopped, and the caller may stop too)."""
        self._stopped = True
        self.ready = False
        if self._config_watch is not None:
            self._config_watch.cancel()
            await asyncio.gather(self._config_watch, return_exceptions=True)
        await self.tail.stop()  # a tail stream would hold up the runner's cleanup
        if self.worker_pool is not None:
            await self.worker_pool.stop()  # they finish what is in flight: journaled here
        if self._runner is not None:
            await self._runner.cleanup()  # stops listening, then waits for in-flight requests
        self.client_faults.summarize()
        await self.guard.stop()
        await self.own_events.close()  # the guard's last summary among them
        # Alert events decided so far are journaled before the workers drain; then no more.
        self.acceptor.observer = None
        await self.alerts.stop()
        for worker in self.workers.values():
            worker.stopping.set()
        if self._tasks:
            _, late = await asyncio.wait(
                self._tasks.values(), timeout=self.config.shutdown.drain_timeout_s
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._orphan_watch is not None:
            self._orphan_watch.cancel()
            await asyncio.gather(self._orphan_watch, return_exceptions=True)
        while not self.journal.orphaned.empty():  # found after the watch's last turn
            self._retire_soon(self.journal.orphaned.get_nowait())
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.evidence.close()  # the final checkpoints, before the archives close
        for target in self.targets.values():
            await target.close()
        self.dead_letters.close()
        books = [self.journal.books(target_id) for target_id in self.targets]
        await self.journal.close()
        log.info(
            "event-router stopped: this run: accepted %s; all-time (the journal's books): "
            "%d received, %d delivered, %d dead-lettered, %d lost; %d pending in the journal for "
            "the next start",
            counted(self.ingest_stats.accepted, "event"),
            sum(b.received for b in books),
            sum(b.delivered for b in books),
            sum(b.dead_lettered for b in books),
            sum(b.lost for b in books),
            sum(b.pending for b in books),
        )

    def _start_worker(self, target_config: TargetConfig) -> None:
        """One worker per target, ever: two would read the same cursor and send every batch
        twice, so a second one for a target that has a worker is refused."""
        if target_config.id in self._tasks:
            raise RuntimeError(f"target {target_config.id} already has a delivery worker")
        worker = DeliveryWorker(
            self.targets[target_config.id],
            target_config,
            self.journal,
            self.dead_letters,
            self.target_stats[target_config.id],
            probe_first=self.config.startup.validate_targets,
            send_seconds=self.metrics.send_seconds,
            unrecorded=self.unrecorded,
        )
        self.workers[target_config.id] = worker
        self._tasks[target_config.id] = asyncio.create_task(
            worker.run(), name=f"deliver:{target_config.id}"
        )

    async def _stop_worker(self, target_id: str, *, drain: bool = True) -> None:
        """Let the target's worker deliver what it can within the drain timeout (unless not
        to `drain`), then stop it (an attempt under way finishes: DeliveryWorker._uncut) and
        close the target. Whatever it did not deliver stays in the journal."""
        worker, task = self.workers.pop(target_id), self._tasks.pop(target_id)
        worker.stopping.set()
        timeout = self.config.shutdown.drain_timeout_s if drain else 0
        _, late = await asyncio.wait([task], timeout=timeout)
        for pending in late:
            pending.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await self.evidence.checkpoint(target_id)
        self.evidence.detach(target_id)
        await self.targets.pop(target_id).close()

    async def reload_from(
        self,
        path: str | Path,
        *,
        initiator: str = "signal",
        adjust: Callable[[Config], Config] | None = None,
    ) -> bool:
        """Load the config file and apply it; a config that fails to load or to apply leaves
        the running one in place, and says why (log line and audit event). True if applied.
        `adjust` applies the command line's overrides, as at start. The file is read under
        config_lock, so an API edit waiting for the lock builds on what it applied."""
        async with self.config_lock:
            if not self.ready:  # start-up failed, or the daemon is stopping: nothing to apply to
                log.warning("config reload skipped: the daemon is not running")
                return False
            try:
                # In a thread: ${file:} references are read from disk, and never on the event
                # loop.
                new, data = await asyncio.to_thread(load_config_and_data, path)
                if adjust is not None:
                    new = adjust(new)
                await self.apply(new, initiator=initiator)
                self.source = ConfigSource(Path(path), data)
            except ConfigError as exc:
                log.error("config reload refused, still running the previous config: %s", exc)
                if exc.source != "reload":  # plan refusals are audited and counted by apply()
                    self._count_reload("refused")
                    await self._audit_reload(self.config, None, None, initiator, str(exc))
                return False
        return True

    async def reload(
        self, new: Config, *, initiator: str = "signal", audit: bool = True
    ) -> ReloadPlan:
        """Apply a new config while running (SIGHUP): refuse it whole if it changes what cannot
        change live; otherwise swap routes, settings and validation atomically for ingest, add
        and start new targets, restart changed ones (their backlog stays), and retire removed
        ones (delivered within the drain timeout, the rest dead-lettered target_removed)."""
        async with self.config_lock:
            return await self.apply(new, initiator=initiator, audit=audit)

    async def apply(
        self, new: Config, *, initiator: str = "signal", audit: bool = True
    ) -> ReloadPlan:
        """`reload` for a caller that already holds config_lock, because it built `new` from
        the running config and nothing may change that in between (the management API)."""
        if not self.config_lock.locked():
            raise RuntimeError("Daemon.apply needs config_lock held")
        if self._stopped:
            raise ConfigError("reload", ["the daemon is stopping"])
        try:
            plan = await self._reload(new, initiator, audit)
        except ConfigError:
            self._count_reload("refused")
            raise
        self._count_reload("applied")
        return plan

    def _count_reload(self, outcome: str) -> None:
        reloads = self._ingest.reloads
        reloads[outcome] = reloads.get(outcome, 0) + 1

    async def _reload(self, new: Config, initiator: str, audit: bool) -> ReloadPlan:
        old = self.config
        try:
            plan = await apply_reload(
                old, new, validator=self.validator, redactor=self.redactor, swaps=self._swaps
            )
        except ConfigError as exc:
            if audit and exc.source == "reload":
                await self._audit_reload(
                    old, new, plan_reload(old, new), initiator, "; ".join(exc.problems)
                )
            raise
        if audit:
            await self._audit_reload(old, new, plan, initiator, None)
        return plan

    async def _audit_reload(
        self,
        old: Config,
        new: Config | None,
        plan: ReloadPlan | None,
        initiator: str,
        failure: str | None,
    ) -> None:
        """Every reload, applied or refused, is an event from the router itself."""
        body = reload_event(
            initiator=initiator,
            initial=config_digest(old),
            new=config_digest(new) if new else None,
            added=plan.added if plan else (),
            changed=plan.changed if plan else (),
            removed=plan.removed if plan else (),
            failure=failure,
        )
        await self.record_own(body)

    async def _load_receipts(self) -> None:
        """The receipt key in storage.path (made at the first start); with storage.backend
        jetstream the one every router of the stream shares, written there for the workers."""
        directory = Path(self.config.storage.path)
        receipts = Receipts.load_or_create(directory, self.evidence.key)
        if (jetstream := self.jetstream) is not None:
            shared = await jetstream.chains.shared_key(receipts.key)
            if shared != receipts.key:
                log.warning(
                    "evidence.receipts: this router takes the receipt key the stream's routers "
                    "share; its own (kept in %s) no longer checks the receipts it issued",
                    directory / "receipts.key.own",
                )
                receipts = Receipts.adopt(directory, shared, self.evidence.key)
        self.acceptor.receipts = receipts

    def _chain(self, target: Target) -> None:
        """A file or COS target writes its archive as a chain (router/evidence), when evidence
        is on, and an event_streams target its topic with evidence.event_streams; a bucket or
        a topic is not read back for its head, so the journal keeps that."""
        if isinstance(target, FileTarget):
            target.chain = self.evidence.attach(target.id, target.write_line)
        elif isinstance(target, CosTarget) or (
            isinstance(target, EventStreamsTarget) and self.config.evidence.event_streams
        ):
            target.chain = self.evidence.attach(target.id, target.write_line, head_in_journal=True)

    async def _announce_missing(self) -> None:
        """A chained archive found cut at start (its places missing_at_start) is an event of
        the router itself, routed like any other, once per chain."""
        for target_id, missing in self.evidence.missing_to_announce():
            await self.record_own(chain_missing_event(target_id, missing))

    async def _can_record(self) -> bool:
        """Whether the journal takes the router's own events now: the ones kept meanwhile are
        journaled first (a real write), and a journal whose last write failed (a producer's
        too) must have written since."""
        await self.own_events.flush()
        return self.journal.healthy and not self.own_events.kept

    async def record_own(self, body: dict[str, Any]) -> None:
        """Journal an event of the router itself, or keep it until the journal can (OwnEvents);
        never raised into the operation it reports on."""
        await self.own_events.record(body)

    async def edit(self, change: Change, *, initiator: str) -> None:
        """The management API's one way to change the config: under config_lock, build the new
        config from the running one, write it back to the file, so a restart comes back with
        it, and apply it (the API audits it, not the reload), then adopt its data."""
        async with self.config_lock:
            new, source = await change(self.config, self.source)
            # The API changes no server section; the running one is the file's with the command
            # line's --host/--port, which a config built from the file's data does not have.
            new = replace(new, server=self.config.server)
            # The file is put in place before the change is applied: a change its file cannot
            # take (a full disk, a file that cannot be renamed over) changes nothing, rather
            # than running until the next restart forgets it.
            existed = None
            if source.path is not None:
                try:
                    existed = await asyncio.to_thread(write_back, source.path, source.data)
                except OSError as exc:
                    raise ConfigWriteError(str(source.path), exc.strerror or str(exc)) from exc
            try:
                await self.apply(new, initiator=initiator, audit=False)
            except BaseException:
                if source.path is not None and existed is not None:
                    await self._undo_write_back(source.path, existed)
                raise
            self.source = source
            shared = self._shared_config()
            if shared is not None:
                await shared.share(source.data)  # every router follows

    async def _undo_write_back(self, path: Path, existed: bool) -> None:
        """The previous config file back in place of a change refused as it was applied."""
        try:
            await asyncio.to_thread(undo_write_back, path, existed)
        except OSError as exc:
            log.error(
                "%s holds a management API change that was refused as it was applied, and "
                "its previous version could not be put back (%s): the next start or reload "
                "would apply it; the previous version is %s.prev",
                path,
                exc,
                path,
            )

    async def share_metadata(self, document: dict[str, Any]) -> None:
        shared = self._shared_config()
        if shared is not None:
            await shared.share_metadata(document)

    def _view_query(self, name: str) -> str | None:
        """The query of the running config's view `name` (the tail's `?view=`)."""
        view = self.config.view(name)
        return str(view.query) if view is not None else None

    def _write_status(self, target_id: str) -> WriteStatus | None:
        stats = self.target_stats.get(target_id)
        return stats.write_status if stats is not None else None

    async def probe_target(self, target_id: str) -> ProbeResult:
        """A test write to a running target (the API's validate), recorded in write_status."""
        return await probe(self.targets[target_id], self.target_stats[target_id])

    async def _retire_orphans(self) -> None:
        """Take each orphan the journal finds while running and retire it, each on its own."""
        while True:
            self._retire_soon(await self.journal.orphaned.get())

    def _retire_soon(self, target_id: str) -> None:
        """The journal found rows for a target a reload just retired: retire them too."""
        task = asyncio.create_task(self._retire(target_id, orphan=True), name=f"retire:{target_id}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, target_id: str, *, orphan: bool = False) -> None:
        """A target gone from the config leaves its backlog as dead letters, not lost (an
        `orphan`'s, unless a reload added the target back meanwhile: see Journal.retire).
        What its last worker settled but could not record (Unrecorded) is not dead-lettered:
        counted delivered, or dead-lettered already, as it was."""
        failure = target_removed(target_id)
        known = None if orphan else self.unrecorded.of(target_id)

        async def dead_letter(entries: list[Entry]) -> int:
            delivered = 0
            if known is not None:
                owed = []
                for entry in entries:
                    settled = known.get(entry.seq)
                    if settled is None:
                        owed.append(entry)
                    elif not settled:
                        delivered += 1
                entries = owed
            if entries:
                await self.dead_letters.write(target_id, entries, failure)
            return delivered

        count = await self.journal.retire(target_id, dead_letter, orphan=orphan)
        if not orphan:
            self.unrecorded.forget(target_id)
        if count:
            log.warning(
                "target %s was removed from the config: %s dead-lettered",
                target_id,
                counted(count, "pending event"),
            )

    def _target_config(self, target_id: str) -> TargetConfig:
        """A running target's config, or a removed one's while its backlog is retired."""
        leaving = self._leaving.get(target_id)
        return leaving if leaving is not None else self.config.target(target_id)

    def status(self) -> dict[str, Any]:
        """The books: ingest counters and, per target, received = delivered + dead + pending
        + lost (lost: what a damaged journal's salvage could not recover)."""
        targets = {}
        now = time.time()
        failing = self.failing_workers()
        for target_id, stats in self.target_stats.items():
            books = self.journal.books(target_id)
            oldest = books.oldest_received_at
            targets[target_id] = {
                "target_type": self._target_config(target_id).target_type,
                "received": books.received,
                "delivered": books.delivered,
                "dead_lettered": books.dead_lettered,
                "pending": books.pending,
                "lost": books.lost,
                "oldest_pending_age_s": round(now - oldest, 3) if oldest else 0.0,
                "retries": stats.retries,
                "batches": stats.batches,
                "worker_errors": stats.worker_errors,
                "worker_failing": target_id in failing,
                "write_status": stats.write_status.as_dict(),
            }
            chain = self.evidence.chains.get(target_id)
            if chain is not None:
                at = chain.checkpointed_at
                evidence: dict[str, Any] = {
                    "chain_seq": chain.seq,
                    "chain_hash": chain.head.hash.hex() if chain.head is not None else None,
                    "checkpoint_seq": chain.checkpointed_seq,
                    "last_checkpoint_at": utc_iso(at) if at is not None else None,
                    "missing_at_start": chain.missing_at_start,
                }
                if (jetstream := self.jetstream) is not None:  # where its record is
                    evidence |= jetstream.chains.where(target_id)
                targets[target_id]["evidence"] = evidence
        ingest = self.ingest_stats
        return {
            "version": __version__,
            "ready": self.ready,
            "ingest": {
                "requests": ingest.requests,
                "accepted": ingest.accepted,
                "rejected": ingest.rejected,
                "unrouted": ingest.unrouted,
                "refused_requests": dict(ingest.refused_requests),
                "journal_full": ingest.journal_full,
                "dropped_buffer_full": ingest.dropped_buffer_full,
            },
            "auth": self.guard.stats(),
            "own_events": self.own_events.status(),
            "tail": self.tail.status(),
            "workers": self.worker_count.status()
            | (self.worker_pool.status() if self.worker_pool is not None else {}),
            "journal": {
                "path": str(self.journal.path),
                "healthy": self.journal.healthy,
                "used_bytes": self.journal.used_bytes,
                "max_bytes": self.config.storage.journal_max_bytes(),
                "quarantined_records": self.journal.quarantined,
                "lost_records": self.journal.lost_records,
                "checkpoint_errors": self.journal.checkpoint_errors,
            },
            "targets": targets,
        }

    @property
    def journal_max_bytes(self) -> int:
        return self.config.storage.journal_max_bytes()

    @property
    def refusals(self) -> Refusals:
        return self.guard.refusals

    @property
    def journal_healthy(self) -> bool:
        return self.journal.healthy

    def _file_archives(self) -> dict[str, Path]:
        """The running config's file targets and their live archives (receipt lookups)."""
        return {
            t.id: Path(t.endpoint.path)
            for t in self.config.targets
            if isinstance(t.endpoint, FileEndpointConfig)
        }

    def failing_workers(self) -> list[str]:
        """Targets whose delivery worker keeps failing while events wait for it (not a target
        that refuses a batch: that is retried, then dead-lettered; a failing worker settles
        nothing at all). Only with a backlog: a worker whose failures passed while it had
        nothing to do must not keep /readyz at 503, or no producer would ever send it work."""
        return sorted(
            target_id
            for target_id, stats in self.target_stats.items()
            if stats.worker_failing and self.journal.books(target_id).pending > 0
        )
