"""A decode step's next tokens from its logits in one pass: argmax for greedy rows, and for sampled
rows the Gumbel-max trick, argmax(logits / T + G) with G = -log(-log(U)), which draws from
softmax(logits / T) without normalising. The noise comes from Philox keyed by a seed read from
device memory, so a captured CUDA graph draws fresh noise on every replay."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.device_check import check_kernel_inputs


@triton.jit
def _sample_tokens_kernel(logits_ptr, stride_row, temperatures_ptr, seed_ptr, out_ptr, vocab_size,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temperatures_ptr + row)
    greedy = temperature == 0.0
    inverse_temperature = 1.0 / tl.where(greedy, 1.0, temperature)
    seed = tl.load(seed_ptr)
    row_start = logits_ptr + row.to(tl.int64) * stride_row
    best_value = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32)
    for start in range(0, vocab_size, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        mask = columns < vocab_size
        values = tl.load(row_start + columns, mask=mask, other=float("-inf")).to(tl.float32)
        if not greedy:
            uniform = tl.rand(seed, row * vocab_size + columns)
            values = values * inverse_temperature - tl.log(-tl.log(uniform))
        values = tl.where(mask, values, float("-inf"))
        block_best = tl.max(values, axis=0)
        # the first maximum wins, within a block (argmax) and across blocks (strictly greater)
        block_index = tl.argmax(values, axis=0).to(tl.int32) + start
        take = block_best > best_value
        best_index = tl.where(take, block_index, best_index)
        best_value = tl.where(take, block_best, best_value)
    tl.store(out_ptr + row, best_index.to(tl.int64))


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, seed: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (unit column stride), temperatures [B] float32 (0: greedy), seed [1] int64 ->
    token ids [B] int64, written into `out` when given."""
    check_kernel_inputs(logits, temperatures, seed)
    if logits.stride(1) != 1:
        raise ValueError("sample_tokens needs logits whose rows are contiguous")
    batch, vocab_size = logits.shape
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch:
        _sample_tokens_kernel[(batch,)](logits, logits.stride(0), temperatures, seed, out, vocab_size,
                                        BLOCK=4096, num_warps=8)
    return out
