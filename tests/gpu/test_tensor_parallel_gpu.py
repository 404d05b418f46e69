"""Tensor parallelism over NCCL on two GPUs, its faults: a rank killed or hung mid-run ends the server within
seconds and frees both GPUs. (Two ranks' tokens against one GPU's and transformers', every step a graph replay
with the all-reduces inside, and graphs against eager steps: tests/gpu/test_engine_gpu.py.)"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from servers import LaunchedServer, alive, assert_health_stays_down, fault_rank_mid_stream
from test_engine_gpu import checkpoint  # noqa: F401 (a fixture)

from sfllm.worker.follower_ranks import STEP_TIMEOUT_S

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


def _free_gpu_memory() -> list[int]:
    return [torch.cuda.mem_get_info(device)[0] for device in range(2)]


@pytest.mark.parametrize(("sent", "within_s", "message"), [
    (signal.SIGKILL, 15, "tensor-parallel rank 1 (pid {pid}) was killed by signal 9"),
    (signal.SIGSTOP, STEP_TIMEOUT_S + 15, "a step has not finished after"),
])
def test_a_rank_killed_or_hung_mid_stream_ends_the_server_and_frees_both_gpus(
        checkpoint: Path, tmp_path: Path, sent: signal.Signals, within_s: float, message: str) -> None:
    torch.cuda.init()
    free_before = _free_gpu_memory()
    server = LaunchedServer(tmp_path, "--model", str(checkpoint), "--device", "cuda", "--dtype", "bfloat16",
                            "--tensor-parallel-size", "2", "--max-context-length", "4096", "--mem-fraction", "0.5",
                            "--cache-dir", str(checkpoint / "cache"))
    try:
        fault = fault_rank_mid_stream(server, sent, {"prompt": "Count: 1, 2, 3,", "max_tokens": 3000,
                                                     "ignore_eos": True}, 20, within_s + 30)
        assert fault.exit_code != 0 and fault.seconds_to_exit < within_s, "launch exits non-zero within seconds"
        assert message.format(pid=fault.rank_pid) in server.log.read_text()
        assert 20 <= len(fault.stream_events) < 3000, "cut mid-stream"
        assert_health_stays_down(fault.health)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in fault.tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in fault.tree), "no rank or other process is left"
        free_after = _free_gpu_memory()
        assert all(after > before - 512 * 1024**2 for before, after in zip(free_before, free_after)), (
            f"GPU memory held: free {free_before} before, {free_after} after")
    finally:
        server.stop()
