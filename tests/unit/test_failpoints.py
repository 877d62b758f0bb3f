"""The failpoint actions fault tests use: probability and jitter (pgq/_failpoints.py)."""

from __future__ import annotations

import random

import pytest

from pgq import _failpoints


@pytest.fixture(autouse=True)
def _fresh_hits() -> None:
    _failpoints._hits.clear()


def test_no_variable_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_failpoints.ENV, raising=False)
    _failpoints.hit("x.y")  # nothing happens


def test_raise_with_a_share_fires_on_about_that_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_failpoints.ENV, "x.y=raise:0.25")
    random.seed(7)
    fired = 0
    for _ in range(4000):
        try:
            _failpoints.hit("x.y")
        except _failpoints.FailpointError:
            fired += 1
    assert 800 < fired < 1200


def test_share_zero_and_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_failpoints.ENV, "a=raise:0,b=raise:1")
    for _ in range(100):
        _failpoints.hit("a")
    with pytest.raises(_failpoints.FailpointError, match="failpoint b"):
        _failpoints.hit("b")


def test_sleep_range_is_uniform_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_failpoints.ENV, "x=sleep:0.01-0.05")
    delays = [_failpoints._fire("x", "sleep:0.01-0.05") for _ in range(500)]
    assert all(0.01 <= d <= 0.05 for d in delays)
    assert max(delays) - min(delays) > 0.03  # spread, not a constant
    assert _failpoints._fire("x", "sleep:0.2") == 0.2


def test_nth_hit_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_failpoints.ENV, "x@3=raise")
    _failpoints.hit("x")
    _failpoints.hit("x")
    with pytest.raises(_failpoints.FailpointError):
        _failpoints.hit("x")
    _failpoints.hit("x")
