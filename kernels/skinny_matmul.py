"""x @ W^T for a few rows of x: the linear layers of small decode batches.

With one to sixteen rows a linear layer is a pass over its weight, but cuBLAS's kernels for these
shapes read a Qwen3-0.6B layer's weights at about a quarter of the H200's bandwidth (profiled: 29 us
for 31 MB, nvjet tiles with split-K). Here each program owns BLOCK_N output columns and streams their
weight rows along K, several tiles in flight, with the rows of x (padded to 16 for the tensor cores)
read from L2. Past SKINNY_ROWS rows the programs also split the rows, in tiles of BLOCK_M (BATCH_TILE):
the programs of one weight tile are neighbours in the grid, so it comes from DRAM once. A weight of few column
tiles also has its K split among programs (split_count), so that it fills the SMs; the last program of a tile to
finish sums the others' fp32 partials in split order (deterministic whoever finishes last).

`skinny_gate_up_silu` is the same pass over a gate/up projection's weight ([gate; up] stacked) with SwiGLU's
activation applied where the two products meet: each program streams the gate rows of its columns and the up
rows of the same columns, so the activation needs no launch of its own and the projection's output is never
written (one launch a layer less at batch 1).
"""
from __future__ import annotations

import functools

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
    if num_columns <= 1024:  # with K split four ways (split_count): 128 programs at 1,024 columns
        return 32, 256, 4, 4
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


@triton.jit
def _epilogue(acc, up_acc, bias_ptr, out_ptr, rows, columns, row_mask, column_mask, N, stride_out,
              HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
    """Adds the bias, applies the gate (GATED) and stores the output tile."""
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


@triton.jit(do_not_specialize=["num_rows"])
def _skinny_matmul_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, partial_ptr, tickets_ptr, num_rows, N, K, split_depth,
                          stride_x, stride_w, stride_out, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                          SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, CONSTANT_WEIGHT: tl.constexpr,
                          PDL: tl.constexpr):
    """out[:, :N] = x @ w[:N]^T; GATED: silu(x @ w[:N]^T) * (x @ w[N:2N]^T), w holding 2N rows. Grid: (row tiles,
    column tiles, splits of K). With SPLIT_K > 1 each program sums `split_depth` of K (a multiple of BLOCK_K) into
    fp32 partials; the last of a tile's programs to finish (by `tickets`, one counter a tile, left at zero) sums
    them and writes the tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    depth = tl.arange(0, BLOCK_K)
    row_mask = rows < num_rows
    column_mask = columns < N
    k_start = tl.program_id(2) * split_depth
    k_end = tl.minimum(k_start + split_depth, K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
    w_rows = w_ptr + columns[:, None].to(tl.int64) * stride_w
    up_rows = w_rows + N * stride_w
    if not CONSTANT_WEIGHT:
        wait_then_release(PDL)
    # A constant weight's first tile is read before waiting for the kernel before, which cannot have written it:
    # its latency passes while that kernel ends (at batch 1, a good part of this one's time).
    w = _tile(w_rows, k_start, depth, column_mask, K, EVEN_K)
    if GATED:
        up = _tile(up_rows, k_start, depth, column_mask, K, EVEN_K)
    if CONSTANT_WEIGHT:
        wait_then_release(PDL)
    x = _tile(x_rows, k_start, depth, row_mask, K, EVEN_K)
    acc = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    up_acc = acc
    if GATED:
        up_acc = tl.dot(x, tl.trans(up), input_precision=DOT_PRECISION)
    for start in range(k_start + BLOCK_K, k_end, BLOCK_K):
        x = _tile(x_rows, start, depth, row_mask, K, EVEN_K)
        w = _tile(w_rows, start, depth, column_mask, K, EVEN_K)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        if GATED:
            up = _tile(up_rows, start, depth, column_mask, K, EVEN_K)
            up_acc += tl.dot(x, tl.trans(up), input_precision=DOT_PRECISION)
    if SPLIT_K == 1:
        _epilogue(acc, up_acc, bias_ptr, out_ptr, rows, columns, row_mask, column_mask, N, stride_out, HAS_BIAS,
                  GATED)
    else:
        # partials [SPLIT_K, padded rows, N (gate) + N (up)]
        width = 2 * N if GATED else N
        split_stride = tl.num_programs(0) * BLOCK_M * width
        partial = partial_ptr + rows[:, None].to(tl.int64) * width + columns[None, :]
        tl.store(partial + tl.program_id(2) * split_stride, acc, mask=column_mask[None, :])
        if GATED:
            tl.store(partial + tl.program_id(2) * split_stride + N, up_acc, mask=column_mask[None, :])
        tl.debug_barrier()  # every thread's partial stored before the ticket (whose release publishes them)
        ticket = tickets_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            up_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):  # in split order: the sum does not depend on who came last
                acc += tl.load(partial + split * split_stride, mask=column_mask[None, :], other=0.0,
                               cache_modifier=".cg")
                if GATED:
                    up_acc += tl.load(partial + split * split_stride + N, mask=column_mask[None, :], other=0.0,
                                      cache_modifier=".cg")
            tl.atomic_xchg(ticket, 0)  # for the next call
            _epilogue(acc, up_acc, bias_ptr, out_ptr, rows, columns, row_mask, column_mask, N, stride_out, HAS_BIAS,
                      GATED)


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  tile: tuple[int, ...] | None = None, constant_weight: bool = False,
                  split_k: int | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype, as F.linear. `tile` overrides the
    choice (skinny_tile's, or BATCH_TILE past SKINNY_ROWS rows): (BLOCK_N, BLOCK_K, num_warps, num_stages) for
    programs of 16 rows, or (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). `constant_weight`: no kernel
    launched since the weight was loaded writes it (a model's parameters), so the kernel starts reading it before
    the kernel before it has finished (sfllm.kernels.dependent_launch). `split_k` overrides the number of programs
    that share each output tile's depth (split_count's)."""
    return _launch(x, weight, bias, tile, gated=False, constant_weight=constant_weight, split_k=split_k)


