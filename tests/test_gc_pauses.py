"""sfllm.gc_pauses.full_collections_deferred on its own: nested calls, calls overlapping on threads, an exception
inside, and a caller who switched the collector off."""
from __future__ import annotations

import gc
import threading

import pytest

from sfllm import gc_pauses
from sfllm.gc_pauses import full_collections_deferred

pytestmark = pytest.mark.skipif(not gc_pauses._GENERATIONAL, reason="a collector without a full generation to put off")


@pytest.fixture(autouse=True)
def callers_thresholds():
    chosen = gc.get_threshold()
    gc.set_threshold(500, 7, 9)
    yield (500, 7, 9)
    gc.set_threshold(*chosen)


def deferred() -> bool:
    return gc.get_threshold()[2] >= 1 << 30


def test_nested_calls_give_the_thresholds_back_after_the_outermost(callers_thresholds) -> None:
    with full_collections_deferred():
        with full_collections_deferred():
            assert deferred()
        assert deferred()
    assert gc.get_threshold() == callers_thresholds


def test_calls_overlapping_on_threads_give_the_thresholds_back_after_the_last(callers_thresholds) -> None:
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with full_collections_deferred():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(10)
    with full_collections_deferred():
        second_in.set()
        first_out.wait(10)
        assert first_out.is_set() and deferred()  # the first call ended inside this one
    thread.join(10)
    assert gc.get_threshold() == callers_thresholds


def test_an_exception_inside_gives_the_thresholds_back(callers_thresholds) -> None:
    with pytest.raises(ValueError):
        with full_collections_deferred():
            raise ValueError("inside")
    assert gc.get_threshold() == callers_thresholds


def test_an_overdue_collection_waits_for_a_caller_who_switched_the_collector_off(monkeypatch) -> None:
    full = []

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)
    monkeypatch.setattr(gc_pauses, "_OVERDUE", 0)
    gc.callbacks.append(on_collection)
    gc.disable()
    try:
        with full_collections_deferred():
            pass
        assert not full
        gc.enable()
        with full_collections_deferred():
            pass
        assert full == [1]
    finally:
        gc.enable()
        gc.callbacks.remove(on_collection)
