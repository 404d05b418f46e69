"""What a PyTorch profiler Chrome trace says about the GPU: how long it sat idle between
kernels, and which kernels took the time."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class GpuIdle:
    span_us: float
    busy_us: float
    num_kernels: int

    @property
    def idle_fraction(self) -> float:
        return 1.0 - self.busy_us / self.span_us if self.span_us > 0 else 0.0


@dataclass
class KernelTotal:
    name: str
    total_us: float
    count: int


def _gpu_events(trace: Path) -> list[dict]:
    events = json.loads(trace.read_text()).get("traceEvents", [])
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def top_kernels(trace: Path, limit: int = 10) -> list[KernelTotal]:
    """GPU time per kernel name, largest first."""
    totals: dict[str, KernelTotal] = {}
    for event in _gpu_events(trace):
        name = event.get("name", "?")
        total = totals.setdefault(name, KernelTotal(name, 0.0, 0))
        total.total_us += event.get("dur", 0)
        total.count += 1
    return sorted(totals.values(), key=lambda t: t.total_us, reverse=True)[:limit]


def gpu_idle(trace: Path) -> GpuIdle:
    kernels = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in _gpu_events(trace))
    if not kernels:
        return GpuIdle(0.0, 0.0, 0)
    busy = 0.0
    current_start, current_end = kernels[0]
    for start, end in kernels[1:]:
        if start > current_end:
            busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    busy += current_end - current_start
    return GpuIdle(kernels[-1][1] - kernels[0][0], busy, len(kernels))
