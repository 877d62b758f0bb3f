"""enqueue_many holds Python's garbage collector off for a large batch and gives it back as it was."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from pgq.client import COPY_MIN_TASKS, collector_paused


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_a_large_batch_pauses_the_collector_and_enables_it_again() -> None:
    gc.enable()
    with collector_paused(COPY_MIN_TASKS):
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_small_batch_leaves_it_alone() -> None:
    gc.enable()
    with collector_paused(COPY_MIN_TASKS - 1):
        assert gc.isenabled()
    assert gc.isenabled()


def test_a_collector_disabled_by_the_application_stays_disabled() -> None:
    gc.disable()
    with collector_paused(COPY_MIN_TASKS):
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_an_error_gives_it_back() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), collector_paused(COPY_MIN_TASKS):
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_overlapping_calls_enable_it_when_the_last_one_ends() -> None:
    gc.enable()
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with collector_paused(COPY_MIN_TASKS):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with collector_paused(COPY_MIN_TASKS):
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other call is still running
    release.set()
    t.join(10)
    assert gc.isenabled()
