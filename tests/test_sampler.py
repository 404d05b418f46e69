"""The eager sampler's top-k / top-p: a row whose top_k is small draws among torch.topk's columns, with the
distribution (and, for seeded rows, the very tokens) of the sort over the whole vocabulary, whatever shares its
batch."""
from __future__ import annotations

import torch

from sfllm.sampling_params import SamplingParams
from sfllm.worker.sampler import TOP_K_BOUND, Sampler, SamplingInputs

VOCAB = 3000


def inputs_for(params: list[SamplingParams]) -> SamplingInputs:
    return SamplingInputs.build(params, positions=list(range(7, 7 + len(params))), vocab_size=VOCAB,
                                device=torch.device("cpu"))


def test_seeded_rows_draw_the_same_tokens_from_the_top_columns_as_from_the_whole_sort() -> None:
    """Qwen3's recommended sampling (top_k 20, top_p 0.95) beside other bounded rows, min_p and a greedy row:
    distinct logits, so the top k are the same tokens either way."""
    rows = [SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=1),
            SamplingParams(temperature=1.3, top_k=5, seed=2),
            SamplingParams(temperature=0.9, top_k=200, top_p=0.5, seed=3),
            SamplingParams(temperature=1.0, top_k=50, min_p=0.05, seed=4),
            SamplingParams(temperature=0.0, seed=5)]
    inputs = inputs_for(rows)
    assert inputs.bounded_rows is not None and inputs.all_bounded
    sampler = Sampler()
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        logits = torch.randn(len(rows), VOCAB, generator=generator) * 3
        tokens = sampler._draw(logits, inputs)
        assert tokens[:4].tolist() == sampler._race(logits, inputs, bounded=False)[:4].tolist()
        assert tokens[4] == logits[4].argmax()
        for row, params in enumerate(rows[:4]):
            assert tokens[row] in logits[row].topk(params.top_k).indices


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch_even_among_tied_logits() -> None:
    """bf16 logits tie often; a 40-way tie across rank 20: the row's top 20 must not depend on its neighbours
    (alone, beside a top_k 50 row, beside a row with top-p alone, which sorts the whole vocabulary)."""
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1)) - 5
    logits[:15] = torch.linspace(9.0, 5.0, 15)
    logits[100:140] = 4.0
    row = SamplingParams(temperature=1.0, top_k=20)
    sampler = Sampler()
    for seed in range(200):
        seeded = SamplingParams(temperature=1.0, top_k=20, seed=seed)
        draws = {sampler._draw(torch.stack([logits] * len(batch)), inputs_for(batch))[0].item()
                 for batch in ([seeded], [seeded, SamplingParams(temperature=1.0, top_k=50)],
                               [seeded, SamplingParams(temperature=1.0, top_p=0.9)])}
        assert len(draws) == 1, (seed, draws)
    assert inputs_for([row, SamplingParams(temperature=1.0, top_p=0.9)]).all_bounded is False


def test_unseeded_rows_draw_from_the_renormalised_nucleus() -> None:
    """A row of 8 tokens' mass, top_k 4 and top_p 0.8: drawn 4,000 times, the kept tokens' frequencies are their
    renormalised probabilities. Past the bound, or with top_k off, a row sorts the whole vocabulary."""
    logits = torch.full((1, VOCAB), -30.0)
    logits[0, :8] = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.2, 0.1])
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.8)
    inputs = inputs_for([params] * 4000)
    assert inputs.all_bounded
    tokens = Sampler(seed=3)._draw(logits.expand(4000, VOCAB).contiguous(), inputs)
    probs = torch.softmax(logits[0, :4], dim=-1)
    kept = int(((probs.cumsum(0) - probs) <= 0.8).sum())  # the nucleus within the top 4
    expected = torch.softmax(logits[0, :kept], dim=-1)
    counts = torch.bincount(tokens, minlength=VOCAB).float() / len(tokens)
    assert counts[kept:].sum() == 0, "nothing outside the nucleus"
    assert torch.allclose(counts[:kept], expected, atol=0.03), (counts[:kept], expected)
    for unbounded in (SamplingParams(temperature=1.0, top_k=TOP_K_BOUND + 1), SamplingParams(temperature=1.0),
                      SamplingParams(temperature=1.0, top_p=0.9)):
        assert inputs_for([unbounded]).bounded_rows is None
    mixed = inputs_for([params, SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.0)])
    assert mixed.bounded_rows.tolist() == [True, False, False] and not mixed.all_bounded
