"""Write the keys and values of new tokens into their slots of the paged KV cache."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfllm.kernels.dependent_launch import launch_options, wait_then_release
from sfllm.kernels.device_check import check_head_dim, check_kernel_inputs


@triton.jit
def _store_kv_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_then_release(PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, HEAD_DIM)
    # A slot of -1 marks a padding token of a CUDA-graph batch: it owns no cache row.
    mask = (heads[:, None] < NUM_KV_HEADS) & (slot >= 0)

    source = token.to(tl.int64)
    k = tl.load(k_ptr + source * stride_k_token + heads[:, None] * stride_k_head + dims[None, :], mask=mask)
    v = tl.load(v_ptr + source * stride_v_token + heads[:, None] * stride_v_head + dims[None, :], mask=mask)

    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    row = block * stride_cache_block + offset * stride_cache_offset + heads[:, None] * stride_cache_head + dims[None, :]
    tl.store(k_cache_ptr + row, k, mask=mask)
    tl.store(v_cache_ptr + row, v, mask=mask)


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Copy k[t], v[t] ([T, Hkv, D]) to flat slot slot_mapping[t] of the caches; slot -1 is skipped."""
    check_kernel_inputs(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    block_size = k_cache.shape[1]
    check_head_dim(head_dim)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("store_kv_cache needs the head dimension of k and v to be contiguous")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("store_kv_cache needs k_cache and v_cache of one layout with a contiguous head dimension")
    if num_tokens == 0:
        return
    _store_kv_cache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads),
        **launch_options(k.device),
    )
