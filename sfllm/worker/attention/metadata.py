"""What every attention layer needs to know about one step, built once per step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """A ragged batch: sequence b has query_lens[b] new tokens, the last ones of its seq_lens[b].

    The new tokens of all sequences are concatenated in batch order (T in total);
    slot_mapping[t] is the flat KV slot (block * block_size + offset) of token t, or -1
    for padding tokens of a CUDA-graph batch."""
    slot_mapping: torch.Tensor      # [T] int64
    query_start_loc: torch.Tensor   # [B + 1] int32
    seq_lens: torch.Tensor          # [B] int32
    block_tables: torch.Tensor      # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    query_lens_host: list[int]
    seq_lens_host: list[int]
    # split-KV partitions of a decode step; fixed by the runner so that a captured graph and an eager
    # run of the same batch split alike and give the same numbers
    num_kv_splits: int | None = None

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_host)
