"""State transitions of claimed tasks: thin Python over sql/queries/worker.sql.

Every function takes an open psycopg async cursor (the worker keeps one per
dedicated connection, with tuple rows) and binds parameters only. What the
database is authoritative for: who owns a task (state = 'active' and its
attempt number), and when anything is due (its clock). A write whose fence does
not match changes nothing; callers learn which ids were applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, LiteralString, NamedTuple

from psycopg import AsyncCursor

from pgq import _sql

#: Outcome kinds of task_ack_many.
DONE, RETRY, ARCHIVE, REQUEUE, RESULT = "done", "retry", "archive", "requeue", "result"


class Ack(NamedTuple):
    """One outcome to write: see task_ack_many in sql/queries/worker.sql."""

    id: int
    attempt: int
    kind: str
    delay: float | None = None
    error: str | None = None
    result: str | None = None  # JSON text
    failed: bool = False
    plain: bool = False  # the task has no retention: a done without result is a plain delete


@dataclass(frozen=True)
class Queries:
    """The named queries of one schema."""

    claim: LiteralString
    next_due: LiteralString
    ack: LiteralString
    ack_done: LiteralString
    extend: LiteralString
    server_delete: LiteralString

    @classmethod
    def load(cls, schema: str) -> Queries:
        q = _sql.query
        return cls(
            claim=q("task_claim_many", schema),
            next_due=q("task_next_due", schema),
            ack=q("task_ack_many", schema),
            ack_done=q("task_ack_done", schema),
            extend=q("task_extend_leases", schema),
            server_delete=q("server_delete", schema),
        )


async def claim_many(
    cur: AsyncCursor[Any],
    q: Queries,
    *,
    queues: Sequence[str],
    limit: int,
    worker_id: str,
    lease: float,
    now: datetime | None = None,
) -> list[Any]:
    """Claim up to `limit` due tasks from `queues` (in that order); rows as task_claim_many returns."""
    await cur.execute(
        q.claim,
        {"queues": list(queues), "limit": limit, "worker_id": worker_id, "lease": lease, "now": now},
        prepare=True,
    )
    return await cur.fetchall()


async def next_due(
    cur: AsyncCursor[Any], q: Queries, *, queues: Sequence[str], now: datetime | None = None
) -> float | None:
    """Seconds until the earliest waiting task of `queues` is due, None when there is none."""
    await cur.execute(q.next_due, {"queues": list(queues), "now": now}, prepare=True)
    row = await cur.fetchone()
    return None if row is None else _first(row)


def _int_array(values: Sequence[int]) -> str:
    """An int array literal: much cheaper than dumping a list element by element."""
    return "{" + ",".join(map(str, values)) + "}"


def _text_or_nulls(values: Sequence[str | None]) -> str | list[str | None]:
    """All-NULL columns (the common case) as a literal; others as a list for psycopg to quote."""
    if any(v is not None for v in values):
        return list(values)
    return "{" + ",".join(["NULL"] * len(values)) + "}"


async def ack_many(
    cur: AsyncCursor[Any], q: Queries, acks: Sequence[Ack], *, now: datetime | None = None
) -> set[int]:
    """Apply a batch of outcomes (one statement, two when plain completions come with
    other outcomes); the ids whose fence held. A caller that retries a failed call
    should pass plain completions and other outcomes in separate calls (the first
    statement may have been applied when the second fails)."""
    if not acks:
        return set()
    acks = sorted(acks)
    plain = [a for a in acks if a.plain and a.kind == DONE and a.result is None]
    if plain:
        await cur.execute(
            q.ack_done,
            {
                "id": _int_array([a.id for a in plain]),
                "attempt": _int_array([a.attempt for a in plain]),
                "now": now,
            },
            prepare=True,
        )
        applied = {_first(r) for r in await cur.fetchall()}
        if len(plain) == len(acks):
            return applied
        acks = [a for a in acks if not (a.plain and a.kind == DONE and a.result is None)]
        return applied | await ack_many(cur, q, acks, now=now)
    n = len(acks)
    kinds = [a.kind for a in acks]
    if all(k == DONE for k in kinds):  # the hot path: plain completions
        kind: str | list[str] = "{" + ",".join(kinds) + "}"
        delay: str | list[float | None] = "{" + ",".join(["NULL"] * n) + "}"
        failed: str | list[bool] = "{" + ",".join(["f"] * n) + "}"
    else:
        kind, delay, failed = kinds, [a.delay for a in acks], [a.failed for a in acks]
    await cur.execute(
        q.ack,
        {
            "id": _int_array([a.id for a in acks]),
            "attempt": _int_array([a.attempt for a in acks]),
            "kind": kind,
            "delay": delay,
            "error": _text_or_nulls([a.error for a in acks]),
            "result": _text_or_nulls([a.result for a in acks]),
            "failed": failed,
            "now": now,
        },
        prepare=True,
    )
    return {_first(r) for r in await cur.fetchall()}


def completion_params(pk: int, attempt: int) -> dict[str, Any]:
    """task_ack_many's parameters for one completion of this attempt (Task.complete,
    on the handler's own connection)."""
    return {
        "id": _int_array([pk]),
        "attempt": _int_array([attempt]),
        "kind": "{" + DONE + "}",
        "delay": "{NULL}",
        "error": _text_or_nulls([None]),
        "result": _text_or_nulls([None]),
        "failed": "{f}",
        "now": None,
    }


async def extend_leases(
    cur: AsyncCursor[Any],
    q: Queries,
    owned: Sequence[tuple[int, int]],
    *,
    lease: float,
    now: datetime | None = None,
) -> set[int]:
    """Extend the leases of (id, attempt) pairs; the ids still owned."""
    if not owned:
        return set()
    owned = sorted(owned)
    await cur.execute(
        q.extend,
        {"id": [o[0] for o in owned], "attempt": [o[1] for o in owned], "lease": lease, "now": now},
    )
    return {_first(r) for r in await cur.fetchall()}


def _first(row: Any) -> Any:
    return row[0] if isinstance(row, tuple) else next(iter(row.values()))
