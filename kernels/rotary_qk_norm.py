"""RoPE on q and k in place, after the per-head RMS norm of Qwen3 when it has one: one launch
where plain torch needs about thirty small kernels per layer."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.device_check import check_head_dim, check_kernel_inputs

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
    num_tokens,
    stride_token,
    eps,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < num_tokens
    head = tl.program_id(1)  # q heads first, then k heads: the layout of the fused qkv output
    half: tl.constexpr = HEAD_DIM // 2
    offsets = tl.arange(0, half)[None, :]
    mask = token_mask[:, None]
    base = qkv_ptr + tokens.to(tl.int64)[:, None] * stride_token + head * HEAD_DIM
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
    tl.store(base + offsets, (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty), mask=mask)
    tl.store(base + half + offsets, (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty), mask=mask)


def rotary_qk_norm_(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, num_heads: int,
                    num_kv_heads: int, head_dim: int, q_weight: torch.Tensor | None = None,
                    k_weight: torch.Tensor | None = None, eps: float = 1e-6) -> None:
    """In place on the q and k parts of qkv [T, (H + 2 Hkv) * D]: optional per-head RMS norm, then RoPE.

    cos_sin [max_positions, D] float32 holds cos in its first half and sin in its second."""
    check_kernel_inputs(qkv, positions, cos_sin)
    check_head_dim(head_dim)
    if qkv.stride(-1) != 1 or cos_sin.dtype != torch.float32 or cos_sin.shape[-1] != head_dim:
        raise ValueError("rotary_qk_norm_ needs a contiguous qkv row and a float32 cos_sin table of head_dim columns")
    has_norm = q_weight is not None
    if qkv.shape[0] == 0:
        return
    num_tokens = qkv.shape[0]
    _rotary_qk_norm_kernel[(triton.cdiv(num_tokens, BLOCK_T), num_heads + num_kv_heads)](
        qkv, positions, cos_sin, q_weight if has_norm else cos_sin, k_weight if has_norm else cos_sin,
        num_tokens, qkv.stride(0), eps, NUM_HEADS=num_heads, HEAD_DIM=head_dim, HAS_NORM=has_norm,
        BLOCK_T=BLOCK_T, num_warps=2 if head_dim <= 64 else 4,
    )
