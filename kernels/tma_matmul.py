"""x @ W^T for the decode batches past the skinny kernel's rows (65-256), and the gate/up projection with its activation
there and in prefills of 2,048 rows and more: tiles loaded by the Hopper's tensor memory accelerator (TMA), the
products on its warpgroup tensor cores.

At these rows a Qwen3-0.6B layer's GEMMs are short (5-10 us for 4-13 MB of weights) and cuBLAS launches each after
the kernel before it has drained. This kernel is launched early (sfllm.kernels.dependent_launch) and its tiles come
through tensor descriptors, so no thread computes addresses and the loads of a few K tiles stay in flight. Alone it
beat cuBLAS on the 0.6B's o_proj (4.8-5.0 against 5.3-6.0 us from 96 to 256 rows) and on the gate/up projection with
its activation (7.3-9.8 against 8.6-10.6 us), and tied on qkv; a decode step with the three in it took 0.960-0.976
of its time at 80-256 sequences (H200, docs/performance.md, nineteenth session). down_proj stays with cuBLAS: it lost
there alone (7.8-8.1 against 7.4-7.7 us at 192-256 rows unsplit), and in the decode step too (H100, twenty-third
session).

Each program owns one BLOCK_M x BLOCK_N output tile and the whole depth; the weight's first tile is read after the
wait for the kernel before (read before it, as the skinny kernel does, the peeled load cost the pipeline more than it
hid: 0.3-0.6 us slower at every shape measured).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sfllm.kernels.dependent_launch import compiled_for_hopper, launch_options, wait_then_release
from sfllm.kernels.device_check import check_kernel_inputs
from sfllm.kernels.dot_precision import dot_input_precision
from sfllm.kernels.skinny_matmul import _epilogue


def tma_tile(rows: int, num_columns: int, gated: bool, element_size: int = 2) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), BLOCK_N counting one half's columns when gated: the best of a
    sweep of 24-33 tiles (each also with K split in two, which won only on down_proj) at 96, 128, 192 and 256 rows on
    a Qwen3-0.6B layer's GEMMs in bf16 (H200; the script is ported as tests/gpu/bench_kernels.py tma, without the
    split). Past 128 rows a wide weight wants longer column tiles (fewer programs reading
    each row tile of x), a gated one shorter (two accumulators a program). A prefill's gated GEMM (past 256 rows) is
    compute-bound: square tiles of two warpgroups, the best of six (or within the bench's spread of it) on Qwen3-0.6B's
    from 2,048 to 8,192 rows on an H100 and an H200, and on SmolLM2's from 4,096; at 2,048 rows SmolLM2's is 10-12%
    slower than at 64 x 128 tiles
    (`bench_kernels.py prefill_gate_up`). float32 tiles are shallower (64 deep, a prefill's gated 32), to fit the
    stages in shared memory."""
    prefill_gated = gated and rows > 256
    if prefill_gated:
        tile = (128, 128, 64, 8, 3)
    elif rows <= 128 or num_columns <= 1024:
        tile = (64, 64, 128, 4, 4)
    elif gated:
        tile = (64, 32, 64, 4, 4)
    else:
        tile = (64, 128, 128, 4, 4)
    if element_size > 2:
        tile = (tile[0], tile[1], min(tile[2], 32 if prefill_gated else 64), *tile[3:])
    return tile


@triton.jit(do_not_specialize=["num_rows"])
def _tma_matmul_kernel(x_desc, w_desc, bias_ptr, out_ptr, num_rows, N, K, stride_out, HAS_BIAS: tl.constexpr,
                       GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """out[:, :N] = x @ w[:N]^T; GATED: silu(x @ w[:N]^T) * (x @ w[N:2N]^T), w holding 2N rows. Grid: (row tiles,
    column tiles)."""
    off_m = tl.program_id(0) * BLOCK_M
    off_n = tl.program_id(1) * BLOCK_N
    rows = off_m + tl.arange(0, BLOCK_M)
    columns = off_n + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    wait_then_release(PDL)
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = x_desc.load([off_m, k])  # zeros past the rows and past K
        acc = tl.dot(x, w_desc.load([off_n, k]).T, acc, input_precision=DOT_PRECISION)
        if GATED:
            up_acc = tl.dot(x, w_desc.load([N + off_n, k]).T, up_acc, input_precision=DOT_PRECISION)
    _epilogue(acc, up_acc, bias_ptr, out_ptr, rows, columns, rows < num_rows, columns < N, N, stride_out, HAS_BIAS,
              GATED)


def tma_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               tile: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype, as F.linear. `tile` overrides tma_tile's."""
    return _launch(x, weight, bias, tile, gated=False)


def tma_gate_up_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     tile: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """silu(gate) * up of the projection x @ weight^T (+ bias) whose first half of columns is gate and second up:
    [M, K] x [2I, K] -> [M, I], rounded as silu_and_mul(F.linear(x, weight, bias)) rounds it. `tile` as tma_matmul's,
    its BLOCK_N counting one half's columns."""
    if weight.shape[0] % 2:
        raise ValueError(f"a gate/up projection has an even number of rows; got {weight.shape[0]}")
    return _launch(x, weight, bias, tile, gated=True)


def tma_loadable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this kernel serves x @ weight^T where the engine asks: a compiled kernel on an NVIDIA GPU with a TMA
    (compute capability 9 and later; elsewhere it was never measured), and tensors a descriptor can address
    (16-byte aligned starts and rows, unit column stride: the engine's activations and weights are)."""
    return compiled_for_hopper(x.device) and _addressable(x, weight)


def _addressable(*tensors: torch.Tensor) -> bool:
    return all(t.dim() == 2 and t.shape[1] > 0 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
               and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: tuple[int, ...] | None,
            gated: bool) -> torch.Tensor:
    check_kernel_inputs(x, weight, *([] if bias is None else [bias]))
    num_rows, depth = x.shape
    if weight.shape[1] != depth:
        raise ValueError(f"tma_matmul takes a weight of x's width; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if not _addressable(x, weight):
        raise ValueError("tma_matmul needs x and the weight 16-byte aligned, rows contiguous, some depth")
    num_columns = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty(num_rows, num_columns, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = tile or tma_tile(num_rows, num_columns, gated,
                                                                                  x.element_size())
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(num_columns, block_n))
    _tma_matmul_kernel[grid](
        TensorDescriptor.from_tensor(x, [block_m, block_k]), TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        bias if bias is not None else weight, out, num_rows, num_columns, depth, out.stride(0),
        HAS_BIAS=bias is not None, GATED=gated, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        STAGES=num_stages, DOT_PRECISION=dot_input_precision(x.dtype), num_warps=num_warps, num_stages=num_stages,
        **launch_options(x.device))
    return out
