"""`sfllm bench serve`: statistics, SSE parsing and workloads on their own; the whole client
against a live sfllm server (tests named `live`, which need the `live_server` fixture)."""
from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import math
import socket
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from sfllm.bench import serve
from sfllm.bench.gpu_monitor import GpuMonitor, GpuSample, GpuUsage, mean_usage, parse_sample
from sfllm.bench.serve import SSEDecoder, ServerTarget, chunk_has_text
from sfllm.bench.serve_report import (
    LATENCY_METRICS,
    STAT_NAMES,
    LevelResult,
    RequestRecord,
    format_table,
    latency_stats_ms,
    plot,
    write_json,
)
from sfllm.bench.workload import (
    LengthRange,
    PromptFileWorkload,
    RandomTokenWorkload,
    RequestSpec,
    WorkloadError,
    parse_length_range,
    poisson_arrival_times,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {
    "completed", "failed", "errors", "duration_s", "total_input_tokens", "total_output_tokens",
    "request_throughput", "input_token_throughput", "output_token_throughput", "client_cpu_s",
    "client_cpu_percent", "gpu_utilization_percent", "gpu_memory_percent", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms",
}
RECORD_KEYS = {
    "index", "start", "ttft", "itl", "e2e", "tpot", "prompt_tokens", "completion_tokens",
    "input_len", "output_len", "status", "error",
}


def ok_record(index: int, ttft: float, itl: list[float], prompt_tokens: int = 10) -> RequestRecord:
    e2e = ttft + sum(itl)
    return RequestRecord(index=index, output_len=len(itl) + 1, input_len=prompt_tokens, start=0.0, ttft=ttft,
                         itl=itl, e2e=e2e, prompt_tokens=prompt_tokens, completion_tokens=len(itl) + 1, status=200)


def failed_record(index: int, error: str) -> RequestRecord:
    return RequestRecord(index=index, output_len=8, input_len=10, e2e=0.001, status=503, error=error)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def refusing_slowly_server(delay_s: float = 0.3) -> Iterator[str]:
    """An HTTP server that answers every POST with a 503 after `delay_s`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay_s)
            body = b'{"error": {"message": "overloaded"}}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def assert_percentiles_ordered(stats: dict[str, float | None]) -> None:
    assert set(stats) == set(STAT_NAMES)
    assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# ---- SSE parsing -----------------------------------------------------------------------

def test_sse_decoder_reassembles_events_split_anywhere() -> None:
    stream = b'data: {"a": 1}\n\n: keep-alive comment\n\nevent: x\ndata: {"b": 2}\r\n\r\ndata: [DONE]\n\n'
    for split in range(len(stream) + 1):
        decoder = SSEDecoder()
        payloads = decoder.feed(stream[:split]) + decoder.feed(stream[split:])
        assert payloads == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"], split


def test_sse_decoder_byte_by_byte_and_many_events_per_read() -> None:
    events = [f'data: {{"i": {i}}}\n\n'.encode() for i in range(50)]
    decoder = SSEDecoder()
    byte_by_byte = [p for byte in b"".join(events) for p in decoder.feed(bytes([byte]))]
    assert byte_by_byte == [f'{{"i": {i}}}'.encode() for i in range(50)]
    assert SSEDecoder().feed(b"".join(events)) == byte_by_byte


def test_sse_decoder_holds_an_unterminated_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"partial"') == []
    assert decoder.feed(b": 1}\n") == [b'{"partial": 1}']


def test_chunk_has_text_per_endpoint() -> None:
    assert chunk_has_text({"choices": [{"index": 0, "text": " hi"}]}, "completions")
    assert not chunk_has_text({"choices": [{"index": 0, "text": ""}]}, "completions")
    assert not chunk_has_text({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}, "completions")
    assert chunk_has_text({"choices": [{"delta": {"content": "hi"}}]}, "chat")
    assert not chunk_has_text({"choices": [{"delta": {"role": "assistant"}}]}, "chat")
    assert not chunk_has_text({"choices": [{"delta": {"content": None}, "finish_reason": "stop"}]}, "chat")


def test_payload_asks_for_usage_and_carries_extensions() -> None:
    spec = RequestSpec(prompt=[5, 6, 7], output_len=9, input_len=3)
    completions = ServerTarget("http://h:1", "completions", "m", True, "background")
    assert completions.url == "http://h:1/v1/completions"
    assert completions.payload(spec) == {
        "model": "m", "prompt": [5, 6, 7], "max_tokens": 9, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True, "priority": "background",
    }
    chat = ServerTarget("http://h:1", "chat", "m", False, None)
    body = chat.payload(RequestSpec(prompt="hello", output_len=4, input_len=None))
    assert chat.url == "http://h:1/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "hello"}] and "priority" not in body
    assert "response_format" not in body
    schema = {"type": "json_schema", "json_schema": {"name": "bench", "schema": {"type": "integer"}}}
    constrained = ServerTarget("http://h:1", "completions", "m", True, None, schema)
    assert constrained.payload(spec)["response_format"] == schema


# ---- statistics ------------------------------------------------------------------------

def test_latency_stats_in_milliseconds() -> None:
    stats = latency_stats_ms([i / 1000 for i in range(1, 101)])
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["max"] == pytest.approx(100.0)
    assert latency_stats_ms([]) == dict.fromkeys(STAT_NAMES)


@pytest.mark.parametrize("seed", range(5))
def test_percentiles_are_ordered_for_any_sample(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n in (1, 2, 3, 10, 1000):
        assert_percentiles_ordered(latency_stats_ms(rng.lognormal(size=n).tolist()))


def test_tpot_excludes_the_first_token() -> None:
    record = ok_record(0, ttft=0.5, itl=[0.1, 0.2, 0.3])
    assert record.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert ok_record(1, ttft=0.5, itl=[]).tpot is None
    assert failed_record(2, "HTTP 503: busy").tpot is None


def test_level_summary_counts_only_successful_requests() -> None:
    records = [ok_record(0, 0.1, [0.01] * 4, prompt_tokens=10), ok_record(1, 0.3, [0.02] * 9, prompt_tokens=30),
               failed_record(2, "HTTP 503: busy"), failed_record(3, "HTTP 503: busy"),
               failed_record(4, "ClientConnectorError: refused")]
    level = LevelResult(concurrency=4, request_rate=None, records=records, duration=2.0, client_cpu=0.5)
    summary = level.summary
    assert summary["completed"] == 2 and summary["failed"] == 3
    assert summary["errors"] == {"HTTP 503: busy": 2, "ClientConnectorError: refused": 1}
    assert summary["total_input_tokens"] == 40 and summary["total_output_tokens"] == 15
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["input_token_throughput"] == pytest.approx(20.0)
    assert summary["output_token_throughput"] == pytest.approx(7.5)
    assert summary["client_cpu_percent"] == pytest.approx(25.0)
    assert summary["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert summary["itl_ms"]["mean"] == pytest.approx((4 * 10 + 9 * 20) / 13)
    assert summary["e2e_ms"]["max"] == pytest.approx(480.0)
    for metric in LATENCY_METRICS:
        assert_percentiles_ordered(summary[f"{metric}_ms"])


def test_level_with_no_success_reports_missing_latencies() -> None:
    level = LevelResult(None, math.inf, [failed_record(0, "boom")], duration=0.1, client_cpu=0.0)
    assert level.label == "rate=inf"
    assert level.summary["ttft_ms"] == dict.fromkeys(STAT_NAMES)
    assert "rate=inf: 1 failed: boom" in format_table([level])


def test_json_table_and_plot(tmp_path: Path) -> None:
    levels = [
        LevelResult(1, None, [ok_record(0, 0.1, [0.01] * 7)], 1.0, 0.1),
        LevelResult(8, None, [ok_record(0, 0.2, [0.02] * 7), failed_record(1, "HTTP 429: full")], 1.5, 0.2),
    ]
    table = format_table(levels)
    assert "c=1" in table and "c=8" in table and "TPOT p99 (ms)" in table and "c=8: 1 failed: HTTP 429" in table
    write_json(tmp_path / "r.json", {"url": "x"}, levels)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["config"] == {"url": "x"}
    assert [level["concurrency"] for level in data["levels"]] == [1, 8]
    assert set(data["levels"][1]["summary"]) == SUMMARY_KEYS
    assert set(data["levels"][1]["requests"][0]) == RECORD_KEYS
    plot(levels, tmp_path / "r.png", "concurrency")
    assert_valid_png(tmp_path / "r.png")


def test_gpu_usage_in_table_json_and_plot(tmp_path: Path) -> None:
    levels = [LevelResult(1, None, [ok_record(0, 0.1, [0.01] * 7)], 1.0, 0.1, gpu=GpuUsage(42.5, 61.0, 10)),
              LevelResult(8, None, [ok_record(0, 0.2, [0.02] * 7)], 1.5, 0.2)]
    table = format_table(levels).splitlines()
    gpu_row = next(line for line in table if line.startswith("GPU utilisation (%)"))
    assert gpu_row.split()[-2:] == ["42.5", "-"]
    assert levels[0].summary["gpu_memory_percent"] == 61.0 and levels[1].summary["gpu_utilization_percent"] is None
    plot(levels, tmp_path / "r.png", "concurrency")
    assert_valid_png(tmp_path / "r.png")


# ---- GPU monitor ---------------------------------------------------------------------------

def test_parse_gpu_sample() -> None:
    assert parse_sample(" 87, 30100, 81559\n", 1.0) == GpuSample(1.0, 87.0, 30100.0, 81559.0)
    for bad in ("[N/A], 1, 2", "1, 2", "", "Failed to initialize NVML"):
        assert parse_sample(bad, 1.0) is None


def test_gpu_usage_averages_only_the_window() -> None:
    samples = [GpuSample(t, util, 500.0, 1000.0 * (1 + (t > 3))) for t, util in
               ((0.5, 0.0), (1.0, 60.0), (2.0, 100.0), (3.0, 80.0), (4.0, 20.0))]
    usage = mean_usage(samples, 1.0, 3.0)
    assert usage == GpuUsage(utilization_percent=80.0, memory_percent=50.0, num_samples=3)
    assert mean_usage(samples, 5.0, 6.0) is None


def fake_nvidia_smi(directory: Path, utilization: int) -> Path:
    """An `nvidia-smi` that streams one sample line every 20 ms and logs its arguments."""
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {directory}/args\n"
                      f"while true; do echo '{utilization}, 2000, 8000'; sleep 0.02; done\n")
    script.chmod(0o755)
    return script


def test_gpu_monitor_reads_a_live_sampler(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    fake_nvidia_smi(tmp_path, 64)
    monitor = GpuMonitor(gpu_id=3)
    start = time.time()
    deadline = time.monotonic() + 30
    while (usage := monitor.usage(start, time.time())) is None or usage.num_samples < 3:
        assert time.monotonic() < deadline, "the sampler's lines are read as they come"
        time.sleep(0.01)
    assert monitor.stop() == ""
    assert usage.utilization_percent == 64.0 and usage.memory_percent == 25.0
    args = (tmp_path / "args").read_text().split()
    assert "--id=3" in args and "--format=csv,noheader,nounits" in args


def test_gpu_monitor_on_needs_nvidia_smi(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    url = f"http://127.0.0.1:{unused_port()}"
    assert serve.main(["--url", url, "--model", "m", "--requests", "1", "--input-len", "4", "--gpu-monitor", "on"]) == 1
    assert "nvidia-smi not found" in capsys.readouterr().err


# ---- workloads -------------------------------------------------------------------------

def test_parse_length_range() -> None:
    assert parse_length_range("16") == LengthRange(16, 16)
    assert parse_length_range("8:32") == LengthRange(8, 32)
    for bad in ("0", "9:3", "a", "1:2:3", ""):
        with pytest.raises(WorkloadError):
            parse_length_range(bad)


def test_random_token_prompts_have_exact_lengths_and_differ_between_takes() -> None:
    workload = RandomTokenWorkload(LengthRange(5, 9), LengthRange(3, 3), vocab_size=100, seed=1)
    first, second = workload.take(50), workload.take(50)
    for spec in first + second:
        assert len(spec.prompt) == spec.input_len and 5 <= spec.input_len <= 9
        assert all(0 <= t < 100 for t in spec.prompt) and spec.output_len == 3
    assert [s.prompt for s in first] != [s.prompt for s in second]
    again = RandomTokenWorkload(LengthRange(5, 9), LengthRange(3, 3), vocab_size=100, seed=1).take(50)
    assert [s.prompt for s in again] == [s.prompt for s in first]


def test_prompt_file_is_taken_in_order_and_wraps(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("one\n\ntwo\nthree\n")
    workload = PromptFileWorkload(path, LengthRange(4, 4), seed=0)
    assert [s.prompt for s in workload.take(4)] == ["one", "two", "three", "one"]
    assert [s.prompt for s in workload.take(2)] == ["two", "three"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(WorkloadError):
        PromptFileWorkload(tmp_path / "empty.txt", LengthRange(4, 4), seed=0)


def test_poisson_arrivals() -> None:
    times = poisson_arrival_times(20000, 50.0, np.random.default_rng(0))
    assert times[0] == 0.0 and all(a <= b for a, b in zip(times, times[1:]))
    assert np.mean(np.diff(times)) == pytest.approx(1 / 50.0, rel=0.05)
    assert poisson_arrival_times(3, math.inf, np.random.default_rng(0)) == [0.0, 0.0, 0.0]


# ---- the command without a server ------------------------------------------------------

def test_contradictory_options_are_rejected() -> None:
    assert serve.main(["--endpoint", "chat"]) == 2
    assert serve.main(["--concurrency", "1", "--request-rate", "2"]) == 2
    assert serve.main(["--concurrency", "1,2,3", "--requests", "4,5"]) == 2
    with pytest.raises(SystemExit):
        serve.main(["--concurrency", "0"])


def test_unreachable_server_counts_failures(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    assert serve.main(["--url", url, "--requests", "2", "--input-len", "4", "--output-len", "2"]) == 1
    out = tmp_path / "r.json"
    args = ["--url", url, "--model", "m", "--concurrency", "1,3", "--requests", "5", "--input-len", "4",
            "--output-len", "2", "--output-file", str(out)]
    assert serve.main(args) == 1
    for level in json.loads(out.read_text())["levels"]:
        assert level["summary"]["completed"] == 0 and level["summary"]["failed"] == 5
        assert sum(level["summary"]["errors"].values()) == 5
        assert all(r["error"] for r in level["requests"])
        assert level["summary"]["gpu_utilization_percent"] is None  # auto: no nvidia-smi here


def test_requests_per_level_and_gpu_monitor_on_a_local_url(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    fake_nvidia_smi(tmp_path, 90)
    out = tmp_path / "r.json"
    # A slow-to-fail server keeps each level long enough for several samples.
    with refusing_slowly_server() as url:
        assert serve.main(["--url", url, "--model", "m", "--concurrency", "1,2", "--requests", "2,3", "--input-len",
                           "4", "--output-len", "2", "--output-file", str(out)]) == 1
    levels = json.loads(out.read_text())["levels"]
    assert [len(level["requests"]) for level in levels] == [2, 3]
    assert [level["summary"]["gpu_utilization_percent"] for level in levels] == [90.0, 90.0]
    assert [level["summary"]["gpu_memory_percent"] for level in levels] == [25.0, 25.0]


# ---- against a live sfllm server -------------------------------------------------------

@pytest.mark.slow
def test_live_benchmark_matches_server_usage(live_server, tmp_path: Path) -> None:
    out, png = tmp_path / "results.json", tmp_path / "plot.png"
    rc = serve.main(["--url", live_server.url, "--concurrency", "1,4", "--requests", "8", "--input-len", "16",
                     "--output-len", "8", "--vocab-size", "1000", "--warmup", "2",
                     "--output-file", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["config"]["model"] and data["config"]["ignore_eos"] is True
    assert [level["concurrency"] for level in data["levels"]] == [1, 4]
    for level in data["levels"]:
        summary, records = level["summary"], level["requests"]
        assert set(summary) == SUMMARY_KEYS
        assert summary["completed"] == 8 and summary["failed"] == 0 and summary["errors"] == {}
        assert len(records) == 8 and sorted(r["index"] for r in records) == list(range(8))
        for r in records:
            assert set(r) == RECORD_KEYS and r["error"] is None and r["status"] == 200
            # Random prompts are sent as token ids and ignore_eos is on: usage must match exactly.
            assert r["prompt_tokens"] == 16 and r["completion_tokens"] == 8
            assert 0 <= r["start"] and 0 < r["ttft"] <= r["e2e"]
            assert len(r["itl"]) <= r["completion_tokens"] - 1
            assert r["tpot"] == pytest.approx((r["e2e"] - r["ttft"]) / 7)
        assert summary["total_input_tokens"] == sum(r["prompt_tokens"] for r in records) == 128
        assert summary["total_output_tokens"] == sum(r["completion_tokens"] for r in records) == 64
        assert summary["output_token_throughput"] == pytest.approx(64 / summary["duration_s"])
        assert summary["client_cpu_s"] >= 0
        for metric in LATENCY_METRICS:
            assert_percentiles_ordered(summary[f"{metric}_ms"])
    assert_valid_png(png)


def test_live_benchmark_under_a_json_schema_decodes_every_token(live_server, tmp_path: Path) -> None:
    """--json-schema: the server takes the schema (a 400 would count as a failure) and, the records being too many
    to close, every request decodes all of its tokens, as the unconstrained run does; --structural-tag's requests
    are taken too."""
    out = tmp_path / "results.json"
    rc = serve.main(["--url", live_server.url, "--concurrency", "4", "--requests", "4", "--input-len", "16",
                     "--output-len", "12", "--vocab-size", "1000", "--json-schema", "--output-file", str(out)])
    assert rc == 0
    records = json.loads(out.read_text())["levels"][0]["requests"]
    assert [(r["status"], r["completion_tokens"]) for r in records] == [(200, 12)] * 4
    rc = serve.main(["--url", live_server.url, "--concurrency", "4", "--requests", "4", "--input-len", "16",
                     "--output-len", "12", "--vocab-size", "1000", "--structural-tag", "--output-file", str(out)])
    assert rc == 0, "--structural-tag: the server takes the tag"
    assert [r["status"] for r in json.loads(out.read_text())["levels"][0]["requests"]] == [200] * 4


@pytest.mark.slow
def test_live_server_stopped_mid_run_counts_failures(
    live_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    send_request = serve.send_request
    stopper = threading.Thread(target=live_server.stop)
    finished = 0

    async def send_then_stop_after_two(*args, **kwargs) -> RequestRecord:
        nonlocal finished
        record = await send_request(*args, **kwargs)
        finished += 1
        if finished == 2:
            stopper.start()
        if finished >= 2:
            # Nothing more is sent until the server is gone, so the outcome does not race.
            await asyncio.to_thread(stopper.join)
        return record

    monkeypatch.setattr(serve, "send_request", send_then_stop_after_two)
    out = tmp_path / "results.json"
    rc = serve.main(["--url", live_server.url, "--concurrency", "2", "--requests", "20", "--input-len", "16",
                     "--output-len", "8", "--vocab-size", "1000", "--timeout", "60", "--output-file", str(out)])
    assert rc == 1
    summary = json.loads(out.read_text())["levels"][0]["summary"]
    # The two that finished first succeeded; at most the other one in flight then also finished.
    assert 2 <= summary["completed"] <= 3
    assert summary["completed"] + summary["failed"] == 20
    assert sum(summary["errors"].values()) == summary["failed"]
