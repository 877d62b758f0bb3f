"""Database trouble logged as episodes (pgq/_outage.py): one WARNING at the start, one INFO
at the end, DEBUG in between, a reminder while it lasts."""

from __future__ import annotations

import logging

import psycopg
import pytest

from pgq._outage import POOL_WARNING_EVERY, Outage, PoolWarnings, is_database_error


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pgq.database" and r.levelno == level]


def test_an_episode_is_two_lines_whatever_fails_how_often(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pgq.database")
    o = Outage(remind=3600)
    err = psycopg.OperationalError("canceling statement due to statement timeout\nDETAIL: x")
    for _ in range(10):
        for loop in ("claimer", "flusher", "recoverer", "heartbeat"):
            o.failed(loop, err, 0.05)
    o.ok("claimer")
    o.ok("flusher")
    o.ok("heartbeat")
    assert o.active and o.episodes == 0  # the recoverer has not succeeded yet
    assert _records(caplog, logging.INFO) == []
    o.ok("recoverer")
    assert not o.active and o.episodes == 1
    (warning,) = _records(caplog, logging.WARNING)
    assert "claimer" in warning and "statement timeout" in warning and "DETAIL" not in warning
    (info,) = _records(caplog, logging.INFO)
    assert "claimer 10x, flusher 10x, heartbeat 10x, recoverer 10x" in info
    assert len(_records(caplog, logging.DEBUG)) == 39


def test_a_lasting_outage_is_reminded_and_a_new_one_starts_afresh(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pgq.database")
    o = Outage(remind=0.0)  # every later failure reminds
    err = psycopg.OperationalError("the database system is shutting down")
    o.failed("claimer", err)
    o.failed("claimer", err)
    o.failed("flusher", err)
    warnings = _records(caplog, logging.WARNING)
    assert len(warnings) == 3 and "go on" in warnings[1] and "claimer 2x" in warnings[1]
    o.ok("flusher")
    o.ok("claimer")
    o.ok("claimer")  # nothing more to end
    assert len(_records(caplog, logging.INFO)) == 1
    o.failed("cleaner", err)
    assert "database error in the cleaner" in _records(caplog, logging.WARNING)[-1]


def test_ok_without_an_episode_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pgq.database")
    o = Outage()
    for _ in range(1000):
        o.ok("claimer")
    assert caplog.records == [] and o.episodes == 0


def test_which_errors_are_the_databases() -> None:
    assert is_database_error(psycopg.OperationalError("x"))
    assert is_database_error(psycopg.InterfaceError("x"))
    assert is_database_error(psycopg.errors.QueryCanceled("x"))  # statement_timeout
    assert is_database_error(psycopg.errors.LockNotAvailable("x"))  # lock_timeout
    assert not is_database_error(psycopg.errors.UniqueViolation("x"))
    assert not is_database_error(psycopg.ProgrammingError("x"))
    assert not is_database_error(ValueError("x"))


def test_pool_warnings_about_pgq_pools_pass_once_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("pgq._outage.time.monotonic", lambda: clock[0])
    f = PoolWarnings()

    def rec(msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("psycopg.pool", level, __file__, 1, msg, args, None)

    err = psycopg.OperationalError("connection refused")
    connecting, gave_up = "error connecting in %r: %s", "reconnection attempt in pool %r failed after %s sec"
    assert f.filter(rec(connecting, "pgq-worker", err))
    assert not f.filter(rec(connecting, "pgq-worker", err))  # a repeat within the minute
    assert f.filter(rec(gave_up, "pgq-worker", 5.0))  # another warning: its own minute
    assert f.filter(rec(connecting, "pgq-client", err))  # another pool of pgq's
    assert f.filter(rec(connecting, "app-pool", err)) and f.filter(rec(connecting, "app-pool", err))
    assert f.filter(rec("connection requested from %r", "pgq-worker", level=logging.INFO))
    clock[0] += POOL_WARNING_EVERY
    assert f.filter(rec(connecting, "pgq-worker", err))
    assert not f.filter(rec(connecting, "pgq-worker", err))
