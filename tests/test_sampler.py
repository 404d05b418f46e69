"""The eager sampler's top-k / top-p: a batch whose rows all bound top_k draws among torch.topk's columns, with the
distribution (and, for seeded rows, the very tokens) of the sort over the whole vocabulary."""
from __future__ import annotations

import torch

from sfllm.sampling_params import SamplingParams
from sfllm.worker.sampler import TOP_K_BOUND_LIMIT, Sampler, SamplingInputs

VOCAB = 3000


def inputs_for(params: list[SamplingParams], bounded: bool) -> SamplingInputs:
    inputs = SamplingInputs.build(params, positions=list(range(7, 7 + len(params))), vocab_size=VOCAB,
                                  device=torch.device("cpu"))
    assert (inputs.top_k_bound is not None) == bounded
    return inputs


def test_seeded_rows_draw_the_same_tokens_from_the_top_columns_as_from_the_whole_sort() -> None:
    """Qwen3's recommended sampling (top_k 20, top_p 0.95) beside other bounded rows, min_p and a greedy row."""
    rows = [SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=1),
            SamplingParams(temperature=1.3, top_k=5, seed=2),
            SamplingParams(temperature=0.9, top_k=200, top_p=0.5, seed=3),
            SamplingParams(temperature=1.0, top_k=50, min_p=0.05, seed=4),
            SamplingParams(temperature=0.0, seed=5)]
    bounded = inputs_for(rows, bounded=True)
    assert bounded.top_k_bound == 200, "the largest top_k of the rows that sample"
    whole = SamplingInputs(**{**bounded.__dict__, "top_k_bound": None})
    sampler = Sampler()
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        logits = torch.randn(len(rows), VOCAB, generator=generator) * 3
        tokens = sampler._draw(logits, bounded)
        assert tokens.tolist() == sampler._draw(logits, whole).tolist()
        assert tokens[4] == logits[4].argmax()
        for row, params in enumerate(rows[:4]):
            assert tokens[row] in logits[row].topk(params.top_k).indices


def test_unseeded_rows_draw_from_the_renormalised_nucleus() -> None:
    """A row of 8 tokens' mass, top_k 4 and top_p 0.8: drawn 4,000 times, the kept tokens' frequencies are their
    renormalised probabilities; a row beside it with top_k off keeps the batch on the whole sort, as before."""
    logits = torch.full((1, VOCAB), -30.0)
    logits[0, :8] = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.2, 0.1])
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.8)
    inputs = inputs_for([params] * 4000, bounded=True)
    tokens = Sampler(seed=3)._draw(logits.expand(4000, VOCAB).contiguous(), inputs)
    probs = torch.softmax(logits[0, :4], dim=-1)
    kept = int(((probs.cumsum(0) - probs) <= 0.8).sum())  # the nucleus within the top 4
    expected = torch.softmax(logits[0, :kept], dim=-1)
    counts = torch.bincount(tokens, minlength=VOCAB).float() / len(tokens)
    assert counts[kept:].sum() == 0, "nothing outside the nucleus"
    assert torch.allclose(counts[:kept], expected, atol=0.03), (counts[:kept], expected)
    inputs_for([params, SamplingParams(temperature=1.0, top_p=0.9)], bounded=False)
    inputs_for([SamplingParams(temperature=1.0, top_k=TOP_K_BOUND_LIMIT + 1)], bounded=False)
    inputs_for([SamplingParams(temperature=1.0, top_k=VOCAB)], bounded=False)
