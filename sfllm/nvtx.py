"""Named ranges for the phases of a step: NVTX ranges on an nsys timeline, and, while a PyTorch
profiler records, ranges in its trace too (`sfllm.bench.profiler_trace` reads them). Free where CUDA
is absent."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    # never imports torch itself: the engine process runs without it
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        yield
        return
    profiled = torch.autograd.profiler._is_profiler_enabled
    torch.cuda.nvtx.range_push(name)
    try:
        if profiled:
            with torch.profiler.record_function(name):
                yield
        else:
            yield
    finally:
        torch.cuda.nvtx.range_pop()
