"""Processes of a server: a frontend killed and replaced, clean shutdown, clear errors on conflicts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from servers import LaunchedServer, alive, free_port, process_tree, rss_mb, start, stop, wait_healthy

pytestmark = pytest.mark.slow


def _engine_stats(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _stream_forever(url: str, started: threading.Event, errors: list) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                          json={"prompt": "Count: 1, 2, 3,", "max_tokens": 2000, "ignore_eos": True,
                                "stream": True}) as response:
            for _ in response.iter_lines():
                started.set()
    except httpx.HTTPError as error:
        errors.append(error)


def test_frontend_killed_with_sigkill_is_replaced_without_touching_the_worker(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = start("engine", "--run-dir", str(run_dir), "--device", "cpu", "--dtype", "float32",
                   "--max-context-length", "4096", "--profile-dir", str(tmp_path / "traces"),
                   log=tmp_path / "engine.log")
    frontend_args = ("--run-dir", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
                     "--max-context-length", "4096")
    frontend = start("frontend", *frontend_args, log=tmp_path / "frontend.log")
    try:
        wait_healthy(url, frontend, tmp_path / "frontend.log")
        workers_before = [p for p in process_tree(engine.pid) if p != engine.pid]
        assert len(workers_before) == 1
        started = threading.Event()
        errors: list = []
        streams = [threading.Thread(target=_stream_forever, args=(url, started, errors)) for _ in range(4)]
        for thread in streams:
            thread.start()
        assert started.wait(120), "streams started"
        _wait_for(lambda: _engine_stats(url)["kv_blocks_free"] < _engine_stats(url)["kv_blocks_total"], 30,
                  "the engine's stats to show the streams' KV blocks")
        frontend.send_signal(signal.SIGKILL)
        frontend.wait()
        for thread in streams:
            thread.join(30)
        assert errors, "the killed frontend's clients saw their streams break"

        # -X importtime logs every module the process imports, lazily imported ones included.
        frontend = start("frontend", *frontend_args, log=tmp_path / "frontend2.log", python_flags=("-X", "importtime"))
        wait_healthy(url, frontend, tmp_path / "frontend2.log")
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
        assert reply.status_code == 200
        _wait_for(lambda: _engine_stats(url)["kv_blocks_free"] == _engine_stats(url)["kv_blocks_total"], 30,
                  "the vanished frontend's requests to be aborted and their KV blocks freed")
        assert [p for p in process_tree(engine.pid) if p != engine.pid] == workers_before, "same worker process"

        assert httpx.post(f"{url}/start_profile", timeout=10).status_code == 200
        httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
        assert httpx.post(f"{url}/stop_profile", timeout=10).status_code == 200
        _wait_for(lambda: any((tmp_path / "traces").glob("worker-trace-*.json")), 60, "the profiler trace")
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert chat.status_code == 200
        imported = {line.rsplit("|", 1)[1].strip() for line in (tmp_path / "frontend2.log").read_text().splitlines()
                    if line.startswith("import time:")}
        assert {"fastapi", "tokenizers", "jinja2"} <= imported, "the import log is read right"
        heavy = sorted(name for name in imported if name.split(".")[0] in ("torch", "transformers"))
        assert not heavy, f"the frontend imported {heavy[:5]}"
        assert rss_mb(frontend.pid) < 150, "a light frontend"
    finally:
        stop(frontend)
        stop(engine)
    assert not run_dir.exists() or not list(run_dir.glob("*.sock"))


def _frontend_pids(url: str, tries: int = 40) -> set[int]:
    """The frontend processes that answered `tries` health checks, each on a new connection."""
    return {httpx.get(f"{url}/health", timeout=10).json()["frontend_pid"] for _ in range(tries)}  # 200 or 503


def _requests_answered(url: str, sample: str = "sfllm_requests_total") -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(sample + "{"))


def test_frontend_processes_share_the_port_sum_their_metrics_are_restarted_and_replaced_one_by_one(
        tmp_path: Path) -> None:
    server = LaunchedServer(tmp_path, "--frontend-processes", "2", "--override-generation-config",
                            '{"max_new_tokens": 3}')
    try:
        _wait_for(lambda: len(_frontend_pids(server.url)) == 2, 120, "both frontends to answer")
        # the engine's sampling defaults reach the frontends it started (vLLM's flag: a request's default budget)
        unbounded = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "ignore_eos": True}, timeout=120)
        assert unbounded.json()["usage"]["completion_tokens"] == 3
        first = sorted(_frontend_pids(server.url))
        for _ in range(6):  # each on a new connection: the kernel spreads them over both frontends
            reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
            assert reply.status_code == 200
        assert _requests_answered(server.url) == 7, "every scrape sums both frontends' counters"
        assert _requests_answered(server.url, "vllm:e2e_request_latency_seconds_count") == 7, "and under vLLM's names"

        os.kill(first[0], signal.SIGKILL)
        reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
        assert reply.status_code == 200, "the other frontend serves meanwhile"
        _wait_for(lambda: len(_frontend_pids(server.url) - {first[1]}) == 1, 120, "a replacement frontend")
        replacement = _frontend_pids(server.url) - {first[1]}
        assert replacement and first[0] not in replacement
        assert _requests_answered(server.url) == 8, "the killed frontend's counts survive it"

        before = _frontend_pids(server.url)
        server.process.send_signal(signal.SIGHUP)
        answered = []

        def both_replaced() -> bool:
            reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
            answered.append(reply.status_code)
            pids = _frontend_pids(server.url, tries=10)
            return not pids & before and len(pids) == 2 and not any(alive(pid) for pid in before)

        _wait_for(both_replaced, 120, "a rolling restart of both frontends")
        assert answered and set(answered) == {200}, answered
    finally:
        assert server.stop() == 0
    assert not server.run_dir.exists() or not list(server.run_dir.iterdir())


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_launch_then_sigterm_leaves_no_process_and_no_socket(tmp_path: Path) -> None:
    """Also: the API key is in no file (only the frontend's environment), the files for the engine and
    the worker are owner-only, and what a SIGKILLed launch left in the run directory is cleaned up."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead, live = _dead_pid(), os.getpid()
    stale = [run_dir / f"launch-config-{dead}.yaml", run_dir / f"worker-config-{dead}.yaml",
             run_dir / f"frontend-metrics-{dead}"]
    for path in stale[:2]:
        path.write_text("api_key: leaked-key\n")
    stale[2].mkdir()
    kept = run_dir / f"launch-config-{live}.yaml"
    kept.write_text("port: 1\n")
    server = LaunchedServer(tmp_path, "--api-key", "lifecycle-key", run_dir=run_dir)
    tree = process_tree(server.process.pid)
    assert len(tree) >= 4, "launch, engine, worker and frontend"
    assert list(server.run_dir.glob("*.sock"))
    assert not any(path.exists() for path in stale) and kept.exists(), "only a dead process's files go"
    written = [*run_dir.glob("launch-config-*.yaml"), *run_dir.glob("worker-config-*.yaml")]
    assert len(written) == 3
    for path in written:
        assert "lifecycle-key" not in path.read_text(), path
        if path != kept:
            assert path.stat().st_mode & 0o777 == 0o600, path
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer lifecycle-key"},
                     timeout=10).status_code == 200, "the frontend has the key"
    kept.unlink()
    assert server.stop() == 0, "a clean exit, not a kill after the stop timeout"
    _wait_for(lambda: not any(alive(p) for p in tree), 10, "every process to exit")
    assert not server.run_dir.exists() or not list(server.run_dir.iterdir())


def test_second_launch_on_a_busy_port_fails_fast_with_a_clear_error(server, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sfllm", "launch", "--host", "127.0.0.1", "--port",
                             str(server.port), "--run-dir", str(tmp_path / "other")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "in use" in result.stderr
    assert not (tmp_path / "other").exists(), "it failed before starting anything"


def test_second_engine_on_the_same_run_dir_fails_fast(server, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sfllm", "engine", "--run-dir", str(server.run_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "another sfllm engine" in result.stderr
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200, "the first one is untouched"
