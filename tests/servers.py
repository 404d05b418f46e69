"""Starting real sfllm processes for tests: `sfllm launch`, or the engine and a frontend apart."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from sfllm.config import without_config_environment

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = without_config_environment()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start(command: str, *args: str, log: Path, python_flags: tuple[str, ...] = ()) -> subprocess.Popen:
    handle = open(log, "ab")
    return subprocess.Popen([sys.executable, *python_flags, "-m", "sfllm", command, *args], stdout=handle,
                            stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def stop(process: subprocess.Popen, timeout: float = 30.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server at {url} not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


class LaunchedServer:
    """`sfllm launch` on a free port with its own run directory."""

    def __init__(self, tmp: Path, *extra: str, run_dir: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = run_dir or tmp / f"run-{self.port}"
        self.log = tmp / f"launch-{self.port}.log"
        self.process = start("launch", "--host", "127.0.0.1", "--port", str(self.port), "--run-dir",
                             str(self.run_dir), "--device", "cpu", "--dtype", "float32", *extra, log=self.log)
        wait_healthy(self.url, self.process, self.log)

    def stop(self) -> int:
        return stop(self.process)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(children.get(current, []))
    return tree


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def watch_health(server: LaunchedServer, stop: threading.Event) -> list[int | str]:
    """Polls /health until `stop` or the server exited; the statuses, or the names of the errors."""
    statuses: list[int | str] = []

    def watch() -> None:
        while not stop.is_set():
            try:
                statuses.append(httpx.get(f"{server.url}/health", timeout=10).status_code)
            except httpx.HTTPError as error:
                statuses.append(type(error).__name__)
                if server.process.poll() is not None:
                    return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return statuses


def assert_health_stays_down(statuses: list[int | str]) -> None:
    """From the first /health answer after a fault that is not 200 on (a 503, or no answer once the replica
    stops), none is 200: the replica never looks healthy again. Whether a 503 comes before the frontends stop
    is a race with launch's exit; a stalled engine shows the 503 itself (test_ops_server.py)."""
    failures = [index for index, status in enumerate(statuses) if status != 200]
    assert failures and 200 not in statuses[failures[0]:], statuses
    down = (503, "ConnectError", "ReadError", "RemoteProtocolError")
    assert all(status in down for status in statuses[failures[0]:]), statuses


@dataclass
class RankFault:
    """What followed a signal to tensor-parallel rank 1 of a launched server in the middle of a stream."""
    rank_pid: int
    exit_code: int
    seconds_to_exit: float
    stream_events: list[str]   # the stream's SSE lines, until it ended or broke
    health: list[int | str]    # /health statuses from the signal on
    tree: list[int]            # the server's processes before the signal


def fault_rank_mid_stream(server: LaunchedServer, fault: signal.Signals, body: dict, events_before: int,
                          wait_s: float) -> RankFault:
    """Streams `body` from /v1/completions, sends `fault` to rank 1 once `events_before` events came, and waits up
    to `wait_s` for launch to exit."""
    tree = process_tree(server.process.pid)
    rank = next(pid for pid in tree if b"--tensor-parallel-rank" in Path(f"/proc/{pid}/cmdline").read_bytes())
    events: list[str] = []

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body | {"stream": True},
                              timeout=120) as response:
                events.extend(line for line in response.iter_lines() if line)
        except httpx.HTTPError:
            pass  # the connection breaks when the frontend stops

    streaming = threading.Thread(target=stream)
    streaming.start()
    deadline = time.monotonic() + 120
    while len(events) < events_before and time.monotonic() < deadline:
        time.sleep(0.01)
    stop = threading.Event()
    health = watch_health(server, stop)
    os.kill(rank, fault)
    signalled = time.monotonic()
    code = server.process.wait(wait_s)
    seconds = time.monotonic() - signalled
    stop.set()
    streaming.join(60)
    return RankFault(rank, code, seconds, events, health, tree)
