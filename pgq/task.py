"""Task, TaskInfo, the state names, and the validation of everything an enqueue takes.

Validation happens in Python, before any SQL is sent, so a bad enqueue raises a
specific error and never aborts the caller's transaction.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pgq.errors import (
    InvalidArgumentError,
    InvalidName,
    InvalidPayloadError,
    PayloadTooLargeError,
    PayloadTypeError,
)

STATES = ("pending", "scheduled", "retry", "active", "aggregating", "completed", "archived")

#: Longest queue, type, group or task id, in characters.
MAX_NAME_LENGTH = 255
#: Largest payload, in bytes of its JSON text (the database checks the stored size too).
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
#: Deepest nesting of lists and objects in a payload.
MAX_PAYLOAD_DEPTH = 512

#: Keyword options of enqueue(), which a Task may also carry.
ENQUEUE_OPTIONS = frozenset(
    {
        "queue",
        "group",
        "max_retry",
        "timeout",
        "deadline",
        "unique",
        "process_at",
        "process_in",
        "task_id",
        "retention",
    }
)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | float | timedelta, name: str = "duration") -> float:
    """Seconds from a timedelta, a number of seconds, or a string like '10s', '2m', '500ms'."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a duration, not a bool")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"{name} must be finite, got {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise InvalidArgumentError(
                f"{name}: cannot read {value!r} as a duration (examples: 500ms, 10s, 2m, 1h)"
            )
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise InvalidArgumentError(f"{name} must be a timedelta or seconds, not {type(value).__name__}")


class UnknownOptionError(InvalidArgumentError, TypeError):
    """An option name that enqueue() and Task() do not know (a TypeError, like any bad keyword)."""


