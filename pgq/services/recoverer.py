"""Recoverer: tasks whose lease expired go back to 'retry' (or 'archived').

A lease expires when its worker died (SIGKILL, OOM, power), stalled longer
than the lease, or lost its database connection: its heartbeat stopped
extending it. The recoverer moves such tasks to 'retry', due at once (not after
a backoff: the task did not fail, its worker did), counting a retry and a
failure and recording last_error = 'lease expired'; tasks whose retries are
spent go to 'archived'. The database clock decides expiry.

Every server runs it. The statement is idempotent and concurrency-safe (FOR
UPDATE SKIP LOCKED, a fenced re-check of state = 'active'), so two recoverers
never move a task twice, and a worker that was only slow cannot write its
outcome afterwards: the attempt fence rejects it. This is where a task can run
twice: the slow worker's handler may still have produced side effects.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg_pool
from psycopg.rows import dict_row

from pgq import _sql
from pgq.services import periodic

logger = logging.getLogger(__name__)

LEASE_EXPIRED = "lease expired"


@dataclass(frozen=True)
class RecovererConfig:
    interval: float = 5.0
    batch_size: int = 1000


@dataclass(frozen=True)
class RecoverResult:
    retried: int = 0
    archived: int = 0


class Recoverer:
    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        *,
        schema: str = "pgq",
        config: RecovererConfig | None = None,
    ) -> None:
        self.pool = pool
        self.config = config or RecovererConfig()
        self._q = _sql.query("task_recover_expired", schema)

    async def run_once(self, now: datetime | None = None) -> RecoverResult:
        """Recover every expired lease (in batches); the counts moved."""
        retried = archived = 0
        while True:
            async with self.pool.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(
                    self._q, {"now": now, "limit": self.config.batch_size, "error": LEASE_EXPIRED}
                )
                row = await cur.fetchone()
            r, a = (row["retried"], row["archived"]) if row else (0, 0)
            retried += r
            archived += a
            if r + a < self.config.batch_size:
                break
        if retried or archived:
            logger.warning(
                "recoverer: %d expired lease(s) sent to retry, %d archived",
                retried,
                archived,
                extra={"action": "tasks_recovered", "retried": retried, "archived": archived},
            )
        return RecoverResult(retried, archived)

    async def run(self, stop: asyncio.Event) -> None:
        await periodic("recoverer", self.run_once, self.config.interval, stop)
