"""The worker's side of grammar masks: packed rows placed at the drawn rows, and bits to -inf logits."""
from __future__ import annotations

import numpy as np
import torch

from sfllm.worker.token_mask import apply_bitmask, grammar_bitmask


def test_bits_allow_exactly_their_tokens_and_other_rows_allow_all() -> None:
    vocab = 100  # 4 words, the last one partly past the vocabulary
    packed = np.zeros((2, 4), dtype=np.uint32)
    packed[0, 1] = (1 << 5) | (1 << 31)  # tokens 37 and 63: the sign bit too
    packed[0, 3] = 1 << 3                # token 99
    packed[1, 0] = 1                     # token 0
    bitmask = grammar_bitmask(packed.astype("<u4").tobytes(), [1, 3], [0, 1, 2, 3], vocab, torch.device("cpu"))
    logits = apply_bitmask(torch.randn(4, vocab), bitmask)
    allowed = [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in logits]
    assert allowed == [list(range(vocab)), [37, 63, 99], list(range(vocab)), [0]]


def test_logits_past_the_masks_width_are_never_allowed() -> None:
    bitmask = torch.full((1, 1), -1, dtype=torch.int32)  # 32 tokens allowed
    logits = apply_bitmask(torch.zeros(1, 40), bitmask)
    assert torch.isfinite(logits[0, :32]).all() and torch.isinf(logits[0, 32:]).all()