def check_options(options: Mapping[str, Any], where: str) -> None:
    """Raise UnknownOptionError naming each unknown option, with a close match when there is one."""
    if options.keys() <= ENQUEUE_OPTIONS:  # the usual case, without building a set
        return
    unknown = sorted(set(options) - ENQUEUE_OPTIONS)
    hints = []
    for name in unknown:
        if name == "conn":
            hints.append("'conn' is an argument of enqueue(), not a task option")
            continue
        close = difflib.get_close_matches(name, sorted(ENQUEUE_OPTIONS), n=1)
        hints.append(f"unknown option {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise UnknownOptionError(f"{where}: " + "; ".join(hints) + f". Known options: {sorted(ENQUEUE_OPTIONS)}")


def check_name(value: object, what: str, *, allow_digits: bool = True) -> str:
    """A queue, type, group or task id: a non-blank str of at most MAX_NAME_LENGTH, no NUL."""
    if not isinstance(value, str):
        raise InvalidName(f"{what} must be a str, not {type(value).__name__}")
    if not value.strip():
        raise InvalidName(f"{what} must not be blank")
    if "\x00" in value:
        raise InvalidName(f"{what} must not contain NUL characters")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidName(f"{what} is {len(value)} characters long; the limit is {MAX_NAME_LENGTH}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName(f"{what} is not valid unicode (lone surrogate)") from None
    if not allow_digits and value.isdigit():
        raise InvalidName(f"{what} must not be all digits: those ids are reserved for generated ids")
    return value


def _check_json_value(value: Any) -> None:
    """Walk containers: keys must be str, floats finite, strings free of NUL and lone surrogates."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                raise InvalidPayloadError("payload strings must not contain NUL (jsonb cannot store \\u0000)")
            continue
        if v is None or isinstance(v, bool | int):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                raise InvalidPayloadError(f"payload contains {v!r}, which JSON cannot represent")
            continue
        if depth >= MAX_PAYLOAD_DEPTH:
            raise InvalidPayloadError(f"payload is nested deeper than {MAX_PAYLOAD_DEPTH} levels")
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise PayloadTypeError(
                        f"payload object keys must be str, found {type(k).__name__} key {k!r}"
                    )
                if "\x00" in k:
                    raise InvalidPayloadError("payload keys must not contain NUL")
                stack.append((item, depth + 1))
        elif isinstance(v, list | tuple):
            stack.extend((item, depth + 1) for item in v)
        else:
            raise PayloadTypeError(
                f"payload must be JSON (dict, list, str, int, float, bool, None); found {type(v).__name__}"
            )


def _not_json(value: Any) -> Any:
    raise PayloadTypeError(
        f"payload must be JSON (dict, list, str, int, float, bool, None); found {type(value).__name__}"
    )


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_not_json)
# json's C encoder, called directly: a third of the cost of JSONEncoder.encode for a small
# payload (no per-call encoder set-up). No circular-reference markers: a cycle ends in
# RecursionError, which the exact walk below reports as too deep.
_C_ENCODE: Callable[[Any, int], Any] | None = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    if getattr(json.encoder, "c_make_encoder", None) is not None
    else None
)


def _dumps(payload: Any) -> str:
    if _C_ENCODE is not None:
        return "".join(_C_ENCODE(payload, 0))
    return _ENCODER.encode(payload)


_CONTAINERS = (dict, list, tuple)


def _check_containers(value: Any) -> None:
    """What json.dumps lets through: non-str keys (it coerces them) and nesting below the C limit.

    A flat dict (the usual payload) is checked in one pass; nested ones take the walk.
    """
    if type(value) is dict:
        nested = False
        for k, item in value.items():
            if type(k) is not str and not isinstance(k, str):
                raise PayloadTypeError(f"payload object keys must be str, found {type(k).__name__} key {k!r}")
            if isinstance(item, _CONTAINERS):
                nested = True
        if not nested:
            return
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth >= MAX_PAYLOAD_DEPTH:
            raise InvalidPayloadError(f"payload is nested deeper than {MAX_PAYLOAD_DEPTH} levels")
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise PayloadTypeError(
                        f"payload object keys must be str, found {type(k).__name__} key {k!r}"
                    )
                if isinstance(item, _CONTAINERS):
                    stack.append((item, depth + 1))
        else:
            stack.extend((item, depth + 1) for item in v if isinstance(item, _CONTAINERS))


def encode_payload(payload: Any) -> str:
    """The payload as JSON text, or a clear error naming what is wrong with it.

    The hot path is json's C encoder plus a walk over containers only; anything it
    rejects, and any text that may hold a NUL, gets the exact walk that names the problem.
    """
    try:
        text = _dumps(payload)
    except PayloadTypeError:
        raise
    except (ValueError, TypeError, RecursionError) as exc:
        _check_json_value(payload)  # raises the specific error
        raise InvalidPayloadError(f"payload is not JSON: {exc}") from None
    if isinstance(payload, _CONTAINERS):
        _check_containers(payload)
    if "\\u0000" in text:  # a NUL (or a backslash followed by "u0000"): let the exact walk decide
        _check_json_value(payload)
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidPayloadError(
                "payload contains a lone surrogate, which is not valid unicode"
            ) from None
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadTooLargeError(f"payload is {size} bytes as JSON; the limit is {MAX_PAYLOAD_BYTES}")
    return text


def encode_headers(headers: Mapping[str, str] | None) -> str | None:
    if headers is None:
        return None
    if not isinstance(headers, Mapping):
        raise InvalidArgumentError(f"headers must be a mapping of str to str, not {type(headers).__name__}")
    for k, v in headers.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgumentError(f"headers must map str to str; got {k!r}: {v!r}")
    return encode_payload(dict(headers))


class ResultWriter:
    """Writes a handler's result onto its task row (see Server); set by the worker."""

    def __init__(self, write: Callable[[Any], None]) -> None:
        self._write = write

    def write(self, value: Any) -> None:
        encode_payload(value)
        self._write(value)


class Task:
    """A unit of work: a type, a JSON payload, headers and optional enqueue options.

    In a handler or an aggregator the task also carries read-only facts:
    id, queue, group, retried, max_retry, enqueued_at, deadline and result_writer.
    """

    __slots__ = (
        "_completer",
        "_deadline",
        "_enqueued_at",
        "_group",
        "_id",
        "_queue",
        "_retried",
        "headers",
        "options",
        "payload",
        "result_writer",
        "type",
    )

    def __init__(
        self,
        type: str,
        payload: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        check_options(options, "Task()")
        if headers is not None and not isinstance(headers, Mapping):
            raise InvalidArgumentError(
                f"headers must be a mapping of str to str, not {headers.__class__.__name__}"
            )
        self.type = type
        self.payload = payload
        self.headers: dict[str, str] = dict(headers) if headers else {}
        self.options: dict[str, Any] = options
        self._id: str | None = None
        self._queue: str | None = options.get("queue")
        self._group: str | None = options.get("group")
        self._retried = 0
        self._enqueued_at: datetime | None = None
        self._deadline: datetime | None = None
        self.result_writer: ResultWriter | None = None
        self._completer: Any = None

    def complete(self, conn: Any) -> None:
        """Complete this task inside `conn`'s open transaction (transactional completion).

        Call it from the handler, on the psycopg connection and in the transaction
        that writes the task's effects: the completion commits with them or not at
        all, so the effects happen exactly once. Once that transaction commits, the
        task is completed whatever the handler does next (an exception, a crash: it
        does not run again); if it rolls back, the worker records the handler's
        outcome as usual. Raises LeaseLost when this attempt no longer owns the task
        (its lease ran out and the task was taken over): let it roll the transaction
        back. On an autocommit connection outside a transaction block the
        completion commits at once, on its own.
        """
        self._owned().complete(conn)

    async def complete_async(self, conn: Any) -> None:
        """complete() on a psycopg AsyncConnection."""
        await self._owned().complete_async(conn)

    def _owned(self) -> Any:
        if self._completer is None:
            raise RuntimeError("complete() is for a task a pgq worker is running (in its handler)")
        return self._completer

    @property
    def id(self) -> str | None:
        return self._id

    @property
    def queue(self) -> str | None:
        return self._queue

    @property
    def group(self) -> str | None:
        return self._group

    @property
    def retried(self) -> int:
        return self._retried

    @property
    def max_retry(self) -> int:
        return int(self.options.get("max_retry", 25))

    @property
    def enqueued_at(self) -> datetime | None:
        return self._enqueued_at

    @property
    def deadline(self) -> datetime | None:
        """When the running attempt must end (timeout or deadline, whichever is first)."""
        return self._deadline

    @classmethod
    def _from_row(cls, row: Mapping[str, Any]) -> Task:
        """A Task as handlers and aggregators see it, from a pgq.task row."""
        t = cls(row["type"], row["payload"], headers=row.get("headers") or None)
        t._id = task_id_of(row)
        t._queue = row["queue"]
        t._group = row.get("group_key")
        t._retried = row.get("retried", 0)
        t.options["max_retry"] = row.get("max_retry", 25)
        t._enqueued_at = row.get("enqueued_at")
        return t

    def __repr__(self) -> str:
        extra = f" id={self._id!r}" if self._id is not None else ""
        return f"<pgq.Task {self.type!r}{extra} payload={self.payload!r}>"


def task_id_of(row: Mapping[str, Any]) -> str:
    """The public id of a task row: its caller-chosen task_id, else its bigint key as text."""
    tid = row.get("task_id")
    return tid if tid is not None else str(row["id"])


@dataclass(slots=True)
class TaskInfo:
    """What pgq knows about one task (returned by enqueue and the Inspector).

    Slotted: enqueue_many returns one per task, and a slotted instance takes about
    two thirds of the memory of one with a __dict__ (and is a little faster to make).
    """

    id: str
    queue: str
    type: str
    payload: Any
    state: str
    group: str | None = None
    max_retry: int = 25
    retried: int = 0
    next_process_at: datetime | None = None
    last_error: str | None = None
    last_failed_at: datetime | None = None
    result: Any = None
    enqueued_at: datetime | None = None
    completed_at: datetime | None = None
    started_at: datetime | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: timedelta | None = None
    deadline: datetime | None = None
    retention: timedelta | None = None
    members: list[str] = field(default_factory=list)
    locked_by: str | None = None
    lease_expires_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskInfo:
        return cls(
            id=task_id_of(row),
            queue=row["queue"],
            type=row["type"],
            payload=row["payload"],
            state=row["state"],
            group=row.get("group_key"),
            max_retry=row.get("max_retry", 25),
            retried=row.get("retried", 0),
            next_process_at=row.get("run_at"),
            last_error=row.get("last_error"),
            last_failed_at=row.get("last_failed_at"),
            result=row.get("result"),
            enqueued_at=row.get("enqueued_at"),
            completed_at=row.get("completed_at"),
            started_at=row.get("started_at"),
            headers=row.get("headers") or {},
            timeout=row.get("timeout"),
            deadline=row.get("deadline"),
            retention=row.get("retention"),
            members=list(row.get("members") or []),
            locked_by=row.get("locked_by"),
            lease_expires_at=row.get("lease_expires_at"),
        )
