"""`sfllm bench offline`: the profiler-trace analysis and the collector's pauses on their own, and the whole command
with its transformers baseline on the default model (CPU)."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from sfllm.bench import offline
from sfllm.bench.collector_pauses import CollectorPauses
from sfllm.bench.profiler_trace import format_idle_causes, gpu_idle, idle_causes, top_host_calls, top_kernels


def write_trace(path: Path, events: list[tuple[str, str, float, float]]) -> Path:
    """A Chrome trace of complete events (category, name, start us, duration us)."""
    path.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}
                                                for cat, name, ts, dur in events]}))
    return path


def test_gpu_idle_merges_overlapping_kernels(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.json", [
        ("kernel", "gemm", 0, 10), ("kernel", "attn", 5, 10),  # overlap: busy 0..15
        ("gpu_memcpy", "copy", 20, 5),                          # idle 15..20
        ("cpu_op", "aten::mm", 0, 100),                         # host events do not count
        ("kernel", "gemm", 30, 10),                             # idle 25..30
    ])
    idle = gpu_idle(trace)
    assert (idle.span_us, idle.busy_us, idle.num_kernels) == (40, 30, 4)
    assert idle.idle_fraction == pytest.approx(0.25)


def test_top_kernels_sums_time_per_name(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.json", [
        ("kernel", "gemm", 0, 10), ("kernel", "attn", 10, 4), ("kernel", "gemm", 20, 30), ("kernel", "norm", 60, 1),
        ("cpu_op", "aten::mm", 0, 1000),
    ])
    top = top_kernels(trace, limit=2)
    assert [(k.name, k.total_us, k.count) for k in top] == [("gemm", 40, 2), ("attn", 4, 1)]
    assert gpu_idle(write_trace(tmp_path / "empty.json", [])).num_kernels == 0


def test_idle_causes_charge_each_gap_to_what_the_host_was_doing(tmp_path: Path, capsys) -> None:
    def phase(name, start, end):
        return {"ph": "X", "cat": "user_annotation", "name": name, "ts": start, "dur": end - start}

    def launch(correlation, ts):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1,
                "args": {"correlation": correlation}}

    def kernel(correlation, start, end):
        return {"ph": "X", "cat": "kernel", "name": f"k{correlation}", "ts": start, "dur": end - start,
                "args": {"correlation": correlation}}

    events = [
        launch(0, -60), kernel(0, -50, -5),
        phase("receive", 0, 10), phase("prepare", 10, 30), launch(1, 25), kernel(1, 28, 29),
        # 33 us idle: 5 waiting for the step (its receive starts at 0), 28 while "prepare" launched
        phase("forward", 30, 40), launch(2, 35), kernel(2, 36, 100),  # 7 us idle: launched late in "forward"
        phase("sample", 40, 60), launch(3, 45), kernel(3, 100, 101),
        launch(4, 50), kernel(4, 103, 104),  # a 2 us gap: the device's own
        launch(5, 55), kernel(5, 120, 130),  # 16 us idle, but launched long before: not the host
        phase("send_result", 130, 135),
    ]
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    causes = idle_causes(trace)
    assert (causes.span_us, causes.busy_us, causes.idle_us) == (180, 122, 58)
    assert causes.waiting_for_step_us == 5
    assert causes.launched_late_us == {"prepare": 28, "forward": 7}
    assert (causes.short_gaps_us, causes.not_host_us) == (2, 16)
    assert causes.not_host_by_pair == {("k4", "k5"): 16}
    assert causes.num_steps == 1 and causes.phase_us["prepare"] == [20]
    assert [(c.name, c.total_us, c.count) for c in top_host_calls(trace, limit=1)] == [("cudaLaunchKernel", 6, 6)]
    report = format_idle_causes(causes)
    assert "waiting for the next step" in report and "launched late in prepare" in report
    assert "after k4 before k5" in report
    from sfllm.bench import profiler_trace
    capsys.readouterr()
    assert profiler_trace.main([str(trace)]) == 0
    printed = capsys.readouterr().out
    assert report in printed and "cudaLaunchKernel" in printed


@pytest.mark.slow
def test_offline_run_with_transformers_baseline(smollm_source, tmp_path: Path, capsys) -> None:
    out = tmp_path / "offline.json"
    assert offline.main(["--model", "smollm2-135m-instruct", "--load-format", "auto", "--device", "cpu",
                         "--dtype", "float32", "--num-requests", "3", "--input-len", "5:9", "--output-len", "4",
                         "--max-context-length", "256", "--baseline", "transformers", "--baseline-requests", "3",
                         "--baseline-batch-size", "2", "--output-file", str(out)]) == 0
    data = json.loads(out.read_text())
    ours, theirs = data["sfllm"], data["transformers"]
    assert ours["requests"] == theirs["requests"] == 3
    # Both ran the same requests: the same prompt tokens and exactly the asked-for output tokens.
    assert ours["input_tokens"] == theirs["input_tokens"] and 15 <= ours["input_tokens"] <= 27
    assert ours["output_tokens"] == theirs["output_tokens"] == 12
    assert ours["output_tokens_per_s"] == pytest.approx(12 / ours["wall_s"])
    assert data["speedup"] == pytest.approx(ours["output_tokens_per_s"] / theirs["output_tokens_per_s"])
    assert "static batches of 2" in theirs["engine"]
    printed = capsys.readouterr().out
    assert "sfllm / transformers output tokens/s" in printed
    assert "garbage collections during the run: generation 0 " in printed


def test_collector_pauses_count_and_time_each_generation() -> None:
    with CollectorPauses() as pauses:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    gc.collect(1)  # after: not counted
    assert pauses.counts == [1, 0, 2]
    assert pauses.seconds[2] > 0.0 and pauses.longest_s[2] <= pauses.seconds[2]
    assert "generation 2 (full) 2 (" in pauses.summary()
