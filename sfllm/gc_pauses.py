"""Keeps the garbage collector's long pauses out of the engine's loops.

torch, Triton, the worker's model and graphs, the engine's tokenizer and scheduler and the frontend's app are
hundreds of thousands of Python objects that live as long as the process: a full collection walked them for 220-400
ms on the GPU host, in the middle of a run whose host work is timed to the tenth of a millisecond (send_timing.py).
A server process freezes them once it has built them (`freeze_startup_objects`): the collector then walks only what
came after (requests, messages, outputs).

The offline API shares its process with the caller, who may drop an engine and build another and may have frozen
objects of its own: freezing the engine there for good would keep its reference cycles (and the GPU memory they
hold) past its end. There `full_collections_deferred` keeps full collections out of a generate call instead: the
younger generations are still collected, and a full collection that falls due comes at the collector's first chance
after the call. CPython 3.14 collects the old generation in small steps beside each young collection (no long pause
to put off), and a free-threaded build has one generation: there it changes nothing.
"""
from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator


def freeze_startup_objects() -> None:
    """Called once a server process has built everything it keeps; what is garbage now is freed first."""
    gc.collect()
    gc.freeze()


# the collector of CPython 3.11-3.13 with the GIL: three generations, a full collection when the middle one has been
# collected threshold[2] times since the last (and enough objects have reached the oldest)
_GENERATIONAL = sys.version_info < (3, 14) and getattr(sys, "_is_gil_enabled", lambda: True)()
# above any count of collections of the middle generation a call can reach
_NEVER = 1 << 30
# Collections of the middle generation inside deferred calls, since the last full collection, from which a call ends
# with a full collection: a caller that runs generate back to back might otherwise never get one. ~10 minutes of
# the standard workload's steps on the GPU host (9 in its 5.4 s); the cyclic garbage they leave is ~1 object a step.
_OVERDUE = 1000


class _Deferral:
    """The state shared by every deferred call of the process (calls may overlap on threads, or nest)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.thresholds = (0, 0, 0)  # the caller's, while calls run
        self.entry_count = 0  # gc.get_count()[2] when the outermost call began
        self.put_off = 0  # collections of the middle generation inside calls since the last full collection seen
        self.count_at_exit = 0

    def enter(self) -> None:
        with self.lock:
            self.depth += 1
            if self.depth > 1:
                return
            count = gc.get_count()[2]
            if count < self.count_at_exit:  # a full collection ran between calls
                self.put_off = 0
            self.entry_count = count
            self.thresholds = gc.get_threshold()
            gc.set_threshold(self.thresholds[0], self.thresholds[1], _NEVER)

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth:
                return
            added = gc.get_count()[2] - self.entry_count
            self.put_off = 0 if added < 0 else self.put_off + added  # (below 0: a full collection ran inside)
            # before the thresholds go back, so that no automatic full collection comes between
            if self.put_off >= _OVERDUE and gc.isenabled() and self.thresholds[0]:
                gc.collect()
                self.put_off = 0
            gc.set_threshold(*self.thresholds)
            self.count_at_exit = gc.get_count()[2]


_deferral = _Deferral()


@contextlib.contextmanager
def full_collections_deferred() -> Iterator[None]:
    """Inside, no full collection; after the outermost call, the collector's thresholds as they were, and a full
    collection if calls have put one off for long (_OVERDUE)."""
    if not _GENERATIONAL:
        yield
        return
    _deferral.enter()
    try:
        yield
    finally:
        _deferral.exit()
