"""Server settings that need checking before anything starts: aggregation policies.

A bad value raises ConfigError when the Server is built (G10), naming the
setting and the queue it applies to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pgq.errors import ConfigError, InvalidArgumentError
from pgq.task import Task, parse_duration

Aggregator = Callable[[str, list[Task]], Task]

DEFAULT_GRACE_PERIOD = 60.0


@dataclass(frozen=True)
class GroupPolicy:
    """Per-queue aggregation settings (group_policies={queue: GroupPolicy(...)}).

    Fields left as None fall back to the Server's group_* settings.
    """

    grace_period: float | timedelta | str | None = None
    max_delay: float | timedelta | str | None = None
    max_size: int | None = None
    aggregator: Aggregator | None = None


@dataclass(frozen=True)
class ResolvedPolicy:
    """A queue's effective aggregation settings: seconds, None for 'no limit'."""

    queue: str
    aggregator: Aggregator
    grace_period: float
    max_delay: float | None
    max_size: int | None


def _duration(value: Any, name: str, where: str) -> float:
    try:
        return parse_duration(value, name)
    except InvalidArgumentError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _grace(value: Any, where: str) -> float:
    s = _duration(value, "group_grace_period", where)
    if s <= 0:
        raise ConfigError(f"{where}: group_grace_period must be positive, got {value!r}")
    return s


def _max_delay(value: Any, where: str) -> float | None:
    if value is None:
        return None
    s = _duration(value, "group_max_delay", where)
    if s < 0:
        raise ConfigError(f"{where}: group_max_delay must not be negative, got {value!r}")
    return s or None


def _max_size(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: group_max_size must be an int, got {value!r}")
    if value < 0:
        raise ConfigError(f"{where}: group_max_size must not be negative, got {value}")
    return value or None


def resolve_group_policies(
    queues: Iterable[str],
    *,
    aggregator: Aggregator | None,
    grace_period: Any = DEFAULT_GRACE_PERIOD,
    max_delay: Any = None,
    max_size: Any = None,
    policies: Mapping[str, GroupPolicy] | None = None,
) -> dict[str, ResolvedPolicy]:
    """The effective policy of every served queue that has an aggregator.

    Validates the server-wide settings even when no queue aggregates, so a bad
    value is reported at construction whatever else is configured.
    """
    queues = list(queues)
    if aggregator is not None and not callable(aggregator):
        raise ConfigError(f"group_aggregator must be callable, got {aggregator!r}")
    base_grace = _grace(DEFAULT_GRACE_PERIOD if grace_period is None else grace_period, "Server")
    base_delay = _max_delay(max_delay, "Server")
    base_size = _max_size(max_size, "Server")
    policies = dict(policies or {})
    for q, p in policies.items():
        if not isinstance(p, GroupPolicy):
            raise ConfigError(f"group_policies[{q!r}] must be a pgq.GroupPolicy, got {type(p).__name__}")
        if q not in queues:
            raise ConfigError(f"group_policies names queue {q!r}, which this server does not serve")
        if p.aggregator is not None and not callable(p.aggregator):
            raise ConfigError(f"group_policies[{q!r}].aggregator must be callable")
    out: dict[str, ResolvedPolicy] = {}
    for q in queues:
        p = policies.get(q, GroupPolicy())
        where = f"group_policies[{q!r}]"
        agg = p.aggregator or aggregator
        grace = base_grace if p.grace_period is None else _grace(p.grace_period, where)
        delay = base_delay if p.max_delay is None else _max_delay(p.max_delay, where)
        size = base_size if p.max_size is None else _max_size(p.max_size, where)
        if agg is not None:
            out[q] = ResolvedPolicy(q, agg, grace, delay, size)
    return out
