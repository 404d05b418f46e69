"""RoPE on q and k in place, after the per-head RMS norm of Qwen3 when it has one: one launch
where plain torch needs about thirty small kernels per layer. Given the layer's paged KV cache, the
same launch writes the new keys and values into their slots (the attention reads them from there),
which saves the separate store kernel: at batch 1 a decode step is made of such small launches."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfllm.kernels.dependent_launch import launch_options, wait_then_release
from sfllm.kernels.device_check import check_head_dim, check_kernel_inputs

# A tile of BLOCK_T tokens per program: one program per (token, head) left a prefill of 8k tokens
# running ~200k programs of 128 elements, 3.6x slower than its bytes allow (H100 profile).
BLOCK_T = 16


@triton.jit(do_not_specialize=["num_tokens"])
def _rotary_qk_norm_kernel(
    qkv_ptr,
    positions_ptr,
    cos_sin_ptr,
    q_weight_ptr,
    k_weight_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    num_tokens,
    stride_token,
    stride_cache_slot,
    stride_cache_head,
    eps,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_NORM: tl.constexpr,
    STORE_KV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_then_release(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < num_tokens
    head = tl.program_id(1)  # q heads, then k heads, then (when storing) v heads: the fused qkv layout
    half: tl.constexpr = HEAD_DIM // 2
    offsets = tl.arange(0, half)[None, :]
    mask = token_mask[:, None]
    base = qkv_ptr + tokens.to(tl.int64)[:, None] * stride_token + head * HEAD_DIM
    if STORE_KV:
        # a negative slot marks a padding token of a CUDA-graph batch: it owns no cache row
        slots = tl.load(slot_mapping_ptr + tokens, mask=token_mask, other=-1).to(tl.int64)
        cache_mask = mask & (slots >= 0)[:, None]
        kv_head = head - NUM_HEADS - tl.where(head >= NUM_HEADS + NUM_KV_HEADS, NUM_KV_HEADS, 0)
        cache_row = slots[:, None] * stride_cache_slot + kv_head * stride_cache_head + offsets
        if head >= NUM_HEADS + NUM_KV_HEADS:  # a v head: copied to the cache as it is
            v1 = tl.load(base + offsets, mask=mask, other=0.0)
            v2 = tl.load(base + half + offsets, mask=mask, other=0.0)
            tl.store(v_cache_ptr + cache_row, v1, mask=cache_mask)
            tl.store(v_cache_ptr + cache_row + half, v2, mask=cache_mask)
            return
    x1 = tl.load(base + offsets, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + half + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
        weight_ptr = q_weight_ptr
        if head >= NUM_HEADS:
            weight_ptr = k_weight_ptr
        w1 = tl.load(weight_ptr + offsets).to(tl.float32)
        w2 = tl.load(weight_ptr + half + offsets).to(tl.float32)
        # rounded to the activation dtype before the weight, as the unfused module does
        x1 = (x1 * inv_rms).to(qkv_ptr.dtype.element_ty).to(tl.float32) * w1
        x2 = (x2 * inv_rms).to(qkv_ptr.dtype.element_ty).to(tl.float32) * w2
        x1 = x1.to(qkv_ptr.dtype.element_ty).to(tl.float32)
        x2 = x2.to(qkv_ptr.dtype.element_ty).to(tl.float32)
    position = tl.load(positions_ptr + tokens, mask=token_mask, other=0).to(tl.int64)[:, None]
    cos = tl.load(cos_sin_ptr + position * HEAD_DIM + offsets, mask=mask, other=0.0)
    sin = tl.load(cos_sin_ptr + position * HEAD_DIM + half + offsets, mask=mask, other=0.0)
    rotated1 = (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty)
    rotated2 = (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty)
    if STORE_KV:  # a k head's go to the cache only (the attention reads them there), a q head's in place
        is_k = head >= NUM_HEADS
        tl.store(k_cache_ptr + cache_row, rotated1, mask=cache_mask & is_k)
        tl.store(k_cache_ptr + cache_row + half, rotated2, mask=cache_mask & is_k)
        tl.store(base + offsets, rotated1, mask=mask & (head < NUM_HEADS))
        tl.store(base + half + offsets, rotated2, mask=mask & (head < NUM_HEADS))
    else:
        tl.store(base + offsets, rotated1, mask=mask)
        tl.store(base + half + offsets, rotated2, mask=mask)


def rotary_qk_norm_(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, num_heads: int,
                    num_kv_heads: int, head_dim: int, q_weight: torch.Tensor | None = None,
                    k_weight: torch.Tensor | None = None, eps: float = 1e-6,
                    kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                    slot_mapping: torch.Tensor | None = None) -> None:
    """In place on the q and k parts of qkv [T, (H + 2 Hkv) * D]: optional per-head RMS norm, then RoPE.
    cos_sin [max_positions, D] float32 holds cos in its first half and sin in its second.

    With `kv_cache` (k_cache, v_cache), each [num_blocks, block_size, Hkv, D], the rotated keys and the
    values go to flat slots `slot_mapping` [T] of the caches instead (negative slots are skipped), and
    the k part of qkv is left as it was."""
    check_kernel_inputs(qkv, positions, cos_sin)
    check_head_dim(head_dim)
    if qkv.stride(-1) != 1 or cos_sin.dtype != torch.float32 or cos_sin.shape[-1] != head_dim:
        raise ValueError("rotary_qk_norm_ needs a contiguous qkv row and a float32 cos_sin table of head_dim columns")
    has_norm = q_weight is not None
    if qkv.shape[0] == 0:
        return
    num_tokens = qkv.shape[0]
    num_programs = num_heads + num_kv_heads
    k_cache = v_cache = slot_stride = head_stride = None
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        check_kernel_inputs(qkv, k_cache, v_cache, slot_mapping)
        if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or k_cache.stride(0) != \
                k_cache.shape[1] * k_cache.stride(1):
            raise ValueError("rotary_qk_norm_ needs k_cache and v_cache of one contiguous-block layout")
        num_programs += num_kv_heads
        slot_stride, head_stride = k_cache.stride(1), k_cache.stride(2)
    _rotary_qk_norm_kernel[(triton.cdiv(num_tokens, BLOCK_T), num_programs)](
        qkv, positions, cos_sin, q_weight if has_norm else cos_sin, k_weight if has_norm else cos_sin,
        k_cache if kv_cache is not None else qkv, v_cache if kv_cache is not None else qkv,
        slot_mapping if kv_cache is not None else positions, num_tokens, qkv.stride(0),
        slot_stride or 0, head_stride or 0, eps, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim, HAS_NORM=has_norm, STORE_KV=kv_cache is not None, BLOCK_T=BLOCK_T,
        num_warps=2 if head_dim <= 64 else 4, **launch_options(qkv.device),
    )
