"""DecodeInputs: a decode batch staged into the captured graphs' input buffers, value by value
(on a CPU device the same layout is filled without pinned memory)."""
from __future__ import annotations

import numpy as np
import torch

from sfllm.messages import ForwardBatch
from sfllm.worker.decode_inputs import DecodeInputs
from sfllm.worker.pinned_staging import NUM_BUFFERS, PinnedStaging

BLOCK_SIZE = 4
PADDING_SLOT = 16


def decode_batch(slots: list[int], context_lens: list[int], tables: list[list[int]]) -> ForwardBatch:
    return ForwardBatch(step_id=0, slots=slots, num_new_tokens=[1] * len(slots), context_lens=context_lens,
                        input_token_ids=[-1] * (len(slots) - 1) + [42], block_tables=tables,
                        sample=[True] * len(slots))


def test_stage_writes_rows_and_padding() -> None:
    inputs = DecodeInputs(max_rows=8, max_blocks=5, block_size=BLOCK_SIZE, padding_slot=PADDING_SLOT,
                          device=torch.device("cpu"))
    batch = decode_batch([3, 0, 7], [6, 1, 17], [[10, 11], [2], [5, 6, 7, 8, 9]])
    inputs.stage(batch, np.array([0.0, 0.7, 1.0], dtype=np.float32), padded=4)
    d = inputs.device_views
    assert d["input_ids"][:3].tolist() == [-1, -1, 42]
    assert d["positions"][:3].tolist() == [5, 0, 16]
    # the new token's KV slot: block_table[p // 4] * 4 + p % 4; the padding row stores nothing
    assert d["slot_mapping"][:4].tolist() == [11 * 4 + 1, 2 * 4 + 0, 9 * 4 + 0, -1]
    assert d["slots"][:4].tolist() == [3, 0, 7, PADDING_SLOT]
    assert d["seq_lens"][:4].tolist() == [6, 1, 17, 0]
    assert d["temperatures"][:4].tolist() == [0.0, np.float32(0.7), 1.0, 0.0]
    assert d["block_tables"][0, :2].tolist() == [10, 11] and d["block_tables"][1, 0] == 2
    assert d["block_tables"][2].tolist() == [5, 6, 7, 8, 9]
    assert d["seq_lens"].dtype == d["block_tables"].dtype == torch.int32
    assert all(view.data_ptr() % 16 == 0 for view in d.values())


def test_a_smaller_batch_after_a_larger_one_pads_over_the_stale_rows() -> None:
    inputs = DecodeInputs(max_rows=8, max_blocks=3, block_size=BLOCK_SIZE, padding_slot=PADDING_SLOT,
                          device=torch.device("cpu"))
    inputs.stage(decode_batch([1, 2, 3, 4], [2, 2, 2, 2], [[1], [2], [3], [4]]), np.ones(4, np.float32), padded=4)
    for _ in range(NUM_BUFFERS):  # every host buffer in turn
        inputs.stage(decode_batch([5], [9], [[7, 8, 9]]), np.zeros(1, np.float32), padded=2)
        d = inputs.device_views
        assert d["slots"][:2].tolist() == [5, PADDING_SLOT]
        assert d["seq_lens"][:2].tolist() == [9, 0] and d["slot_mapping"][:2].tolist() == [9 * 4 + 0, -1]
        assert d["block_tables"][0].tolist() == [7, 8, 9]


def test_pinned_staging_hands_buffers_out_in_turn_and_grows_them() -> None:
    staging = PinnedStaging(torch.device("cpu"), num_buffers=2)
    first = staging.take(16)
    second = staging.take(16)
    assert first.data_ptr() != second.data_ptr()
    assert staging.take(8).data_ptr() == first.data_ptr(), "the first buffer again, and big enough"
    grown = staging.take(64)
    assert grown.numel() == 64 and grown.data_ptr() != second.data_ptr()
