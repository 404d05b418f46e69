"""High priority served under a flood on a GPU: `sfllm launch` at its defaults (the worker in its own process,
holding the step it gets behind each long one), background streams past the batch limit, and high-priority
requests one after another. The engine sends them urgent steps, which the worker launches before a held step
(its loop report counts them); every request ends with its length; each high-priority request's first token is
the one it gets alone (its prefill runs alone either way, on its prompt's first 496 tokens cached); the KV
blocks are all free again. The held steps' own tokens after an urgent step are checked on the tiny model
(tests/test_held_steps.py): a flood's are not comparable from run to run (a bf16 step's rows depend on its batch)."""
from __future__ import annotations

import asyncio
import random
import re
import time
from pathlib import Path

import httpx
import pytest
import torch
from test_served_grammar_gpu import kv_usage_settles_at_zero

from servers import LaunchedServer

from sfllm.loop_time import LOG_INTERVAL_S

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VOCAB = 151_936  # qwen3-0.6b's


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, VOCAB - 1000) for _ in range(length)] for _ in range(count)]


async def complete(client: httpx.AsyncClient, prompt: list[int], priority: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "priority": priority}
    response = await client.post("/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


async def high_priority_alone_and_under_a_flood(url: str, probes: list[list[int]]) -> tuple[list[str], list[str]]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        for p in probes:  # their prompts into the prefix cache: alone and under the flood, 16 tokens computed
            await complete(client, p, "high", 1)
        alone = [(await complete(client, p, "high", 1))["text"] for p in probes]
        flood = [asyncio.create_task(complete(client, p, "background", 256)) for p in prompts(400, 1024, seed=2)]
        await asyncio.sleep(1.0)  # the flood admitted: every slot within the batch limit taken
        loaded = []
        jitter = random.Random(3)
        for p in probes:  # at random points of the flood's steps, some of them while a step is held
            await asyncio.sleep(jitter.uniform(0.0, 0.01))
            loaded.append((await complete(client, p, "high", 1))["text"])
        for choice in await asyncio.gather(*flood):
            assert choice["finish_reason"] == "length"
    return alone, loaded


def test_high_priority_requests_run_before_the_held_step_under_a_flood(tmp_path: Path) -> None:
    server = LaunchedServer(tmp_path, "--model", "qwen3-0.6b", "--load-format", "dummy", "--device", "cuda",
                            "--dtype", "bfloat16", "--log-level", "debug")
    try:
        probes = prompts(16, 512, seed=1)
        alone, loaded = asyncio.run(high_priority_alone_and_under_a_flood(server.url, probes))
        assert loaded == alone
        assert kv_usage_settles_at_zero(server.url)
        log = server.log.read_text(errors="replace")
        assert re.search(r"urgent step \d+: 1 high-priority requests, 16 tokens", log), "the engine sent some"
        # the worker's loop report (every LOG_INTERVAL_S with steps in it, on a turn of its loop) says how many
        deadline = time.monotonic() + LOG_INTERVAL_S + 2
        while not re.search(r"(\d+) urgent steps launched before a held step", log) and time.monotonic() < deadline:
            time.sleep(0.5)
            log = server.log.read_text(errors="replace")
        assert re.search(r"(\d+) urgent steps launched before a held step", log), "and the worker ran one first"
    finally:
        assert server.stop() == 0
