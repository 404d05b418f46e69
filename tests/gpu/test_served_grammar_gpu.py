"""Constrained requests served on a GPU: `sfllm launch` (the worker in its own process, decode steps in CUDA
graphs) with a step scheduled behind each one that waits for its grammar mask (sfllm.engine.engine_core).
Every constrained answer matches its pattern, greedy and sampled; the unconstrained ones beside them run to
their length; the engine's KV blocks are all free again."""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from servers import LaunchedServer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PATTERN = r"[0-9]{3}-[a-z]{4}"
# xgrammar's structural tag form: exactly one tag, nothing around it
ONE_TAG = {"type": "structural_tag", "format": {
    "type": "triggered_tags", "triggers": ["<f="], "at_least_one": True, "stop_after_first": True,
    "tags": [{"type": "tag", "begin": "<f=a>", "content": {"type": "regex", "pattern": "[0-9]{3}"}, "end": "</f>"}]}}
TAG_PATTERN = r"<f=a>[0-9]{3}</f>"


def test_constrained_and_plain_requests_served_together(tmp_path: Path) -> None:
    server = LaunchedServer(tmp_path, "--model", "qwen3-0.6b", "--load-format", "dummy", "--device", "cuda",
                            "--dtype", "bfloat16")
    try:
        def complete(index: int) -> dict:
            body = {"prompt": f"request {index}:", "max_tokens": 24,
                    "temperature": 0.0 if index % 3 else 1.0}
            if index % 8 == 3:
                body["response_format"] = ONE_TAG
            elif index % 4:
                body["response_format"] = {"type": "regex", "regex": PATTERN}
            else:
                body["ignore_eos"] = True
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]

        with ThreadPoolExecutor(64) as pool:
            choices = list(pool.map(complete, range(96)))
        for index, choice in enumerate(choices):
            if index % 4:
                assert re.fullmatch(TAG_PATTERN if index % 8 == 3 else PATTERN, choice["text"]), (index, choice)
                assert choice["finish_reason"] == "stop"
            else:
                assert choice["finish_reason"] == "length"
        assert kv_usage_settles_at_zero(server.url)
    finally:
        assert server.stop() == 0


def kv_usage_settles_at_zero(url: str, timeout: float = 5.0) -> bool:
    """The frontend's engine stats come with its heartbeats (every 0.5 s): a leaked block shows past them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        usage = re.search(r"^sfllm_kv_cache_usage_ratio (\S+)", httpx.get(f"{url}/metrics", timeout=10).text, re.M)
        if usage and float(usage.group(1)) == 0.0:
            return True
        time.sleep(0.2)
    return False
