"""x @ W^T for a few rows of x: the linear layers of small decode batches.

With one to sixteen rows a linear layer is a pass over its weight, but cuBLAS's kernels for these
shapes read a Qwen3-0.6B layer's weights at about a quarter of the H200's bandwidth (profiled: 29 us
for 31 MB, nvjet tiles with split-K). Here each program owns BLOCK_N output columns and streams their
weight rows along K, several tiles in flight, with the rows of x (padded to 16 for the tensor cores)
read from L2. Past SKINNY_ROWS rows the programs also split the rows, in tiles of BLOCK_M (BATCH_TILE):
the programs of one weight tile are neighbours in the grid, so it comes from DRAM once.

`skinny_gate_up_silu` is the same pass over a gate/up projection's weight ([gate; up] stacked) with SwiGLU's
activation applied where the two products meet: each program streams the gate rows of its columns and the up
rows of the same columns, so the activation needs no launch of its own and the projection's output is never
written (one launch a layer less at batch 1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfllm.kernels.dependent_launch import launch_options, wait_then_release
from sfllm.kernels.device_check import check_kernel_inputs
from sfllm.kernels.dot_precision import dot_input_precision

# Up to this many rows a program holds all of them (skinny_tile's tiles).
SKINNY_ROWS = 16


def skinny_tile(num_columns: int, depth: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for a weight of num_columns x depth: the best of a sweep on
    an H200 at one row (tests/gpu/bench_kernels.py sweep). Few columns want long K tiles, so that each of
    their few programs keeps enough bytes in flight."""
    if num_columns <= 2048:
        return 16, 512, 4, 3
    if depth <= 1024:
        return (32 if num_columns <= 4096 else 64), 128, 4, 4
    if num_columns >= 16384:
        return 64, 128, 4, 3
    return (32, 512, 4, 4) if num_columns <= 4096 else (64, 256, 4, 4)


# Past SKINNY_ROWS: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), BLOCK_N counting one half's columns in the
# gated kernel. The best of 36 tiles for each GEMM of a Qwen3-0.6B layer at 64 rows and for three of the four at 32
# (o_proj's best there: 3 stages), launched early (tests/gpu/bench_kernels.py batch_gemm, H200, 2026-12-03).
BATCH_TILE = (64, 32, 128, 4, 4)


@triton.jit
def _tile(rows_ptr, start, depth, row_mask, K, EVEN_K: tl.constexpr):
    """The [rows, BLOCK_K] tile at depth `start` of the rows at rows_ptr (zeros past K and masked rows)."""
    ks = start + depth
    if EVEN_K:
        return tl.load(rows_ptr + ks[None, :], mask=row_mask[:, None], other=0.0)
    return tl.load(rows_ptr + ks[None, :], mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)


