"""Split-KV (flash-decoding) attention of one new query token per sequence over its paged KV cache.

Sequence b's token is row query_start_loc[b] of q and out; sequences with another number of new
tokens are skipped (extend_attention's), so one call serves the decode rows of a mixed batch too.
Stage 1 gives each (sequence, kv head, split) one program that reads its slice of K/V once for all
query heads of the GQA group and writes a partial output and its log-sum-exp to a workspace;
stage 2 merges the splits (with a single split, stage 1 writes the output itself). The grid depends
only on shapes and `num_kv_splits`, never on the values of `seq_lens`, so a captured CUDA graph replays
correctly with new `seq_lens` and `block_tables`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sfllm.kernels.dependent_launch import launch_options, wait_then_release
from sfllm.kernels.device_check import check_head_dim, check_kernel_inputs
from sfllm.kernels.dot_precision import dot_input_precision
from sfllm.kernels.online_softmax import LOG2_E, attend_to_kv_tile
from sfllm.kernels.tile_config import TileConfig, fit_to_shared_memory

# Measured on an H100: below one tile of tokens a split costs more in merging than it gains in
# parallelism, and about four programs per SM saturate memory bandwidth.
MIN_TOKENS_PER_SPLIT = 128
MAX_KV_SPLITS = 64
PROGRAMS_PER_SM = 4
@dataclass
class DecodeWorkspace:
    """Per-split partial results; may be larger than a call needs (allocate once for the largest batch)."""

    partial_out: torch.Tensor  # [batch, num_heads, num_kv_splits, head_dim], fp32, normalised per split
    partial_lse: torch.Tensor  # [batch, num_heads, num_kv_splits], fp32, base-2 log-sum-exp; -inf if empty

    @classmethod
    def allocate(
        cls, batch: int, num_heads: int, num_kv_splits: int, head_dim: int, device: torch.device | str
    ) -> DecodeWorkspace:
        return cls(
            partial_out=torch.empty(batch, num_heads, num_kv_splits, head_dim, dtype=torch.float32, device=device),
            partial_lse=torch.empty(batch, num_heads, num_kv_splits, dtype=torch.float32, device=device),
        )

    def fits(self, batch: int, num_heads: int, num_kv_splits: int, head_dim: int) -> bool:
        b, h, s, d = self.partial_out.shape
        return b >= batch and h == num_heads and s >= num_kv_splits and d == head_dim


def decode_tile_config(group: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                       batch: int = 1) -> TileConfig:
    # The best of sweeps at Qwen3-0.6B and SmolLM2 shapes (tests/gpu/bench_kernels.py): on an H100, tiles of 128
    # tokens at every batch; on an H200, tiles of 64 read 3-4% faster from batch 64 (4.1-4.25 TB/s) and 10%
    # slower at batch 1, and over the standard workload's ragged batches (`ragged_tiles`) 64 x 2 stages beat
    # 64 x 3 by 1-2% from batch 64: a program's smaller footprint fits three to an SM instead of two. A later
    # sweep (every 64th step) found 128 x 2 4-6% faster than 64 x 2 at 69-96 sequences and slower from 113: so
    # 64 x 2 from 112, 128 x 2 from 64.
    # tl.dot needs at least 16 rows, so small GQA groups are padded.
    block_n, num_stages = (64, 2) if batch >= 112 else (128, 2) if batch >= 64 else (128, 3)
    config = TileConfig(block_m=max(16, triton.next_power_of_2(group)), block_n=block_n, num_warps=4,
                        num_stages=num_stages)
    return fit_to_shared_memory(config, head_dim, dtype, device)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_kv_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                         programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """Splits per sequence that fill the GPU without making any split shorter than is worth it
    (`programs_per_sm`: for the kernel bench's sweep of the rule)."""
    wanted = math.ceil(programs_per_sm * num_sms / max(1, batch * num_kv_heads))
    useful = math.ceil(max_seq_len / MIN_TOKENS_PER_SPLIT)
    splits = max(1, min(wanted, useful, MAX_KV_SPLITS))
    # Powers of two measured steadier than the counts between them (3 splits left a mostly idle last wave).
    return 1 << (splits.bit_length() - 1)


# Values that change from step to step must not pick compiled variants (Triton specialises ints that
# are 1 or multiples of 16): a new variant compiles for hundreds of ms in the middle of serving.
@triton.jit(do_not_specialize=["num_kv_splits", "stride_table_batch", "stride_po_batch", "stride_po_head",
                               "stride_pl_batch", "stride_pl_head"])
def _decode_partial_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    batch_order_ptr,
    qk_scale,
    num_kv_splits,
    stride_q_batch,
    stride_q_head,
    stride_out_batch,
    stride_out_head,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    stride_table_batch,
    stride_po_batch,
    stride_po_head,
    stride_po_split,
    stride_pl_batch,
    stride_pl_head,
    GROUP: tl.constexpr,
    BLOCK_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    ORDERED: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_then_release(PDL)
    # The heads of a sequence are neighbours in the grid; with ORDERED, the sequences come longest first
    kv_head = tl.program_id(0)
    batch = tl.program_id(1)
    if ORDERED:
        batch = tl.load(batch_order_ptr + batch)
    split = tl.program_id(2)

    token = tl.load(query_start_loc_ptr + batch)
    one_query = tl.load(query_start_loc_ptr + batch + 1) - token == 1
    seq_len = tl.where(one_query, tl.load(seq_lens_ptr + batch), 0)
    # Whole tiles per split keep only the last tile of a sequence ragged; trailing splits may be empty.
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, num_kv_splits), BLOCK_N) * BLOCK_N
    split_start = split * tokens_per_split
    split_end = tl.minimum(split_start + tokens_per_split, seq_len)

    group = tl.arange(0, BLOCK_GROUP)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + group
    group_mask = group < GROUP
    q = tl.load(
        q_ptr + token.to(tl.int64) * stride_q_batch + heads[:, None] * stride_q_head + dims[None, :],
        mask=group_mask[:, None] & one_query,
        other=0.0,
    )

    row_max = tl.full([BLOCK_GROUP], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_GROUP], dtype=tl.float32)
    acc = tl.zeros([BLOCK_GROUP, HEAD_DIM], dtype=tl.float32)
    table_row = block_tables_ptr + batch.to(tl.int64) * stride_table_batch
    for tile_start in range(split_start, split_end, BLOCK_N):
        # Every tile starts inside the split, so each holds at least one unmasked position.
        row_max, row_sum, acc = attend_to_kv_tile(
            q,
            row_max,
            row_sum,
            acc,
            k_cache_ptr,
            v_cache_ptr,
            table_row,
            kv_head * stride_cache_head,
            tile_start,
            split_end,
            seq_len - 1,
            qk_scale,
            stride_cache_block,
            stride_cache_offset,
            HEAD_DIM,
            BLOCK_SIZE,
            BLOCK_N,
            BOUNDED=True,
            CAUSAL=False,
            DOT_PRECISION=DOT_PRECISION,
        )

    has_tokens = row_sum > 0.0
    out = acc / tl.where(has_tokens, row_sum, 1.0)[:, None]
    if SINGLE_SPLIT:  # the final output: no merge kernel (zeros for an empty padding sequence)
        out_rows = token.to(tl.int64) * stride_out_batch + heads[:, None] * stride_out_head + dims[None, :]
        tl.store(out_ptr + out_rows, out.to(out_ptr.dtype.element_ty), mask=group_mask[:, None] & one_query)
        return
    lse = tl.where(has_tokens, row_max + tl.log2(tl.where(has_tokens, row_sum, 1.0)), float("-inf"))
    out_rows = batch.to(tl.int64) * stride_po_batch + heads[:, None] * stride_po_head + split * stride_po_split
    tl.store(partial_out_ptr + out_rows + dims[None, :], out, mask=group_mask[:, None])
    tl.store(partial_lse_ptr + batch.to(tl.int64) * stride_pl_batch + heads * stride_pl_head + split, lse, mask=group_mask)


