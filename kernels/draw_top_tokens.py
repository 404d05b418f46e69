"""A bounded row's draw from its top tokens in one program a row: the temperature, top-k, top-p, min-p and the
exponential race that sfllm.worker.sampler's torch path runs as some forty small kernels, over the columns that
sfllm.kernels.top_k_select sorted (descending, the lower id first among equal logits).

Seeded rows take the sampler's counter-based noise, a hash of (seed, position, token id), so they draw the tokens the
torch path draws; the others take Philox noise keyed by a device counter that the sampler moves on after each draw,
as sample_tokens's does. A greedy row (temperature 0) takes its first column: the argmax, lowest id among equals."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfllm.kernels.device_check import check_kernel_inputs

_MASK32 = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _hash32(x):
    """sfllm.worker.sampler's 32-bit mix, on int64 values below 2**32."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


@triton.jit
def _softmax(logits):
    exps = tl.exp(logits - tl.max(logits, axis=0))
    return exps / tl.sum(exps, axis=0)


@triton.jit
def _draw_kernel(values_ptr, ids_ptr, temperatures_ptr, top_ks_ptr, top_ps_ptr, min_ps_ptr, seeds_ptr,
                 positions_ptr, noise_seed_ptr, out_ptr, k, HAS_MIN_P: tl.constexpr, HAS_SEEDS: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK_K)
    in_row = columns < k
    values = tl.load(values_ptr + row * k + columns, mask=in_row, other=float("-inf"))
    ids = tl.load(ids_ptr + row * k + columns, mask=in_row, other=0)
    temperature = tl.load(temperatures_ptr + row)
    logits = values / tl.where(temperature == 0.0, 1.0, temperature)
    dropped = (columns >= tl.load(top_ks_ptr + row)) | ~in_row
    probs = _softmax(tl.where(dropped, float("-inf"), logits))
    # drop a token when the ones above it already reach top_p (the first is always kept)
    dropped = dropped | ((tl.cumsum(probs, axis=0) - probs) > tl.load(top_ps_ptr + row))
    probs = _softmax(tl.where(dropped, float("-inf"), logits))
    if HAS_MIN_P:
        probs = tl.where(probs < tl.load(min_ps_ptr + row) * tl.max(probs, axis=0), 0.0, probs)
    uniform = tl.rand(tl.load(noise_seed_ptr), row * k + columns)
    noise = -tl.log(tl.maximum(uniform, 1e-30))
    if HAS_SEEDS:
        seed = tl.load(seeds_ptr + row)
        key = tl.maximum(seed, 0)
        row_key = _hash32((key & _MASK32) ^ _hash32((key >> 32) & _MASK32))
        row_key = _hash32(row_key ^ (tl.load(positions_ptr + row) & _MASK32))
        bits = _hash32(_hash32(row_key ^ ids) ^ row_key)
        seeded_noise = (-tl.log((bits.to(tl.float64) + 0.5) * (1.0 / 4294967296.0))).to(tl.float32)
        noise = tl.where(seed >= 0, seeded_noise, noise)
    # exponential race: argmax(p / E) samples from p. A row of NaN scores (an infinite or NaN logit, or none
    # finite) takes its first column as torch's argmax does: a compiled argmax never picks a NaN
    scores = probs / noise
    choice = tl.argmax(tl.where(scores != scores, float("inf"), scores), axis=0)
    choice = tl.where(temperature == 0.0, 0, choice)
    tl.store(out_ptr + row, tl.sum(tl.where(columns == choice, ids, 0), axis=0))


def draw_top_tokens(values: torch.Tensor, ids: torch.Tensor, temperatures: torch.Tensor,
                    top_ks: torch.Tensor, top_ps: torch.Tensor, min_ps: torch.Tensor | None,
                    seeds: torch.Tensor | None, positions: torch.Tensor | None, noise_seed: torch.Tensor
                    ) -> torch.Tensor:
    """values [B, K] float32 sorted descending with their token ids [B, K] int64; per row: temperatures [B] float32
    (0: greedy), top_ks [B] int64 (K or more: off), top_ps [B] float32 (1: off), min_ps [B] float32, seeds [B]
    int64 (-1: unseeded) with positions [B] int64 (the sampled token's); noise_seed [1] int64 -> token ids [B]
    int64."""
    check_kernel_inputs(values, ids, temperatures, top_ks, top_ps, noise_seed)
    batch, k = values.shape
    if (values.dtype != torch.float32 or ids.dtype != torch.int64 or ids.shape != values.shape
            or not values.is_contiguous() or not ids.is_contiguous()):
        raise ValueError(f"draw_top_tokens needs contiguous float32 values and int64 ids of one shape, got "
                         f"{values.dtype} {tuple(values.shape)} and {ids.dtype} {tuple(ids.shape)}")
    if (seeds is None) != (positions is None):
        raise ValueError("draw_top_tokens takes seeds with positions")
    out = torch.empty(batch, dtype=torch.int64, device=values.device)
    if batch:
        _draw_kernel[(batch,)](values, ids, temperatures, top_ks, top_ps, values if min_ps is None else min_ps,
                               ids if seeds is None else seeds, ids if positions is None else positions, noise_seed,
                               out, k, HAS_MIN_P=min_ps is not None, HAS_SEEDS=seeds is not None,
                               BLOCK_K=triton.next_power_of_2(k), num_warps=4)
    return out


def warm_up_draw_top_tokens(k: int, device: torch.device) -> None:
    """Compiles the four variants the sampler can meet (with or without min-p, with or without seeded rows), so that
    no request waits for Triton."""
    values = torch.zeros(1, k, device=device)
    ids = torch.zeros(1, k, dtype=torch.int64, device=device)
    ones = torch.ones(1, device=device)
    top_ks = torch.full((1,), k, dtype=torch.int64, device=device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    for min_ps in (None, ones * 0.1):
        for seeds in (None, seed):
            draw_top_tokens(values, ids, ones, top_ks, ones, min_ps, seeds, seeds, seed)
