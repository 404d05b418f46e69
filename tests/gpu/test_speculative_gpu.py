"""Speculative decoding on a GPU: verify steps in the CUDA graphs give plain decoding's tokens.

Random weights (made here with transformers, as in test_engine_gpu.py). A random model seldom repeats itself
within a few dozen tokens, so n-gram drafts would be rare: the drafts come from `OracleProposer`, which knows
what plain decoding emitted and spoils every third position of it, so that every verify step has accepted
and rejected drafts."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from test_engine_gpu import VOCAB, _llm, _prompts, checkpoint  # noqa: F401  (the module's checkpoint fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SPEC = {"speculative_method": "ngram", "num_speculative_tokens": 4, "speculative_min_acceptance_rate": 0.0}


class OracleProposer:
    """Drafts from the tokens plain decoding emitted for each prompt, every third position of them spoiled."""

    def __init__(self, prompts: list[list[int]], outputs: list[list[int]]) -> None:
        self.runs = list(zip(prompts, outputs))

    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        for prompt, output in self.runs:
            emitted = token_ids[len(prompt):]
            if token_ids[:len(prompt)] == prompt and output[:len(emitted)] == emitted:
                start = len(emitted)
                drafts = output[start:start + max_drafts]
                return [(t + 1) % VOCAB if (start + i) % 3 == 2 else t for i, t in enumerate(drafts)]
        return []


def _run(checkpoint: Path, prompts, params, proposer: OracleProposer | None = None, **overrides):
    from sfllm.loop_time import LoopTime
    llm = _llm(checkpoint, attention_backend="triton", **overrides)
    if proposer is not None:
        llm.engine.scheduler.speculation.proposer = proposer
    runner = llm.engine.worker.runner
    runner.loop_time = LoopTime()
    outputs = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    speculation = llm.engine.scheduler.speculation
    facts = {"graph_steps": runner.loop_time.calls.get("forward", 0), "steps": runner.num_steps,
             "accepted": speculation.num_accepted, "proposed": speculation.num_proposed,
             "kv_free": llm.kv_usage()[0] == llm.kv_usage()[1]}
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    return outputs, facts


@pytest.mark.parametrize("batch", [1, 8])
def test_float32_greedy_verify_steps_in_graphs_equal_plain_decoding(checkpoint: Path, batch: int) -> None:  # noqa: F811
    from sfllm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    prompts = _prompts()[:batch]
    plain, _ = _run(checkpoint, prompts, params, dtype="float32")
    oracle = OracleProposer(prompts, plain)
    eager, eager_facts = _run(checkpoint, prompts, params, oracle, dtype="float32", disable_cuda_graph=True, **SPEC)
    graphs, facts = _run(checkpoint, prompts, params, oracle, dtype="float32", **SPEC)
    assert graphs == plain and eager == plain
    assert facts["graph_steps"] == facts["steps"], "every step, verify steps too, ran as a graph"
    assert 0.4 * facts["proposed"] < facts["accepted"] < 0.9 * facts["proposed"], "drafts accepted and rejected"
    assert facts["kv_free"] and eager_facts["kv_free"]


def test_seeded_and_temperature_rows_with_drafts(checkpoint: Path) -> None:  # noqa: F811
    """Seeded rows (redrawn by the eager sampler at every draft position) give plain decoding's tokens;
    temperature-only rows (drawn in the graph) give tokens of the vocabulary, with every block free after."""
    from sfllm import SamplingParams
    prompts = _prompts()[:4]
    params = [SamplingParams(temperature=0.7, seed=5, max_tokens=48, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=48, ignore_eos=True),
              SamplingParams(temperature=0.5, top_k=20, seed=9, max_tokens=48, ignore_eos=True)]
    # float32: a verify row's logits come from the extend kernels, a decode's from the decode ones; in bf16 their
    # rounding differs enough to move a seeded draw
    plain, _ = _run(checkpoint, prompts, params, dtype="float32")
    drafted, facts = _run(checkpoint, prompts, params, OracleProposer(prompts, plain), dtype="float32", **SPEC)
    assert [drafted[i] for i in (0, 1, 3)] == [plain[i] for i in (0, 1, 3)]
    assert len(drafted[2]) == 48 and facts["kv_free"] and facts["accepted"] > 0
