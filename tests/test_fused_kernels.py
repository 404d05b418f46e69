"""The fused layer kernels against the torch code they replace (interpreted on CPU, compiled on GPU)."""
from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from sfllm.kernels import (draw_top_tokens, rotary_qk_norm_, sample_tokens, silu_and_mul,  # noqa: E402
                           skinny_gate_up_silu, skinny_matmul, tma_gate_up_silu, tma_matmul, top_k_select)
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


@pytest.mark.parametrize("rows", [1, 5, 16, 70])  # 70: row tiles of 64, the second ragged
@pytest.mark.parametrize("depth, with_bias", [(512, False), (200, True)])  # K a multiple of the tile, or not
@pytest.mark.parametrize("constant_weight", [False, True])  # the weight's first tile read before the wait, or after
def test_skinny_matmul_matches_linear(rows: int, depth: int, with_bias: bool, constant_weight: bool) -> None:
    torch.manual_seed(4)
    x = torch.randn(rows, depth).to(DEVICE)
    weight = torch.randn(80, depth).to(DEVICE)  # 80 columns: the last tile of 16 or 32 is ragged
    bias = torch.randn(80).to(DEVICE) if with_bias else None
    out = skinny_matmul(x, weight, bias, constant_weight=constant_weight)
    assert out.shape == (rows, 80) and out.dtype == x.dtype
    assert _relative_error(out, torch.nn.functional.linear(x, weight, bias)) < 1e-5
    empty = skinny_matmul(x[:, :0], weight[:, :0], bias)  # no depth: the bias alone, or zeros
    assert torch.equal(empty, torch.nn.functional.linear(x[:, :0], weight[:, :0], bias))
    with pytest.raises(ValueError, match="a weight of x's width"):
        skinny_matmul(torch.randn(rows, depth + 1).to(DEVICE), weight)


@pytest.mark.parametrize("rows, depth, with_bias", [(1, 512, False), (8, 200, True), (16, 512, False),
                                                     (70, 200, True)])
@pytest.mark.parametrize("constant_weight", [False, True])  # the weight's first tile read before the wait, or after
def test_skinny_gate_up_silu_matches_the_projection_then_the_activation(rows: int, depth: int, with_bias: bool,
                                                                         constant_weight: bool) -> None:
    """Gate and up of 40 columns each: the last tile of each half is ragged, and a row's gate and up products
    must come from the rows 40 apart."""
    torch.manual_seed(5)
    x = torch.randn(rows, depth).to(DEVICE)
    weight = torch.randn(80, depth).to(DEVICE)
    bias = torch.randn(80).to(DEVICE) if with_bias else None
    out = skinny_gate_up_silu(x, weight, bias, constant_weight=constant_weight)
    gate, up = torch.nn.functional.linear(x, weight, bias).chunk(2, dim=-1)
    assert out.shape == (rows, 40) and out.dtype == x.dtype
    assert _relative_error(out, torch.nn.functional.silu(gate) * up) < 1e-5
    with pytest.raises(ValueError, match="even number of rows"):
        skinny_gate_up_silu(x, weight[:79])


@pytest.mark.parametrize("rows, tile", [(5, None), (70, (64, 32, 64, 4, 2))])  # one program's rows; row tiles
@pytest.mark.parametrize("gated", [False, True])
def test_split_skinny_gemm_sums_its_splits_once_and_leaves_its_tickets_at_zero(rows: int, tile, gated: bool) -> None:
    """K of 640 in 3 splits asked: whole K tiles each, so 2 of 512 for one program's rows (512-deep tiles) and 256,
    256, 128 for the row tiles' 64-deep ones. Each output tile is summed by the last of its programs; a second call
    finds the tile counters at zero again and gives the same bits."""
    skinny = importlib.import_module("sfllm.kernels.skinny_matmul")
    torch.manual_seed(6)
    x = torch.randn(rows, 640).to(DEVICE)
    weight = torch.randn(96, 640).to(DEVICE)
    bias = torch.randn(96).to(DEVICE)
    run = skinny_gate_up_silu if gated else skinny_matmul
    out = run(x, weight, bias, tile=tile, split_k=3)
    reference = torch.nn.functional.linear(x, weight, bias)
    if gated:
        gate, up = reference.chunk(2, dim=-1)
        reference = torch.nn.functional.silu(gate) * up
    assert _relative_error(out, reference) < 1e-5
    assert not skinny._TICKETS[x.device].any(), "a split GEMM leaves its tile counters at zero"
    assert torch.equal(run(x, weight, bias, tile=tile, split_k=3), out)
    assert _relative_error(run(x, weight, bias, tile=tile, split_k=1), reference) < 1e-5


