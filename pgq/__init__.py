"""pgq: a durable job queue for Python on PostgreSQL, with task aggregation.

The public names are imported on first use (PEP 562), so `import pgq` (and the
`pgq` command, whose subcommands import only what they use) does not pay for
psycopg, asyncio, the client, the server and the inspector up front.
`_EXPORTS` is the one table of public name -> defining module; `__all__` and the
`TYPE_CHECKING` imports (what type checkers see) list the same names, and
tests/unit/test_lazy_imports.py checks that the three agree. A submodule
(`pgq.db`, `pgq.client`, ...) is also imported on first attribute access, as
the eager imports used to make it available after a bare `import pgq`.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgq.client import AsyncClient, Client
    from pgq.config import GroupPolicy
    from pgq.errors import (
        ConfigError,
        DuplicateTaskError,
        EnqueueError,
        InvalidArgumentError,
        InvalidName,
        InvalidPayloadError,
        LeaseLost,
        PayloadTooLargeError,
        PayloadTypeError,
        PgqError,
        QueueNotEmptyError,
        QueueNotFoundError,
        SkipRetry,
        TaskIDConflictError,
        TaskNotFoundError,
        TaskStateError,
    )
    from pgq.inspector import (
        DailyStats,
        DoctorReport,
        Finding,
        GroupInfo,
        Inspector,
        QueueInfo,
        ServerInfo,
        WorkerInfo,
    )
    from pgq.mux import ServeMux
    from pgq.scheduler import Scheduler
    from pgq.server import Server
    from pgq.task import STATES, Task, TaskInfo

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "STATES": "pgq.task",
    "AsyncClient": "pgq.client",
    "Client": "pgq.client",
    "ConfigError": "pgq.errors",
    "DailyStats": "pgq.inspector",
    "DoctorReport": "pgq.inspector",
    "DuplicateTaskError": "pgq.errors",
    "EnqueueError": "pgq.errors",
    "Finding": "pgq.inspector",
    "GroupInfo": "pgq.inspector",
    "GroupPolicy": "pgq.config",
    "Inspector": "pgq.inspector",
    "InvalidArgumentError": "pgq.errors",
    "InvalidName": "pgq.errors",
    "InvalidPayloadError": "pgq.errors",
    "LeaseLost": "pgq.errors",
    "PayloadTooLargeError": "pgq.errors",
    "PayloadTypeError": "pgq.errors",
    "PgqError": "pgq.errors",
    "QueueInfo": "pgq.inspector",
    "QueueNotEmptyError": "pgq.errors",
    "QueueNotFoundError": "pgq.errors",
    "Scheduler": "pgq.scheduler",
    "ServeMux": "pgq.mux",
    "Server": "pgq.server",
    "ServerInfo": "pgq.inspector",
    "SkipRetry": "pgq.errors",
    "Task": "pgq.task",
    "TaskIDConflictError": "pgq.errors",
    "TaskInfo": "pgq.task",
    "TaskNotFoundError": "pgq.errors",
    "TaskStateError": "pgq.errors",
    "WorkerInfo": "pgq.inspector",
}

__all__ = [
    "STATES",
    "AsyncClient",
    "Client",
    "ConfigError",
    "DailyStats",
    "DoctorReport",
    "DuplicateTaskError",
    "EnqueueError",
    "Finding",
    "GroupInfo",
    "GroupPolicy",
    "Inspector",
    "InvalidArgumentError",
    "InvalidName",
    "InvalidPayloadError",
    "LeaseLost",
    "PayloadTooLargeError",
    "PayloadTypeError",
    "PgqError",
    "QueueInfo",
    "QueueNotEmptyError",
    "QueueNotFoundError",
    "Scheduler",
    "ServeMux",
    "Server",
    "ServerInfo",
    "SkipRetry",
    "Task",
    "TaskIDConflictError",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskStateError",
    "WorkerInfo",
]


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule) on first access and keep it in the module."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(_importlib.import_module(module), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            # importing a submodule binds it as an attribute of this package
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the submodule exists but something it imports is missing
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
