"""What every attention layer needs to know about one step, built once per step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """A ragged batch: sequence b has query_lens[b] new tokens, the last ones of its seq_lens[b].

    The new tokens of all sequences are concatenated in batch order (T in total);
    slot_mapping[t] is the flat KV slot (block * block_size + offset) of token t, negative for
    padding tokens of a CUDA-graph batch. Sequences of one new token are attended as decodes, the
    others by query tiles (`tiles`, see sfllm.kernels.extend_tiles); a CUDA graph's padding sequences have
    no new tokens."""
    slot_mapping: torch.Tensor      # [T] int64
    query_start_loc: torch.Tensor   # [B + 1] int32
    seq_lens: torch.Tensor          # [B] int32
    block_tables: torch.Tensor      # [B, max_blocks] int32
    tiles: torch.Tensor             # [N, 2] int32 (sequence, first query row); -1 rows unused
    decode_only: bool               # every sequence has one new token (no tiles to attend)
    # split-KV partitions of the decode rows; fixed by the runner so that a captured graph and an eager
    # run of the same batch split alike and give the same numbers
    num_kv_splits: int | None = None
    decode_order: torch.Tensor | None = None  # [B] int32, the sequences longest first (for the decode kernel)
    # Host copies of the lengths, for the torch backend; a CUDA graph's steps have none.
    query_lens_host: list[int] | None = None
    seq_lens_host: list[int] | None = None

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def max_seq_len_host(self) -> int:
        return max(self.seq_lens_host, default=0)
