"""The Triton kernels against their plain-torch references, at small shapes.

Without a GPU the kernels run in the Triton interpreter, which must be switched on before Triton is
first imported; with a GPU they run compiled on it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from sfllm.kernels import (  # noqa: E402
    DecodeWorkspace,
    choose_num_kv_splits,
    decode_attention,
    extend_attention,
    extend_tiles,
    fused_add_rms_norm,
    store_kv_cache,
)
from sfllm.kernels.decode_attention import MAX_KV_SPLITS  # noqa: E402
from sfllm.kernels.extend_attention import extend_tile_config  # noqa: E402
from sfllm.kernels.device_check import KERNELS_INTERPRETED  # noqa: E402
from sfllm.kernels.reference import (  # noqa: E402
    reference_decode_attention,
    reference_extend_attention,
    reference_fused_add_rms_norm,
    reference_store_kv_cache,
)

DEVICE = "cpu" if KERNELS_INTERPRETED else "cuda"
BLOCK_SIZE = 16
HEAD_DIM = 64
REPO_ROOT = Path(__file__).resolve().parents[1]
# Triton 3.6's interpreter multiplies the raw bits of bf16 operands in tl.dot, so bf16 is checked on GPUs only.
HALF_DTYPES = [torch.float16] if KERNELS_INTERPRETED else [torch.float16, torch.bfloat16]


@dataclass
class PagedKV:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor


def make_paged_kv(seq_lens: list[int], num_kv_heads: int, dtype: torch.dtype = torch.float32) -> PagedKV:
    """Random caches whose blocks are handed out in shuffled order; unused table entries hold junk ids."""
    blocks_per_seq = [-(-length // BLOCK_SIZE) for length in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks).tolist()
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), max(blocks_per_seq) + 1), dtype=torch.int32)
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = torch.tensor(order[:count], dtype=torch.int32)
        order = order[count:]
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    return PagedKV(
        k_cache=torch.randn(shape, dtype=dtype, device=DEVICE),
        v_cache=torch.randn(shape, dtype=dtype, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
    )


def strided_heads(num_tokens: int, num_heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[T, H, D] random values viewed out of a wider buffer, as q is sliced out of a fused qkv projection."""
    fused = torch.randn(num_tokens, (num_heads + 2) * HEAD_DIM, dtype=dtype, device=DEVICE)
    return fused[:, HEAD_DIM : (num_heads + 1) * HEAD_DIM].view(num_tokens, num_heads, HEAD_DIM)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_store_kv_cache_writes_slots_and_skips_padding(slot_dtype: torch.dtype) -> None:
    num_kv_heads, num_tokens = 3, 12
    paged = make_paged_kv([40, 20], num_kv_heads)
    num_slots = paged.k_cache.shape[0] * BLOCK_SIZE
    slots = torch.randperm(num_slots)[:num_tokens]
    slots[[2, 7, 11]] = -1
    k = strided_heads(num_tokens, num_kv_heads)
    v = strided_heads(num_tokens, num_kv_heads)
    expected_k, expected_v = paged.k_cache.clone(), paged.v_cache.clone()
    reference_store_kv_cache(k, v, expected_k, expected_v, slots.to(DEVICE))

    store_kv_cache(k, v, paged.k_cache, paged.v_cache, slots.to(slot_dtype).to(DEVICE))

    assert torch.equal(paged.k_cache, expected_k)
    assert torch.equal(paged.v_cache, expected_v)
    written = slots[slots >= 0].to(DEVICE)
    assert torch.equal(paged.k_cache.view(-1, num_kv_heads, HEAD_DIM)[written], k[slots.to(DEVICE) >= 0])


