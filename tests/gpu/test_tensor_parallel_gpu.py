"""Tensor parallelism over NCCL on two GPUs: float32 tokens of two ranks equal one GPU's and transformers' with
every step a CUDA graph replay (the all-reduces captured in it), bf16 graphs equal bf16 eager steps of two
ranks, and a rank killed or hung mid-run ends the server within seconds and frees both GPUs."""
from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from servers import LaunchedServer, alive, process_tree, watch_health
from test_engine_gpu import _llm, _prompts, _reference, _reference_greedy, checkpoint  # noqa: F401 (a fixture)

from sfllm.worker.follower_ranks import STEP_TIMEOUT_S

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


@pytest.fixture(autouse=True)
def release_gpu_memory():
    yield
    gc.collect()  # the engine's objects hold reference cycles
    torch.cuda.empty_cache()


def test_float32_two_ranks_equal_one_gpu_and_transformers_with_every_step_a_graph(checkpoint: Path) -> None:
    from sfllm import SamplingParams
    from sfllm.loop_time import LoopTime
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = _prompts()
    reference = _reference(checkpoint, torch.float32)
    expected = [_reference_greedy(reference, p, 32) for p in prompts]
    del reference
    outputs = {}
    for size in (1, 2):
        llm = _llm(checkpoint, attention_backend="triton", tensor_parallel_size=size)
        runner = llm.engine.worker.runner
        runner.loop_time = LoopTime()
        outputs[size] = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
        assert runner.graph_runner is not None and runner.shard.num_heads == 16 // size
        assert runner.loop_time.calls["forward"] == runner.num_steps >= 32, "every step ran as a graph"
        assert llm.kv_usage()[0] == llm.kv_usage()[1]
        llm.engine.worker.close()
        del llm, runner
        gc.collect()
    assert outputs[2] == outputs[1] == expected


def test_bf16_two_ranks_graph_replays_equal_their_eager_steps(checkpoint: Path) -> None:
    """The captured all-reduces and logits gather compute what the eager ones do, on a mixed batch."""
    from sfllm import SamplingParams
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (40, 3, 17, 64, 5, 30, 8, 50)]
    results = {}
    for graphs in (True, False):
        llm = _llm(checkpoint, dtype="bfloat16", attention_backend="triton", disable_cuda_graph=not graphs,
                   tensor_parallel_size=2)
        results[graphs] = [r.outputs[0].token_ids for r in llm.generate(_prompts(), params)]
        llm.engine.worker.close()
        del llm
        gc.collect()
    assert results[True] == results[False]
    assert [len(t) for t in results[True]] == [p.max_tokens for p in params]


def _free_gpu_memory() -> list[int]:
    return [torch.cuda.mem_get_info(device)[0] for device in range(2)]


def _stream(url: str, events: list[str]) -> None:
    import httpx
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            events.extend(line for line in response.iter_lines() if line)
    except httpx.HTTPError:
        pass


@pytest.mark.parametrize(("fault", "within_s", "message"), [
    (signal.SIGKILL, 15, "tensor-parallel rank 1 (pid {pid}) was killed by signal 9"),
    (signal.SIGSTOP, STEP_TIMEOUT_S + 15, "a step has not finished after"),
])
def test_a_rank_killed_or_hung_mid_stream_ends_the_server_and_frees_both_gpus(
        checkpoint: Path, tmp_path: Path, fault: signal.Signals, within_s: float, message: str) -> None:
    torch.cuda.init()
    free_before = _free_gpu_memory()
    server = LaunchedServer(tmp_path, "--model", str(checkpoint), "--device", "cuda", "--dtype", "bfloat16",
                            "--tensor-parallel-size", "2", "--max-context-length", "4096", "--mem-fraction", "0.5",
                            "--cache-dir", str(checkpoint / "cache"))
    try:
        tree = process_tree(server.process.pid)
        rank_1 = next(pid for pid in tree if b"--tensor-parallel-rank" in Path(f"/proc/{pid}/cmdline").read_bytes())
        events: list[str] = []
        streaming = threading.Thread(target=_stream, args=(server.url, events))
        streaming.start()
        deadline = time.monotonic() + 120
        while len(events) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop = threading.Event()
        statuses = watch_health(server, stop)
        os.kill(rank_1, fault)
        faulted = time.monotonic()
        code = server.process.wait(within_s + 30)
        stop.set()
        streaming.join(60)
        assert code != 0 and time.monotonic() - faulted < within_s, "launch exits non-zero within seconds"
        assert message.format(pid=rank_1) in server.log.read_text()
        assert 20 <= len(events) < 3000, "cut mid-stream"
        assert 503 in statuses, statuses
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in tree), "no rank or other process is left"
        free_after = _free_gpu_memory()
        assert all(after > before - 512 * 1024**2 for before, after in zip(free_before, free_after)), (
            f"GPU memory held: free {free_before} before, {free_after} after")
    finally:
        if server.process.poll() is None:
            os.kill(rank_1, signal.SIGCONT)
        server.stop()
