"""Keeps the garbage collector off the objects a process builds at startup.

The worker's model, graphs and buffers and the engine's tokenizer and scheduler are tens of thousands of
Python objects that live as long as the process. Every full collection would walk them all, in the middle
of a step whose host work the engine times to the tenth of a millisecond (send_timing.py). Frozen, the
collector only walks what came after: requests, messages, outputs.
"""
from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Called once a server process has built everything it keeps; what is garbage now is freed first."""
    gc.collect()
    gc.freeze()