# row and column tiles ragged; 300 and 1,100 rows: tma_tile's prefill tile when gated
@pytest.mark.parametrize("rows, tile", [(70, None), (130, (64, 32, 64, 4, 3)), (300, None), (1100, None)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_tma_matmul_matches_linear(rows: int, tile, with_bias: bool, gated: bool) -> None:
    """K of 200: the last K tile reaches past the depth (the descriptor reads zeros there); 96 columns, gate and up
    of 48 each when gated: a half's last tile reaches into the up half or past the weight, and those columns are
    not stored."""
    torch.manual_seed(7)
    x = torch.randn(rows, 200).to(DEVICE)
    weight = torch.randn(96, 200).to(DEVICE)
    bias = torch.randn(96).to(DEVICE) if with_bias else None
    out = (tma_gate_up_silu if gated else tma_matmul)(x, weight, bias, tile=tile)
    reference = torch.nn.functional.linear(x, weight, bias)
    if gated:
        gate, up = reference.chunk(2, dim=-1)
        reference = torch.nn.functional.silu(gate) * up
    assert out.shape == reference.shape and out.dtype == x.dtype
    assert _relative_error(out, reference) < 1e-5


def test_tma_matmul_refuses_what_a_descriptor_cannot_address() -> None:
    x = torch.randn(70, 202).to(DEVICE)
    with pytest.raises(ValueError, match="16-byte aligned"):
        tma_matmul(x[:, 1:201], torch.randn(96, 200).to(DEVICE))  # rows start 4 bytes in
    with pytest.raises(ValueError, match="x's width"):
        tma_matmul(x, torch.randn(96, 200).to(DEVICE))
    with pytest.raises(ValueError, match="even number of rows"):
        tma_gate_up_silu(x[:, :200], torch.randn(95, 200).to(DEVICE))


def test_layers_past_the_skinny_rows_take_the_tma_kernel_only_where_it_can_run() -> None:
    """The interpreter, a CPU tensor and a float32 run keep torch's GEMM; the rule's rows are the model's."""
    layer = torch.nn.Linear(200, 96).to(DEVICE)
    x = torch.randn(100, 200).to(DEVICE)
    assert not layer_ops._by_tma(x, layer.weight, layer_ops.TMA_ROWS)
    assert torch.equal(layer_ops.linear(x, layer, 16, layer_ops.TMA_ROWS), layer(x))
    assert layer_ops.tma_rows(6 * 2**20) == layer_ops.TMA_ROWS and layer_ops.tma_rows(24 * 2**20) == 0


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


def test_sample_tokens_never_draws_a_token_of_logit_minus_infinity() -> None:
    """What the eager sampler makes of tokens a row may not draw (ending tokens short of min_tokens): rows whose
    logits are -inf but for two tokens, one far below the other, draw only those two; a greedy row the better,
    hot rows both (in 4 x 32 draws), whatever the chunk of the vocabulary each sits in."""
    logits = torch.full((33, 9000), float("-inf"))
    logits[:, 3], logits[:, 8500] = -50.0, -51.0
    temperatures = torch.tensor([0.0] + [50.0] * 32, device=DEVICE)
    drawn = torch.cat([sample_tokens(logits.to(DEVICE), temperatures, torch.tensor([seed], device=DEVICE)).cpu()
                       for seed in range(4)])
    assert set(drawn.tolist()) == {3, 8500}
    assert drawn[::33].tolist() == [3] * 4, "the greedy row"


def _packed_bitmask(allowed: list[list[int]], vocab: int) -> torch.Tensor:
    words = torch.zeros(len(allowed), (vocab + 31) // 32, dtype=torch.int64)
    for row, tokens in enumerate(allowed):
        for token in tokens:
            words[row, token // 32] |= 1 << (token % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31 as the sign bit


def test_sample_tokens_draws_from_softmax_over_temperature() -> None:
    """Four draws of the batch over the whole vocabulary, four under a bitmask allowing four tokens: from the
    softmax renormalised over them."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    temperature = 0.7
    rows = 128  # 512 draws of each kind; the interpreter runs each row as its own program
    allowed = [1, 2, 4, 6]
    batch = logits.repeat(rows, 1).to(DEVICE)
    temperatures = torch.full((rows,), temperature, device=DEVICE)
    bitmask = _packed_bitmask([allowed] * rows, len(logits)).to(DEVICE)

    def draw(seed: int, masked: bool) -> torch.Tensor:
        return sample_tokens(batch, temperatures, torch.tensor([seed], device=DEVICE),
                             bitmask=bitmask if masked else None).cpu()

    # the 0.001 tail of chi-square with len(tokens) - 1 degrees of freedom
    for masked, tokens, tail in ((False, list(range(len(logits))), 24.3), (True, allowed, 16.3)):
        draws = [draw(seed, masked) for seed in range(4)]
        counts = sum(torch.bincount(tokens_drawn, minlength=len(logits)).float() for tokens_drawn in draws)
        assert counts.sum() == counts[tokens].sum(), counts
        expected = torch.softmax(logits[tokens] / temperature, dim=0) * counts.sum()
        chi_square = ((counts[tokens] - expected) ** 2 / expected).sum().item()
        assert chi_square < tail, (masked, counts, expected)
        assert not torch.equal(draws[0][:40], draws[1]), "another seed draws other tokens"
        assert torch.equal(draw(0, masked), draws[0]), "the same seed draws the same tokens"


def test_sample_tokens_under_a_bitmask_draws_only_allowed_tokens() -> None:
    """Greedy rows take the best allowed token (the sign bit's token too, and one in a later chunk); a row
    allowing a single token takes it whatever its logit; a token past the mask's width is never drawn."""
    torch.manual_seed(3)
    vocab = 9000
    logits = torch.randn(4, vocab)
    logits[0, 5] = logits[1, 12] = 30.0  # each row's best token, disallowed
    allowed = [[31, 63, 100], [8500, 40], [2], [7, 8]]
    logits[0, 63] = 10.0
    logits[1, 8500] = 9.0
    logits[2, 2] = -30.0
    bitmask = _packed_bitmask(allowed, vocab)
    out = sample_tokens(logits.to(DEVICE), None, torch.tensor([5], device=DEVICE), bitmask=bitmask.to(DEVICE)).cpu()
    assert out[:3].tolist() == [63, 8500, 2]
    assert out[3].item() == 7 + int(logits[3, 8] > logits[3, 7])

    narrow = _packed_bitmask([[0]], 32).to(DEVICE).expand(2, 1).contiguous()
    narrow[1] = -1  # the first 32 tokens allowed; the 40 past them are not
    wide = torch.zeros(2, 72)
    wide[:, 50] = 100.0
    wide[0, 3] = wide[1, 20] = 1.0
    assert sample_tokens(wide.to(DEVICE), None, torch.tensor([0], device=DEVICE), bitmask=narrow).tolist() == [0, 20]


def test_sample_tokens_refuses_a_bitmask_of_another_batch() -> None:
    with pytest.raises(ValueError, match="bitmask of 2 rows"):
        sample_tokens(torch.zeros(2, 64, device=DEVICE), None, torch.tensor([0], device=DEVICE),
                      bitmask=torch.zeros(3, 2, dtype=torch.int32, device=DEVICE))


def test_warm_up_runs_every_variant_a_step_can_meet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits in the model's dtype and float32, padded rows and contiguous ones, greedy and sampled, with and
    without a bitmask, one program a row and several: each combination once, and each a valid call."""
    module = importlib.import_module("sfllm.kernels.sample_tokens")  # the package's name is the function's
    calls = []
    real = module.sample_tokens

    def recording(logits, temperatures, seed, out=None, bitmask=None, chunks_per_row=None):
        blocks = -(-logits.shape[1] // module.BLOCK)
        programs = max(1, min(blocks, chunks_per_row or module.TARGET_PROGRAMS // len(logits)))
        calls.append((logits.dtype, logits.stride(0), temperatures is None, bitmask is None, programs))
        return real(logits, temperatures, seed, out=out, bitmask=bitmask, chunks_per_row=chunks_per_row)

    monkeypatch.setattr(module, "sample_tokens", recording)
    vocab = module.BLOCK + 40  # two blocks: a row is scanned by two programs, or by one
    module.warm_up_sample_tokens(vocab, vocab + 24, torch.float16, torch.device(DEVICE))
    assert sorted(set(calls), key=str) == sorted(calls, key=str) and len(calls) == 32
    assert {(dtype, stride) for dtype, stride, *_ in calls} == {
        (torch.float16, vocab + 24), (torch.float16, vocab), (torch.float32, vocab + 24), (torch.float32, vocab)}
    assert {(greedy, unmasked, programs) for _, _, greedy, unmasked, programs in calls} == {
        (g, u, n) for g in (True, False) for u in (True, False) for n in (1, 2)}


def _stable_top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the k largest by a stable sort, so equal logits keep the lower id first."""
    values, ids = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
    return values[:, :k], ids[:, :k]


def _awkward_logits(dtype: torch.dtype, vocab: int) -> torch.Tensor:
    """Rows a sampler meets: spread logits, a row all tied, a grammar's -inf over most of a row (fewer finite
    logits than k), zeros of both signs, a NaN, and a tie across the k-th place; in rows padded as a graph's are."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, vocab, generator=generator) * 4).to(dtype)
    logits[1] = 1.5
    logits[2, 40:] = float("-inf")
    logits[3, ::2], logits[3, 1::2] = -0.0, 0.0
    logits[4, 11] = float("nan")
    sign_and_nan = {torch.bfloat16: (torch.int16, -0x40), torch.float32: (torch.int32, -0x400000)}[dtype]
    logits[4:5].view(sign_and_nan[0])[0, 5] = sign_and_nan[1]  # a NaN with its sign bit set: still the largest
    logits[5, 300:420] = logits[5].float().topk(30).values[-1]  # 120 ties at about rank 30
    logits[6, :vocab // 2] = 9.0  # half the row tied above the rest
    padded = torch.zeros(7, vocab + 24, dtype=dtype)
    padded[:, :vocab] = logits
    return padded.to(DEVICE)[:, :vocab]


@pytest.mark.parametrize("few_keys", ["default", 0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_top_k_select_is_a_stable_sorts_first_k(dtype: torch.dtype, few_keys: str | int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The k largest of each row, descending, the lower id first among equal logits (and the lowest ids of a tie at
    the k-th place kept), whatever the rows' chunking among programs; -0.0 and 0.0 are equal, NaN is the largest.
    The later digits counted by atomics (every row of 1500 has few keys) and, with no row's keys few, by histograms."""
    module = importlib.import_module("sfllm.kernels.top_k_select")
    monkeypatch.setattr(module, "BLOCK", 256)  # several chunks a row at an interpreter's size
    if few_keys != "default":
        monkeypatch.setattr(module, "FEW_KEYS", few_keys)
    logits = _awkward_logits(dtype, 1500)
    # k below the sampler's 256: the interpreter's sort takes about a second a row at 256
    for k, chunks_per_row in ((64, None), (64, 2), (37, 1)):
        values, ids = top_k_select(logits, k, chunks_per_row)
        expected_values, expected_ids = _stable_top_k(logits.cpu(), k)
        assert ids.dtype == torch.int64 and values.dtype == torch.float32
        assert torch.equal(ids.cpu(), expected_ids), (k, chunks_per_row)
        assert torch.equal(values.cpu().nan_to_num(), expected_values.nan_to_num()), (k, chunks_per_row)


def test_top_k_select_keeps_a_rows_tied_tokens_whatever_shares_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 row with a 60-way tie across rank 20: alone, or beside other rows, its k are the same ids."""
    module = importlib.import_module("sfllm.kernels.top_k_select")
    monkeypatch.setattr(module, "BLOCK", 256)
    row = torch.randn(1200, generator=torch.Generator().manual_seed(2)) - 5
    row[:12] = torch.linspace(9.0, 5.0, 12)
    row[500:560] = 4.0
    row = row.to(torch.bfloat16).to(DEVICE)
    others = (torch.randn(5, 1200, generator=torch.Generator().manual_seed(3)) * 4).to(torch.bfloat16).to(DEVICE)
    alone = top_k_select(row[None], 20)[1][0]
    assert alone[12:].tolist() == list(range(500, 508))
    for batch in (torch.cat([others[:2], row[None]]), torch.cat([row[None], others])):
        position = 2 if torch.equal(batch[2], row) else 0
        assert torch.equal(top_k_select(batch, 20)[1][position], alone)


def test_top_k_select_refuses_what_it_cannot_select() -> None:
    with pytest.raises(ValueError, match="0 < k <= 64"):
        top_k_select(torch.zeros(2, 64, device=DEVICE), 65)
    with pytest.raises(ValueError, match="float logits"):
        top_k_select(torch.zeros(2, 64, dtype=torch.int32, device=DEVICE), 4)
    with pytest.raises(ValueError, match="contiguous"):
        top_k_select(torch.zeros(64, 2, device=DEVICE).t(), 4)


def test_top_k_select_warm_up_compiles_both_key_widths_and_row_strides(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("sfllm.kernels.top_k_select")
    calls = []
    monkeypatch.setattr(module, "top_k_select", lambda logits, k: calls.append((logits.dtype, logits.stride(0), k)))
    module.warm_up_top_k_select(300, 320, torch.bfloat16, torch.device(DEVICE), 256)
    assert sorted(calls, key=str) == sorted([(torch.bfloat16, 320, 256), (torch.bfloat16, 300, 256),
                                             (torch.float32, 320, 256), (torch.float32, 300, 256)], key=str)
    calls.clear()
    module.warm_up_top_k_select(256, 320, torch.bfloat16, torch.device(DEVICE), 256)
    assert calls == []  # a vocabulary of k tokens or fewer: never bounded


def _bounded_inputs(params: list, vocab: int):
    from sfllm.worker.sampler import SamplingInputs
    return SamplingInputs.build(params, list(range(7, 7 + len(params))), vocab, torch.device("cpu"))


@pytest.mark.parametrize("with_min_p", [True, False])
def test_draw_top_tokens_draws_the_seeded_tokens_of_the_samplers_torch_path(with_min_p: bool) -> None:
    """Qwen3's sampling beside other bounded rows, seeded, from the same top 256 columns: the kernel draws the torch
    path's tokens (the same noise, a hash of seed, position and token id); a greedy row takes its top token, and a
    row with an infinite logit (every score NaN) its first column, as torch's argmax."""
    from sfllm.sampling_params import SamplingParams
    from sfllm.worker.sampler import TOP_K_BOUND, Sampler

    vocab = 3000
    params = [SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=1),
              SamplingParams(temperature=1.3, top_k=5, seed=2),
              SamplingParams(temperature=0.9, top_k=200, top_p=0.5, seed=3),
              SamplingParams(temperature=1.0, top_k=50, min_p=0.05 if with_min_p else 0.0, seed=4),
              SamplingParams(temperature=0.0, seed=5)]
    inputs = _bounded_inputs(params, vocab)
    assert (inputs.min_ps is not None) == with_min_p
    generator = torch.Generator().manual_seed(0)
    noise_seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for _ in range(12):
        logits = torch.randn(len(params), vocab, generator=generator) * 3
        expected = Sampler()._race(logits, inputs, bounded=True)
        values, ids = logits.topk(TOP_K_BOUND)
        on_device = [t.to(DEVICE) if t is not None else None for t in (
            values, ids, inputs.temperatures, inputs.top_ks, inputs.top_ps, inputs.min_ps, inputs.seeds,
            inputs.positions)]
        tokens = draw_top_tokens(*on_device, noise_seed).cpu()
        assert tokens[:4].tolist() == expected[:4].tolist()
        assert tokens[4] == logits[4].argmax()
    values[1, 0] = float("inf")
    on_device[0] = values.to(DEVICE)
    assert draw_top_tokens(*on_device, noise_seed)[1].item() == ids[1, 0].item()


def test_draw_top_tokens_unseeded_rows_draw_from_the_renormalised_nucleus() -> None:
    """Eight tokens' mass, top_k 4 and top_p 0.8, drawn 600 times with the kernel's own noise (a program a draw:
    slow in the interpreter): the kept tokens' frequencies are their renormalised probabilities (within ~3.5
    standard deviations), and another noise seed draws other tokens."""
    from sfllm.sampling_params import SamplingParams

    rows, k = 600, 16
    values = torch.full((rows, k), -30.0)
    values[:, :8] = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.2, 0.1])
    ids = torch.arange(100, 100 + k).expand(rows, k).contiguous()
    inputs = _bounded_inputs([SamplingParams(temperature=1.0, top_k=4, top_p=0.8)] * rows, 3000)
    draws = [draw_top_tokens(values[:n].to(DEVICE), ids[:n].to(DEVICE), inputs.temperatures[:n].to(DEVICE),
                             inputs.top_ks[:n].to(DEVICE), inputs.top_ps[:n].to(DEVICE), None, None, None,
                             torch.tensor([seed], device=DEVICE)).cpu() for seed, n in ((0, rows), (1, 40))]
    probs = torch.softmax(values[0, :4], dim=-1)
    kept = int(((probs.cumsum(0) - probs) <= 0.8).sum())  # the nucleus within the top 4
    counts = torch.bincount(draws[0] - 100, minlength=k).float() / rows
    assert counts[kept:].sum() == 0, "nothing outside the nucleus"
    assert torch.allclose(counts[:kept], torch.softmax(values[0, :kept], dim=-1), atol=0.07), counts[:kept]
    assert not torch.equal(draws[0][:40], draws[1])


def test_draw_top_tokens_warm_up_compiles_the_four_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("sfllm.kernels.draw_top_tokens")
    calls = []
    real = module.draw_top_tokens

    def recording(values, ids, temperatures, top_ks, top_ps, min_ps, seeds, positions, noise_seed):
        calls.append((min_ps is None, seeds is None))
        return real(values, ids, temperatures, top_ks, top_ps, min_ps, seeds, positions, noise_seed)

    monkeypatch.setattr(module, "draw_top_tokens", recording)
    module.warm_up_draw_top_tokens(8, torch.device(DEVICE))
    assert sorted(calls) == [(False, False), (False, True), (True, False), (True, True)]
