"""Plain-torch versions of the kernels: the tests' ground truth and the basis of the CPU attention backend.

All attention math is in fp32 and the results are cast back to the query's dtype. These functions read
`seq_lens` and `query_start_loc` on the host, so unlike the kernels they are not CUDA-graph safe.
"""
from __future__ import annotations

import torch


def reference_store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    written = slot_mapping >= 0
    slots = slot_mapping[written].long()
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k[written].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v[written].to(v_cache.dtype)


def _softmax_allowing_empty_rows(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where fully masked (-inf) rows give zeros instead of NaN."""
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def _cache_slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_table[..., positions // block_size].long() * block_size + positions % block_size


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_len = int(seq_lens.max()) if batch else 0
    positions = torch.arange(max_len, device=q.device)
    visible = positions[None, :] < seq_lens[:, None].long()
    # Table entries past a sequence's end may be anything; read slot 0 there and mask it out.
    slots = torch.where(visible, _cache_slots(block_tables, positions, block_size), 0)
    keys = k_cache.reshape(-1, num_kv_heads, head_dim)[slots].float()
    values = v_cache.reshape(-1, num_kv_heads, head_dim)[slots].float()

    queries = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", queries, keys) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgl,blhd->bhgd", _softmax_allowing_empty_rows(scores), values)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def reference_extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    k_flat = k_cache.reshape(-1, num_kv_heads, head_dim)
    v_flat = v_cache.reshape(-1, num_kv_heads, head_dim)
    starts = query_start_loc.tolist()
    out = torch.empty_like(q)
    for seq, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[seq], starts[seq + 1]
        if end == start:
            continue
        positions = torch.arange(seq_len, device=q.device)
        slots = _cache_slots(block_tables[seq], positions, block_size)
        keys = k_flat[slots].float().repeat_interleave(group, dim=1)
        values = v_flat[slots].float().repeat_interleave(group, dim=1)

        query_positions = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        scores = torch.einsum("nhd,lhd->hnl", q[start:end].float(), keys) * scale
        scores = scores.masked_fill(positions[None, None, :] > query_positions[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hnl,lhd->nhd", torch.softmax(scores, dim=-1), values).to(q.dtype)
    return out


def reference_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place: (rms_norm(x + residual) * weight, x + residual), rounded like the unfused HF modules."""
    new_residual = (x.float() + residual.float()).to(residual.dtype)
    hidden = new_residual.float()
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype), new_residual
