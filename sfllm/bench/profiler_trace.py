"""What a PyTorch profiler Chrome trace says about the GPU: how long it sat idle between
kernels, which kernels took the time, and what the worker's host thread was doing while the
GPU waited."""
from __future__ import annotations

import bisect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The named phases of a step (sfllm.nvtx ranges), in the order they run: "schedule" where the
# scheduler shares the process (the offline engine), "receive" and "send_result" where it does not.
PHASES = ("schedule", "receive", "prepare", "forward", "sample", "send_result")
SHORT_GAP_US = 5.0  # shorter gaps between kernels are the device's own, not the host's
PAIRS_SHOWN = 6  # of the device-side gaps, the largest (work before, work after) pairs
NAME_CHARS = 48


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


def _load(trace: Path) -> list[dict]:
    return [e for e in json.loads(trace.read_text()).get("traceEvents", []) if e.get("ph") == "X"]


def _gpu_events(trace: Path | list[dict]) -> list[dict]:
    events = _load(trace) if isinstance(trace, Path) else trace
    return [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def top_kernels(trace: Path, limit: int = 10) -> list[KernelTotal]:
    """GPU time per kernel name, largest first."""
    totals: dict[str, KernelTotal] = {}
    for event in _gpu_events(trace):
        name = event.get("name", "?")
        total = totals.setdefault(name, KernelTotal(name, 0.0, 0))
        total.total_us += event.get("dur", 0)
        total.count += 1
    return sorted(totals.values(), key=lambda t: t.total_us, reverse=True)[:limit]


def top_host_calls(trace: Path, limit: int = 15) -> list[KernelTotal]:
    """Host time per operator and CUDA API call name (inclusive of what they call), largest first."""
    totals: dict[str, KernelTotal] = {}
    for event in _load(trace):
        if event.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver"):
            total = totals.setdefault(event["name"], KernelTotal(event["name"], 0.0, 0))
            total.total_us += event.get("dur", 0)
            total.count += 1
    return sorted(totals.values(), key=lambda t: t.total_us, reverse=True)[:limit]


def gpu_idle(trace: Path | list[dict]) -> GpuIdle:
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


@dataclass
class IdleCauses:
    """The GPU's idle time in a trace, split by what the host was doing (microseconds)."""
    span_us: float
    busy_us: float
    short_gaps_us: float = 0.0        # gaps under SHORT_GAP_US
    waiting_for_step_us: float = 0.0  # before the step that ended the gap was received (or scheduled)
    launched_late_us: dict[str, float] = field(default_factory=dict)  # by the phase that launched late
    not_host_us: float = 0.0          # the next work was launched before the gap began
    # not_host_us by the GPU work on either side of the gap: (before, after) -> us
    not_host_by_pair: dict[tuple[str, str], float] = field(default_factory=dict)
    num_steps: int = 0
    phase_us: dict[str, list[float]] = field(default_factory=dict)  # each phase's durations

    @property
    def idle_us(self) -> float:
        return self.span_us - self.busy_us


def idle_causes(trace: Path) -> IdleCauses:
    """Charges every idle gap of the GPU to the host. The work that ends a gap was launched by a host
    call (the trace links the two by correlation id); when that launch came after the gap began, the
    GPU waited for the host: the gap up to the start of the step's "receive" (or, in one process, its
    "schedule") is charged to waiting for the step, the rest to the phase around the launch."""
    events = _load(trace)
    gpu = sorted(_gpu_events(events), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    phases = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                    if e.get("cat") == "user_annotation" and e.get("name") in PHASES)
    step_starts = [start for start, _, name in phases if name in ("receive", "schedule")]
    idle = gpu_idle(gpu)
    causes = IdleCauses(idle.span_us, idle.busy_us, num_steps=sum(1 for p in phases if p[2] == "forward"))
    for start, end, name in phases:
        causes.phase_us.setdefault(name, []).append(end - start)
    busy_end = gpu[0]["ts"] + gpu[0].get("dur", 0) if gpu else 0.0
    last = gpu[0] if gpu else None  # the work that ends last so far
    for event in gpu[1:]:
        start = event["ts"]
        if start <= busy_end:
            if start + event.get("dur", 0) > busy_end:
                busy_end, last = start + event.get("dur", 0), event
            continue
        gap = start - busy_end
        launch = launches.get(event.get("args", {}).get("correlation"))
        if gap < SHORT_GAP_US:
            causes.short_gaps_us += gap
        elif launch is None or launch <= busy_end:
            causes.not_host_us += gap
            pair = (last.get("name", "?"), event.get("name", "?"))
            causes.not_host_by_pair[pair] = causes.not_host_by_pair.get(pair, 0.0) + gap
        else:
            received = step_starts[bisect.bisect_right(step_starts, launch) - 1] \
                if step_starts and step_starts[0] <= launch else None
            waited = max(0.0, min(received, start) - busy_end) if received is not None else 0.0
            causes.waiting_for_step_us += waited
            phase = _phase_at(phases, launch) or "outside the phases"
            causes.launched_late_us[phase] = causes.launched_late_us.get(phase, 0.0) + gap - waited
        busy_end, last = start + event.get("dur", 0), event
    return causes


def _phase_at(phases: list[tuple[float, float, str]], ts: float) -> str | None:
    """The phase running at `ts`: phases follow one another, so only the latest started can."""
    index = bisect.bisect_right(phases, (ts, float("inf"), "")) - 1
    if index >= 0 and phases[index][1] >= ts:
        return phases[index][2]
    return None


def format_idle_causes(causes: IdleCauses) -> str:
    span = max(causes.span_us, 1e-9)
    pct = lambda us: f"{us / 1000:8.2f} ms {100 * us / span:5.1f}%"  # noqa: E731
    lines = [f"GPU busy {pct(causes.busy_us)} of {causes.span_us / 1000:.2f} ms, {causes.num_steps} steps; idle:",
             f"  waiting for the next step             {pct(causes.waiting_for_step_us)}"]
    for phase, us in sorted(causes.launched_late_us.items(), key=lambda kv: -kv[1]):
        lines.append(f"  launched late in {phase:<21} {pct(us)}")
    lines.append(f"  gaps under {SHORT_GAP_US:.0f} us between kernels      {pct(causes.short_gaps_us)}")
    lines.append(f"  launched before the gap (device side) {pct(causes.not_host_us)}")
    for (before, after), us in sorted(causes.not_host_by_pair.items(), key=lambda kv: -kv[1])[:PAIRS_SHOWN]:
        lines.append(f"    {pct(us)} after {before[:NAME_CHARS]} before {after[:NAME_CHARS]}")
    lines.append("worker phases, mean / max per call:")
    for phase in PHASES:
        durations = causes.phase_us.get(phase)
        if durations:
            lines.append(f"  {phase:<12} {sum(durations) / len(durations):8.1f} us {max(durations):8.1f} us"
                         f"  x{len(durations)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """python -m sfllm.bench.profiler_trace TRACE.json: the idle-time report of one worker trace."""
    for path in argv if argv is not None else sys.argv[1:]:
        print(path)
        print(format_idle_causes(idle_causes(Path(path))))
        print("host time by call (inclusive):")
        for call in top_host_calls(Path(path)):
            print(f"  {call.total_us / 1000:9.2f} ms x{call.count:<6d} {call.name[:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
