"""Attention in plain torch over the paged cache: runs anywhere, the reference of the others.

What depends only on the step (which rows to write, which cache slots each sequence reads,
the padding mask) is built once in `prepare`, not in each of the layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sfllm.worker.attention.backend import AttentionBackend, register_backend
from sfllm.worker.attention.metadata import AttentionMetadata


@dataclass
class _StepIndex:
    write_rows: torch.Tensor | None  # rows of k/v that have a slot; None when all have
    write_slots: torch.Tensor        # their flat KV slots
    read_slots: torch.Tensor | None  # decode: [B * L] flat slots of every sequence's first L positions
    read_mask: torch.Tensor | None   # decode: [B, 1, 1, L] true where the position exists


@register_backend("torch")
class TorchAttentionBackend(AttentionBackend):

    _meta: AttentionMetadata | None = None
    _index: _StepIndex | None = None

    def prepare(self, meta: AttentionMetadata) -> None:
        valid = meta.slot_mapping >= 0
        padded = not bool(valid.all())
        write_rows = valid.nonzero().squeeze(1) if padded else None
        write_slots = meta.slot_mapping[write_rows] if padded else meta.slot_mapping
        read_slots = read_mask = None
        if meta.decode_only:
            block_size = self.kv_cache.block_size
            positions = torch.arange(meta.max_seq_len_host, device=meta.block_tables.device)
            blocks = meta.block_tables[:, positions // block_size].long()
            read_slots = (blocks * block_size + positions % block_size).flatten()
            read_mask = (positions[None, :] < meta.seq_lens[:, None])[:, None, None, :]
        self._meta, self._index = meta, _StepIndex(write_rows, write_slots, read_slots, read_mask)

    def _step_index(self, meta: AttentionMetadata) -> _StepIndex:
        if self._meta is not meta:  # a caller that skipped prepare
            self.prepare(meta)
        assert self._index is not None
        return self._index

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        index = self._step_index(meta)
        k_flat = self.kv_cache.keys(layer).view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.kv_cache.values(layer).view(-1, self.num_kv_heads, self.head_dim)
        if index.write_rows is None:
            k_flat.index_copy_(0, index.write_slots, k)
            v_flat.index_copy_(0, index.write_slots, v)
        else:
            k_flat.index_copy_(0, index.write_slots, k[index.write_rows])
            v_flat.index_copy_(0, index.write_slots, v[index.write_rows])
        if meta.decode_only:
            out = self._decode(q, k_flat, v_flat, index)
        else:
            out = self._extend(q, k, v, k_flat, v_flat, meta)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _decode(self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, index: _StepIndex) -> torch.Tensor:
        batch = q.shape[0]
        kv_shape = (batch, -1, self.num_kv_heads, self.head_dim)
        # index_select over whole rows: several times faster on CPU than advanced indexing
        keys = k_flat.flatten(1).index_select(0, index.read_slots).view(kv_shape).transpose(1, 2)  # [B, Hkv, L, D]
        values = v_flat.flatten(1).index_select(0, index.read_slots).view(kv_shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.view(batch, self.num_heads, 1, self.head_dim), keys, values,
                                             attn_mask=index.read_mask, scale=self.scale, enable_gqa=True)
        return out.view(batch, self.num_heads, self.head_dim)

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_flat: torch.Tensor,
                v_flat: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        block_size = self.kv_cache.block_size
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
        # is_causal aligns the mask to the top left, right only without a cached prefix
        mask = None if q_len == kv_len else \
            torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True)
        return out.transpose(0, 1)
