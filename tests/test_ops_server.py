"""Operating real servers: load, faults, bad input, limits, nginx in front, drain (CPU, loopback).

Three `sfllm launch` servers serve the module, started together. A has an API key and
tight limits; B is tiny (two running, two waiting, 8 s timeout); C has the defaults. The
tests run in file order: the last ones kill B's worker and C's engine, then replace A's
frontend (SIGHUP), kill it, and drain A.
"""
from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from sfllm.frontend.engine_client import HEARTBEAT_INTERVAL_S
from servers import (LaunchedServer, alive, assert_health_stays_down, free_port, process_tree,
                     watch_health)
from test_ops_frontend import PRIORITY_HEADERS, REQUESTS, check_answer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
API_KEY = "ops-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
A_FLAGS = ("--api-key", API_KEY, "--max-output-tokens", "4000", "--max-prompt-tokens", "512", "--max-n", "8",
           "--max-stop-sequences", "4", "--max-request-body-bytes", "65536", "--drain-timeout-s", "60")
B_FLAGS = ("--max-running-requests", "2", "--max-waiting-requests", "2", "--request-timeout-s", "8")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LaunchedServer]]:
    """A, B and C (a default server whose engine gets killed), started together."""
    started: dict[str, LaunchedServer | Exception] = {}

    def start(name: str, folder: Path, flags: tuple[str, ...]) -> None:
        try:
            started[name] = LaunchedServer(folder, *flags)
        except Exception as error:  # raised below, in the test's thread
            started[name] = error

    threads = [threading.Thread(target=start, args=(name, tmp_path_factory.mktemp(f"server-{name}"), flags))
               for name, flags in (("a", A_FLAGS), ("b", B_FLAGS), ("c", ()))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        for server in started.values():
            if isinstance(server, Exception):
                raise server
        yield started  # type: ignore[misc]
    finally:
        for server in started.values():
            if isinstance(server, LaunchedServer):
                server.stop()


@pytest.fixture(scope="module")
def a(servers: dict[str, LaunchedServer]) -> LaunchedServer:
    return servers["a"]


@pytest.fixture(scope="module")
def b(servers: dict[str, LaunchedServer]) -> LaunchedServer:
    return servers["b"]


@pytest.fixture(scope="module")
def c(servers: dict[str, LaunchedServer]) -> LaunchedServer:
    return servers["c"]


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def kv_idle(server: LaunchedServer) -> bool:
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    return (health["kv_blocks_free"] == health["kv_blocks_total"] and not any(health["running"].values())
            and health["batch_size"] == 0)


def metrics(server: LaunchedServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def settled_metrics(server: LaunchedServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Metrics once the engine's stats show it idle (their totals then count every finished request) and the
    frontend serves nothing (it counts a request as its answer ends). The frontend asks for the engine's
    stats every heartbeat: stats from before the last requests ran would show it idle too, so the metrics are
    read again two heartbeats later."""
    wait_for(lambda: kv_idle(server), 60, "the engine to be idle")
    wait_for(lambda: metric(metrics(server), "sfllm_frontend_requests_in_flight") == 0, 60, "no request in flight")
    time.sleep(2 * HEARTBEAT_INTERVAL_S + 0.1)
    assert kv_idle(server), "the engine went back to work"
    return metrics(server)


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def role_pids(server: LaunchedServer) -> dict[str, int]:
    """The pids of the launch's engine, worker and frontend, from their command lines."""
    pids = {}
    for pid in process_tree(server.process.pid)[1:]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for role in ("engine", "worker", "frontend"):
            if role.encode() in argv:
                pids[role] = pid
    return pids


def sse_data(lines: list[str]) -> list[Any]:
    return [line.removeprefix("data: ") if line == "data: [DONE]" else json.loads(line.removeprefix("data: "))
            for line in lines if line.startswith("data: ")]


def completion(url: str, prompt: str = "Hello", max_tokens: int = 2, headers: dict[str, str] | None = None,
               **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers=headers, timeout=120,
                      json={"prompt": prompt, "max_tokens": max_tokens, **extra})


def test_probes_are_open_and_everything_else_needs_the_key(a: LaunchedServer) -> None:
    assert httpx.get(f"{a.url}/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(f"{a.url}/ready", timeout=10).json()["status"] == "ready"
    assert "sfllm_engine_healthy 1.0" in httpx.get(f"{a.url}/metrics", timeout=10).text
    assert httpx.get(f"{a.url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{a.url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    assert completion(a.url).status_code == 401
    assert completion(a.url, headers=AUTH).status_code == 200
    assert completion(a.url, headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
    for probe in ("/health", "/ready"):
        head = httpx.head(f"{a.url}{probe}", timeout=10)
        assert (head.status_code, head.content) == (200, b""), probe


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"prompt": "x" * 70_000}, 413, "request_too_large"),
    ({"prompt": "hello " * 600, "max_tokens": 1}, 400, "prompt_too_long"),
    ({"prompt": "x", "max_tokens": 4001}, 400, "max_tokens_too_large"),
    ({"prompt": ["a", "b", "c"], "n": 3}, 400, "too_many_sequences"),
    ({"prompt": "x", "stop": ["1", "2", "3", "4", "5"]}, 400, "too_many_stop_sequences"),
    ({"prompt": "x", "stop": "s" * 300}, 400, "stop_sequence_too_long"),
])
def test_limits_answer_with_clear_errors(a: LaunchedServer, body: dict[str, Any], status: int, code: str) -> None:
    response = httpx.post(f"{a.url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_200_concurrent_streams_all_complete_and_free_the_kv_cache(a: LaunchedServer) -> None:
    before = settled_metrics(a)  # the previous tests' tokens must not count here

    async def stream(client: httpx.AsyncClient, index: int) -> list[Any]:
        body = {"prompt": f"Question {index}:", "max_tokens": 4, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            return sse_data([line async for line in response.aiter_lines()])

    async def run_all() -> list[list[Any]]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=a.url, headers=AUTH, limits=limits, timeout=600) as client:
            return await asyncio.gather(*(stream(client, i) for i in range(200)))

    results = asyncio.run(run_all())
    for events in results:
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1] if isinstance(e, dict))
        assert events[-2]["usage"]["completion_tokens"] == 4
    after = settled_metrics(a)  # and every KV block free again
    assert metric(after, "sfllm_requests_total", status="200", priority="normal") - metric(
        before, "sfllm_requests_total", status="200", priority="normal") == 200
    assert metric(after, "sfllm_generation_tokens_total") - metric(before, "sfllm_generation_tokens_total") == 800
    assert metric(after, "sfllm_requests_finished_total", reason="length") - metric(
        before, "sfllm_requests_finished_total", reason="length") == 200
    assert metric(after, "sfllm_request_queue_time_seconds_count") - metric(
        before, "sfllm_request_queue_time_seconds_count") == 200
    assert metric(after, "sfllm_time_to_first_token_seconds_count") >= 200
    # vLLM's names, read by gateways and autoscalers: the same counts, the histograms summed over the frontends
    model = httpx.get(f"{a.url}/ready", timeout=10).json()["model"]
    for sfllm_name, vllm_name, labels in (
            ("sfllm_generation_tokens_total", "vllm:generation_tokens_total", {}),
            ("sfllm_requests_finished_total", "vllm:request_success_total", {"reason": "length"}),
            ("sfllm_e2e_request_latency_seconds_count", "vllm:e2e_request_latency_seconds_count", {}),
            ("sfllm_time_to_first_token_seconds_count", "vllm:time_to_first_token_seconds_count", {})):
        other_labels = {("finished_reason" if key == "reason" else key): value for key, value in labels.items()}
        assert metric(after, vllm_name, model_name=model, **other_labels) == metric(after, sfllm_name, **labels) > 0
    assert metric(after, "vllm:num_requests_running", model_name=model) == 0


def stream_lines(url: str, body: dict[str, Any], headers: dict[str, str] | None, first: threading.Event,
                 result: dict[str, Any], stop_after: int | None = None) -> None:
    """Streams a completion into `result["lines"]`; with `stop_after`, leaves after that many lines."""
    lines: list[str] = []
    result["lines"] = lines
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=300) as response:
            result["status"] = response.status_code
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first.set()
                if stop_after is not None and len(lines) >= stop_after:
                    return
    except httpx.HTTPError as error:
        result["error"] = error
    finally:
        first.set()


