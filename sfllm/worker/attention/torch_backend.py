"""Attention in plain torch over the paged cache: runs anywhere, the reference of the others."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sfllm.worker.attention.backend import AttentionBackend, register_backend
from sfllm.worker.attention.metadata import AttentionMetadata


@register_backend("torch")
class TorchAttentionBackend(AttentionBackend):

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        k_cache = self.kv_cache.keys(layer)
        v_cache = self.kv_cache.values(layer)
        block_size = k_cache.shape[1]
        k_flat = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        valid = meta.slot_mapping >= 0
        k_flat.index_copy_(0, meta.slot_mapping[valid], k[valid])
        v_flat.index_copy_(0, meta.slot_mapping[valid], v[valid])
        if meta.is_decode:
            out = self._decode(q, k_flat, v_flat, meta, block_size)
        else:
            out = self._extend(q, k, v, k_flat, v_flat, meta, block_size)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _gather_slots(self, meta: AttentionMetadata, block_size: int, length: int) -> torch.Tensor:
        """[B, length] flat slots of the first `length` positions of every sequence."""
        positions = torch.arange(length, device=meta.block_tables.device)
        blocks = meta.block_tables[:, positions // block_size].long()
        return blocks * block_size + positions % block_size

    def _decode(self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                meta: AttentionMetadata, block_size: int) -> torch.Tensor:
        batch = q.shape[0]
        length = meta.max_seq_len
        slots = self._gather_slots(meta, block_size, length)
        keys = k_flat[slots]            # [B, L, Hkv, D]
        values = v_flat[slots]
        group = self.num_heads // self.num_kv_heads
        qg = q.view(batch, self.num_kv_heads, group, self.head_dim).float()
        scores = torch.einsum("bhgd,blhd->bhgl", qg, keys.float()) * self.scale
        mask = torch.arange(length, device=q.device)[None, :] < meta.seq_lens[:, None]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out = torch.einsum("bhgl,blhd->bhgd", probs, values.float())
        return out.to(q.dtype).reshape(batch, self.num_heads, self.head_dim)

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_flat: torch.Tensor,
                v_flat: torch.Tensor, meta: AttentionMetadata, block_size: int) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for b, (q_len, seq_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
            end = start + q_len
            if q_len == seq_len:
                # nothing cached before these tokens: attend to the new K/V directly
                keys, values = k[start:end], v[start:end]
            else:
                positions = torch.arange(seq_len, device=q.device)
                slots = meta.block_tables[b, positions // block_size].long() * block_size + positions % block_size
                keys, values = k_flat[slots], v_flat[slots]
            out[start:end] = self._causal(q[start:end], keys, values)
            start = end
        return out

    def _causal(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """q: [Q, H, D] are the last Q of the K positions in keys/values [K, Hkv, D]."""
        q_len, kv_len = q.shape[0], keys.shape[0]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=mask, scale=self.scale, enable_gqa=True)
        return out.transpose(0, 1)
