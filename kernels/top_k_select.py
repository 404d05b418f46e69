"""Each row's k largest logits and their token ids, sorted, by a radix select instead of torch.topk.

torch.topk(256) over Qwen3's 151,936 float32 logits took 103 us at 1 row and 210 us at 64 on an H100
(docs/performance.md, thirty-fourth session): most of what drawing a top-k row costs. Here a logit becomes
an unsigned key whose order is the logits' order (16 bits for bf16 and fp16, 32 for float32), and the key at rank k
is found a byte at a time: a histogram of the first byte over the row, split among many programs that add their
counts into 256 bins, picks the byte of the k-th key; a histogram of the next byte among the keys that start with it
(an atomic add a key instead, where few keys do) picks the next, and so on (two passes for 16-bit logits). Then each
program counts its chunk's keys above that threshold key and equal to it, and a gather pass writes every key above
it and the first of the ties, in token order, each to a place given by the counts of the chunks before it: which
tied tokens make a row's k is fixed by the row alone (the lowest ids), never by what shares its batch or how programs
ran. One program a row then sorts its k by (key, then lower id first). Every pass reads the row once; no pass sorts
more than k values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfllm.kernels.device_check import check_kernel_inputs

BLOCK = 2048  # a row's columns a program reads at once
NUM_WARPS = 4  # against 8 and 16, and blocks of 4096 and 8192: the fastest from 8 rows up, 2 us slower at one
# A row whose keys under the first digits' prefix are at most this many counts them by an atomic each (a few percent
# of a row, where a model's top tokens stand out) instead of a histogram over every key: half a pass's time at 64
# rows. A row of many equal logits keeps the histogram: atomics on one bin serialise (~0.75 ns each on an H100).
FEW_KEYS = 8192
# Programs for the whole batch, a row's chunks read one after another by its programs: a row alone still spreads
# over ~75 programs of Qwen3's vocabulary, so one row's passes are bound by their launches, not the bytes.
TARGET_PROGRAMS = 2048
ID_BITS = 24  # a token id's bits in a sort key: vocabularies below 16.7M tokens
_ID_BITS = tl.constexpr(ID_BITS)
_ID_MASK = tl.constexpr((1 << ID_BITS) - 1)
_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}  # +inf's bits


@triton.jit
def _ordered_keys(row_start, columns, mask, KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr):
    """Unsigned keys in the logits' order (int32 for 16-bit logits, int64 for float32: a GPU does 64-bit integer
    arithmetic in two instructions): a float's bits with the sign bit set for positives and every bit flipped for
    negatives; -0.0 takes +0.0's key, as the two compare equal, and a NaN of either sign is the largest, as
    torch.topk and argmax take it."""
    values = tl.load(row_start + columns, mask=mask, other=0)
    if KEY_BITS == 16:
        bits = values.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:
        bits = values.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    sign: tl.constexpr = 1 << (KEY_BITS - 1)
    every: tl.constexpr = (1 << KEY_BITS) - 1
    # a NaN by its bits (all exponent bits and some mantissa bit set): the interpreter's bf16 compares no NaN unequal
    bits = tl.where((bits == sign) | ((bits & (sign - 1)) > INF_BITS), bits & (sign - 1), bits)
    return tl.where(bits >= sign, bits ^ every, bits | sign)


@triton.jit
def _threshold(hist_ptr, row, batch, k, DIGITS: tl.constexpr, KEY_BITS: tl.constexpr):
    """The first DIGITS bytes of the row's k-th largest key (in the keys' integer type), how many of the k share
    them (the rest are above), and how many of the row's keys do (DIGITS > 0)."""
    if KEY_BITS == 16:
        prefix = tl.zeros((), tl.int32)
    else:
        prefix = tl.zeros((), tl.int64)
    remaining = k
    sharing = tl.zeros((), tl.int32)
    bins = tl.arange(0, 256)
    for digit_index in tl.static_range(DIGITS):
        counts = tl.load(hist_ptr + (digit_index * batch + row) * 256 + bins)
        at_or_above = tl.cumsum(counts, axis=0, reverse=True)
        digit = tl.sum((at_or_above >= remaining).to(tl.int32), axis=0) - 1
        remaining -= tl.sum(tl.where(bins > digit, counts, 0), axis=0)
        sharing = tl.sum(tl.where(bins == digit, counts, 0), axis=0)
        prefix = prefix * 256 + digit
    return prefix, remaining, sharing


