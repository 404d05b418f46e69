"""Turns a ForwardBatch into the device tensors of one model step, in one host-to-device copy."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from sfllm.messages import ForwardBatch
from sfllm.worker.attention.metadata import AttentionMetadata
from sfllm.worker.pinned_staging import PinnedStaging


@dataclass
class StepInputs:
    input_ids: torch.Tensor         # [T] int64; -1 placeholders already replaced
    positions: torch.Tensor         # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor    # [S] rows of the hidden states to sample from
    sample_slots: torch.Tensor      # [S] worker slots of the sampled sequences
    sample_positions: list[int]     # [S] position the sampled token will take in its sequence
    sample_slots_host: list[int]


def build_step_inputs(batch: ForwardBatch, block_size: int, last_tokens: torch.Tensor,
                      device: torch.device, staging: PinnedStaging | None = None) -> StepInputs:
    """`staging` provides the host buffer of the copy (a fresh one when None)."""
    num_new = np.asarray(batch.num_new_tokens, dtype=np.int64)
    context_lens = np.asarray(batch.context_lens, dtype=np.int64)
    slots = np.asarray(batch.slots, dtype=np.int64)
    sample = np.asarray(batch.sample, dtype=bool)
    num_seqs = len(slots)
    num_tokens = int(num_new.sum())

    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(num_new, out=query_start_loc[1:])
    seq_of_token = np.repeat(np.arange(num_seqs), num_new)
    positions = np.arange(num_tokens) - query_start_loc[seq_of_token] + (context_lens - num_new)[seq_of_token]

    table_lens = np.fromiter(map(len, batch.block_tables), dtype=np.int64, count=num_seqs)
    max_blocks = int(table_lens.max()) if num_seqs else 1
    block_tables = np.zeros((num_seqs, max(max_blocks, 1)), dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(batch.block_tables), dtype=np.int64, count=int(table_lens.sum()))
    block_tables[np.arange(block_tables.shape[1])[None, :] < table_lens[:, None]] = flat
    slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size

    logits_indices = query_start_loc[1:][sample] - 1
    sample_slots = slots[sample]
    input_ids = np.asarray(batch.input_token_ids, dtype=np.int64)
    token_slots = slots[seq_of_token]

    # One packed copy instead of eight small ones. Every part starts 16-byte aligned: Triton compiles a
    # kernel variant per pointer alignment, and an odd token count must not trigger a new one.
    parts = [input_ids, positions, slot_mapping, query_start_loc, context_lens, logits_indices, sample_slots,
             token_slots, block_tables.reshape(-1)]
    # Each part is followed by a pad of 0 or 1 elements; one split yields parts and pads alike.
    parts_and_pads = [n for part in parts for n in (len(part), len(part) % 2)]
    total = sum(parts_and_pads)
    host_bytes = staging.take(8 * total) if staging is not None else torch.empty(8 * total, dtype=torch.uint8)
    packed = host_bytes.view(torch.int64)
    host = packed.numpy()  # the padding is never read
    start = 0
    for part, pad in zip(parts, parts_and_pads[1::2]):
        host[start:start + len(part)] = part
        start += len(part) + pad
    packed = packed.to(device, non_blocking=True)
    if staging is not None:
        staging.copy_launched()
    (ids, pos, slot_map, qsl, seq_lens, logits_idx, s_slots, t_slots, tables) = packed.split(parts_and_pads)[::2]

    placeholders = input_ids < 0
    if placeholders.all():  # decoding with overlap: every token is the one sampled last
        ids = last_tokens.index_select(0, t_slots)
    elif placeholders.any():
        ids = torch.where(ids < 0, last_tokens[t_slots], ids)
    meta = AttentionMetadata(
        slot_mapping=slot_map,
        query_start_loc=qsl.int(),
        seq_lens=seq_lens.int(),
        block_tables=tables.view(num_seqs, block_tables.shape[1]).int(),
        max_query_len=int(num_new.max()) if num_seqs else 0,
        max_seq_len=int(context_lens.max()) if num_seqs else 0,
        query_lens_host=num_new.tolist(),
        seq_lens_host=context_lens.tolist(),
    )
    return StepInputs(ids, pos, meta, logits_idx, s_slots, context_lens[sample].tolist(),
                      sample_slots.tolist())
