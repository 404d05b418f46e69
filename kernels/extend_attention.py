"""Causal attention of a ragged batch of new tokens (prefill, chunked prefill, prefix-cache hits)
over the paged KV cache, flash-attention style: tiles of queries against tiles of cached keys, with an
online softmax in fp32.

Sequence b's q_len new tokens are the last q_len of its seq_lens[b] tokens, all already in the cache.
The work comes as a list of query tiles, (sequence, first row) each, built on the host: the grid is
the list's length, so a CUDA graph captured for a list capacity replays any batch that fits it
(unused entries have sequence -1 and return at once).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import triton
import triton.language as tl

from sfllm.kernels.dependent_launch import launch_options, wait_then_release
from sfllm.kernels.device_check import check_head_dim, check_kernel_inputs
from sfllm.kernels.dot_precision import dot_input_precision
from sfllm.kernels.online_softmax import LOG2_E, attend_to_kv_tile
from sfllm.kernels.tile_config import TileConfig, fit_to_shared_memory

def extend_tile_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    # head_dim 128: the best over the standard workload's prefill steps (prompts of 100-1,024 tokens, 20% over
    # 128 x 128) and single prompts of 2k and 8k tokens on an H200 (`bench_kernels.py extend`); below it, the
    # best of a sweep on an H100 over prefills of 1k to 8k tokens.
    if head_dim >= 128:
        config = TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    else:
        config = TileConfig(block_m=64, block_n=128, num_warps=4, num_stages=2)
    return fit_to_shared_memory(config, head_dim, dtype, device)


def extend_tiles(query_lens: np.ndarray, rows_per_tile: int, first_seq: int = 0,
                 prefix_lens: np.ndarray | None = None) -> np.ndarray:
    """[num_tiles, 2] int32 (sequence, first query row) covering the sequences with more than one new
    token; sequences of one new token are decode_attention's (see its `query_start_loc`). With the
    sequences' `prefix_lens` (tokens cached before the new ones) the tiles that attend to the most keys
    come first, so that the grid's last programs are short ones (2-5% faster over the standard workload's
    prefill steps on an H200 at the engine's tile, `bench_kernels.py extend`)."""
    query_lens = np.asarray(query_lens, dtype=np.int64)
    seqs = np.flatnonzero(query_lens > 1)
    counts = -(-query_lens[seqs] // rows_per_tile)
    tiles = np.empty((int(counts.sum()), 2), dtype=np.int32)
    tiles[:, 0] = np.repeat(seqs + first_seq, counts)
    starts = np.cumsum(counts) - counts
    tiles[:, 1] = (np.arange(len(tiles)) - np.repeat(starts, counts)) * rows_per_tile
    if prefix_lens is not None and len(tiles):
        keys = np.asarray(prefix_lens, dtype=np.int64)[tiles[:, 0] - first_seq] + tiles[:, 1]
        tiles = tiles[np.argsort(-keys, kind="stable")]
    return tiles


# The block-table width changes from step to step: no compiled variant per value (see decode_attention).
@triton.jit(do_not_specialize=["stride_table_batch"])
def _extend_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    tiles_ptr,
    qk_scale,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    stride_table_batch,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_then_release(PDL)
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    if seq < 0:
        return
    first_row = tl.load(tiles_ptr + 2 * tile + 1)
    kv_head = head // GROUP

    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - query_len

    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < query_len
    dims = tl.arange(0, HEAD_DIM)
    tokens = (query_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + tokens[:, None] * stride_q_token + head * stride_q_head + dims[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )
    query_positions = prefix_len + rows

    # Keys before the tile's first query position are visible to all its rows and need no mask;
    # causality ends the keys at the tile's last row.
    kv_end = tl.minimum(seq_len, prefix_len + first_row + BLOCK_M)
    unmasked_end = (prefix_len + first_row) // BLOCK_N * BLOCK_N

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_batch
    head_offset = kv_head * stride_cache_head
    for tile_start in range(0, unmasked_end, BLOCK_N):
        row_max, row_sum, acc = attend_to_kv_tile(
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
            HEAD_DIM,
            BLOCK_SIZE,
            BLOCK_N,
            BOUNDED=False,
            CAUSAL=False,
            DOT_PRECISION=DOT_PRECISION,
        )
    # Position 0 is visible to every row, so the first tile of either loop leaves row_max finite.
    for tile_start in range(unmasked_end, kv_end, BLOCK_N):
        row_max, row_sum, acc = attend_to_kv_tile(
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
            HEAD_DIM,
            BLOCK_SIZE,
            BLOCK_N,
            BOUNDED=True,
            CAUSAL=True,
            DOT_PRECISION=DOT_PRECISION,
        )

    out = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]
    tl.store(
        out_ptr + tokens[:, None] * stride_out_token + head * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None],
    )


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tiles: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens q [T, H, D] of each sequence over its cache, for the query rows
    that `tiles` ([N, 2] int32 from `extend_tiles`) cover; returns [T, H, D], other rows of `out` untouched.
    `block_m` is the rows per tile the list was built with (default: `extend_tile_config(...).block_m`)."""
    check_kernel_inputs(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, tiles)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_head_dim(head_dim)
    batch = seq_lens.shape[0]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if out is None:
        out = torch.empty_like(q)
    if q.stride(-1) != 1 or out.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("extend_attention needs a contiguous head dimension and k_cache, v_cache of one layout")
    if num_tokens == 0 or batch == 0 or tiles.shape[0] == 0:
        return out
    if tiles.dtype != torch.int32 or not tiles.is_contiguous():
        raise ValueError("extend_attention needs tiles as a contiguous int32 [N, 2] tensor")

    config = extend_tile_config(head_dim, q.dtype, q.device)
    if block_m is not None:
        config = dataclasses.replace(config, block_m=block_m)
    grid = (tiles.shape[0], num_heads)
    _extend_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        seq_lens,
        tiles,
        scale * LOG2_E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        DOT_PRECISION=dot_input_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **launch_options(q.device),
    )
    return out
