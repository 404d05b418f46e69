"""When the server sends the next step: as late as the device still gets it in time.

A step sent while another runs waits behind it on the worker; a request that arrives meanwhile (a
high-priority one) can only join the step after. So the engine holds the next step back until the one
in flight is about to end, by `send_ahead_s`: the host time the next step needs before the device can
start it (the engine's scheduling and the worker's staging, with room to spare), never less than
SEND_AHEAD_MIN_S nor more than SEND_AHEAD_MAX_S. Both times come from recent steps of the same size: a
decode step after a long prefill step must not be expected to last as long, or the device would wait for
the step after it; and the next step, expected to be like the newest in flight, needs the host time of
steps of that size among the recent ones: a decode step's, not that of the 8,192-token prefill steps or the
high-priority prefills among the last decodes (a step of another size than expected may start late, by the
difference).
"""
from __future__ import annotations

from collections import deque

SEND_AHEAD_MIN_S = 0.002
# Enough for any step's host work (an eager GPU step takes 15-25 ms, docs/performance.md); also where the
# send-ahead stays on a CPU, whose worker computes the forward as it "launches" it
SEND_AHEAD_MAX_S = 0.05
# room for the spread of host times and the message's way to the worker
SEND_AHEAD_FACTOR = 1.5
SEND_AHEAD_SLACK_S = 0.001
RECENT_STEPS = 32

# The hold: a step sent behind one expected to last at least HOLD_MIN_STEP_S waits on the worker, staged, until
# the step in flight ends, or is expected to (whichever comes first), so that a high-priority arrival's urgent
# step can go before it all along the step in flight. The price: where the step in flight ends before it was
# expected to, the device waits for the worker's wake-up and the launch (estimated ~0.1-0.3 ms, not measured
# alone), the reason shorter steps are not held (the step a high-priority request waits behind is short anyway).
# A hold that ended 1.5 ms before the step in flight (2026-12-03) left a window in which back-to-back probes kept
# arriving, too late for it.
# An urgent step is worth sending while the held step has URGENT_MARGIN_S of its hold left (the message's way).
HOLD_MIN_STEP_S = 0.004
URGENT_MARGIN_S = 0.0003
# Steps are held only while high priority came lately (sfllm/scheduler/scheduler.py, HIGH_PRIORITY_LATELY_S): a
# server without that traffic pays nothing (a burst's steps of ~6 ms ran 4% longer with holds in one A/B,
# 2026-12-03).


def size_class(num_tokens: int) -> int:
    """Steps of (2^(k-1), 2^k] tokens are expected to take as long as each other."""
    return max(num_tokens - 1, 0).bit_length()


class SendTiming:
    def __init__(self) -> None:
        # (size class, scheduling + the worker's staging) of the last RECENT_STEPS steps
        self._host_s: deque[tuple[int, float]] = deque(maxlen=RECENT_STEPS)
        self._duration_by_size: dict[int, float] = {}
        self._last_duration_s = 0.0

    def record(self, num_tokens: int, duration_s: float, schedule_s: float, launch_s: float) -> None:
        """A step is back: `duration_s` from the end of the step before (or its sending, into an empty
        pipeline) to its result, `schedule_s` the engine's and `launch_s` the worker's host time for it."""
        size = size_class(num_tokens)
        self._duration_by_size[size] = duration_s
        self._last_duration_s = duration_s
        self._host_s.append((size, schedule_s + launch_s))

    def expected_duration_s(self, num_tokens: int) -> float:
        """How long a step of `num_tokens` will take: the last of its size, else the last step's."""
        return self._duration_by_size.get(size_class(num_tokens), self._last_duration_s)

    def send_ahead_s(self, num_tokens: int) -> float:
        """How long before the step in flight ends to send the next, expected to be of `num_tokens` like the
        newest in flight: from the most host time a step of that size took among the last RECENT_STEPS; with
        none of that size among them, the most any of them took, and with nothing measured yet the most there is."""
        if not self._host_s:
            return SEND_AHEAD_MAX_S
        size = size_class(num_tokens)
        same_size = [host_s for step_size, host_s in self._host_s if step_size == size]
        host_s = max(same_size) if same_size else max(host_s for _, host_s in self._host_s)
        needed = SEND_AHEAD_FACTOR * host_s + SEND_AHEAD_SLACK_S
        return min(SEND_AHEAD_MAX_S, max(SEND_AHEAD_MIN_S, needed))
