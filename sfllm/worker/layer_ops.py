"""The element-wise parts of a decoder layer: Triton kernels on CUDA, plain torch elsewhere.

Both paths compute the same function; on a GPU in half precision the fused kernels cut a
layer from about sixty launches to about a dozen, which is what a decode step's time is made of.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# Where the linear layers run sfllm.kernels.skinny_matmul instead of cuBLAS (measured on an H200, kernel benches in
# tests/gpu/bench_kernels.py). Up to 16 rows at every weight: launched after the kernel before it beat cuBLAS at
# every layer of Qwen3-0.6B and -8B up to 8 rows and was even at 16 (`sweep`); launched early it reads a weight
# tile while the kernel before ends, and a decode step's layers at 12 and 16 sequences took 0.85-0.96 of
# cuBLAS's time (`pdl`). Up to 64 rows in layers whose largest weight (the gate/up projection) has at most 8 Mi
# elements: alone the kernel is 1.3-1.5 us a layer slower than cuBLAS there, but launched early among the layer's
# other kernels a Qwen3-0.6B decode step (6 Mi) at 21-64 sequences took 0.93-0.97 of cuBLAS's time (even at 24
# sequences of 64 tokens). From 96 rows it was slower, on Qwen3-1.7B's layers (24 Mi) 1.04-1.08 with all four GEMMs
# in it (0.97-1.03 with its two smaller ones), on the 8B's 1.10-1.12 (`batch_gemm`, `batch_steps`).
SKINNY_ROWS = 16
BATCH_ROWS = 64
BATCH_WEIGHT_ELEMENTS = 8 * 2**20
# Past the skinny kernel's rows, up to TMA_ROWS, the same small layers' qkv, o and gate/up projections run in
# sfllm.kernels.tma_matmul on a GPU with a TMA: a Qwen3-0.6B decode step at 80-256 sequences took 0.960-0.976 of its
# time with cuBLAS there (0.989 once; at 68 sequences 1.012, within that bench's spread) (`tma_steps`); down_proj
# stays with cuBLAS (slower alone in the kernel at 192-256 rows; in the decode step, at its best tile, 0.999-1.010 of
# the step's time at 96-256 sequences on an H100, and the standard workload 0.03-0.10 s slower: `tma_down`).
TMA_ROWS = 256
# From PREFILL_TMA_ROWS rows on, in the same layers, the gate/up projection with its activation runs in the TMA kernel
# again: with the activation in its epilogue it writes half the projection's bytes and no pass reads them back.
# Qwen3-0.6B's took 0.87-0.93 of cuBLAS's and silu_and_mul's time from 2,048 to 8,192 rows on an H200, 0.81-0.86 on an
# H100, SmolLM2's 0.74-1.00; from 288 to 1,024 rows cuBLAS was faster at the kernel's prefill tile on Qwen3-0.6B on
# both cards (`bench_kernels.py prefill_gate_up`).
PREFILL_TMA_ROWS = 2048


def kernel_rows(largest_weight_elements: int) -> int:
    """The most rows for which a layer's linear layers run in the skinny kernel, by the layer's largest weight."""
    return BATCH_ROWS if largest_weight_elements <= BATCH_WEIGHT_ELEMENTS else SKINNY_ROWS


def tma_rows(largest_weight_elements: int) -> int:
    """The most rows for which a layer's qkv, o and gate/up projections run in the TMA kernel past kernel_rows (0:
    none; the larger layers' GEMMs were not measured in it)."""
    return TMA_ROWS if largest_weight_elements <= BATCH_WEIGHT_ELEMENTS else 0


def _use_kernels(x: torch.Tensor) -> bool:
    # float32 runs are for checking numbers against transformers: there the torch ops keep its rounding
    return x.is_cuda and x.dtype != torch.float32


