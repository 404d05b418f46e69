"""min_tokens on a GPU: its rows leave the captured decode step for the eager sampler, whose -inf ending tokens
the sampling kernel must pass over; the other rows of the same steps keep the graph's tokens."""
from __future__ import annotations

import gc

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MIN_TOKENS = 4


@pytest.fixture(autouse=True)
def release_gpu_memory():
    """The engine is the test's own: once its frame is gone, a collection frees the device for the suite's
    next files, whose servers start in processes of their own (a module-scoped fixture kept it past its
    teardown: pytest holds a fixture's value until its finalizers have run)."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def test_rows_short_of_min_tokens_pass_over_their_ending_tokens_beside_plain_rows() -> None:
    from sfllm import LLM
    llm = LLM(model="qwen3-0.6b", load_format="dummy", cuda_graph_max_bs=16)
    for temperature in (0.0, 0.8):
        _check_min_tokens_beside_plain_rows(llm, temperature)


def _check_min_tokens_beside_plain_rows(llm, temperature: float) -> None:
    from sfllm import SamplingParams
    prompts = [[100 + i] * 8 for i in range(12)]
    plain = [r.outputs[0].token_ids for r in llm.generate(prompts, SamplingParams(
        temperature=temperature, seed=7, max_tokens=8, ignore_eos=True))]
    # a stop token each row would draw first: held off, the row draws another
    held = [SamplingParams(temperature=temperature, seed=7, max_tokens=8, min_tokens=MIN_TOKENS,
                           stop_token_ids=[tokens[0]]) if i % 2 == 0 else
            SamplingParams(temperature=temperature, seed=7, max_tokens=8, ignore_eos=True)
            for i, tokens in enumerate(plain)]
    outputs = [r.outputs[0] for r in llm.generate(prompts, held)]
    eos = set(llm.source.config.eos_token_ids)
    for i, (output, tokens) in enumerate(zip(outputs, plain)):
        if i % 2:
            assert output.token_ids == tokens, "a plain row beside min_tokens rows keeps its tokens"
        else:
            assert len(output.token_ids) >= MIN_TOKENS
            first = output.token_ids[:MIN_TOKENS]
            assert tokens[0] not in first and not eos & set(first)
    assert llm.kv_usage()[0] == llm.kv_usage()[1], "every KV block free again"