@triton.jit(do_not_specialize=["num_kv_splits", "stride_po_batch", "stride_po_head", "stride_pl_batch",
                               "stride_pl_head"])
def _decode_merge_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    query_start_loc_ptr,
    out_ptr,
    num_kv_splits,
    stride_po_batch,
    stride_po_head,
    stride_po_split,
    stride_pl_batch,
    stride_pl_head,
    stride_out_batch,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_then_release(PDL)
    batch = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + batch)
    if tl.load(query_start_loc_ptr + batch + 1) - token != 1:
        return
    splits = tl.arange(0, BLOCK_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    split_mask = splits < num_kv_splits

    lse = tl.load(
        partial_lse_ptr + batch * stride_pl_batch + head * stride_pl_head + splits, mask=split_mask, other=float("-inf")
    )
    max_lse = tl.max(lse, axis=0)
    # A sequence of length 0 (CUDA-graph padding) has every split empty: its output is zeros.
    max_lse = tl.where(max_lse == float("-inf"), 0.0, max_lse)
    weights = tl.exp2(lse - max_lse)
    total = tl.sum(weights, axis=0)

    partial = tl.load(
        partial_out_ptr + batch * stride_po_batch + head * stride_po_head + splits[:, None] * stride_po_split + dims[None, :],
        mask=split_mask[:, None],
        other=0.0,
    )
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + token.to(tl.int64) * stride_out_batch + head * stride_out_head + dims,
             out.to(out_ptr.dtype.element_ty))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
    workspace: DecodeWorkspace | None = None,
    query_start_loc: torch.Tensor | None = None,
    batch_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each sequence's query row over its first seq_lens[b] cached tokens: q [T, H, D] ->
    out [T, H, D]. Without `query_start_loc` ([B + 1] int32) sequence b's row is b (T = B).
    `batch_order` ([B] int32, a permutation of the sequences) is the order the programs take them in:
    longest first, the last wave of programs is not left to one long sequence (ignored for batches whose
    heads do not outnumber the SMs).

    Without `num_kv_splits` the split count comes from shapes alone (the block table's capacity);
    without `workspace` one is allocated per call, which is safe under CUDA-graph capture too.
    """
    batch = seq_lens.shape[0]
    if query_start_loc is None:
        query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    check_kernel_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_head_dim(head_dim)
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if out is None:
        out = torch.empty_like(q)
    if q.stride(-1) != 1 or out.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("decode_attention needs a contiguous head dimension and k_cache, v_cache of one layout")
    if num_kv_splits is None:
        max_seq_len = block_tables.shape[1] * block_size
        num_kv_splits = choose_num_kv_splits(batch, num_kv_heads, max_seq_len, _num_sms(q.device))
    if workspace is None:
        workspace = DecodeWorkspace.allocate(batch, num_heads, num_kv_splits, head_dim, q.device)
    elif not workspace.fits(batch, num_heads, num_kv_splits, head_dim):
        raise ValueError(
            f"workspace {tuple(workspace.partial_out.shape)} is too small for batch {batch}, "
            f"{num_heads} heads, {num_kv_splits} splits, head_dim {head_dim}"
        )
    if batch == 0:
        return out

    group = num_heads // num_kv_heads
    config = decode_tile_config(group, head_dim, q.dtype, q.device, batch)
    partial_out, partial_lse = workspace.partial_out, workspace.partial_lse
    if batch_order is not None and (batch_order.shape != (batch,) or batch_order.dtype != torch.int32
                                    or batch_order.stride(0) != 1 or batch_order.device != q.device):
        raise ValueError(f"batch_order must be a contiguous int32 [{batch}] tensor on {q.device}, got "
                         f"{batch_order.dtype} {tuple(batch_order.shape)} on {batch_order.device}")
    if batch_order is not None and batch * num_kv_heads <= _num_sms(q.device):
        # a program per SM at most for the sequences' heads: they start together, and the order's load would
        # only add latency to every program (at batch 1, to every layer of a step that launches are bound by)
        batch_order = None
    _decode_partial_kernel[(num_kv_heads, batch, num_kv_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        partial_out,
        partial_lse,
        out,
        seq_lens if batch_order is None else batch_order,  # any pointer when unordered: never read
        scale * LOG2_E,
        num_kv_splits,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        GROUP=group,
        BLOCK_GROUP=config.block_m,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        DOT_PRECISION=dot_input_precision(q.dtype),
        SINGLE_SPLIT=num_kv_splits == 1,
        ORDERED=batch_order is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **launch_options(q.device),
    )
    if num_kv_splits == 1:
        return out
    _decode_merge_kernel[(batch, num_heads)](
        partial_out,
        partial_lse,
        query_start_loc,
        out,
        num_kv_splits,
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_SPLITS=triton.next_power_of_2(num_kv_splits),
        num_warps=4,
        **launch_options(q.device),
    )
    return out