def _by_kernel(x: torch.Tensor, weight: torch.Tensor, most_rows: int) -> bool:
    """Whether x @ weight^T runs in sfllm.kernels.skinny_matmul (or its gate/up form) rather than cuBLAS (the
    weight: for the kernel benches' stand-ins, which choose by GEMM)."""
    return _use_kernels(x) and x.shape[0] <= most_rows


def _by_tma(x: torch.Tensor, weight: torch.Tensor, most_tma_rows: int) -> bool:
    return x.shape[0] <= most_tma_rows and _tma_can_run(x, weight)


def _tma_can_run(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not _use_kernels(x):
        return False
    from sfllm.kernels.tma_matmul import tma_loadable
    return tma_loadable(x, weight)


def linear(x: torch.Tensor, layer: torch.nn.Linear, most_rows: int = SKINNY_ROWS,
           most_tma_rows: int = 0) -> torch.Tensor:
    """layer(x); up to `most_rows` rows (kernel_rows) by a kernel that streams the weight and is launched while the
    kernel before it ends (sfllm.kernels.skinny_matmul), then up to `most_tma_rows` (tma_rows) by the TMA kernel."""
    if _by_kernel(x, layer.weight, most_rows):
        from sfllm.kernels import skinny_matmul
        return skinny_matmul(x, layer.weight, layer.bias, constant_weight=True)
    if _by_tma(x, layer.weight, most_tma_rows):
        from sfllm.kernels import tma_matmul
        return tma_matmul(x, layer.weight, layer.bias)
    return layer(x)


def gate_up_silu(x: torch.Tensor, layer: torch.nn.Linear, most_rows: int = SKINNY_ROWS,
                 most_tma_rows: int = 0) -> torch.Tensor:
    """silu(gate) * up of the gate/up projection layer(x); up to `most_rows` rows, then up to `most_tma_rows` and (in
    the layers that take the TMA kernel) from PREFILL_TMA_ROWS on, in the projection's own kernel
    (sfllm.kernels.skinny_gate_up_silu, tma_gate_up_silu), without a launch for the activation."""
    if _by_kernel(x, layer.weight, most_rows):
        from sfllm.kernels import skinny_gate_up_silu
        return skinny_gate_up_silu(x, layer.weight, layer.bias, constant_weight=True)
    layer_takes_tma = most_tma_rows > 0
    prefill_by_tma = layer_takes_tma and x.shape[0] >= PREFILL_TMA_ROWS and _tma_can_run(x, layer.weight)
    if prefill_by_tma or _by_tma(x, layer.weight, most_tma_rows):
        from sfllm.kernels import tma_gate_up_silu
        return tma_gate_up_silu(x, layer.weight, layer.bias)
    return silu_and_mul(layer(x))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # computed in float32 and rounded before the weight, as transformers does
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); in place on CUDA."""
    if _use_kernels(x):
        from sfllm.kernels import fused_add_rms_norm
        return fused_add_rms_norm(x, residual, weight, eps)
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if _use_kernels(gate_up):
        from sfllm.kernels import silu_and_mul as fused
        return fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_qk_norm(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                   eps: float, kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                   slot_mapping: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Splits qkv [T, (H + 2 Hkv) * D] into q [T, H, D], k, v [T, Hkv, D] with q and k normed per head
    (when weights are given) and rotated. Given the layer's `kv_cache` (k_cache, v_cache) and the tokens'
    `slot_mapping`, the fused kernel writes k and v into the cache itself and returns (q, None, None)."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if _use_kernels(qkv):
        from sfllm.kernels import rotary_qk_norm_
        rotary_qk_norm_(qkv, positions, cos_sin, num_heads, num_kv_heads, head_dim, q_weight, k_weight, eps,
                        kv_cache, slot_mapping)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        if kv_cache is not None:
            return q.view(-1, num_heads, head_dim), None, None
        return (q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim),
                v.view(-1, num_kv_heads, head_dim))
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(-1, num_heads, head_dim)
    k = k.reshape(-1, num_kv_heads, head_dim)
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v.reshape(-1, num_kv_heads, head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
