"""`sfllm bench offline`: the profiler-trace analysis on its own, and the whole command with its
transformers baseline on the default model (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sfllm.bench import offline
from sfllm.bench.profiler_trace import gpu_idle, top_kernels


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
    assert "sfllm / transformers output tokens/s" in capsys.readouterr().out
