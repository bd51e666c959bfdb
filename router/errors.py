"""The exception tree of event-router (shaped like httpx's).

    RouterError
    ├── ConfigError(source, problems)      a config file that cannot be used; lists every problem
    ├── RequestError(status, code, msg)    a whole ingest request refused (4xx), before any event
    ├── QueryError(message, column)        a query that does not parse; points at the column
    ├── StorageLockedError(path, pid)      another process holds storage.path
    └── DeliveryError(target_id)           one batch could not be delivered to one target
        ├── RetryableDeliveryError         try again later (connection, timeout, 408, 429, 5xx)
        └── PermanentDeliveryError         retrying cannot help (other 4xx, unwritable file),
            │                              for the batch or for the events it names
            └── UnexpectedDeliveryError    a target raised something else (a bug, a refused input)

A per-event validation problem is not an exception: `validation.validate` returns a list of
`Problem`s, because one request carries many events and each gets its own answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from router.masking import mask_text


class RouterError(Exception):
    """Root of every error event-router raises on purpose."""


class ConfigError(RouterError):
    """A configuration that cannot be used; `problems` holds every finding, with its path."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        # Problems quote what they are about; a URL among it shows no password or token.
        self.problems = [mask_text(problem) for problem in problems]
        super().__init__(f"{source}: " + "; ".join(self.problems))


class ConfigWriteError(RouterError):
    """A management API change whose config file (`what`), or the API's metadata file, could
    not be written (a full disk): it was not applied."""

    def __init__(self, path: str, reason: str, what: str = "the config file") -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{what} {path} could not be written: {reason}")


class RequestError(RouterError):
    """An ingest request refused as a whole; becomes an HTTP 4xx answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{status} {code}: {message}")


class QueryError(RouterError):
    """A query that does not parse. `column` is 1-based, so a caret can point at the spot."""

    def __init__(self, message: str, column: int) -> None:
        self.message = message
        self.column = column
        super().__init__(f"column {column}: {message}")


class StorageUnavailableError(RouterError):
    """The journal's storage cannot be used at start-up: storage.backend jetstream and no NATS
    server answers, or a stream exists with settings the journal cannot work with."""


class JournalFormatError(RouterError):
    """The journal under storage.path was written by a newer event-router, in a format this one
    does not know: opening it could take what it cannot read for damage."""


class StorageLockedError(RouterError):
    """Another process (`pid`, None when it cannot be told) holds the journal under `path`."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "a process whose pid is unknown"
        super().__init__(
            f"storage.path {path} is in use by another event-router ({holder}); two daemons "
            "on one journal would lose events: give each its own storage.path"
        )


class DeliveryError(RouterError):
    """A batch could not be delivered to `target_id`."""

    def __init__(
        self,
        target_id: str,
        message: str,
        *,
        status: int | None = None,
        response_excerpt: str = "",
    ) -> None:
        self.target_id = target_id
        self.status = status
        # Masked here, once for every target: the message and the excerpt go on to the log,
        # /v1/status and the dead letter, and a URL in them may carry a password or a token.
        self.response_excerpt = mask_text(response_excerpt)
        super().__init__(f"target {target_id}: {mask_text(message)}")


class RetryableDeliveryError(DeliveryError):
    """A failure that may pass: the batch is tried again after a backoff."""

    def __init__(
        self,
        target_id: str,
        message: str,
        *,
        status: int | None = None,
        response_excerpt: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(target_id, message, status=status, response_excerpt=response_excerpt)
        self.retry_after_s = retry_after_s


class PermanentDeliveryError(DeliveryError):
    """A failure that retrying cannot fix: the batch goes to the dead-letter file.

    With `refused` (event id -> why), only those events were refused and the target took
    every other event of the request (a Kafka broker judges each message): only they are
    dead-lettered, each with its own reason, and the rest count as delivered."""

    def __init__(
        self,
        target_id: str,
        message: str,
        *,
        status: int | None = None,
        response_excerpt: str = "",
        refused: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(target_id, message, status=status, response_excerpt=response_excerpt)
        self.refused = None if refused is None else {k: mask_text(v) for k, v in refused.items()}


class UnexpectedDeliveryError(PermanentDeliveryError):
    """A target's send raised something that is not a DeliveryError: a bug, or an input its
    client refuses (aiohttp's ValueError for a control character in a header). Retrying
    cannot help, so the batch is dead-lettered with the exception's class and message rather
    than holding up the target for ever."""
