"""Cleaner: deletes what has outlived its retention, in batches.

- completed tasks whose expires_at (completed_at + retention) has passed;
- archived tasks that failed more than `archived_max_age` ago (90 days, as Asynq);
- pgq.server rows whose heartbeat is older than `server_max_age`;
- stat_daily rows older than `stats_max_age` (a year).

Every server runs it; each statement is idempotent and skips rows another
cleaner holds (SKIP LOCKED). The database clock decides; `now` is injectable.
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

DAY = 86400.0


@dataclass(frozen=True)
class CleanerConfig:
    interval: float = 60.0
    batch_size: int = 1000
    archived_max_age: float = 90 * DAY
    server_max_age: float = 300.0
    stats_max_age: float = 365 * DAY


@dataclass(frozen=True)
class CleanResult:
    completed: int = 0
    archived: int = 0
    servers: int = 0
    stats: int = 0


class Cleaner:
    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        *,
        schema: str = "pgq",
        config: CleanerConfig | None = None,
    ) -> None:
        self.pool = pool
        self.config = config or CleanerConfig()
        q = _sql.query
        self._completed = q("task_clean_completed", schema)
        self._archived = q("task_clean_archived", schema)
        self._servers = q("server_clean_stale", schema)
        self._stats = q("stat_clean_old", schema)

    async def _batched(self, query: Any, params: dict[str, Any]) -> int:
        total = 0
        while True:
            async with self.pool.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(query, {**params, "limit": self.config.batch_size})
                row = await cur.fetchone()
            n = row["deleted"] if row else 0
            total += n
            if n < self.config.batch_size:
                return total

    async def run_once(self, now: datetime | None = None) -> CleanResult:
        c = self.config
        res = CleanResult(
            completed=await self._batched(self._completed, {"now": now}),
            archived=await self._batched(self._archived, {"now": now, "max_age": c.archived_max_age}),
            servers=await self._batched(self._servers, {"now": now, "max_age": c.server_max_age}),
            stats=await self._batched(self._stats, {"now": now, "max_age": c.stats_max_age}),
        )
        if res.completed or res.archived or res.servers or res.stats:
            logger.info("cleaner: deleted %s", res, extra={"action": "cleaned"})
        return res

    async def run(self, stop: asyncio.Event) -> None:
        await periodic("cleaner", self.run_once, self.config.interval, stop, first_delay=self.config.interval)