@pytest.mark.parametrize("group,num_kv_heads", [(3, 3), (2, 2)])
@pytest.mark.parametrize("num_kv_splits", [None, 1, 3])
def test_decode_attention_matches_reference(group: int, num_kv_heads: int, num_kv_splits: int | None) -> None:
    paged = make_paged_kv([1, 17, 70, 32, 5], num_kv_heads)
    q = strided_heads(5, group * num_kv_heads)
    out = torch.full_like(q, float("nan"))

    decode_attention(
        q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125, out=out, num_kv_splits=num_kv_splits
    )

    ref = reference_decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125)
    assert relative_error(out, ref) < 1e-4


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_decode_attention_in_any_batch_order_gives_the_same_rows(num_kv_splits: int) -> None:
    # the order is used once the sequences' heads outnumber the SMs
    num_sms = 1 if KERNELS_INTERPRETED else torch.cuda.get_device_properties(0).multi_processor_count
    seq_lens = ([1, 17, 70, 32, 0, 5] * (num_sms // 6 + 1))[:max(6, num_sms // 2 + 1)]
    paged = make_paged_kv(seq_lens, 2)
    q = strided_heads(len(seq_lens), 4)
    unordered = decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125,
                                 num_kv_splits=num_kv_splits)
    longest_first = torch.argsort(paged.seq_lens, descending=True, stable=True).to(torch.int32)

    ordered = decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125,
                               num_kv_splits=num_kv_splits, batch_order=longest_first)

    assert torch.equal(ordered, unordered)  # each row is computed alike, only at another time
    ref = reference_decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125)
    assert relative_error(ordered, ref) < 1e-4
    with pytest.raises(ValueError, match="batch_order"):
        decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125,
                         num_kv_splits=num_kv_splits, batch_order=longest_first[:-1])
    with pytest.raises(ValueError, match="batch_order"):
        decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125,
                         num_kv_splits=num_kv_splits, batch_order=longest_first.long())


def test_decode_attention_takes_the_sequences_in_the_order_given() -> None:
    num_sms = 1 if KERNELS_INTERPRETED else torch.cuda.get_device_properties(0).multi_processor_count
    seq_lens = ([9, 17, 30] * (num_sms // 3 + 1))[:max(3, num_sms // 2 + 1)]  # heads outnumber the SMs
    paged = make_paged_kv(seq_lens, 2)
    q = strided_heads(len(seq_lens), 4)
    out = torch.full_like(q, float("nan"))
    only_the_second = torch.ones(len(seq_lens), dtype=torch.int32, device=DEVICE)  # not a permutation: a probe

    decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125, out=out,
                     num_kv_splits=1, batch_order=only_the_second)

    ref = reference_decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125)
    assert relative_error(out[1], ref[1]) < 1e-4
    assert torch.isnan(out[0]).all() and torch.isnan(out[2:]).all(), "the programs computed the second sequence only"


@pytest.mark.parametrize("num_kv_splits", [1, 4])  # the output written by stage 1 itself, or by the merge
def test_decode_attention_gives_zeros_for_empty_padding_rows(num_kv_splits: int) -> None:
    paged = make_paged_kv([0, 23, 0], 3)
    q = strided_heads(3, 9)

    out = decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125,
                           num_kv_splits=num_kv_splits)

    assert torch.isfinite(out).all()
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
    ref = reference_decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125)
    assert relative_error(out, ref) < 1e-4


def test_decode_attention_uses_a_larger_preallocated_workspace() -> None:
    paged = make_paged_kv([9, 50], 2)
    q = strided_heads(2, 4)
    workspace = DecodeWorkspace.allocate(8, 4, 6, HEAD_DIM, DEVICE)
    workspace.partial_out.fill_(float("nan"))
    workspace.partial_lse.fill_(float("nan"))

    out = decode_attention(
        q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125, num_kv_splits=2, workspace=workspace
    )

    ref = reference_decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125)
    assert relative_error(out, ref) < 1e-4
    with pytest.raises(ValueError, match="too small"):
        decode_attention(
            q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.1, num_kv_splits=7, workspace=workspace
        )


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_decode_attention_in_16_bit(dtype: torch.dtype) -> None:
    paged = make_paged_kv([30, 3], 3, dtype)
    q = strided_heads(2, 9, dtype)

    out = decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125, num_kv_splits=2)

    ref = reference_decode_attention(
        q.float(), paged.k_cache.float(), paged.v_cache.float(), paged.block_tables, paged.seq_lens, 0.125
    )
    assert out.dtype == dtype
    assert relative_error(out, ref) < 2e-2


def tiles_for(query_lens: list[int], rows_per_tile: int, capacity: int | None = None) -> torch.Tensor:
    tiles = torch.from_numpy(extend_tiles(query_lens, rows_per_tile))
    if capacity is not None:  # unused entries, as a CUDA graph's larger tile list has them
        tiles = torch.cat([tiles, torch.full((capacity - len(tiles), 2), -1, dtype=torch.int32)])
    return tiles.to(DEVICE)


def test_extend_tiles_cover_the_rows_of_multi_token_sequences() -> None:
    assert extend_tiles([5, 1, 0, 9, 2], 4).tolist() == [[0, 0], [0, 4], [3, 0], [3, 4], [3, 8], [4, 0]]
    assert extend_tiles([1, 1], 4).shape == (0, 2)
    assert extend_tiles([3], 4, first_seq=2).tolist() == [[2, 0]]


