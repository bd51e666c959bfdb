"""The config every router of one stream shares, in a KV bucket (SharedConfig).

The management API on any router puts the config into the KV bucket `<stream>_CONFIG`, and
every router watches it and applies what another one put; the YAML file is the bootstrap (what
a router runs until the bucket has a config).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from router.journal.jetstream.streams import STREAM_ERRORS, open_bucket

if TYPE_CHECKING:
    from router.journal.jetstream.journal import JetStreamJournal

log = logging.getLogger(__name__)

CONFIG_KEY = "config"
METADATA_KEY = "metadata"  # the management API's timestamps and versions (server.api.Metadata)


class SharedConfig:
    """The config every router of one stream runs: a KV bucket `<stream>_CONFIG` holding the
    config's data (references unresolved, as the management API keeps it) and who put it,
    and beside it the management API's metadata. The sections that belong to one router
    (LOCAL_SECTIONS) are the router's own and are neither shared nor taken."""

    LOCAL_SECTIONS = ("server", "storage")

    def __init__(self, journal: JetStreamJournal) -> None:
        self.journal = journal
        self.bucket = f"{journal.js_config.stream}_CONFIG"
        self.revision = 0  # the last config revision this router applied or put
        self.metadata_revision = 0  # the same for the metadata
        self.metadata: dict[str, Any] | None = None  # what `open` found
        self.failures = 0  # shared configs that raised while being applied
        self._kv: KeyValue | None = None

    @classmethod
    def shareable(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in data.items() if k not in cls.LOCAL_SECTIONS}

    @classmethod
    def merged(cls, shared: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
        """The shared config with this router's own local sections."""
        return {
            **cls.shareable(shared),
            **{k: own[k] for k in cls.LOCAL_SECTIONS if k in own},
        }

    async def open(self) -> dict[str, Any] | None:
        """The bucket (created if missing) and the config in it, if any."""
        self._kv = await open_bucket(
            self.journal.js, self.journal.js_config, self.bucket, history=10
        )
        try:
            entry = await self._kv.get(METADATA_KEY)
            self.metadata_revision = entry.revision or 0
            self.metadata = dict(orjson.loads(entry.value or b"{}")["metadata"])
        except KeyNotFoundError:
            self.metadata = None
        try:
            entry = await self._kv.get(CONFIG_KEY)
        except KeyNotFoundError:
            return None
        self.revision = entry.revision or 0
        return dict(orjson.loads(entry.value or b"{}")["data"])

    async def put(self, data: Mapping[str, Any]) -> None:
        """Share this router's config (its shareable sections) with every router."""
        assert self._kv is not None
        value = orjson.dumps({"origin": self.journal.instance, "data": self.shareable(data)})
        self.revision = await self._kv.put(CONFIG_KEY, value)

    async def share(self, data: Mapping[str, Any]) -> None:
        """`put`, for a change already applied here: NATS away is logged, not raised (the
        change stands on this router; the others get the next one, or this one on restart)."""
        try:
            await self.put(data)
        except STREAM_ERRORS as exc:
            log.error("the config change applies here but could not be shared: %s", exc)

    async def share_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Share the management API's metadata; NATS away is logged, as in `share`."""
        assert self._kv is not None
        value = orjson.dumps({"origin": self.journal.instance, "metadata": metadata})
        try:
            self.metadata_revision = await self._kv.put(METADATA_KEY, value)
        except STREAM_ERRORS as exc:
            log.error("the API metadata could not be shared: %s", exc)

    async def watch(
        self,
        apply: Callable[[dict[str, Any]], Awaitable[None]],
        adopt: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        """Apply every config, and adopt all metadata, another router puts, newest first seen,
        until cancelled; one that fails is logged, and the next one is awaited."""
        assert self._kv is not None
        watcher = await self._kv.watch(">")
        try:
            async for entry in watcher:
                if entry is None or entry.value is None:
                    continue
                revision = entry.revision or 0
                if entry.key == CONFIG_KEY and revision > self.revision:
                    self.revision = revision
                    what, take, field = "config", apply, "data"
                elif entry.key == METADATA_KEY and revision > self.metadata_revision:
                    self.metadata_revision = revision
                    what, take, field = "API metadata", adopt, "metadata"
                else:
                    continue
                document = orjson.loads(entry.value)
                if document.get("origin") == self.journal.instance:
                    continue
                try:
                    await take(dict(document[field]))
                except Exception:  # the task boundary: the next one is still awaited
                    self.failures += 1
                    log.exception("the shared %s (revision %d) failed to apply", what, revision)
        finally:
            with contextlib.suppress(*STREAM_ERRORS):
                await watcher.stop()  # type: ignore[no-untyped-call]
