"""pgq: a durable job queue for Python on PostgreSQL, with task aggregation."""

from __future__ import annotations

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