def start_streams(url: str, count: int, body: dict[str, Any], headers: dict[str, str] | None = None,
                  stop_after: int | None = None) -> tuple[list[threading.Thread], list[dict[str, Any]]]:
    results: list[dict[str, Any]] = [{} for _ in range(count)]
    events = [threading.Event() for _ in range(count)]
    threads = [threading.Thread(target=stream_lines, args=(url, body, headers, event, result, stop_after))
               for event, result in zip(events, results)]
    for thread in threads:
        thread.start()
    assert all(event.wait(180) for event in events), "every stream started"
    return threads, results


def test_clients_that_leave_mid_stream_have_their_requests_aborted(a: LaunchedServer) -> None:
    before = settled_metrics(a)
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    threads, results = start_streams(a.url, 6, body, AUTH, stop_after=2)
    for thread in threads:
        thread.join(60)
    assert all(len(result["lines"]) == 2 for result in results), "each left after two events"
    after = settled_metrics(a)  # the abandoned requests aborted and their KV blocks freed
    aborted = metric(after, "sfllm_requests_finished_total", reason="abort") - metric(
        before, "sfllm_requests_finished_total", reason="abort")
    assert aborted == 6


def test_a_slow_reader_does_not_hold_up_other_clients(a: LaunchedServer) -> None:
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    slow.settimeout(120)
    slow.connect(("127.0.0.1", a.port))
    body = json.dumps({"prompt": "Tell me a story", "max_tokens": 64, "ignore_eos": True, "stream": True,
                       "logprobs": 20}).encode()
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        assert slow.recv(16).startswith(b"HTTP/1.1 200"), "the slow client's stream started"
        # Were the server held up by the client that reads nothing, these would time out.
        replies = [completion(a.url, f"Fast client {i}:", 4, AUTH) for i in range(3)]
        assert all(reply.status_code == 200 for reply in replies)
        assert httpx.get(f"{a.url}/health", timeout=10).status_code == 200
        rest = b""
        while not rest.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked body
            chunk = slow.recv(65536)
            assert chunk, f"the slow client's stream ends whole: {rest[-200:]!r}"
            rest += chunk
        assert b"data: [DONE]" in rest
    finally:
        slow.close()
    wait_for(lambda: kv_idle(a), 120, "the slow client's request to end and free its KV blocks")


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=REQUESTS, headers=PRIORITY_HEADERS)
def test_fuzzed_requests_never_get_a_5xx(a: LaunchedServer, request: tuple[str, Any], headers: dict[str, Any]) -> None:
    path, body = request
    response = httpx.post(f"{a.url}{path}", content=json.dumps(body).encode(), timeout=120,
                          headers={"content-type": "application/json", **AUTH, **headers})
    check_answer(response)


