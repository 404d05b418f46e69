"""A ForwardBatch staged into a step's tensors, exactly or padded to a graph's shape, and completed on
the device from the worker's block tables: checked value by value."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sfllm.messages import BlockTableUpdate, ForwardBatch
from sfllm.worker.block_tables import BlockTables
from sfllm.worker.step_inputs import StepShape, StepStaging, device_metadata, exact_shape, stage_step

BLOCK_SIZE = 4
NUM_SLOTS = 10
PADDING_SLOT = NUM_SLOTS
CPU = torch.device("cpu")


def mixed_batch(input_token_ids: list[int]) -> ForwardBatch:
    """Slot 5 prefills 3 new tokens after 2 cached ones (chunk not finished: no sample); slot 2 decodes
    its 7th token; slot 9 prefills a 1-token prompt."""
    return ForwardBatch(step_id=3, slots=[5, 2, 9], num_new_tokens=[3, 1, 1], context_lens=[5, 7, 1],
                        input_token_ids=input_token_ids, sample=[False, True, True],
                        block_table_updates=[BlockTableUpdate(5, 0, [10, 11]), BlockTableUpdate(2, 0, [3, 4]),
                                             BlockTableUpdate(9, 0, [8])])


def tables_for(batch: ForwardBatch) -> BlockTables:
    tables = BlockTables(NUM_SLOTS, max_blocks=3, block_size=BLOCK_SIZE, device=CPU)
    tables.apply(batch.block_table_updates)
    return tables


def staged(batch: ForwardBatch, shape: StepShape, tile_rows: int | None = 2):
    temperatures = np.linspace(0.0, 1.0, NUM_SLOTS + 1, dtype=np.float32)
    host_buffer, host = StepStaging(CPU).host(shape)
    num_sampled = stage_step(batch, shape, host, temperatures, PADDING_SLOT, tile_rows)
    return shape.views(host_buffer), num_sampled, temperatures


def test_values_of_a_mixed_batch() -> None:
    batch = mixed_batch([21, 22, 23, 24, 25])
    shape = exact_shape(batch, tile_rows=2)
    assert shape == StepShape(5, 3, 2, decode_only=False)  # slot 5's 3 tokens: two tiles of 2 rows
    tensors, num_sampled, temperatures = staged(batch, shape)
    input_ids, meta = device_metadata(tensors, shape, tables_for(batch), torch.arange(100, 111), None, batch)

    assert input_ids.tolist() == [21, 22, 23, 24, 25]
    assert tensors.positions.tolist() == [2, 3, 4, 6, 0]
    assert tensors.token_slots.tolist() == [5, 5, 5, 2, 9]
    # position p of a sequence lives in its table's block p // 4 at offset p % 4
    assert meta.slot_mapping.tolist() == [10 * 4 + 2, 10 * 4 + 3, 11 * 4 + 0, 4 * 4 + 2, 8 * 4 + 0]
    assert meta.query_start_loc.tolist() == [0, 3, 4, 5]
    assert meta.seq_lens.tolist() == [5, 7, 1]
    assert meta.block_tables[:, :2].tolist() == [[10, 11], [3, 4], [8, 0]]
    assert meta.block_tables.dtype == meta.seq_lens.dtype == torch.int32
    assert meta.tiles.tolist() == [[0, 2], [0, 0]], "the tile attending to the most keys first"
    assert meta.decode_order.tolist() == [1, 0, 2], "the longest sequence first"
    assert not meta.decode_only and meta.query_lens_host == [3, 1, 1] and meta.seq_lens_host == [5, 7, 1]
    assert num_sampled == 2
    assert tensors.logits_indices.tolist() == [3, 4, 0]
    assert tensors.sample_slots.tolist() == [2, 9, PADDING_SLOT]
    assert tensors.temperatures.tolist() == [temperatures[2], temperatures[9], 0.0]


def test_padding_to_a_graph_shape() -> None:
    """Padding tokens belong to the padding slot (negative KV slots), padding sequences have no tokens
    and no length, unused tiles are -1, unsampled rows write the padding slot."""
    batch = mixed_batch([21, 22, 23, -1, 25])
    shape = StepShape(8, 5, 4, decode_only=False)
    tensors, num_sampled, _ = staged(batch, shape)
    input_ids, meta = device_metadata(tensors, shape, tables_for(batch), torch.arange(100, 111), None)

    assert input_ids.tolist() == [21, 22, 23, 102, 25, 0, 0, 0]
    assert tensors.token_slots.tolist()[5:] == [PADDING_SLOT] * 3
    assert (meta.slot_mapping[5:] < 0).all() and (meta.slot_mapping[:5] >= 0).all()
    assert meta.query_start_loc.tolist() == [0, 3, 4, 5, 5, 5]
    assert meta.seq_lens.tolist() == [5, 7, 1, 0, 0]
    assert meta.decode_order.tolist() == [1, 0, 2, 3, 4], "padding sequences last"
    assert meta.block_tables[3:].eq(-1).all(), "padding sequences read the padding slot's table"
    assert meta.tiles.tolist() == [[0, 2], [0, 0], [-1, -1], [-1, -1]]
    assert tensors.sample_slots.tolist() == [2, 9] + [PADDING_SLOT] * 3
    assert meta.query_lens_host is None, "a graph's step has no host lengths"


def test_a_decode_shape_pads_with_one_token_sequences_of_length_zero() -> None:
    batch = ForwardBatch(step_id=0, slots=[4, 1], num_new_tokens=[1, 1], context_lens=[6, 3], input_token_ids=[-1, 7],
                         sample=[True, True], block_table_updates=[BlockTableUpdate(4, 0, [5, 6]),
                                                                   BlockTableUpdate(1, 0, [2])])
    shape = StepShape(4, 4, 0, decode_only=True)
    tensors, num_sampled, _ = staged(batch, shape, tile_rows=None)
    input_ids, meta = device_metadata(tensors, shape, tables_for(batch), torch.arange(100, 111), 2)
    assert num_sampled == 2 and input_ids.tolist() == [104, 7, 0, 0]
    assert tensors.positions.tolist() == [5, 2, 0, 0]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4] and meta.seq_lens.tolist() == [6, 3, 0, 0]
    assert meta.slot_mapping.tolist()[:2] == [6 * 4 + 1, 2 * 4 + 2] and (meta.slot_mapping[2:] < 0).all()
    assert meta.decode_only and meta.num_kv_splits == 2


@pytest.mark.parametrize("num_seqs", [1, 2, 3, 7])
def test_every_tensor_starts_16_byte_aligned(num_seqs: int) -> None:
    # Odd and even lengths of every part: Triton would compile a variant per alignment.
    shape = StepShape(num_seqs * 3, num_seqs, num_seqs, decode_only=False)
    buffer = torch.empty(shape.num_bytes, dtype=torch.uint8)
    tensors = shape.views(buffer)
    assert all(getattr(tensors, name).data_ptr() % 16 == 0 for name in vars(tensors))
    assert tensors.tiles.shape == (num_seqs, 2) and tensors.query_start_loc.shape == (num_seqs + 1,)


def test_block_table_updates_write_the_new_entries_only() -> None:
    tables = BlockTables(NUM_SLOTS, max_blocks=4, block_size=BLOCK_SIZE, device=CPU)
    tables.apply([BlockTableUpdate(3, 0, [7, 8]), BlockTableUpdate(1, 0, [2])])
    tables.apply([BlockTableUpdate(3, 2, [9]), BlockTableUpdate(1, 1, [5, 6])])
    assert tables.table[3].tolist() == [7, 8, 9, 0] and tables.table[1].tolist() == [2, 5, 6, 0]
    assert tables.table[PADDING_SLOT].eq(-1).all()
    with pytest.raises(ValueError, match="past the 4 entries"):
        tables.apply([BlockTableUpdate(1, 3, [1, 2])])
