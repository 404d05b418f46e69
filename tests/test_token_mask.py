"""The worker's side of grammar masks: packed rows placed at the drawn rows, and bits to -inf logits."""
from __future__ import annotations

import numpy as np
import torch

from sfllm.worker.token_mask import TokenBitmasks, apply_bitmask


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> list[list[int]]:
    logits = apply_bitmask(torch.randn(len(bitmask), vocab), bitmask)
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in logits]


def test_bits_allow_exactly_their_tokens_and_other_rows_allow_all() -> None:
    vocab = 100  # 4 words, the last one partly past the vocabulary
    packed = np.zeros((2, 4), dtype=np.uint32)
    packed[0, 1] = (1 << 5) | (1 << 31)  # tokens 37 and 63: the sign bit too
    packed[0, 3] = 1 << 3                # token 99
    packed[1, 0] = 1                     # token 0
    bitmask = TokenBitmasks(vocab, torch.device("cpu")).bitmask(memoryview(packed.astype("<u4")).cast("B"),
                                                                [1, 3], [0, 1, 2, 3])
    assert allowed_tokens(bitmask, vocab) == [list(range(vocab)), [37, 63, 99], list(range(vocab)), [0]]


def test_a_reused_buffer_keeps_no_row_of_an_earlier_step() -> None:
    """Steps of constrained rows only, each allowing one token, then on the same buffers a step with a drawn
    row no grammar constrains: that row allows every token, the grammar rows their own step's token."""
    vocab = 64
    masks = TokenBitmasks(vocab, torch.device("cpu"))

    def packed(tokens: list[int]) -> bytes:
        rows = np.zeros((len(tokens), 2), dtype="<u4")
        for row, token in enumerate(tokens):
            rows[row, token // 32] = 1 << (token % 32)
        return rows.tobytes()

    for step in range(4):  # every buffer filled, rows and all
        assert allowed_tokens(masks.bitmask(packed([step, 40 + step, 50]), [0, 1, 2], [0, 1, 2]), vocab) == \
            [[step], [40 + step], [50]]
    assert allowed_tokens(masks.bitmask(packed([7, 9]), [0, 2], [0, 1, 2]), vocab) == [[7], list(range(vocab)), [9]]
    assert allowed_tokens(masks.bitmask(packed([8]), [0], [0]), vocab) == [[8]]


def test_logits_past_the_masks_width_are_never_allowed() -> None:
    bitmask = torch.full((1, 1), -1, dtype=torch.int32)  # 32 tokens allowed
    logits = apply_bitmask(torch.zeros(1, 40), bitmask)
    assert torch.isfinite(logits[0, :32]).all() and torch.isinf(logits[0, 32:]).all()
