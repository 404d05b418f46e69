"""Starting real sfllm processes for tests: `sfllm launch`, or the engine and a frontend apart."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFLLM_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start(command: str, *args: str, log: Path) -> subprocess.Popen:
    handle = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "sfllm", command, *args], stdout=handle, stderr=subprocess.STDOUT,
                            env=_env(), start_new_session=True)


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

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = tmp / f"run-{self.port}"
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
