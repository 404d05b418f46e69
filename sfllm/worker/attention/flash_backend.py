"""Attention through flash-attn's paged kernels (optional: `pip install 'sfllm[flash]'`).

flash-attn reads a paged cache only in pages of a multiple of 256 tokens, so this backend
needs --block-size 256 (or a multiple)."""
from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from sfllm.worker.attention.backend import AttentionBackend, register_backend
from sfllm.worker.attention.metadata import AttentionMetadata
from sfllm.worker.attention.triton_backend import store_layer_kv
from sfllm.worker.kv_cache import KVCache

FLASH_PAGE_MULTIPLE = 256


@register_backend("flash")
class FlashAttentionBackend(AttentionBackend):
    supports_cuda_graphs = True

    def __init__(self, kv_cache: KVCache, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__(kv_cache, num_heads, num_kv_heads, head_dim)
        if kv_cache.block_size % FLASH_PAGE_MULTIPLE:
            raise ValueError(f"--attention-backend flash needs --block-size a multiple of {FLASH_PAGE_MULTIPLE} "
                             f"(flash-attn's page size); got {kv_cache.block_size}")
        self._cu_seqlens_k: torch.Tensor | None = None

    def prepare(self, meta: AttentionMetadata) -> None:
        if not meta.is_decode:
            self._cu_seqlens_k = torch.nn.functional.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = store_layer_kv(self.kv_cache, layer, k, v, meta.slot_mapping)
        if meta.is_decode:
            out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens,
                                          block_table=meta.block_tables, softmax_scale=self.scale, causal=True)
        else:
            out = flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=meta.query_start_loc,
                                         cu_seqlens_k=self._cu_seqlens_k, max_seqlen_q=meta.max_query_len,
                                         max_seqlen_k=meta.max_seq_len, softmax_scale=self.scale, causal=True,
                                         block_table=meta.block_tables)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
