"""Where a process loop's time goes, summed by activity and logged every interval while steps run.

At small batches a decode step is bound by host work. The engine's line tells whether it waits for
the worker (the GPU or the worker's host work sets the pace) or the worker waits for it (scheduling,
results, frontend messages do); the worker's line splits its own time into waiting and the phases
of a step.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

LOG_INTERVAL_S = 10.0


class LoopTime:
    """`lap(activity)` charges the time since the previous lap to `activity`: one clock read each."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.perf_counter) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._last = self._started = clock()
        self._steps_at_start = 0

    def lap(self, activity: str) -> None:
        now = self._clock()
        self.seconds[activity] = self.seconds.get(activity, 0.0) + now - self._last
        self.calls[activity] = self.calls.get(activity, 0) + 1
        self._last = now

    def report(self, num_steps: int) -> str | None:
        """Once an interval has passed: each activity's share of it, time per step, and time per lap and
        laps (None if no step ran); the next interval starts."""
        now = self._clock()
        elapsed = now - self._started
        if elapsed < self.interval_s:
            return None
        steps = num_steps - self._steps_at_start
        parts = [f"{activity} {100 * seconds / elapsed:.0f}% ({1e6 * seconds / max(steps, 1):.0f} us/step, "
                 f"{1e6 * seconds / self.calls[activity]:.0f} us x {self.calls[activity]})"
                 for activity, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1])]
        self.seconds = {}
        self.calls = {}
        self._steps_at_start = num_steps
        if not steps:
            # an idle interval: a wait under way is charged from now on, not spread over the next steps' report
            self._started = self._last = now
            return None
        # The next interval starts at the last lap, whose successor's time is charged to it: from `now`, a long
        # wait lapped after this report would count time before the interval and read over 100%.
        self._started = self._last
        return f"{steps} steps in {elapsed:.1f} s: " + ", ".join(parts)


def loop_time(disable_log_stats: bool) -> LoopTime:
    """A process loop's clock: reporting every LOG_INTERVAL_S, or never (the disable_log_stats setting)."""
    return LoopTime(math.inf if disable_log_stats else LOG_INTERVAL_S)
