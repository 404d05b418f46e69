"""The garbage collector's pauses during a timed run, by generation: a full collection in the middle of a run once held
the host for 220-400 ms while the GPU ran dry (docs/performance.md, eighteenth session)."""
from __future__ import annotations

import gc
import time

# CPython 3.11-3.13's three generations; a collection of the oldest is a full one
GENERATIONS = ("generation 0", "generation 1", "generation 2 (full)")


class CollectorPauses:
    """Inside: every collection counted and timed, from the collector's own callbacks."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest_s = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __enter__(self) -> CollectorPauses:
        gc.callbacks.append(self._on_collection)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation, elapsed = info["generation"], time.perf_counter() - self._started
        self.counts[generation] += 1
        self.seconds[generation] += elapsed
        self.longest_s[generation] = max(self.longest_s[generation], elapsed)

    def summary(self) -> str:
        parts = [f"{name} {count} ({1e3 * seconds:.1f} ms, the longest {1e3 * longest:.1f} ms)"
                 for name, count, seconds, longest in zip(GENERATIONS, self.counts, self.seconds, self.longest_s)]
        return "garbage collections during the run: " + ", ".join(parts)