def test_after_the_fuzz_the_server_serves_normally(a: LaunchedServer) -> None:
    assert role_pids(a).keys() == {"engine", "worker", "frontend"}, "no process crashed"
    reply = completion(a.url, "1, 2, 3, 4,", 8, AUTH, temperature=0)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
    wait_for(lambda: kv_idle(a), 60, "no KV block leaked")
    wait_for(lambda: metric(metrics(a), "sfllm_frontend_requests_in_flight") == 0, 30, "no request left running")


def test_full_queue_is_503_with_retry_after_and_timeouts_abort(b: LaunchedServer) -> None:
    before = settled_metrics(b)
    long = {"prompt": "Count: 1, 2, 3,", "max_tokens": 8000, "ignore_eos": True}
    threads, streamed = start_streams(b.url, 1, {**long, "stream": True})
    with httpx.Client(timeout=60) as client:
        replies: list[httpx.Response] = [None] * 7  # type: ignore[list-item]

        def post(index: int) -> None:
            replies[index] = client.post(f"{b.url}/v1/completions", json=long)

        posters = [threading.Thread(target=post, args=(i,)) for i in range(7)]
        for poster in posters:
            poster.start()
        for poster in posters:
            poster.join(60)
    full = [r for r in replies if r.status_code == 503]
    timed_out = [r for r in replies if r.status_code == 504]
    assert full and len(full) + len(timed_out) == 7, [r.status_code for r in replies]
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "engine_overloaded" for r in full)
    assert all(r.json()["error"]["code"] == "request_timeout" for r in timed_out)
    threads[0].join(60)
    events = sse_data(streamed[0]["lines"])
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout", events[-3:]
    wait_for(lambda: kv_idle(b), 30, "the timed-out requests' KV blocks to be free")
    # the engine's stats as of after the aborts: those the frontend holds may predate a queued request's abort
    after = settled_metrics(b)
    assert metric(after, "sfllm_requests_finished_total", reason="abort") - metric(
        before, "sfllm_requests_finished_total", reason="abort") == 1 + len(timed_out)
    assert metric(after, "sfllm_requests_finished_total", reason="error") - metric(
        before, "sfllm_requests_finished_total", reason="error") == len(full)
    assert metric(after, "sfllm_requests_total", status="503", priority="normal") == len(full)


