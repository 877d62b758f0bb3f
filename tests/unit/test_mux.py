from __future__ import annotations

import collections
import random

import pytest

import pgq
from pgq.cli.worker import parse_queues
from pgq.errors import ConfigError
from pgq.mux import ServeMux
from pgq.worker import default_retry_delay, weighted_order


def test_longest_prefix_wins_and_exact_match() -> None:
    mux = ServeMux()
    mux.handle("email:", lambda t: "email")
    mux.handle("email:deliver", lambda t: "deliver")
    mux.handle("e", lambda t: "e")
    assert mux.process_task(pgq.Task("email:deliver")) == "deliver"
    assert mux.process_task(pgq.Task("email:deliver:now")) == "deliver"
    assert mux.process_task(pgq.Task("email:other")) == "email"
    assert mux.process_task(pgq.Task("event")) == "e"
    assert mux.resolve("zzz") is None


def test_decorator_and_async_detection() -> None:
    mux = ServeMux()

    @mux.handle("a")
    async def a(task: pgq.Task) -> None: ...

    @mux.handle("s")
    def s(task: pgq.Task) -> None: ...

    assert mux.resolve("a") == (a, True)
    assert mux.resolve("s") == (s, False)


def test_middleware_first_registered_is_outermost() -> None:
    mux = ServeMux()
    calls: list[str] = []

    def mw(name: str):  # type: ignore[no-untyped-def]
        def wrap(next_handler):  # type: ignore[no-untyped-def]
            def h(task):  # type: ignore[no-untyped-def]
                calls.append(f"{name}>")
                r = next_handler(task)
                calls.append(f"<{name}")
                return r

            return h

        return wrap

    mux.handle("x", lambda t: calls.append("handler"))
    mux.use(mw("outer"), mw("inner"))
    mux.process_task(pgq.Task("x"))
    assert calls == ["outer>", "inner>", "handler", "<inner", "<outer"]


def test_bad_registrations() -> None:
    mux = ServeMux()
    with pytest.raises(ValueError, match="blank"):
        mux.handle("  ", lambda t: None)
    mux.handle("a", lambda t: None)
    with pytest.raises(ValueError, match="already registered"):
        mux.handle("a", lambda t: None)
    with pytest.raises(TypeError):
        mux.handle("b", 42)  # type: ignore[call-overload]


def test_default_backoff_is_asynqs() -> None:
    t = pgq.Task("x")
    for n in (0, 1, 2, 5):
        for _ in range(50):
            d = default_retry_delay(n, RuntimeError(), t)
            assert n**4 + 15 <= d <= n**4 + 15 + 29 * (n + 1)


def test_weighted_order_follows_weights() -> None:
    random.seed(7)
    firsts = collections.Counter(weighted_order({"a": 6, "b": 3, "c": 1})[0] for _ in range(6000))
    assert 0.55 < firsts["a"] / 6000 < 0.65
    assert 0.25 < firsts["b"] / 6000 < 0.35
    assert 0.05 < firsts["c"] / 6000 < 0.15
    assert sorted(weighted_order({"a": 1, "b": 1})) == ["a", "b"]


def test_server_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="concurrency"):
        pgq.Server("postgresql://x@localhost/db", concurrency=0)
    with pytest.raises(ConfigError, match="weight"):
        pgq.Server("postgresql://x@localhost/db", queues={"a": 0})
    with pytest.raises(ConfigError, match="queues"):
        pgq.Server("postgresql://x@localhost/db", queues={})
    with pytest.raises(ConfigError, match="lease_duration"):
        pgq.Server("postgresql://x@localhost/db", lease_duration=-1)
    with pytest.raises(ConfigError, match="poll_interval"):
        pgq.Server("postgresql://x@localhost/db", poll_interval=0)
    with pytest.raises(ConfigError, match="is_failure"):
        pgq.Server("postgresql://x@localhost/db", is_failure=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="group_grace_period"):
        pgq.Server("postgresql://x@localhost/db", group_aggregator=lambda g, ts: ts[0], group_grace_period=0)
    with pytest.raises(ConfigError, match="schema"):
        pgq.Server("postgresql://x@localhost/db", schema="Bad-Name")
    s = pgq.Server(None, queues={"a": 2}, shutdown_timeout=0)
    assert s.with_options(concurrency=3).concurrency == 3


def test_parse_queues() -> None:
    assert parse_queues("critical=6, default=3,low") == {"critical": 6, "default": 3, "low": 1}
    with pytest.raises(ConfigError, match="integer"):
        parse_queues("a=x")
    with pytest.raises(ConfigError, match=">= 1"):
        parse_queues("a=0")


def test_result_writes_fold_into_the_later_outcome() -> None:
    from pgq.tasks import DONE, RESULT, RETRY, Ack
    from pgq.worker import _merge_results

    batch = [
        Ack(1, 1, RESULT, result='"a"'),
        Ack(2, 1, RESULT, result='"x"'),
        Ack(1, 1, RESULT, result='"b"'),
        Ack(1, 1, DONE),
        Ack(3, 1, RETRY, 5.0, "err", None, True),
    ]
    out = _merge_results(batch)
    assert out == [
        Ack(1, 1, DONE, result='"b"'),
        Ack(2, 1, RESULT, result='"x"'),
        Ack(3, 1, RETRY, 5.0, "err", None, True),
    ]
