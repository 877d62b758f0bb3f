"""The exception tree: every error pgq raises on purpose is a PgqError."""

from __future__ import annotations


class PgqError(Exception):
    """Base class of pgq's errors."""


class ConfigError(PgqError, ValueError):
    """A bad setting (server options, schema name, DSN), raised before any work starts."""


class EnqueueError(PgqError):
    """An enqueue was refused. Raised before any SQL is sent where the problem is
    detectable in Python, so the caller's transaction stays usable."""


class InvalidArgumentError(EnqueueError, ValueError):
    """A bad enqueue option: blank name, negative max_retry, naive datetime, ..."""


class InvalidName(InvalidArgumentError):
    """A queue, group, type or task id that is blank, contains NUL or is too long."""


class InvalidPayloadError(InvalidArgumentError):
    """A payload value that JSON/jsonb cannot hold exactly (NaN, "\\u0000", lone surrogates, ...)."""


class PayloadTypeError(EnqueueError, TypeError):
    """A payload of a type that is not JSON (bytes, set, datetime, non-string keys, ...)."""


class PayloadTooLargeError(InvalidPayloadError):
    """A payload above the documented limit."""


class TaskIDConflictError(EnqueueError):
    """A task with the same task_id already exists in the queue."""


class DuplicateTaskError(EnqueueError):
    """unique=: a task with the same (queue, type, payload) holds the uniqueness lock."""


class TaskNotFoundError(PgqError, LookupError):
    """No task with this id in this queue."""


class QueueNotFoundError(PgqError, LookupError):
    """No such queue."""


class QueueNotEmptyError(PgqError):
    """A queue that still holds tasks cannot be removed without force."""


class TaskStateError(PgqError):
    """The operation does not apply to the task in its current state."""


class LeaseLost(PgqError):
    """A worker's lease on a task is gone: its outcome is no longer accepted."""


class SkipRetry(Exception):
    """Raise from a handler to archive the task at once, without retries."""
