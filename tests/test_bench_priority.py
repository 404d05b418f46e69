"""`sfllm bench priority`: its statistics and report on their own; the whole run against a live sfllm server."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfllm.bench import priority
from sfllm.bench.priority import FloodOutcome, PriorityResult, ProbeSeries, format_report
from sfllm.bench.serve_report import RequestRecord


def probe(index: int, ttft: float | None, error: str | None = None) -> RequestRecord:
    return RequestRecord(index=index, output_len=4, input_len=16, ttft=ttft, e2e=(ttft or 0.0) + 0.05,
                         prompt_tokens=16, completion_tokens=4, status=200 if error is None else 503, error=error)


def series(name: str, ttfts: list[float], in_flight: list[int] | None = None) -> ProbeSeries:
    return ProbeSeries(name, [probe(i, t) for i, t in enumerate(ttfts)], in_flight or [])


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ratio_of_the_p50s_and_stats_of_successful_probes_only() -> None:
    alone = series("alone", [0.1, 0.3, 0.2])
    loaded = series("under load", [0.5, 0.4, 0.9, 0.6], [4, 4, 4, 4])
    loaded.records.append(probe(4, None, error="HTTP 503: full"))
    result = PriorityResult(alone, loaded, FloodOutcome(sent=6, records=[probe(0, 1.0)]), concurrency=4)
    assert alone.ttft_ms["p50"] == pytest.approx(200.0) and alone.ttft_ms["max"] == pytest.approx(300.0)
    assert loaded.ttft_ms["p50"] == pytest.approx(550.0) and loaded.ttft_ms["p90"] == pytest.approx(810.0)
    assert loaded.failed == 1 and alone.failed == 0
    assert result.ttft_ratio == pytest.approx(2.75)
    assert result.probes_below_concurrency == 0
    flood = result.flood.to_json()
    assert (flood["sent"], flood["completed"], flood["cancelled"], flood["output_tokens"]) == (6, 1, 5, 4)


def test_report_names_the_ratio_failures_and_a_flood_that_ran_out() -> None:
    loaded = series("under load", [0.5, 0.7], [3, 1])
    loaded.records.append(probe(2, None, error="timed out (--timeout)"))
    flood = FloodOutcome(sent=3, records=[probe(0, 1.0), probe(1, None, error="HTTP 500: boom")])
    result = PriorityResult(series("alone", [0.2, 0.2]), loaded, flood, concurrency=3)
    assert result.probes_below_concurrency == 1
    text = format_report(result)
    assert "TTFT p50 under load / alone: 3.00x" in text
    assert "background: 3 sent, 1 completed, 1 failed, 1 cancelled" in text
    assert "warning: 1 probes were sent with fewer than 3 background requests in flight" in text
    assert "under load: 1 failed: timed out (--timeout)" in text and "background: 1 failed: HTTP 500: boom" in text
    assert PriorityResult(series("alone", []), loaded, flood, 3).ttft_ratio is None
    assert "under load / alone: -" in format_report(PriorityResult(series("alone", []), loaded, flood, 3))


def test_options_are_checked_and_an_unreachable_server_fails(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    assert priority.main(["--url", url, "--background-requests", "2", "--concurrency", "3"]) == 2
    assert priority.main(["--url", url]) == 1, "no model name"
    out = tmp_path / "r.json"
    assert priority.main(["--url", url, "--model", "m", "--probes", "2", "--warmup", "0", "--background-requests",
                          "2", "--output-file", str(out)]) == 1
    data = json.loads(out.read_text())
    assert data["alone"]["failed"] == data["under_load"]["failed"] == 2
    assert data["flood"]["failed"] == data["flood"]["sent"] == 2 and data["ttft_p50_ratio"] is None


@pytest.mark.slow
def test_live_probes_get_their_first_token_while_the_flood_runs(tmp_path: Path) -> None:
    from servers import LaunchedServer
    server = LaunchedServer(tmp_path, "--max-running-requests", "2")
    try:
        out = tmp_path / "r.json"
        rc = priority.main(["--url", server.url, "--probes", "2", "--warmup", "0", "--probe-input-len", "16",
                            "--probe-output-len", "2", "--background-requests", "6", "--concurrency", "3",
                            "--input-len", "32", "--output-len", "200", "--vocab-size", "1000",
                            "--output-file", str(out)])
    finally:
        server.stop()
    assert rc == 0
    data = json.loads(out.read_text())
    for phase in ("alone", "under_load"):
        assert data[phase]["failed"] == 0 and len(data[phase]["requests"]) == 2
        assert all(r["prompt_tokens"] == 16 and r["completion_tokens"] == 2 for r in data[phase]["requests"])
    assert data["under_load"]["flood_in_flight"] == [3, 3], "the flood outlasts the probes"
    assert data["flood"]["cancelled"] == 3 and data["flood"]["failed"] == 0
    p50s = [data[phase]["ttft_ms"]["p50"] for phase in ("alone", "under_load")]
    assert data["ttft_p50_ratio"] == pytest.approx(p50s[1] / p50s[0])
    # the two slots are the flood's; the probes' first tokens came long before a background stream of 200 tokens ended
    assert data["flood"]["completed"] == 0


# The probes' process of these tests: a flood against a server that takes connections and never answers, so its
# requests stay in flight; it prints the flood process's pid, then waits to be signalled, and stops the flood on
# its way out as `bench priority` does.
FLOOD_PARENT = """
import signal, sys, time
# Ctrl-C at a terminal; a test run started in the background (no job control) hands its children SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
from sfllm.bench.flood_process import FloodProcess
from sfllm.bench.serve import ServerTarget
from sfllm.bench.workload import RequestSpec
flood = FloodProcess(ServerTarget(sys.argv[1], "completions", "m", True, "background"),
                     [RequestSpec([1, 2, 3], 8, 3)] * 4, 2, 60.0, {})
try:
    print(flood.pid, flush=True)
    time.sleep(60)
finally:
    outcome = flood.stop()
    print("stopped", outcome.sent, outcome.in_flight, flush=True)
"""


@pytest.mark.parametrize("signalled", ["killed", "interrupted"])
def test_the_flood_process_ends_with_the_probes_process(signalled: str) -> None:
    """Killed outright, the probes' process leaves no flood running against the server; Ctrl-C (SIGINT to the
    process group) stops the flood through the probes' process, with no traceback from the flood's."""
    from servers import alive
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    accepted = []
    try:
        parent = subprocess.Popen([sys.executable, "-c", FLOOD_PARENT, f"http://127.0.0.1:{silent.getsockname()[1]}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        child = int(parent.stdout.readline())
        silent.settimeout(20)
        while len(accepted) < 2:  # both of the flood's requests are in flight
            accepted.append(silent.accept()[0])
        if signalled == "killed":
            parent.kill()
        else:
            os.killpg(parent.pid, signal.SIGINT)
        try:
            parent.wait(timeout=20)
        except subprocess.TimeoutExpired:
            parent.kill()
            out, err = parent.communicate(timeout=5)
            pytest.fail(f"the probes' process did not end within 20 s of SIGINT:\n{out}\n{err}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(child):
            time.sleep(0.05)
        assert not alive(child), "the flood process outlived the probes' process"
        if signalled == "interrupted":
            out, err = parent.communicate(timeout=5)  # the flood process shared its pipes: it is gone
            assert "stopped 2 2" in out, out + err
            assert "SpawnProcess" not in err and err.count("Traceback") == 1, err  # the probes' process's only
    finally:
        for connection in accepted:
            connection.close()
        silent.close()
