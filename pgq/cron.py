"""Cron specs: parsing, validation with errors that name the field, and tick times.

A spec is one of:

- five fields, `minute hour day-of-month month day-of-week` (Vixie cron: names such
  as `JAN` and `MON`, ranges, lists, steps, `7` for Sunday; when both day fields are
  restricted a day matches either), evaluated in the schedule's time zone;
- a name: `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`),
  `@hourly`, which stand for the usual five fields;
- `@every <duration>`, e.g. `@every 30s`, `@every 1h30m`: ticks at whole multiples
  of the interval since the Unix epoch (UTC), so that every node computes the same
  tick times whenever it started. The interval is at least one second.

Matching the five fields is done by `cronsim` (a maintained, typed, dependency-free
evaluator from healthchecks.io); pgq checks the spec first so that a bad one raises
`CronSpecError` naming the field ("cron spec '61 * * * *': bad minute field '61'
(allowed 0-59)").

Time zones: the fields are wall-clock times in `location` (an IANA name, via
zoneinfo). Across a daylight-saving change a wall time that does not exist that day
(spring forward) fires at the first instant after the gap; a wall time that happens twice (fall back) fires
twice for minute/hour steps and once (the first time) for fixed times of day, which
is cronsim's (and cronie's) behaviour. Every tick is returned as an aware UTC
datetime: the ticks are instants, and instants are what the database stores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from pgq.errors import ConfigError

__all__ = ["CronSpecError", "Schedule", "parse", "zone"]

FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_RANGES = ("0-59", "0-23", "1-31", "1-12 or JAN-DEC", "0-7 or SUN-SAT")
_NAMED = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_EVERY_RE = re.compile(r"^@every\s+(.+)$", re.I)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS_US = {"ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_SECOND = timedelta(seconds=1)


class CronSpecError(ConfigError):
    """A cron spec that pgq cannot read; `field` names the part at fault (or is None)."""

    def __init__(self, spec: str, message: str, field: str | None = None) -> None:
        super().__init__(f"cron spec {spec!r}: {message}")
        self.spec = spec
        self.field = field


def zone(location: str | tzinfo) -> tzinfo:
    """A tzinfo from an IANA name ("Europe/Paris", "UTC") or a tzinfo."""
    if isinstance(location, tzinfo):
        return location
    if not isinstance(location, str) or not location.strip():
        raise ConfigError(f"location must be an IANA time zone name such as 'UTC', got {location!r}")
    try:
        return ZoneInfo(location)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"unknown time zone {location!r} (use an IANA name such as 'Europe/Paris')"
        ) from None


def _zone_name(tz: tzinfo) -> str:
    return getattr(tz, "key", None) or str(tz)


@dataclass(frozen=True)
class Schedule:
    """The tick times of one spec in one time zone. Ticks are aware UTC datetimes."""

    spec: str
    location: tzinfo
    #: `@every` interval in microseconds, else None (a five-field spec in `expr`).
    every_us: int | None = None
    expr: str = ""

    @property
    def location_name(self) -> str:
        return _zone_name(self.location)

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after t."""
        t = _aware(t)
        if self.every_us is not None:
            n = _since_epoch_us(t) // self.every_us + 1
            return _EPOCH + timedelta(microseconds=n * self.every_us)
        start = t.astimezone(self.location).replace(microsecond=0)
        return next(CronSim(self.expr, start)).astimezone(UTC)

    def last_at_or_before(self, t: datetime) -> datetime:
        """The latest tick at or before t."""
        t = _aware(t)
        if self.every_us is not None:
            n = _since_epoch_us(t) // self.every_us
            return _EPOCH + timedelta(microseconds=n * self.every_us)
        # cronsim steps whole seconds and returns ticks strictly before its start;
        # ticks fall on whole minutes, so starting one second after t's second is exact.
        start = t.astimezone(self.location).replace(microsecond=0) + _ONE_SECOND
        return next(CronSim(self.expr, start, reverse=True)).astimezone(UTC)

    def ticks(self, after: datetime, until: datetime) -> list[datetime]:
        """Every tick in (after, until], oldest first (for tests and previews)."""
        out = []
        t = self.next_after(after)
        while t <= _aware(until):
            out.append(t)
            t = self.next_after(t)
        return out


def _aware(t: datetime) -> datetime:
    if not isinstance(t, datetime):
        raise TypeError(f"expected a datetime, not {type(t).__name__}")
    if t.tzinfo is None or t.tzinfo.utcoffset(t) is None:
        raise ValueError(f"expected a timezone-aware datetime, got naive {t}")
    return t


def _since_epoch_us(t: datetime) -> int:
    d = t - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def _parse_every(spec: str, text: str) -> int:
    compact = re.sub(r"\s+", "", text.lower())
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(compact):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS_US[m.group(2)]
        pos = m.end()
    if not compact or pos != len(compact):
        raise CronSpecError(
            spec, f"cannot read {text!r} as an @every interval (examples: 30s, 5m, 1h30m, 2d)", "interval"
        )
    us = round(total)
    if us < 1_000_000:
        raise CronSpecError(spec, f"the @every interval must be at least 1s, got {text!r}", "interval")
    return us


def _check_fields(spec: str, text: str, expr: str, tz: tzinfo) -> None:
    parts, shown = expr.split(), text.split()
    if len(parts) != 5:
        raise CronSpecError(
            spec,
            f"expected 5 fields (minute hour day-of-month month day-of-week), found {len(parts)}; "
            "or use @every <duration>, @hourly, @daily, @weekly, @monthly, @yearly",
            None,
        )
    probe = datetime(2000, 1, 1, tzinfo=tz)
    for i, part in enumerate(parts):
        # Check each field alone (the others '*') so the error names the right one.
        alone = " ".join(part if j == i else "*" for j in range(5))
        try:
            CronSim(alone, probe)
        except CronSimError:
            raise CronSpecError(
                spec, f"bad {FIELDS[i]} field {shown[i]!r} (allowed {_RANGES[i]}, with , - / *)", FIELDS[i]
            ) from None
    try:
        it = CronSim(expr, probe)
        next(it)
    except (CronSimError, StopIteration):  # e.g. day-of-month 30 in February only
        raise CronSpecError(
            spec,
            f"day-of-month field {shown[2]!r} never occurs in month field {shown[3]!r}: "
            "the spec never matches a real date",
            "day-of-month",
        ) from None


def parse(spec: str, location: str | tzinfo = "UTC") -> Schedule:
    """A Schedule for a cron spec, or CronSpecError naming what is wrong."""
    tz = zone(location)
    if not isinstance(spec, str):
        raise CronSpecError(repr(spec), f"a cron spec must be a str, not {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise CronSpecError(spec, "the spec is blank")
    m = _EVERY_RE.match(text)
    if m:
        return Schedule(spec=text, location=tz, every_us=_parse_every(spec, m.group(1)))
    if text.startswith("@"):
        expr = _NAMED.get(text.lower())
        if expr is None:
            raise CronSpecError(
                spec, f"unknown name {text!r} (known: @every <duration>, {', '.join(sorted(_NAMED))})", None
            )
        return Schedule(spec=text, location=tz, expr=expr)
    expr = " ".join(text.upper().split())
    _check_fields(spec, text, expr, tz)
    return Schedule(spec=text, location=tz, expr=expr)
