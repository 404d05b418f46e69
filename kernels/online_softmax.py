"""One step of flash attention: fold a tile of paged keys/values into a running softmax."""
from __future__ import annotations

import math

import triton
import triton.language as tl

# Scores are scaled by log2(e) so that the softmax can use exp2, the GPU's native exponential.
LOG2_E = math.log2(math.e)


@triton.jit
def attend_to_kv_tile(
    q,
    row_max,
    row_sum,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    table_row,
    head_offset,
    tile_start,
    kv_end,
    query_positions,
    qk_scale,
    stride_cache_block,
    stride_cache_offset,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BOUNDED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Attend q [M, D] to cached positions tile_start..tile_start+BLOCK_N of one sequence.

    BOUNDED masks positions >= kv_end; CAUSAL masks positions after each row's query position.
    row_max and row_sum are in base 2 (qk_scale includes log2(e)). Callers must ensure every row has
    seen at least one unmasked position by the end of its first tile, so row_max never stays -inf.
    """
    positions = tile_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    valid = positions < kv_end
    if BOUNDED:
        blocks = tl.load(table_row + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        blocks = tl.load(table_row + positions // BLOCK_SIZE).to(tl.int64)
    rows = blocks * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_offset + head_offset
    offsets = rows[:, None] + dims[None, :]
    if BOUNDED:
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + offsets)
        v = tl.load(v_cache_ptr + offsets)

    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if BOUNDED:
        scores = tl.where(valid[None, :], scores, float("-inf"))
    if CAUSAL:
        scores = tl.where(positions[None, :] <= query_positions[:, None], scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    probs = tl.exp2(scores - new_max[:, None])
    rescale = tl.exp2(row_max - new_max)
    row_sum = row_sum * rescale + tl.sum(probs, axis=1)
    acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
    return new_max, row_sum, acc
