"""Residual add and RMS normalisation in one pass over the hidden states."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfllm.kernels.dependent_launch import launch_options, wait_then_release
from sfllm.kernels.device_check import check_kernel_inputs


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    stride_x_row,
    stride_residual_row,
    hidden_size,
    eps,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x_row = x_ptr + row * stride_x_row + cols
    residual_row = residual_ptr + row * stride_residual_row + cols

    x = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_row, mask=mask, other=0.0).to(tl.float32)
    # Round the sum to the residual's dtype before normalising, as the unfused modules do.
    summed = (x + residual).to(residual_ptr.dtype.element_ty)
    tl.store(residual_row, summed, mask=mask)

    hidden = summed.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(hidden * hidden, axis=0) / hidden_size + eps)
    normed = (hidden * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_row, (normed * weight).to(x_ptr.dtype.element_ty), mask=mask)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual <- x + residual, x <- rms_norm(residual) * weight; returns (x, residual)."""
    check_kernel_inputs(x, residual, weight)
    hidden_size = x.shape[-1]
    if x.shape != residual.shape or weight.shape != (hidden_size,):
        raise ValueError(f"shapes x {tuple(x.shape)}, residual {tuple(residual.shape)}, weight {tuple(weight.shape)} differ")
    if x.stride(-1) != 1 or residual.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("fused_add_rms_norm needs a contiguous hidden dimension")
    x_rows = x.view(-1, hidden_size)
    residual_rows = residual.view(-1, hidden_size)
    if x_rows.shape[0] == 0:
        return x, residual
    block = triton.next_power_of_2(hidden_size)
    _fused_add_rms_norm_kernel[(x_rows.shape[0],)](
        x_rows,
        residual_rows,
        weight,
        x_rows.stride(0),
        residual_rows.stride(0),
        hidden_size,
        eps,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
        **launch_options(x.device),
    )
    return x, residual