def test_extend_tiles_with_prefixes_put_the_tiles_of_most_keys_first() -> None:
    # keys a tile attends to grow with its sequence's prefix and its first row; ties keep the listed order
    tiles = extend_tiles([5, 9, 1, 4], 4, first_seq=1, prefix_lens=np.array([0, 10, 7, 4]))
    assert tiles.tolist() == [[2, 8], [2, 4], [2, 0], [1, 4], [4, 0], [1, 0]]


@pytest.mark.parametrize("group,num_kv_heads", [(3, 3), (2, 2)])
def test_extend_and_decode_attention_together_match_reference(group: int, num_kv_heads: int) -> None:
    """A mixed batch: extend_attention takes the rows of sequences with several new tokens (tiles of 16
    rows, from a list with unused entries), decode_attention those with one; the sequence of no new
    tokens (a padding row) is nobody's."""
    # (query_len, seq_len): plain prefill, prefix-cache hit, a one-token extend, chunked prefill of an odd
    # length, an extend whose prefix spans whole key tiles (the kernel's unmasked loop), a decode row, and
    # an empty padding sequence.
    cases = [(37, 37), (5, 21), (1, 16), (70, 83), (9, 150), (1, 40), (0, 0)]
    paged = make_paged_kv([seq_len for _, seq_len in cases], num_kv_heads)
    query_lens = [query_len for query_len, _ in cases]
    query_start_loc = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    q = strided_heads(sum(query_lens), group * num_kv_heads)
    out = torch.full_like(q, float("nan"))
    tiles = tiles_for(query_lens, 16, capacity=16)

    extend_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, query_start_loc, paged.seq_lens, tiles,
                     0.125, out=out, block_m=16)
    single_rows = query_start_loc[:-1][torch.tensor(query_lens, device=DEVICE) == 1].long()
    assert torch.isnan(out[single_rows]).all(), "rows of one new token are not extend_attention's"
    decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 0.125, out=out,
                     num_kv_splits=2, query_start_loc=query_start_loc)

    ref = reference_extend_attention(
        q, paged.k_cache, paged.v_cache, paged.block_tables, query_start_loc, paged.seq_lens, 0.125
    )
    assert relative_error(out, ref) < 1e-4


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_extend_attention_in_16_bit(dtype: torch.dtype) -> None:
    paged = make_paged_kv([40], 2, dtype)
    q = strided_heads(24, 4, dtype)
    query_start_loc = torch.tensor([0, 24], dtype=torch.int32, device=DEVICE)
    block_m = extend_tile_config(HEAD_DIM, dtype, torch.device(DEVICE)).block_m

    out = extend_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, query_start_loc, paged.seq_lens,
                           tiles_for([24], block_m), 0.125)

    ref = reference_extend_attention(
        q.float(), paged.k_cache.float(), paged.v_cache.float(), paged.block_tables, query_start_loc, paged.seq_lens, 0.125
    )
    assert out.dtype == dtype
    assert relative_error(out, ref) < 2e-2


def test_fused_add_rms_norm_updates_both_in_place() -> None:
    x = torch.randn(5, 576, device=DEVICE)
    residual = torch.randn(5, 576, device=DEVICE)
    weight = torch.randn(576, device=DEVICE)
    expected_normed, expected_residual = reference_fused_add_rms_norm(x, residual, weight, 1e-5)

    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)

    assert normed.data_ptr() == x.data_ptr() and new_residual.data_ptr() == residual.data_ptr()
    assert relative_error(normed, expected_normed) < 1e-5
    assert relative_error(new_residual, expected_residual) < 1e-6


def test_split_count_fills_the_gpu_only_when_sequences_are_long_enough() -> None:
    assert choose_num_kv_splits(batch=256, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 1
    assert choose_num_kv_splits(batch=1, num_kv_heads=8, max_seq_len=100, num_sms=132) == 1
    assert 1 < choose_num_kv_splits(batch=1, num_kv_heads=8, max_seq_len=4096, num_sms=132) < MAX_KV_SPLITS
    assert choose_num_kv_splits(batch=1, num_kv_heads=1, max_seq_len=1 << 20, num_sms=132) == MAX_KV_SPLITS


def test_kernels_refuse_cpu_tensors_without_the_interpreter() -> None:
    script = """
import torch
from sfllm.kernels import decode_attention
q = torch.randn(1, 2, 64)
cache = torch.randn(1, 16, 2, 64)
try:
    decode_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 0.1)
except RuntimeError as error:
    print(error)
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "'torch' attention backend" in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout
