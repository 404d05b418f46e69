"""What a serving benchmark measured: per-request records, per-level summaries, table, JSON, plot."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sfllm.bench.gpu_monitor import GpuUsage

STAT_NAMES = ("mean", "p50", "p90", "p99", "max")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds, `start` from the start of its level."""

    index: int
    output_len: int
    input_len: int | None
    start: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if not self.ok or self.ttft is None or self.e2e is None or (self.completion_tokens or 0) < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tpot": self.tpot}


def latency_stats_ms(seconds: list[float]) -> dict[str, float | None]:
    """Mean, p50, p90, p99 and max in milliseconds; all None when there is nothing to measure."""
    if not seconds:
        return dict.fromkeys(STAT_NAMES)
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(ms.max())}


def error_summary(records: list[RequestRecord]) -> dict[str, int]:
    """How many requests failed with each error message, most frequent first."""
    return dict(Counter(r.error for r in records if r.error is not None).most_common())


def level_label(concurrency: int | None, request_rate: float | None) -> str:
    if concurrency is not None:
        return f"c={concurrency}"
    return f"rate={request_rate:g}/s" if math.isfinite(request_rate) else "rate=inf"


@dataclass
class LevelResult:
    """All requests of one concurrency level or one request rate."""

    concurrency: int | None
    request_rate: float | None
    records: list[RequestRecord]
    duration: float
    client_cpu: float
    started_unix: float = 0.0  # time.time() at the level's start: lines it up with GPU samples and server logs
    gpu: GpuUsage | None = None  # None when not monitored

    @property
    def label(self) -> str:
        return level_label(self.concurrency, self.request_rate)

    @cached_property
    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.records if r.ok]
        input_tokens = sum(r.prompt_tokens for r in ok)
        output_tokens = sum(r.completion_tokens for r in ok)
        per_second = 1.0 / self.duration if self.duration > 0 else 0.0
        return {
            "completed": len(ok),
            "failed": len(self.records) - len(ok),
            "errors": error_summary(self.records),
            "duration_s": self.duration,
            "total_input_tokens": input_tokens,
            "total_output_tokens": output_tokens,
            "request_throughput": len(ok) * per_second,
            "input_token_throughput": input_tokens * per_second,
            "output_token_throughput": output_tokens * per_second,
            "client_cpu_s": self.client_cpu,
            "client_cpu_percent": 100.0 * self.client_cpu * per_second,
            "gpu_utilization_percent": None if self.gpu is None else self.gpu.utilization_percent,
            "gpu_memory_percent": None if self.gpu is None else self.gpu.memory_percent,
            "ttft_ms": latency_stats_ms([r.ttft for r in ok if r.ttft is not None]),
            "tpot_ms": latency_stats_ms([r.tpot for r in ok if r.tpot is not None]),
            "itl_ms": latency_stats_ms([gap for r in ok for gap in r.itl]),
            "e2e_ms": latency_stats_ms([r.e2e for r in ok if r.e2e is not None]),
        }

    def to_json(self) -> dict[str, Any]:
        rate = self.request_rate
        return {
            "concurrency": self.concurrency,
            # JSON has no infinity; "inf" means every request was sent at once.
            "request_rate": "inf" if rate is not None and math.isinf(rate) else rate,
            "started_unix": self.started_unix,
            "summary": self.summary,
            "requests": [r.to_json() for r in self.records],
        }


def config_json(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The options a run was made with, as the JSON's `config` section."""
    rates = args.request_rate
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "url": args.url,
        "endpoint": args.endpoint,
        "model": model,
        "concurrency": args.concurrency,
        "request_rate": None if rates is None else ["inf" if math.isinf(r) else r for r in rates],
        "requests": args.requests,
        "input_len": None if args.input_len is None else str(args.input_len),
        "output_len": str(args.output_len),
        "prompt_file": None if args.prompt_file is None else str(args.prompt_file),
        "vocab_size": None if args.prompt_file is not None else args.vocab_size,
        "ignore_eos": args.ignore_eos,
        "priority": args.priority,
        "seed": args.seed,
        "warmup": args.warmup,
        "timeout": args.timeout,
        "gpu_monitor": args.gpu_monitor,
        "gpu_id": args.gpu_id,
    }


def write_json(path: Path, config: dict[str, Any], levels: list[LevelResult]) -> None:
    path.write_text(json.dumps({"config": config, "levels": [level.to_json() for level in levels]}))


_TABLE_ROWS: list[tuple[str, str, str]] = [
    ("successful requests", "completed", "{:d}"),
    ("failed requests", "failed", "{:d}"),
    ("duration (s)", "duration_s", "{:.2f}"),
    ("request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("input tokens/s", "input_token_throughput", "{:.1f}"),
    ("output tokens/s", "output_token_throughput", "{:.1f}"),
    ("client CPU (% of one core)", "client_cpu_percent", "{:.1f}"),
    ("GPU utilisation (%)", "gpu_utilization_percent", "{:.1f}"),
    ("GPU memory used (%)", "gpu_memory_percent", "{:.1f}"),
]


def format_table(levels: list[LevelResult]) -> str:
    """Metrics down, levels across; then each level's errors."""
    rows: list[tuple[str, list[str]]] = [("", [level.label for level in levels])]
    for title, key, fmt in _TABLE_ROWS:
        values = [level.summary[key] for level in levels]
        rows.append((title, ["-" if v is None else fmt.format(v) for v in values]))
    for metric in LATENCY_METRICS:
        for stat in STAT_NAMES:
            values = [level.summary[f"{metric}_ms"][stat] for level in levels]
            rows.append((f"{metric.upper()} {stat} (ms)", ["-" if v is None else f"{v:.2f}" for v in values]))
    title_width = max(len(title) for title, _ in rows)
    column_width = max(len(cell) for _, cells in rows for cell in cells)
    lines = [title.ljust(title_width) + "".join(cell.rjust(column_width + 2) for cell in cells) for title, cells in rows]
    for level in levels:
        for message, count in level.summary["errors"].items():
            lines.append(f"{level.label}: {count} failed: {message}")
    return "\n".join(lines)


def plot(levels: list[LevelResult], path: Path, x_title: str) -> None:
    """TTFT, TPOT and throughput against the levels, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(metric: str, stat: str) -> list[float]:
        return [math.nan if (v := level.summary[metric][stat]) is None else v for level in levels]

    # Levels are categories so that `inf` and uneven steps (1, 5, 50) stay readable.
    x = list(range(len(levels)))
    labels = [level.label.split("=", 1)[1] for level in levels]
    gpu_monitored = any(level.gpu is not None for level in levels)
    fig, axes = plt.subplots(1, 4 if gpu_monitored else 3, figsize=(20 if gpu_monitored else 15, 4.5))
    ttft_ax, tpot_ax, tput_ax = axes[:3]
    for ax, metric, title in ((ttft_ax, "ttft_ms", "TTFT (ms)"), (tpot_ax, "tpot_ms", "TPOT (ms)")):
        for stat in ("mean", "p50", "p99"):
            ax.plot(x, series(metric, stat), marker="o", label=stat)
        ax.set_title(title)
        ax.legend()
    tput_ax.plot(x, [level.summary["output_token_throughput"] for level in levels], marker="o", color="C0")
    tput_ax.set_ylabel("output tokens/s", color="C0")
    requests_ax = tput_ax.twinx()
    requests_ax.plot(x, [level.summary["request_throughput"] for level in levels], marker="s", color="C1")
    requests_ax.set_ylabel("requests/s", color="C1")
    tput_ax.set_title("Throughput")
    if gpu_monitored:
        gpu_ax = axes[3]
        for key, name in (("gpu_utilization_percent", "utilisation"), ("gpu_memory_percent", "memory used")):
            gpu_ax.plot(x, [math.nan if (v := level.summary[key]) is None else v for level in levels], marker="o",
                        label=name)
        gpu_ax.set_title("GPU (%)")
        gpu_ax.legend()
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.set_xlabel(x_title)
        ax.set_ylim(bottom=0, top=105 if ax is axes[-1] and gpu_monitored else None)
        ax.grid(alpha=0.3)
    requests_ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