# The ints that change with the batch are not specialised on (== 1, a multiple of 16): one compiled variant serves every
# batch, so none is compiled while requests wait (warm_up_top_k_select compiles the row strides a step has at the
# engine's start). The row stride stays specialised, and a chunk's start is a multiple of BLOCK: known 16-byte
# aligned, a row's loads are vector loads (8 scalar loads a thread without, by a review's reading of the PTX).
@triton.jit(do_not_specialize=["batch", "chunk_size", "few_keys"])
def _digit_histogram_kernel(logits_ptr, stride_row, hist_ptr, batch, vocab_size, chunk_size, k, few_keys,
                            DIGIT: tl.constexpr, KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr,
                            BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    prefix, _, sharing = _threshold(hist_ptr, row, batch, k, DIGIT, KEY_BITS)
    shift: tl.constexpr = KEY_BITS - 8 * (DIGIT + 1)
    row_start = logits_ptr + row.to(tl.int64) * stride_row
    row_hist = hist_ptr + (DIGIT * batch + row) * 256
    chunk_start = tl.multiple_of(chunk * chunk_size, BLOCK)
    chunk_end = tl.minimum(chunk_start + chunk_size, vocab_size)
    by_atomics = False
    if DIGIT > 0:
        by_atomics = sharing <= few_keys
    if by_atomics:
        for start in range(chunk_start, chunk_end, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            mask = columns < chunk_end
            keys = _ordered_keys(row_start, columns, mask, KEY_BITS, INF_BITS)
            under_prefix = mask & ((keys >> (shift + 8)) == prefix)
            tl.atomic_add(row_hist + ((keys >> shift) & 255), 1, mask=under_prefix, sem="relaxed")
    else:
        counts = tl.zeros((256,), tl.int32)
        for start in range(chunk_start, chunk_end, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            mask = columns < chunk_end
            keys = _ordered_keys(row_start, columns, mask, KEY_BITS, INF_BITS)
            if DIGIT > 0:
                mask = mask & ((keys >> (shift + 8)) == prefix)
            counts += tl.histogram(((keys >> shift) & 255).to(tl.int32), 256, mask=mask)
        tl.atomic_add(row_hist + tl.arange(0, 256), counts, sem="relaxed")


@triton.jit(do_not_specialize=["batch", "chunk_size", "num_chunks"])
def _count_kernel(logits_ptr, stride_row, hist_ptr, above_ptr, ties_ptr, batch, vocab_size, chunk_size, num_chunks,
                  k, KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    threshold, _, _ = _threshold(hist_ptr, row, batch, k, KEY_BITS // 8, KEY_BITS)
    row_start = logits_ptr + row.to(tl.int64) * stride_row
    chunk_start = tl.multiple_of(chunk * chunk_size, BLOCK)
    chunk_end = tl.minimum(chunk_start + chunk_size, vocab_size)
    above = tl.zeros((BLOCK,), tl.int32)  # a lane's counts, summed across lanes once: no reduction a block
    ties = tl.zeros((BLOCK,), tl.int32)
    for start in range(chunk_start, chunk_end, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        mask = columns < chunk_end
        keys = _ordered_keys(row_start, columns, mask, KEY_BITS, INF_BITS)
        above += (mask & (keys > threshold)).to(tl.int32)
        ties += (mask & (keys == threshold)).to(tl.int32)
    tl.store(above_ptr + row * num_chunks + chunk, tl.sum(above, axis=0))
    tl.store(ties_ptr + row * num_chunks + chunk, tl.sum(ties, axis=0))


@triton.jit(do_not_specialize=["batch", "chunk_size", "num_chunks"])
def _gather_kernel(logits_ptr, stride_row, hist_ptr, above_ptr, ties_ptr, selected_ptr, batch, vocab_size,
                   chunk_size, num_chunks, k, KEY_BITS: tl.constexpr, INF_BITS: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    threshold, ties_taken, _ = _threshold(hist_ptr, row, batch, k, KEY_BITS // 8, KEY_BITS)
    chunks = tl.arange(0, BLOCK_CHUNKS)
    before = chunks < chunk
    above_before = tl.sum(tl.load(above_ptr + row * num_chunks + chunks, mask=before, other=0), axis=0)
    ties_before = tl.sum(tl.load(ties_ptr + row * num_chunks + chunks, mask=before, other=0), axis=0)
    has_above = tl.load(above_ptr + row * num_chunks + chunk) > 0
    has_ties = (tl.load(ties_ptr + row * num_chunks + chunk) > 0) & (ties_before < ties_taken)
    if has_above | has_ties:
        row_start = logits_ptr + row.to(tl.int64) * stride_row
        chunk_start = tl.multiple_of(chunk * chunk_size, BLOCK)
        chunk_end = tl.minimum(chunk_start + chunk_size, vocab_size)
        for start in range(chunk_start, chunk_end, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            mask = columns < chunk_end
            keys = _ordered_keys(row_start, columns, mask, KEY_BITS, INF_BITS)
            is_above = mask & (keys > threshold)
            is_tie = mask & (keys == threshold)
            above_rank = above_before + tl.cumsum(is_above.to(tl.int32), axis=0) - 1
            tie_rank = ties_before + tl.cumsum(is_tie.to(tl.int32), axis=0) - 1
            # above the threshold first (k - ties_taken of them), then the lowest ids among the ties
            slot = tl.where(is_above, above_rank, k - ties_taken + tie_rank)
            keep = is_above | (is_tie & (tie_rank < ties_taken))
            sort_keys = (keys.to(tl.int64) << _ID_BITS) | (_ID_MASK - columns)
            tl.store(selected_ptr + row * k + slot, sort_keys, mask=keep)
            above_before += tl.sum(is_above.to(tl.int32), axis=0)
            ties_before += tl.sum(is_tie.to(tl.int32), axis=0)


@triton.jit
def _sort_kernel(logits_ptr, stride_row, selected_ptr, values_ptr, ids_ptr, k, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    slots = tl.arange(0, BLOCK_K)
    mask = slots < k
    sort_keys = tl.sort(tl.load(selected_ptr + row * k + slots, mask=mask, other=-1), descending=True)
    ids = _ID_MASK - (sort_keys & _ID_MASK)
    values = tl.load(logits_ptr + row.to(tl.int64) * stride_row + ids, mask=mask).to(tl.float32)
    tl.store(values_ptr + row * k + slots, values, mask=mask)
    tl.store(ids_ptr + row * k + slots, ids, mask=mask)


def top_k_select(logits: torch.Tensor, k: int, chunks_per_row: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (bf16, fp16 or float32, unit column stride) -> (values [B, k] float32, token ids [B, k] int64),
    each row's k largest, descending; among equal logits the lower id first, and the lowest ids of a tie at the
    k-th place are the ones kept. `chunks_per_row`: how many programs read a row (default: about TARGET_PROGRAMS for
    the batch); the result is the same whatever it is."""
    check_kernel_inputs(logits)
    batch, vocab_size = logits.shape
    if logits.stride(1) != 1 or logits.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"top_k_select needs 16- or 32-bit float logits whose rows are contiguous, got "
                         f"{logits.dtype} with strides {logits.stride()}")
    if not 0 < k <= vocab_size or vocab_size >= 1 << ID_BITS:
        raise ValueError(f"top_k_select needs 0 < k <= {vocab_size} and fewer than {1 << ID_BITS} columns")
    device = logits.device
    values = torch.empty(batch, k, dtype=torch.float32, device=device)
    ids = torch.empty(batch, k, dtype=torch.int64, device=device)
    if not batch:
        return values, ids
    key_bits = logits.element_size() * 8
    inf_bits = _INF_BITS[logits.dtype]
    blocks = triton.cdiv(vocab_size, BLOCK)
    num_chunks = max(1, min(blocks, chunks_per_row or TARGET_PROGRAMS // batch))
    chunk_size = triton.cdiv(blocks, num_chunks) * BLOCK
    num_chunks = triton.cdiv(vocab_size, chunk_size)
    hist = torch.zeros(key_bits // 8, batch, 256, dtype=torch.int32, device=device)
    above = torch.empty(batch, num_chunks, dtype=torch.int32, device=device)
    ties = torch.empty(batch, num_chunks, dtype=torch.int32, device=device)
    selected = torch.empty(batch, k, dtype=torch.int64, device=device)
    grid = (batch, num_chunks)
    for digit in range(key_bits // 8):
        _digit_histogram_kernel[grid](logits, logits.stride(0), hist, batch, vocab_size, chunk_size, k, FEW_KEYS,
                                      DIGIT=digit, KEY_BITS=key_bits, INF_BITS=inf_bits, BLOCK=BLOCK,
                                      num_warps=NUM_WARPS)
    _count_kernel[grid](logits, logits.stride(0), hist, above, ties, batch, vocab_size, chunk_size, num_chunks, k,
                        KEY_BITS=key_bits, INF_BITS=inf_bits, BLOCK=BLOCK, num_warps=NUM_WARPS)
    _gather_kernel[grid](logits, logits.stride(0), hist, above, ties, selected, batch, vocab_size, chunk_size,
                         num_chunks, k, KEY_BITS=key_bits, INF_BITS=inf_bits, BLOCK=BLOCK,
                         BLOCK_CHUNKS=triton.next_power_of_2(blocks), num_warps=NUM_WARPS)
    _sort_kernel[(batch,)](logits, logits.stride(0), selected, values, ids, k, BLOCK_K=triton.next_power_of_2(k),
                           num_warps=4)
    return values, ids


def warm_up_top_k_select(vocab_size: int, row_stride: int, dtype: torch.dtype, device: torch.device, k: int) -> None:
    """Compiles the variants the sampler can meet, so that no request waits for Triton: logits in the model's dtype
    (16-bit keys) or float32 (32-bit: penalties, a logit bias or logprobs turn them to float32), in rows
    `row_stride` apart (a graph's padded logits) or contiguous. Nothing where the vocabulary has no more than k
    tokens: the sampler never bounds such rows."""
    if vocab_size <= k:
        return
    for logits_dtype in dict.fromkeys((dtype, torch.float32)):
        for stride in dict.fromkeys((row_stride, vocab_size)):
            top_k_select(torch.zeros(1, stride, dtype=logits_dtype, device=device)[:, :vocab_size], k)
