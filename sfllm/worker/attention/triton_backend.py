"""Attention through sfllm's Triton kernels: the default on CUDA, and safe to capture in CUDA graphs."""
from __future__ import annotations

import torch

from sfllm.kernels import decode_attention, extend_attention, extend_tile_config, store_kv_cache
from sfllm.worker.attention.backend import AttentionBackend, register_backend
from sfllm.worker.attention.metadata import AttentionMetadata


@register_backend("triton")
class TritonAttentionBackend(AttentionBackend):
    supports_cuda_graphs = True

    def extend_tile_rows(self, dtype: torch.dtype, device: torch.device) -> int:
        return extend_tile_config(self.head_dim, dtype, device).block_m

    def kv_cache_to_fill(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv_cache.keys(layer), self.kv_cache.values(layer)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache.keys(layer), self.kv_cache.values(layer)
        if k is not None:
            store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        # each kernel writes the rows of its sequences: one new token (decode), several (extend tiles)
        decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale, out=out,
                         num_kv_splits=meta.num_kv_splits, query_start_loc=meta.query_start_loc,
                         batch_order=meta.decode_order)
        if not meta.decode_only:
            extend_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                             meta.tiles, self.scale, out=out)
        return out.view(q.shape[0], self.num_heads * self.head_dim)