def skinny_gate_up_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        tile: tuple[int, ...] | None = None, constant_weight: bool = False,
                        split_k: int | None = None) -> torch.Tensor:
    """silu(gate) * up of the projection x @ weight^T (+ bias) whose first half of columns is gate and second up:
    [M, K] x [2I, K] -> [M, I], as silu_and_mul(F.linear(x, weight, bias)) rounds it. `tile` as skinny_matmul's,
    its BLOCK_N counting the columns of one half (the default: half of the whole projection's tile, so that a
    program streams as many weight rows as it would for the projection alone). `constant_weight` and `split_k` as
    skinny_matmul's."""
    if weight.shape[0] % 2:
        raise ValueError(f"a gate/up projection has an even number of rows; got {weight.shape[0]}")
    if tile is None and x.shape[0] <= SKINNY_ROWS:
        block_n, block_k, num_warps, num_stages = skinny_tile(weight.shape[0], weight.shape[1])
        tile = (max(16, block_n // 2), block_k, num_warps, num_stages)
    return _launch(x, weight, bias, tile, gated=True, constant_weight=constant_weight, split_k=split_k)


# Most programs that share an output tile's depth (split_count)
MAX_SPLITS = 8


def split_count(num_tiles: int, depth: int, block_k: int, device: torch.device) -> int:
    """How many programs share each of `num_tiles` output tiles' depth: enough that the programs about fill the SMs
    once. A narrow weight (Qwen3-0.6B's o_proj and down_proj: 1,024 columns) has a few dozen output tiles, and each
    of their programs would stream a long K alone while most SMs idle: split four ways, a 0.6B layer's down_proj
    took 4.7 us against 6.0 at 1-16 rows and 5.7-5.9 against 8.2-8.3 at 32-64, its o_proj 4.2 against 4.4 and
    5.2-5.4 against 6.1-6.2, and a decode step 0.90 of its time at 1-8 sequences and 0.96 at 16-64 (H200,
    tests/gpu/bench_kernels.py split)."""
    if device.type != "cuda":
        return 1
    return max(1, min(_num_sms(device) // num_tiles, triton.cdiv(depth, block_k), MAX_SPLITS))


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# One counter per output tile of a split GEMM, zero between calls (each call's last program of a tile resets it); per
# device, allocated before any CUDA graph is captured (the graphs' warm-up runs eagerly first). Split GEMMs on one
# device must therefore run one at a time, as they do on the engine's one stream: two on concurrent streams would
# count into the same tiles' counters.
_TICKETS: dict[torch.device, torch.Tensor] = {}
MIN_TICKETS = 4096


def _tickets(device: torch.device, count: int) -> torch.Tensor:
    tickets = _TICKETS.get(device)
    if tickets is None or tickets.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"a split skinny GEMM of {count} output tiles was first run inside a CUDA graph "
                               "capture; run it once eagerly before capturing (its tile counters live outside graphs)")
        tickets = _TICKETS[device] = torch.zeros(max(count, MIN_TICKETS), dtype=torch.int32, device=device)
    return tickets


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: tuple[int, ...] | None,
            gated: bool, constant_weight: bool, split_k: int | None) -> torch.Tensor:
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
    tiles = (triton.cdiv(num_rows, block_m), triton.cdiv(num_columns, block_n))
    if split_k is None:
        split_k = split_count(tiles[0] * tiles[1], depth, block_k, x.device)
    # whole K tiles per split, and no split left empty
    split_depth = triton.cdiv(triton.cdiv(depth, max(split_k, 1)), block_k) * block_k
    split_k = triton.cdiv(depth, split_depth)
    grid = (*tiles, split_k)
    partial = tickets = out  # any tensor when unsplit: never read
    if split_k > 1:
        partial = torch.empty(split_k, grid[0] * block_m, weight.shape[0], dtype=torch.float32, device=x.device)
        tickets = _tickets(x.device, grid[0] * grid[1])
    _skinny_matmul_kernel[grid](
        x, weight, bias if bias is not None else weight, out, partial, tickets, num_rows, num_columns, depth,
        split_depth, x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, GATED=gated,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=depth % block_k == 0, SPLIT_K=split_k,
        DOT_PRECISION=dot_input_precision(x.dtype), CONSTANT_WEIGHT=constant_weight, num_warps=num_warps,
        num_stages=num_stages, **launch_options(x.device))
    return out
