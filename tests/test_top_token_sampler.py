"""The top-token sampler's staging and draw (its graphs' work, run uncaptured on the CPU): which rows it draws,
the padding rows of a graph larger than the step, and each unseeded row's own noise. Against the eager sampler
and the model: tests/test_step_graphs.py; captured, on a GPU: tests/gpu/test_engine_gpu.py."""
from __future__ import annotations

import numpy as np
import torch

from sfllm.sampling_params import SamplingParams
from sfllm.worker.top_token_sampler import TopTokenSampler

VOCAB = 1024
NUM_SLOTS = 16  # and the padding slot after them


def sampler(logits: torch.Tensor) -> TopTokenSampler:
    tokens = torch.full((logits.shape[0],), -5, dtype=torch.int64)
    last_tokens = torch.full((NUM_SLOTS + 1,), -7, dtype=torch.int64)
    return TopTokenSampler(logits, tokens, last_tokens, torch.tensor([3 << 32]), VOCAB, [1, 2, 4, 6, 8],
                           torch.device("cpu"))


def stage(top: TopTokenSampler, slots: list[int], positions: list[int] | None = None) -> int:
    """Stages one row per slot, the last input token of each at `positions` (10, 11, ... by default)."""
    rows = np.arange(len(slots), dtype=np.int64)
    token_positions = rows + 10 if positions is None else np.asarray(positions, dtype=np.int64)
    return top.stage(np.asarray(slots, dtype=np.int64), token_positions, rows, np.full(NUM_SLOTS + 1, 1.0, np.float32))


def test_a_step_of_five_rows_in_the_graph_of_six_writes_its_slots_alone() -> None:
    top = sampler(torch.randn(8, VOCAB))
    for slot in range(NUM_SLOTS):
        top.settings.set(slot, SamplingParams(temperature=1.0, top_k=8) if slot % 2 else SamplingParams())
    assert stage(top, [0, 2, 4]) == 0, "no row of the step is drawn here: nothing staged"
    slots = [1, 2, 3, 5, 9]
    assert stage(top, slots) == 6
    top.run(6)
    tokens = top.tokens.tolist()
    assert tokens[1] == -5 and tokens[5] == -5, "slot 2's row keeps the step graph's token; the padding row too"
    assert all(t in top.logits[row].topk(8).indices.tolist() for row, t in enumerate(tokens) if row in (0, 2, 3, 4))
    written = top.last_tokens.tolist()
    assert [written[s] for s in slots] == tokens[:5], "each row's token to its slot"
    assert all(written[s] == -7 for s in range(NUM_SLOTS) if s not in slots), "no other slot is written"


def test_unseeded_rows_of_equal_logits_draw_apart_and_seeded_ones_alike() -> None:
    top = sampler(torch.zeros(8, VOCAB))  # every token alike: the draw is the noise's alone
    for slot in range(8):
        top.settings.set(slot, SamplingParams(temperature=1.0, top_k=256, seed=5 if slot >= 6 else None))
    assert stage(top, list(range(8)), positions=[20, 20, 20, 20, 20, 20, 30, 30]) == 8
    top.run(8)
    unseeded, seeded = top.tokens[:6].tolist(), top.tokens[6:].tolist()
    assert len(set(unseeded)) >= 4, f"each unseeded row has its own noise: {unseeded}"
    assert seeded[0] == seeded[1], "one seed at one position, one token"
    first = unseeded
    top.noise_seed.add_(1)  # the next step's counter
    top.run(8)
    assert top.tokens[:6].tolist() != first and top.tokens[6:].tolist() == seeded, "each step its own, seeds aside"


def test_a_vocabulary_within_the_bound_captures_nothing() -> None:
    """No row of a vocabulary of at most 256 tokens is drawn here (its top_k never bounds it), and topk(256) of
    its logits would not run: no graph is captured (on the CPU, a capture would fail)."""
    logits = torch.zeros(4, 200)
    top = TopTokenSampler(logits, torch.zeros(4, dtype=torch.int64), torch.zeros(NUM_SLOTS + 1, dtype=torch.int64),
                          torch.tensor([0]), 200, [1, 2, 4], torch.device("cpu"))
    top.settings.set(0, SamplingParams(temperature=1.0, top_k=20))
    assert top.settings.num_drawn == 0 and stage(top, [0]) == 0
    top.capture(pool=())
    assert top.graphs == {}
