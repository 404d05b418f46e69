"""A frontend's memory and how fast `sfllm launch` replaces it after a SIGKILL.

    python scripts/frontend_restart.py [--kills 5] [-- extra `sfllm launch` flags]

Starts `sfllm launch` on a free loopback port, sends a few chat requests, reads the
frontend's RSS, then kills the frontend `--kills` times (waiting out the launcher's
crash-loop backoff in between) and times each kill until /health answers 200 from the
new frontend. Prints the RSS and every replacement time.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from sfllm.launcher import FRONTEND_RESTART_BACKOFF_S

POLL_S = 0.01


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _healthy_frontend(url: str, other_than: int | None = None) -> int | None:
    """The pid of the frontend that answered /health with 200, unless it is `other_than`."""
    try:
        response = httpx.get(f"{url}/health", timeout=1)
    except httpx.HTTPError:
        return None
    pid = response.json().get("frontend_pid") if response.status_code == 200 else None
    return None if pid == other_than else pid


def _wait_for_frontend(url: str, launch: subprocess.Popen, timeout_s: float, other_than: int | None = None) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if launch.poll() is not None:
            raise RuntimeError(f"sfllm launch exited with {launch.returncode}")
        pid = _healthy_frontend(url, other_than)
        if pid is not None:
            return pid
        time.sleep(POLL_S)
    raise TimeoutError(f"no healthy frontend at {url} within {timeout_s:g} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("launch_flags", nargs="*", help="after --: flags for sfllm launch")
    args = parser.parse_args()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as run_dir:
        launch = subprocess.Popen([sys.executable, "-m", "sfllm", "launch", "--host", "127.0.0.1", "--port", str(port),
                                   "--run-dir", run_dir, *args.launch_flags],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            frontend = _wait_for_frontend(url, launch, 600)
            for question in ("What is the capital of France?", "Name a colour.", "Count to five."):
                httpx.post(f"{url}/v1/chat/completions", timeout=120,
                           json={"messages": [{"role": "user", "content": question}], "max_tokens": 16})
            print(f"frontend RSS after 3 chat requests: {_rss_mb(frontend):.0f} MB")
            times: list[float] = []
            for _ in range(args.kills):
                if times:  # past the launcher's longest restart backoff, which is meant for crash loops
                    time.sleep(max(0.0, killed_at + max(FRONTEND_RESTART_BACKOFF_S) + 0.5 - time.monotonic()))
                os.kill(frontend, signal.SIGKILL)
                killed_at = time.monotonic()
                frontend = _wait_for_frontend(url, launch, 120, other_than=frontend)
                times.append(time.monotonic() - killed_at)
                print(f"SIGKILL to /health 200 from the new frontend: {times[-1]:.2f} s")
            print(f"median of {len(times)}: {statistics.median(times):.2f} s; "
                  f"new frontend RSS: {_rss_mb(frontend):.0f} MB")
        finally:
            launch.send_signal(signal.SIGTERM)
            launch.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
