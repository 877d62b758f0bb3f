"""pgq.cron: spec parsing, errors naming the field, tick arithmetic, time zones."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

import pgq
from pgq.cron import CronSpecError, parse


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("spec", "field", "shown"),
    [
        ("61 * * * *", "minute", "'61'"),
        ("* 24 * * *", "hour", "'24'"),
        ("* * 0 * *", "day-of-month", "'0'"),
        ("* * 32 * *", "day-of-month", "'32'"),
        ("* * * 13 *", "month", "'13'"),
        ("* * * FOO *", "month", "'FOO'"),
        ("* * * * 8", "day-of-week", "'8'"),
        ("* * * * Funday", "day-of-week", "'Funday'"),
        ("*/0 * * * *", "minute", "'*/0'"),
        ("5-1 * * * *", "minute", "'5-1'"),
        ("x * * * *", "minute", "'x'"),
        ("0 0 30 2 *", "day-of-month", "'30'"),
        ("@every 0.5s", "interval", "at least 1s"),
        ("@every soon", "interval", "'soon'"),
    ],
)
def test_bad_spec_names_the_field(spec: str, field: str, shown: str) -> None:
    with pytest.raises(CronSpecError) as ei:
        parse(spec)
    assert ei.value.field == field
    msg = str(ei.value)
    assert repr(spec) in msg and shown in msg
    if field != "interval":
        assert field in msg
    assert isinstance(ei.value, pgq.ConfigError) and isinstance(ei.value, ValueError)


@pytest.mark.parametrize("spec", ["* * *", "* * * * * *", "", "   ", "@reboot", "@every"])
def test_bad_shape(spec: str) -> None:
    with pytest.raises(CronSpecError, match="cron spec"):
        parse(spec)


def test_bad_location() -> None:
    with pytest.raises(pgq.ConfigError, match="Mars/Olympus"):
        parse("@daily", "Mars/Olympus")


@pytest.mark.parametrize(
    ("spec", "after", "expected"),
    [
        ("*/15 * * * *", utc(2024, 5, 1, 12, 7, 3), utc(2024, 5, 1, 12, 15)),
        ("0 9 * * MON-FRI", utc(2024, 5, 3, 9, 0), utc(2024, 5, 6, 9, 0)),  # Fri 9:00 -> Mon
        ("@hourly", utc(2024, 5, 1, 12, 0), utc(2024, 5, 1, 13, 0)),
        ("@daily", utc(2024, 5, 1, 12, 0), utc(2024, 5, 2)),
        ("@midnight", utc(2024, 5, 1, 12, 0), utc(2024, 5, 2)),
        ("@weekly", utc(2024, 5, 1), utc(2024, 5, 5)),  # Sunday
        ("@monthly", utc(2024, 5, 1), utc(2024, 6, 1)),
        ("@yearly", utc(2024, 5, 1), utc(2025, 1, 1)),
        ("@annually", utc(2024, 5, 1), utc(2025, 1, 1)),
        ("0 0 29 2 *", utc(2024, 3, 1), utc(2028, 2, 29)),
        ("0 0 * * 7", utc(2024, 5, 1), utc(2024, 5, 5)),  # 7 is Sunday too
        ("@every 30s", utc(2024, 5, 1, 12, 7, 3), utc(2024, 5, 1, 12, 7, 30)),
        ("@every 1h30m", utc(2024, 5, 1, 12, 7), utc(2024, 5, 1, 13, 30)),
        ("@every 1s", utc(2024, 5, 1, 12, 0, 0), utc(2024, 5, 1, 12, 0, 1)),
    ],
)
def test_next_after(spec: str, after: datetime, expected: datetime) -> None:
    assert parse(spec).next_after(after) == expected


def test_last_at_or_before_includes_the_instant() -> None:
    s = parse("*/15 * * * *")
    assert s.last_at_or_before(utc(2024, 5, 1, 12, 15)) == utc(2024, 5, 1, 12, 15)
    assert s.last_at_or_before(utc(2024, 5, 1, 12, 14, 59, 999999)) == utc(2024, 5, 1, 12, 0)
    e = parse("@every 1s")
    assert e.last_at_or_before(utc(2024, 5, 1, 12, 0, 5, 400000)) == utc(2024, 5, 1, 12, 0, 5)
    assert e.last_at_or_before(utc(2024, 5, 1, 12, 0, 5)) == utc(2024, 5, 1, 12, 0, 5)


def test_every_is_aligned_to_the_epoch_so_nodes_agree() -> None:
    s = parse("@every 7s")
    a = s.next_after(utc(2024, 5, 1, 12, 0, 0))
    assert int(a.timestamp()) % 7 == 0
    # nodes asking at any instant within the interval get the same tick
    for ms in (1, 3000, 6999):
        assert s.next_after(a - timedelta(milliseconds=ms)) == a
    assert s.next_after(a) == a + timedelta(seconds=7)


def test_ticks_many() -> None:
    s = parse("*/5 * * * *")
    ticks = s.ticks(utc(2024, 1, 1), utc(2024, 1, 2))
    assert len(ticks) == 288
    assert all(b - a == timedelta(minutes=5) for a, b in itertools.pairwise(ticks))


def test_location_wall_clock() -> None:
    s = parse("0 9 * * *", "Europe/Paris")
    assert s.next_after(utc(2024, 1, 15)) == utc(2024, 1, 15, 8)  # CET, UTC+1
    assert s.next_after(utc(2024, 7, 15)) == utc(2024, 7, 15, 7)  # CEST, UTC+2


def test_dst_spring_forward_runs_at_the_end_of_the_gap() -> None:
    # 2024-03-31 02:30 does not exist in Paris: that day it runs at 03:00 CEST (01:00 UTC).
    s = parse("30 2 * * *", "Europe/Paris")
    assert s.next_after(utc(2024, 3, 30, 12)) == utc(2024, 3, 31, 1, 0)
    assert s.next_after(utc(2024, 3, 31, 1, 0)) == utc(2024, 4, 1, 0, 30)


def test_dst_fall_back_fixed_time_fires_once() -> None:
    s = parse("30 2 * * *", "Europe/Paris")
    ticks = s.ticks(utc(2024, 10, 26, 12), utc(2024, 10, 28, 12))
    assert ticks == [utc(2024, 10, 27, 0, 30), utc(2024, 10, 28, 1, 30)]


def test_spec_text_is_kept_and_names_are_case_insensitive() -> None:
    assert parse(" @Daily ").spec == "@Daily"
    assert parse("0 0 * jan sun").next_after(utc(2024, 1, 1)) == utc(2024, 1, 7)
