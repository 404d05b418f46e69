"""Keeps the garbage collector off the objects a process builds at startup.

torch, Triton, the worker's model and graphs, the engine's tokenizer and scheduler and the frontend's app are
hundreds of thousands of Python objects that live as long as the process: a full collection walked them for 220
ms on the GPU host, in the middle of a run whose host work is timed to the tenth of a millisecond (send_timing.py).
Frozen, the collector only walks what came after: requests, messages, outputs.

The offline API shares its process with the caller, who may drop an engine and build another and may have frozen
objects of its own: freezing the engine there for good would keep its reference cycles (and the GPU memory they
hold) past its end. There `full_collections_deferred` keeps full collections out of a generate call instead: the
young generations are still collected, and a full collection that falls due runs after the call.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def freeze_startup_objects() -> None:
    """Called once a server process has built everything it keeps; what is garbage now is freed first."""
    gc.collect()
    gc.freeze()


# above any count of collections of the middle generation a call can reach
_NEVER = 1 << 30
# Collections of the middle generation since the last full one (gc.get_count()[2]) from which a call ends with a full
# collection: a caller that runs generate back to back would otherwise never get one. ~10 minutes of the standard
# workload's steps on the GPU host (9 in its 5.4 s); the cyclic garbage they leave is ~1 object a step.
_OVERDUE = 1000


@contextlib.contextmanager
def full_collections_deferred() -> Iterator[None]:
    """Inside, no full collection; after, the collector's thresholds as they were, and a full collection if one has
    been put off for long (_OVERDUE)."""
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], _NEVER)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if gc.get_count()[2] >= _OVERDUE:
            gc.collect()