def nginx_config(template: str, replicas: list[str], port: int, folder: Path) -> str:
    """deploy/nginx.conf with its upstream servers replaced by `replicas` (same parameters), on loopback."""
    upstream = re.search(r"upstream\s+\w+\s*\{.*?\}", template, re.S)
    assert upstream is not None
    block = upstream.group(0)
    lines = []
    for line in block.splitlines(keepends=True):
        server = re.match(r"(\s*)server\s+\S+\s+([^;]*);", line)
        if server is None:
            lines.append(line)
        elif not any(line.lstrip().startswith("server ") for line in lines):
            lines.extend(f"{server.group(1)}server {replica} {server.group(2)};\n" for replica in replicas)
    site = re.sub(r"listen\s+[^;]+;", f"listen 127.0.0.1:{port};", template.replace(block, "".join(lines)))
    temp = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                            "uwsgi", "scgi"))
    return (f"daemon off;\nuser {getpass.getuser()};\nworker_processes 1;\npid {folder / 'nginx.pid'};\n"
            f"error_log {folder / 'error.log'} warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n    access_log {folder / 'access.log'};\n{temp}\n{site}\n}}\n")


@pytest.fixture
def nginx(a: LaunchedServer, b: LaunchedServer, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if binary is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's nginx-light)")
    port = free_port()
    config = tmp_path / "nginx.conf"
    config.write_text(nginx_config((REPO / "deploy" / "nginx.conf").read_text(),
                                   [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], port, tmp_path))
    process = subprocess.Popen([binary, "-c", str(config), "-p", str(tmp_path)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None, 30,
                 f"nginx to listen (see {tmp_path / 'error.log'})")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def test_nginx_balances_streams_and_routes_around_a_replica_whose_worker_died(
        a: LaunchedServer, b: LaunchedServer, nginx: str) -> None:
    served_before = [metric(metrics(s), "sfllm_requests_total", status="200", priority="normal") for s in (a, b)]
    body = {"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True, "stream": True}
    threads, results = start_streams(nginx, 4, body, AUTH)
    for thread in threads:
        thread.join(120)
    for result in results:
        assert result.get("status") == 200 and sse_data(result["lines"])[-1] == "[DONE]", result

    def served() -> list[float]:
        return [metric(metrics(s), "sfllm_requests_total", status="200", priority="normal") - before
                for s, before in zip((a, b), served_before)]
    # a request is counted once its response is done, which may be just after the client read its end
    wait_for(lambda: sum(served()) == 4, 30, "every stream to be counted as a success")
    assert all(count >= 1 for count in served()), f"both replicas served: {served()}"

    tree = process_tree(b.process.pid)
    worker = role_pids(b)["worker"]
    replies: list[httpx.Response] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            replies.append(completion(nginx, "Hi", 2, AUTH))

    statuses = watch_health(b, stop)
    asker = threading.Thread(target=keep_asking)
    asker.start()
    wait_for(lambda: len(replies) >= 2 and 200 in statuses, 60, "requests and health checks before the kill")
    os.kill(worker, signal.SIGKILL)
    try:
        code = b.process.wait(60)
        for _ in range(3):
            replies.append(completion(nginx, "Hello again", 2, AUTH))
    finally:
        stop.set()
        asker.join(120)
    assert code != 0, "launch exits non-zero when its worker dies"
    wait_for(lambda: not any(alive(pid) for pid in tree), 30, "every process of the replica to exit")
    assert not list(b.run_dir.glob("*.sock")), "no socket left behind"
    assert_health_stays_down(statuses)
    assert replies and all(reply.status_code == 200 for reply in replies), [r.status_code for r in replies]


def test_a_stalled_engine_turns_health_503_and_a_killed_one_ends_launch_non_zero_leaving_nothing(c: LaunchedServer) -> None:
    tree = process_tree(c.process.pid)
    engine = role_pids(c)["engine"]
    threads, results = start_streams(c.url, 2, {"prompt": "Count: 1, 2, 3,", "max_tokens": 2000, "ignore_eos": True,
                                                "stream": True})
    stop = threading.Event()
    statuses = watch_health(c, stop)
    wait_for(lambda: 200 in statuses, 60, "a health check before the kill")
    # A stalled engine first: its stats go stale and /health turns 503, the streams wait, and /health is
    # 200 again once the engine runs on.
    os.kill(engine, signal.SIGSTOP)
    try:
        wait_for(lambda: 503 in statuses, 30, "/health to turn 503 while the engine is stopped")
        assert httpx.get(f"{c.url}/ready", timeout=5).status_code == 503, "a stalled engine is not ready"
    finally:
        os.kill(engine, signal.SIGCONT)
    wait_for(lambda: 200 in statuses[statuses.index(503):], 30, "/health to be 200 again")
    assert all(thread.is_alive() for thread in threads), "the streams outlived the stall"
    killed_at = len(statuses)
    os.kill(engine, signal.SIGKILL)
    try:
        assert c.process.wait(60) != 0
    finally:
        stop.set()
    for thread in threads:
        thread.join(60)
    for result in results:
        events = sse_data(result["lines"])
        assert "error" in result or events[-2]["error"]["code"] == "engine_unavailable", events[-2:]
    assert_health_stays_down(statuses[killed_at:])
    wait_for(lambda: not any(alive(pid) for pid in tree), 30, "the worker and the frontend to exit too")
    left = list(c.run_dir.iterdir()) if c.run_dir.exists() else []
    assert not left, f"the killed engine's sockets, lock and worker config are cleaned up: {left}"


def test_the_log_file_holds_whole_lines(a: LaunchedServer) -> None:
    """Progress bars draw with carriage returns: into a log file they glue the next record onto the bar."""
    log = a.log.read_text()
    assert "model_runner: memory layout:" in log and "\r" not in log, "a progress bar in the log file"


def frontend_pid(server: LaunchedServer) -> int:
    return httpx.get(f"{server.url}/health", timeout=10).json()["frontend_pid"]


def test_sighup_replaces_the_frontend_under_streaming_load_without_a_failed_request(a: LaunchedServer) -> None:
    """Long streams run across the handover; short requests (new connections, and keep-alive ones) keep
    coming before, during and after it. Every one must succeed."""
    old_frontend = frontend_pid(a)
    phase = ["before"]  # "before" SIGHUP, "replaced" once the new frontend answers, "after" the old one exited
    long_lines: list[list[tuple[str, str]]] = [[] for _ in range(3)]
    short: list[list[tuple[str, bool]]] = [[] for _ in range(4)]
    failures: list[str] = []
    stop = threading.Event()

    def long_stream(lines: list[tuple[str, str]]) -> None:
        # Long enough to outlast the replacement's start, short enough to end within A's drain timeout (60 s: on a
        # loaded 2-core machine, 20 s cut these streams off).
        body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 60, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{a.url}/v1/completions", json=body, headers=AUTH, timeout=300) as response:
                if response.status_code != 200:
                    failures.append(f"long stream: {response.status_code}")
                lines.extend((phase[0], line) for line in response.iter_lines() if line)
        except httpx.HTTPError as error:
            failures.append(f"long stream: {error!r}")

    def short_requests(done: list[tuple[str, bool]], keep_alive: bool) -> None:
        client = httpx.Client(base_url=a.url, headers=AUTH, timeout=120)
        try:
            while not stop.is_set():
                started = phase[0]
                try:
                    if keep_alive:
                        reply = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
                        ok = reply.status_code == 200
                    else:
                        with httpx.Client(base_url=a.url, headers=AUTH, timeout=120) as fresh:
                            with fresh.stream("POST", "/v1/completions", json={
                                    "prompt": "Hi", "max_tokens": 3, "stream": True}) as response:
                                events = sse_data([line for line in response.iter_lines()])
                            ok = response.status_code == 200 and events[-1] == "[DONE]"
                except httpx.HTTPError as error:
                    ok = False
                    failures.append(f"short request started {started}: {error!r}")
                done.append((started, ok))
        finally:
            client.close()

    threads = [threading.Thread(target=long_stream, args=(lines,)) for lines in long_lines]
    threads += [threading.Thread(target=short_requests, args=(done, index % 2 == 0)) for index, done in
                enumerate(short)]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(long_lines) and all(short), 120, "every stream and request loop to be under way")
    os.kill(a.process.pid, signal.SIGHUP)
    try:
        wait_for(lambda: frontend_pid(a) != old_frontend, 120, "the new frontend to answer")
        phase[0] = "replaced"
        wait_for(lambda: not alive(old_frontend), 120, "the old frontend to finish and exit")
        phase[0] = "after"
        wait_for(lambda: all(any(started == "after" for started, _ in done) for done in short), 120,
                 "requests sent after the handover")
    finally:
        stop.set()
        for thread in threads:
            thread.join(300)
    assert not failures, failures
    assert all(ok for done in short for _, ok in done)
    for lines in long_lines:
        events = sse_data([line for _, line in lines])
        assert events[-1] == "[DONE]" and not any("error" in event for event in events[:-1]), events[-3:]
        assert {"before", "replaced"} <= {when for when, _ in lines}, "the stream ran across the handover"
    assert role_pids(a)["frontend"] not in (old_frontend, None)
    wait_for(lambda: kv_idle(a), 60, "every KV block to be free again")
    wait_for(lambda: re.search(r"INFO \[engine\] \S+: frontend \S+ left; aborted its 0 requests", a.log.read_text()),
             30, "the engine to log the old frontend's goodbye")
    assert "went silent" not in a.log.read_text(), "a frontend that handed over said goodbye; it did not go silent"


def test_a_killed_frontend_is_replaced_its_requests_aborted_and_engine_totals_kept(a: LaunchedServer) -> None:
    pids = role_pids(a)
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    threads, results = start_streams(a.url, 8, body, AUTH)
    before = metrics(a)
    os.kill(pids["frontend"], signal.SIGKILL)
    for thread in threads:
        thread.join(60)
    assert all("error" in result or sse_data(result["lines"])[-1] != "[DONE]" for result in results)
    wait_for(lambda: httpx.get(f"{a.url}/health", timeout=5).status_code == 200, 240, "a new frontend")
    new_pids = role_pids(a)
    assert new_pids["frontend"] != pids["frontend"]
    assert (new_pids["engine"], new_pids["worker"]) == (pids["engine"], pids["worker"]), "the model stayed loaded"
    wait_for(lambda: kv_idle(a), 60, "the dead frontend's requests to be aborted")
    log = a.log.read_text()
    silent = re.findall(r"frontend (\S+) went silent; aborted its 8 requests", log)
    assert silent and silent[0] in re.findall(r"frontend (\S+) connected", log), "the engine names it as it said hello"
    after = metrics(a)
    assert metric(after, "sfllm_requests_finished_total", reason="abort") - metric(
        before, "sfllm_requests_finished_total", reason="abort") == 8
    for name in ("sfllm_generation_tokens_total", "sfllm_prompt_tokens_total",
                 "sfllm_request_queue_time_seconds_count"):
        assert metric(after, name) >= metric(before, name) > 0, f"{name} is the engine's total"
    assert metric(after, "sfllm_requests_total", status="200", priority="normal") < metric(
        before, "sfllm_requests_total", status="200", priority="normal"), "the frontend's own counts start again"
    assert completion(a.url, "Hello", 2, AUTH).status_code == 200


def test_sigterm_to_launchs_group_and_to_every_process_drains_running_streams_then_all_exit_cleanly(
        a: LaunchedServer) -> None:
    """A signal to launch's whole process group (launch leads its own: a terminal's Ctrl-C, a script's `kill -TERM
    -- -PGID`) reaches launch alone, the children running in sessions of their own; systemd's default KillMode and
    `pkill -f sfllm` send SIGTERM to every process besides. Both at once here: the frontend drains (launch's order
    after the SIGTERM does not cut it), the engine and its worker log the SIGTERM and serve until launch stops them
    in order, the streams finish, every process exits and launch exits 0, with nothing logged as an error."""
    tree = process_tree(a.process.pid)
    roles = role_pids(a)
    assert {"engine", "worker"} <= set(roles) and len(tree) >= 4, (roles, tree)
    assert all(os.getsid(pid) != os.getsid(a.process.pid) for pid in tree if pid != a.process.pid)
    logged_before = len(a.log.read_text())
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 10, "ignore_eos": True, "stream": True}
    threads, results = start_streams(a.url, 2, body, AUTH)
    os.killpg(a.process.pid, signal.SIGTERM)
    for pid in tree[1:]:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{a.url}/ready", timeout=5).status_code == 503, 10, "/ready to turn 503")
    refused = completion(a.url, "Hi", 2, AUTH)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_draining"
    assert httpx.get(f"{a.url}/health", timeout=5).status_code == 200, "alive while draining"
    for thread in threads:
        thread.join(60)
    for result in results:
        assert "error" not in result and sse_data(result["lines"])[-1] == "[DONE]", result
    assert a.process.wait(60) == 0
    wait_for(lambda: not any(alive(pid) for pid in tree), 30, "every process to exit")
    assert not a.run_dir.exists() or not list(a.run_dir.iterdir())
    log = a.log.read_text()[logged_before:]
    assert "[engine] sfllm.ordered_stop: SIGTERM while sfllm launch" in log, log
    assert "[worker] sfllm.ordered_stop: SIGTERM while its engine" in log, log
    assert not re.findall(r".* (?:ERROR|CRITICAL) .*|Traceback.*", log)
