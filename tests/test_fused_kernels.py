"""The fused layer kernels against the torch code they replace (interpreted on CPU, compiled on GPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sfllm.kernels import rotary_qk_norm_, sample_tokens, silu_and_mul, skinny_matmul  # noqa: E402
from sfllm.worker import layer_ops  # noqa: E402
from sfllm.worker.rotary_embedding import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the conftest interprets the kernels on CPU


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (9, 3, 64)])
@pytest.mark.parametrize("tokens", [7, 37])  # within one tile of tokens, and over several with a ragged last
def test_rotary_qk_norm_matches_torch(with_norm: bool, heads: int, kv_heads: int, head_dim: int,
                                      tokens: int) -> None:
    torch.manual_seed(0)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    positions = torch.randint(0, 512, (tokens,))
    table = RotaryEmbedding(head_dim, 512, 10000.0, None, torch.device("cpu")).cos_sin
    q_weight = torch.rand(head_dim) + 0.5 if with_norm else None
    k_weight = torch.rand(head_dim) + 0.5 if with_norm else None
    q_ref, k_ref, v_ref = layer_ops.rotary_qk_norm(qkv.clone(), positions, table, heads, kv_heads, head_dim,
                                                   q_weight, k_weight, 1e-6)
    qkv, positions, table = qkv.to(DEVICE), positions.to(DEVICE), table.to(DEVICE)
    if with_norm:
        q_weight, k_weight = q_weight.to(DEVICE), k_weight.to(DEVICE)
    fused = qkv.clone()
    rotary_qk_norm_(fused, positions, table, heads, kv_heads, head_dim, q_weight, k_weight, 1e-6)
    q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    assert _relative_error(q.cpu().reshape(q_ref.shape), q_ref) < 1e-5
    assert _relative_error(k.cpu().reshape(k_ref.shape), k_ref) < 1e-5
    assert torch.equal(v.cpu().reshape(v_ref.shape), v_ref), "v is left alone"


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (9, 3, 64)])
def test_rotary_qk_norm_can_write_k_and_v_into_the_paged_cache(heads: int, kv_heads: int, head_dim: int) -> None:
    """Given the cache, the kernel stores rotated k and plain v at the tokens' slots (none for a negative
    slot), rotates q in place as before, and leaves k and v in qkv alone."""
    from sfllm.kernels.reference import reference_store_kv_cache
    torch.manual_seed(3)
    tokens, block_size, num_blocks = 21, 4, 9
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    positions = torch.randint(0, 512, (tokens,))
    table = RotaryEmbedding(head_dim, 512, 10000.0, None, torch.device("cpu")).cos_sin
    q_weight, k_weight = torch.rand(head_dim) + 0.5, torch.rand(head_dim) + 0.5
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[[3, 11]] = -1
    q_ref, k_ref, v_ref = layer_ops.rotary_qk_norm(qkv.clone(), positions, table, heads, kv_heads, head_dim,
                                                   q_weight, k_weight, 1e-6)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    k_expected, v_expected = torch.randn(cache_shape), torch.randn(cache_shape)
    k_cache, v_cache = k_expected.clone().to(DEVICE), v_expected.clone().to(DEVICE)
    reference_store_kv_cache(k_ref, v_ref, k_expected, v_expected, slots)

    fused = qkv.to(DEVICE)
    rotary_qk_norm_(fused, positions.to(DEVICE), table.to(DEVICE), heads, kv_heads, head_dim, q_weight.to(DEVICE),
                    k_weight.to(DEVICE), 1e-6, (k_cache, v_cache), slots.to(DEVICE))

    q, k_and_v = fused.cpu().split([heads * head_dim, 2 * kv_heads * head_dim], dim=-1)
    assert _relative_error(q.reshape(q_ref.shape), q_ref) < 1e-5
    assert torch.equal(k_and_v, qkv[:, heads * head_dim:]), "k and v in qkv are left alone"
    assert _relative_error(k_cache.cpu(), k_expected) < 1e-5
    assert torch.equal(v_cache.cpu(), v_expected)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("depth, with_bias", [(512, False), (200, True)])  # K a multiple of the tile, or not
def test_skinny_matmul_matches_linear(rows: int, depth: int, with_bias: bool) -> None:
    torch.manual_seed(4)
    x = torch.randn(rows, depth).to(DEVICE)
    weight = torch.randn(80, depth).to(DEVICE)  # 80 columns: the last tile of 16 or 32 is ragged
    bias = torch.randn(80).to(DEVICE) if with_bias else None
    out = skinny_matmul(x, weight, bias)
    assert out.shape == (rows, 80) and out.dtype == x.dtype
    assert _relative_error(out, torch.nn.functional.linear(x, weight, bias)) < 1e-5
    with pytest.raises(ValueError, match="at most 16 rows"):
        skinny_matmul(torch.randn(17, depth).to(DEVICE), weight)


def test_silu_and_mul_matches_torch() -> None:
    torch.manual_seed(1)
    gate_up = torch.randn(5, 2 * 1500)
    gate, up = gate_up.chunk(2, dim=-1)
    fused = silu_and_mul(gate_up.to(DEVICE)).cpu()
    assert _relative_error(fused, torch.nn.functional.silu(gate) * up) < 1e-6


def test_sample_tokens_greedy_rows_are_argmax_with_the_first_maximum() -> None:
    """Three rows: each row's vocabulary is scanned in chunks by programs of their own."""
    torch.manual_seed(2)
    logits = torch.randn(3, 9000)
    logits[0, 17] = logits[0, 8500] = 50.0  # a tie across blocks of the kernel: the first wins
    logits[1, 4100] = logits[1, 4200] = 50.0  # a tie within one block
    out = sample_tokens(logits.to(DEVICE), torch.zeros(3, device=DEVICE),
                        torch.tensor([7], device=DEVICE)).cpu()
    assert out.tolist() == [17, 4100, int(logits[2].argmax())]


def test_sample_tokens_draws_from_softmax_over_temperature() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    temperature = 0.7
    rows = 128  # 1,024 draws; the interpreter runs each row as its own program
    batch = logits.repeat(rows, 1).to(DEVICE)
    temperatures = torch.full((rows,), temperature, device=DEVICE)
    counts = torch.zeros(len(logits))
    draws = [sample_tokens(batch, temperatures, torch.tensor([seed], device=DEVICE)).cpu() for seed in range(8)]
    for tokens in draws:
        counts += torch.bincount(tokens, minlength=len(logits)).float()
    expected = torch.softmax(logits / temperature, dim=0) * counts.sum()
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 24.3, (counts, expected)  # the 0.001 tail of chi-square with 7 degrees of freedom
    assert not torch.equal(draws[0], draws[1]), "another seed draws other tokens"
    again = sample_tokens(batch, temperatures, torch.tensor([0], device=DEVICE)).cpu()
    assert torch.equal(again, draws[0]), "the same seed draws the same tokens"
