"""build_step_inputs: a ForwardBatch into the tensors of one step, checked value by value."""
from __future__ import annotations

import pytest
import torch

from sfllm.messages import ForwardBatch
from sfllm.worker.step_inputs import build_step_inputs

BLOCK_SIZE = 4


def mixed_batch(input_token_ids: list[int]) -> ForwardBatch:
    """Slot 5 prefills 3 new tokens after 2 cached ones (chunk not finished: no sample); slot 2 decodes
    its 7th token; slot 9 prefills a 1-token prompt."""
    return ForwardBatch(step_id=3, slots=[5, 2, 9], num_new_tokens=[3, 1, 1], context_lens=[5, 7, 1],
                        input_token_ids=input_token_ids, block_tables=[[10, 11], [3, 4], [8]],
                        sample=[False, True, True])


def test_values_of_a_mixed_batch() -> None:
    last_tokens = torch.arange(100, 110)
    inputs = build_step_inputs(mixed_batch([21, 22, 23, 24, 25]), BLOCK_SIZE, last_tokens, torch.device("cpu"))
    assert inputs.input_ids.tolist() == [21, 22, 23, 24, 25]
    assert inputs.positions.tolist() == [2, 3, 4, 6, 0]
    # position p of a sequence lives in block_table[p // 4] at offset p % 4
    assert inputs.meta.slot_mapping.tolist() == [10 * 4 + 2, 10 * 4 + 3, 11 * 4 + 0, 4 * 4 + 2, 8 * 4 + 0]
    assert inputs.meta.query_start_loc.tolist() == [0, 3, 4, 5]
    assert inputs.meta.seq_lens.tolist() == [5, 7, 1]
    assert inputs.meta.block_tables.tolist() == [[10, 11], [3, 4], [8, 0]]
    assert inputs.meta.block_tables.dtype == inputs.meta.seq_lens.dtype == torch.int32
    assert (inputs.meta.max_query_len, inputs.meta.max_seq_len) == (3, 7)
    assert inputs.logits_indices.tolist() == [3, 4]
    assert inputs.sample_slots.tolist() == inputs.sample_slots_host == [2, 9]
    assert inputs.sample_positions == [7, 1]


@pytest.mark.parametrize("input_token_ids, expected", [
    ([-1, -1, -1, -1, -1], [105, 105, 105, 102, 109]),  # all placeholders: each its slot's last token
    ([21, 22, 23, -1, 25], [21, 22, 23, 102, 25]),      # only the decode's token is still on the device
])
def test_placeholders_take_the_slot_s_last_sampled_token(input_token_ids: list[int], expected: list[int]) -> None:
    last_tokens = torch.arange(100, 110)
    inputs = build_step_inputs(mixed_batch(input_token_ids), BLOCK_SIZE, last_tokens, torch.device("cpu"))
    assert inputs.input_ids.tolist() == expected


@pytest.mark.parametrize("num_seqs", [1, 2, 3, 7])
def test_every_tensor_starts_16_byte_aligned(num_seqs: int) -> None:
    # Odd and even lengths of every part: Triton would compile a variant per alignment.
    batch = ForwardBatch(step_id=0, slots=list(range(num_seqs)), num_new_tokens=[1] * num_seqs,
                         context_lens=[9] * num_seqs, input_token_ids=[-1] * num_seqs,
                         block_tables=[[3 * i, 3 * i + 1, 3 * i + 2] for i in range(num_seqs)],
                         sample=[True] * num_seqs)
    inputs = build_step_inputs(batch, BLOCK_SIZE, torch.zeros(8, dtype=torch.int64), torch.device("cpu"))
    tensors = [inputs.input_ids, inputs.positions, inputs.logits_indices, inputs.sample_slots,
               inputs.meta.slot_mapping, inputs.meta.query_start_loc, inputs.meta.seq_lens, inputs.meta.block_tables]
    assert all(t.data_ptr() % 16 == 0 for t in tensors)
    assert inputs.meta.slot_mapping.tolist() == [12 * i + 8 for i in range(num_seqs)]