@triton.jit(do_not_specialize=["num_rows"])
def _skinny_matmul_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, num_rows, N, K, stride_x, stride_w, stride_out,
                          HAS_BIAS: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, CONSTANT_WEIGHT: tl.constexpr, PDL: tl.constexpr):
    """out[:, :N] = x @ w[:N]^T; GATED: silu(x @ w[:N]^T) * (x @ w[N:2N]^T), w holding 2N rows. Grid: (row tiles,
    column tiles)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    depth = tl.arange(0, BLOCK_K)
    row_mask = rows < num_rows
    column_mask = columns < N
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
    w_rows = w_ptr + columns[:, None].to(tl.int64) * stride_w
    up_rows = w_rows + N * stride_w
    if not CONSTANT_WEIGHT:
        wait_then_release(PDL)
    # A constant weight's first tile is read before waiting for the kernel before, which cannot have written it:
    # its latency passes while that kernel ends (at batch 1, a good part of this one's time).
    w = _tile(w_rows, 0, depth, column_mask, K, EVEN_K)
    if GATED:
        up = _tile(up_rows, 0, depth, column_mask, K, EVEN_K)
    if CONSTANT_WEIGHT:
        wait_then_release(PDL)
    x = _tile(x_rows, 0, depth, row_mask, K, EVEN_K)
    acc = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    if GATED:
        up_acc = tl.dot(x, tl.trans(up), input_precision=DOT_PRECISION)
    for start in range(BLOCK_K, K, BLOCK_K):
        x = _tile(x_rows, start, depth, row_mask, K, EVEN_K)
        w = _tile(w_rows, start, depth, column_mask, K, EVEN_K)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        if GATED:
            up = _tile(up_rows, start, depth, column_mask, K, EVEN_K)
            up_acc += tl.dot(x, tl.trans(up), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + columns, mask=column_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up_acc += tl.load(bias_ptr + N + columns, mask=column_mask, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    if GATED:
        # rounded where the unfused code rounds: the projection's output, then silu before the product
        gate = acc.to(dtype).to(tl.float32)
        result = (gate / (1.0 + tl.exp(-gate))).to(dtype) * up_acc.to(dtype)
    else:
        result = acc.to(dtype)
    out = out_ptr + rows[:, None].to(tl.int64) * stride_out + columns[None, :]
    tl.store(out, result, mask=row_mask[:, None] & column_mask[None, :])


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  tile: tuple[int, ...] | None = None, constant_weight: bool = False) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype, as F.linear. `tile` overrides the
    choice (skinny_tile's, or BATCH_TILE past SKINNY_ROWS rows): (BLOCK_N, BLOCK_K, num_warps, num_stages) for
    programs of 16 rows, or (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). `constant_weight`: no kernel
    launched since the weight was loaded writes it (a model's parameters), so the kernel starts reading it before
    the kernel before it has finished (sfllm.kernels.dependent_launch)."""
    return _launch(x, weight, bias, tile, gated=False, constant_weight=constant_weight)


def skinny_gate_up_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        tile: tuple[int, ...] | None = None, constant_weight: bool = False
                        ) -> torch.Tensor:
    """silu(gate) * up of the projection x @ weight^T (+ bias) whose first half of columns is gate and second up:
    [M, K] x [2I, K] -> [M, I], as silu_and_mul(F.linear(x, weight, bias)) rounds it. `tile` as skinny_matmul's,
    its BLOCK_N counting the columns of one half (the default: half of the whole projection's tile, so that a
    program streams as many weight rows as it would for the projection alone). `constant_weight` as skinny_matmul's."""
    if weight.shape[0] % 2:
        raise ValueError(f"a gate/up projection has an even number of rows; got {weight.shape[0]}")
    if tile is None and x.shape[0] <= SKINNY_ROWS:
        block_n, block_k, num_warps, num_stages = skinny_tile(weight.shape[0], weight.shape[1])
        tile = (max(16, block_n // 2), block_k, num_warps, num_stages)
    return _launch(x, weight, bias, tile, gated=True, constant_weight=constant_weight)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            tile: tuple[int, ...] | None, gated: bool, constant_weight: bool) -> torch.Tensor:
    check_kernel_inputs(x, weight, *([] if bias is None else [bias]))
    num_rows, depth = x.shape
    if weight.shape[1] != depth:
        raise ValueError(f"skinny_matmul takes a weight of x's width; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("skinny_matmul needs rows of x and of the weight contiguous")
    num_columns = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty(num_rows, num_columns, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    if depth == 0:  # no products, the bias alone, as F.linear (the kernel reads a first tile whatever K is)
        projected = torch.nn.functional.linear(x, weight, bias)
        if not gated:
            return projected
        gate, up = projected.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    if tile is None:
        tile = skinny_tile(num_columns, depth) if num_rows <= SKINNY_ROWS else BATCH_TILE
    block_m, (block_n, block_k, num_warps, num_stages) = (16, tile) if len(tile) == 4 else (tile[0], tile[1:])
    _skinny_matmul_kernel[(triton.cdiv(num_rows, block_m), triton.cdiv(num_columns, block_n))](
        x, weight, bias if bias is not None else weight, out, num_rows, num_columns, depth, x.stride(0),
        weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, GATED=gated, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=depth % block_k == 0, DOT_PRECISION=dot_input_precision(x.dtype),
        CONSTANT_WEIGHT=constant_weight, num_warps=num_warps, num_stages=num_stages, **launch_options(x.device))
    return out
