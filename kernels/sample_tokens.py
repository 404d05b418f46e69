"""A decode step's next tokens from its logits in one pass: argmax for greedy rows, and for sampled
rows the Gumbel-max trick, argmax(logits / T + G) with G = -log(-log(U)), which draws from
softmax(logits / T) without normalising. The noise comes from Philox keyed by a seed read from
device memory, so a captured CUDA graph draws fresh noise on every replay.

A row's vocabulary is scanned in chunks by programs of their own when the batch is too small to fill
the GPU (one program reading a 152k vocabulary alone took 33 us at batch 1); a second kernel then picks
each row's best chunk. The noise of a logit depends on its row and column only, so the draw is the
same however the rows are chunked.

With a grammar's packed bitmask ([B, ceil(V / 32)] int32, bit j of word w allows token 32 w + j) the
draw is over the allowed tokens only: the Gumbel race restricted to a subset draws from the softmax
renormalised over it, so a constrained row needs no masked copy of its logits. The eager sampler
draws its constrained rows this way, one launch where masking and drawing took a dozen."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfllm.kernels.dependent_launch import launch_options, wait_then_release
from sfllm.kernels.device_check import check_kernel_inputs

BLOCK = 4096
# Programs for the whole batch, at least one block of the vocabulary each. A row's blocks are read one after another,
# so a batch wants many programs, not just enough to fill the SMs: greedy over Qwen3's 152k vocabulary on an H200,
# 128 programs took 48 / 57 / 58 us at 128 / 200 / 256 rows, 2,048 took 16.7 / 25.1 / 31.1 (1.1-1.8x the bytes'
# time), and no fewer at 16-64 rows (tests/gpu/bench_kernels.py sample, 2026-12-03).
TARGET_PROGRAMS = 2048


@triton.jit
def _sample_chunk_kernel(logits_ptr, stride_row, temperatures_ptr, seed_ptr, bitmask_ptr, bitmask_words,
                         values_ptr, indices_ptr, out_ptr, vocab_size, chunk_size, num_chunks,
                         SINGLE_CHUNK: tl.constexpr, ALL_GREEDY: tl.constexpr, HAS_BITMASK: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_then_release(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if ALL_GREEDY:
        temperature = 0.0
    else:
        temperature = tl.load(temperatures_ptr + row)
    greedy = temperature == 0.0
    inverse_temperature = 1.0 / tl.where(greedy, 1.0, temperature)
    seed = tl.load(seed_ptr)
    row_start = logits_ptr + row.to(tl.int64) * stride_row
    best_value = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32)
    chunk_start = chunk * chunk_size
    chunk_end = tl.minimum(chunk_start + chunk_size, vocab_size)
    for start in range(chunk_start, chunk_end, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        mask = columns < chunk_end
        values = tl.load(row_start + columns, mask=mask, other=float("-inf")).to(tl.float32)
        if not greedy:
            uniform = tl.rand(seed, row * vocab_size + columns)
            values = values * inverse_temperature - tl.log(-tl.log(uniform))
        if HAS_BITMASK:
            words = tl.load(bitmask_ptr + row.to(tl.int64) * bitmask_words + columns // 32,
                            mask=mask & (columns < bitmask_words * 32), other=0)
            mask = mask & (((words >> (columns % 32)) & 1) != 0)
        values = tl.where(mask, values, float("-inf"))
        block_best = tl.max(values, axis=0)
        # the first maximum wins, within a block (argmax) and across blocks (strictly greater)
        block_index = tl.argmax(values, axis=0).to(tl.int32) + start
        take = block_best > best_value
        best_index = tl.where(take, block_index, best_index)
        best_value = tl.where(take, block_best, best_value)
    if SINGLE_CHUNK:
        tl.store(out_ptr + row, best_index.to(tl.int64))
    else:
        tl.store(values_ptr + row * num_chunks + chunk, best_value)
        tl.store(indices_ptr + row * num_chunks + chunk, best_index)


@triton.jit
def _pick_chunk_kernel(values_ptr, indices_ptr, out_ptr, num_chunks, BLOCK_CHUNKS: tl.constexpr,
                       PDL: tl.constexpr):
    wait_then_release(PDL)
    row = tl.program_id(0)
    chunks = tl.arange(0, BLOCK_CHUNKS)
    mask = chunks < num_chunks
    values = tl.load(values_ptr + row * num_chunks + chunks, mask=mask, other=float("-inf"))
    best = tl.argmax(values, axis=0)  # the first maximum: the lowest chunk, so the lowest index
    tl.store(out_ptr + row, tl.load(indices_ptr + row * num_chunks + best).to(tl.int64))


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor | None, seed: torch.Tensor,
                  out: torch.Tensor | None = None, bitmask: torch.Tensor | None = None,
                  chunks_per_row: int | None = None) -> torch.Tensor:
    """logits [B, V] (unit column stride), temperatures [B] float32 (0: greedy; None: every row greedy),
    seed [1] int64 -> token ids [B] int64, written into `out` when given. `bitmask` [B, W] int32: only the
    tokens whose bit is set are drawn (none past 32 W; a row with none draws token 0). `chunks_per_row`: how
    many programs scan a row (default: about TARGET_PROGRAMS for the batch); the draw is the same whatever it is."""
    check_kernel_inputs(logits, seed, *(t for t in (temperatures, bitmask) if t is not None))
    if logits.stride(1) != 1:
        raise ValueError("sample_tokens needs logits whose rows are contiguous")
    batch, vocab_size = logits.shape
    if bitmask is not None and (bitmask.dtype != torch.int32 or bitmask.shape[0] != batch
                                or not bitmask.is_contiguous()):
        raise ValueError(f"sample_tokens needs a contiguous int32 bitmask of {batch} rows, got "
                         f"{bitmask.dtype} {tuple(bitmask.shape)}")
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if not batch:
        return out
    blocks = triton.cdiv(vocab_size, BLOCK)
    num_chunks = max(1, min(blocks, chunks_per_row or TARGET_PROGRAMS // batch))
    chunk_size = triton.cdiv(blocks, num_chunks) * BLOCK
    num_chunks = triton.cdiv(vocab_size, chunk_size)
    values = torch.empty(batch * num_chunks, dtype=torch.float32, device=logits.device)
    indices = torch.empty(batch * num_chunks, dtype=torch.int32, device=logits.device)
    _sample_chunk_kernel[(batch, num_chunks)](
        logits, logits.stride(0), logits if temperatures is None else temperatures, seed,
        logits if bitmask is None else bitmask, 0 if bitmask is None else bitmask.shape[1], values, indices, out,
        vocab_size, chunk_size, num_chunks, SINGLE_CHUNK=num_chunks == 1, ALL_GREEDY=temperatures is None,
        HAS_BITMASK=bitmask is not None, BLOCK=BLOCK, num_warps=8,
        **launch_options(logits.device))
    if num_chunks > 1:
        _pick_chunk_kernel[(batch,)](values, indices, out, num_chunks,
                                     BLOCK_CHUNKS=triton.next_power_of_2(num_chunks), num_warps=1,
                                     **launch_options(logits.device))
    return out


def warm_up_sample_tokens(vocab_size: int, row_stride: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compiles the variants of the kernel a step can meet, so that no request waits for Triton to compile one
    (every stream of the engine would wait with it): logits in the model's dtype or float32,
    rows `row_stride` apart (a graph's padded logits) or contiguous, greedy or at a temperature, under a grammar's
    bitmask or not, a row's vocabulary in one program or in several."""
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    temperatures = torch.ones(1, dtype=torch.float32, device=device)
    bitmask = torch.full((1, triton.cdiv(vocab_size, 32)), -1, dtype=torch.int32, device=device)
    for chunks_per_row in (None, 1):  # several programs a row, then one (the variant of batches past TARGET_PROGRAMS)
        for logits_dtype in dict.fromkeys((dtype, torch.float32)):
            views = [torch.zeros(1, vocab_size, dtype=logits_dtype, device=device)]
            if row_stride != vocab_size:
                views.append(torch.zeros(1, row_stride, dtype=logits_dtype, device=device)[:, :vocab_size])
            for logits in views:
                for row_temperatures in (None, temperatures):
                    for row_bitmask in (None, bitmask):
                        sample_tokens(logits, row_temperatures, seed, bitmask=row_bitmask,
                                      chunks_per_row=chunks_per_row)
