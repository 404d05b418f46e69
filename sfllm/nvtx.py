"""NVTX ranges that mark the phases of a step on an nsys timeline, free where CUDA is absent."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    # never imports torch itself: the scheduler process runs without it
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
