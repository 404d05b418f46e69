"""The engine loop's time accounting, on a scripted clock."""
from __future__ import annotations

from sfllm.loop_time import LoopTime, loop_time


def test_laps_are_summed_by_activity_and_reported_once_per_interval() -> None:
    now = [0.0]
    loop = LoopTime(interval_s=10.0, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 1.0
        loop.lap("waiting for the worker")
        now[0] += 0.5
        loop.lap("results")
    assert loop.report(num_steps=4) is None  # 6 s: the interval has not passed
    now[0] += 4.0
    loop.lap("scheduling")
    line = loop.report(num_steps=4)
    assert line == ("4 steps in 10.0 s: waiting for the worker 40% (1000000 us/step, 1000000 us x 4), "
                    "scheduling 40% (1000000 us/step, 4000000 us x 1), results 20% (500000 us/step, 500000 us x 4)")
    now[0] += 11.0
    loop.lap("idle")
    assert loop.report(num_steps=4) is None  # a new interval, and no step ran in it
    assert loop.seconds == {} and loop.calls == {}


def test_a_wait_begun_before_a_report_is_charged_within_the_next_interval() -> None:
    """The worker logs between a step's last lap and its wait for the next step: the wait's lap then spans
    the report, and its share must not pass 100%."""
    now = [0.0]
    loop = LoopTime(interval_s=10.0, clock=lambda: now[0])
    now[0] += 10.0
    loop.lap("step")
    now[0] += 0.5
    assert loop.report(num_steps=1) is not None
    now[0] += 20.0
    loop.lap("waiting")
    now[0] += 1.0
    loop.lap("step")
    line = loop.report(num_steps=2)
    assert line == ("1 steps in 21.5 s: waiting 95% (20500000 us/step, 20500000 us x 1), "
                    "step 5% (1000000 us/step, 1000000 us x 1)")


def test_an_idle_interval_is_not_spread_over_the_next_report() -> None:
    """The worker reports while it waits for a step (its wait is lapped only when the step comes): after an
    hour idle, the next report covers the time since the last idle report, not the hour."""
    now = [0.0]
    loop = LoopTime(interval_s=10.0, clock=lambda: now[0])
    now[0] += 1.0
    loop.lap("step")
    for _ in range(360):  # an hour of waiting, reported on each 10 s poll
        now[0] += 10.0
        loop.report(num_steps=1)
    now[0] += 2.0
    loop.lap("waiting")
    now[0] += 8.0
    loop.lap("step")
    assert loop.report(num_steps=2) == ("1 steps in 10.0 s: step 80% (8000000 us/step, 8000000 us x 1), "
                                        "waiting 20% (2000000 us/step, 2000000 us x 1)")


def test_disable_log_stats_gives_a_clock_that_never_reports() -> None:
    for disabled, reports in ((False, True), (True, False)):
        now = [0.0]
        loop = loop_time(disabled)
        loop._clock = lambda: now[0]
        loop._started = loop._last = 0.0
        loop.lap("step")
        now[0] += 3600.0
        loop.lap("step")
        assert (loop.report(num_steps=2) is not None) == reports
