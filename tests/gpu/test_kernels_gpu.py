"""The Triton kernels at real model shapes on a GPU, against the fp32 references."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("triton")

from sfllm.kernels import (  # noqa: E402
    DecodeWorkspace,
    choose_num_kv_splits,
    decode_attention,
    extend_attention,
    extend_tile_config,
    extend_tiles,
    fused_add_rms_norm,
    silu_and_mul,
    skinny_gate_up_silu,
    skinny_matmul,
    store_kv_cache,
    tma_gate_up_silu,
    tma_matmul,
)
from sfllm.kernels.reference import (  # noqa: E402
    reference_decode_attention,
    reference_extend_attention,
    reference_fused_add_rms_norm,
    reference_store_kv_cache,
)

BLOCK_SIZE = 16
# (num_heads, num_kv_heads, head_dim)
MODEL_SHAPES = {"qwen3-0.6b": (16, 8, 128), "smollm2": (9, 3, 64)}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-3}


@dataclass
class PagedKV:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor


def make_paged_kv(
    seq_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, max_blocks: int | None = None
) -> PagedKV:
    """Random caches with blocks handed out in shuffled order; unused table entries hold junk block ids."""
    blocks_per_seq = [-(-length // BLOCK_SIZE) for length in seq_lens]
    num_blocks = sum(blocks_per_seq) + 8
    max_blocks = max_blocks or max(blocks_per_seq) + 1
    order = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), dtype=torch.int32, device="cuda")
    start = 0
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = order[start : start + count]
        start += count
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    return PagedKV(
        k_cache=torch.randn(shape, device="cuda").to(dtype),
        v_cache=torch.randn(shape, device="cuda").to(dtype),
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def random_lengths(batch: int, longest: int) -> list[int]:
    lengths = torch.randint(1, longest + 1, (batch,)).tolist()
    lengths[0] = longest
    if batch > 2:
        lengths[1], lengths[2] = 1, BLOCK_SIZE
    return lengths


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("model", MODEL_SHAPES)
def test_store_kv_cache_at_prefill_size(model: str) -> None:
    _, num_kv_heads, head_dim = MODEL_SHAPES[model]
    paged = make_paged_kv([4096, 1000], num_kv_heads, head_dim, torch.bfloat16)
    num_tokens = 4096
    slots = torch.randperm(paged.k_cache.shape[0] * BLOCK_SIZE, device="cuda")[:num_tokens]
    slots[torch.rand(num_tokens, device="cuda") < 0.1] = -1
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    expected_k, expected_v = paged.k_cache.clone(), paged.v_cache.clone()
    reference_store_kv_cache(k, v, expected_k, expected_v, slots)

    store_kv_cache(k, v, paged.k_cache, paged.v_cache, slots)

    assert torch.equal(paged.k_cache, expected_k)
    assert torch.equal(paged.v_cache, expected_v)


@pytest.mark.parametrize("model", MODEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,longest", [(1, 8192), (16, 8192), (64, 4096), (256, 2048)])
def test_decode_attention_at_model_shapes(model: str, dtype: torch.dtype, batch: int, longest: int) -> None:
    num_heads, num_kv_heads, head_dim = MODEL_SHAPES[model]
    paged = make_paged_kv(random_lengths(batch, longest), num_kv_heads, head_dim, dtype)
    q = torch.randn(batch, num_heads, head_dim, device="cuda").to(dtype)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5

    decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, scale, out=out)

    ref = reference_decode_attention(
        q.float(), paged.k_cache.float(), paged.v_cache.float(), paged.block_tables, paged.seq_lens, scale
    )
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("model", MODEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "cases",
    [
        [(8192, 8192)],
        [(1, 4000), (512, 3000), (2048, 2048), (100, 7000), (17, 17), (300, 301)],
    ],
    ids=["prefill-8k", "mixed-extend"],
)
def test_extend_attention_at_model_shapes(model: str, dtype: torch.dtype, cases: list[tuple[int, int]]) -> None:
    num_heads, num_kv_heads, head_dim = MODEL_SHAPES[model]
    paged = make_paged_kv([seq_len for _, seq_len in cases], num_kv_heads, head_dim, dtype)
    query_lens = [query_len for query_len, _ in cases]
    query_start_loc = torch.tensor([0] + query_lens, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(sum(query_lens), num_heads, head_dim, device="cuda").to(dtype)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5

    block_m = extend_tile_config(head_dim, dtype, q.device).block_m
    tiles = torch.from_numpy(extend_tiles(query_lens, block_m)).cuda()
    extend_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, query_start_loc, paged.seq_lens, tiles,
                     scale, out)
    # the one-token sequence is decode_attention's, as in the attention backend
    decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, scale, out=out,
                     query_start_loc=query_start_loc)

    ref = reference_extend_attention(
        q.float(), paged.k_cache.float(), paged.v_cache.float(), paged.block_tables, query_start_loc, paged.seq_lens, scale
    )
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("model", MODEL_SHAPES)
@pytest.mark.parametrize("preallocated", [True, False], ids=["given-workspace", "defaults"])
def test_decode_attention_replays_in_a_cuda_graph(model: str, preallocated: bool) -> None:
    """With defaults the split count comes from the block table's shape and the workspace from the graph's pool."""
    num_heads, num_kv_heads, head_dim = MODEL_SHAPES[model]
    batch, max_seq_len = 32, 4096
    max_blocks = max_seq_len // BLOCK_SIZE
    paged = make_paged_kv([max_seq_len] * batch, num_kv_heads, head_dim, torch.bfloat16, max_blocks)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    num_splits = choose_num_kv_splits(batch, num_kv_heads, max_seq_len, num_sms)
    workspace = DecodeWorkspace.allocate(batch, num_heads, num_splits, head_dim, "cuda") if preallocated else None
    q = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    seq_lens, block_tables = paged.seq_lens.clone(), paged.block_tables.clone()
    out = torch.empty_like(q)
    scale = head_dim**-0.5

    def run() -> None:
        if preallocated:
            decode_attention(q, paged.k_cache, paged.v_cache, block_tables, seq_lens, scale, out, num_splits, workspace)
        else:
            decode_attention(q, paged.k_cache, paged.v_cache, block_tables, seq_lens, scale, out)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    for _ in range(2):
        # New lengths (the last rows are empty padding) and a new assignment of blocks to sequences.
        new_lens = random_lengths(batch, max_seq_len)
        new_lens[-3:] = [0, 0, 0]
        seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        block_tables.copy_(paged.block_tables[torch.randperm(batch, device="cuda")])
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        replayed = out.clone()
        eager = decode_attention(q, paged.k_cache, paged.v_cache, block_tables, seq_lens, scale, None, num_splits)

        assert torch.equal(replayed, eager)
        assert torch.equal(replayed[-3:], torch.zeros_like(replayed[-3:]))
        ref = reference_decode_attention(
            q.float(), paged.k_cache.float(), paged.v_cache.float(), block_tables, seq_lens, scale
        )
        assert relative_error(replayed, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_add_rms_norm_at_model_width(dtype: torch.dtype) -> None:
    x = torch.randn(512, 1024, device="cuda").to(dtype)
    residual = torch.randn(512, 1024, device="cuda").to(dtype)
    weight = torch.randn(1024, device="cuda").to(dtype)
    expected_normed, expected_residual = reference_fused_add_rms_norm(x, residual, weight, 1e-6)

    fused_add_rms_norm(x, residual, weight, 1e-6)

    assert torch.equal(residual, expected_residual)
    assert relative_error(x, expected_normed) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("rows", [1, 17, 48, 100])  # one program's rows, then row tiles (the last ragged)
@pytest.mark.parametrize("columns, depth", [(4096, 1024), (1024, 2048), (1024, 3072)])  # Qwen3-0.6B's qkv, o, down
def test_skinny_matmul_at_model_shapes(rows: int, columns: int, depth: int) -> None:
    """The layers' GEMMs of a decode batch (layer_ops runs the kernel up to 64 rows on Qwen3-0.6B) against fp32."""
    x = torch.randn(rows, depth, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(columns, depth, device="cuda", dtype=torch.bfloat16) / depth**0.5
    out = skinny_matmul(x, weight, constant_weight=True)
    assert out.shape == (rows, columns) and out.dtype == torch.bfloat16
    assert relative_error(out, x.float() @ weight.float().t()) < 1e-2


@pytest.mark.parametrize("rows", [1, 48])  # one program's rows, row tiles
@pytest.mark.parametrize("columns, depth", [(1024, 2048), (1024, 3072)])  # Qwen3-0.6B's o and down: 32 column tiles
def test_split_skinny_matmul_replays_in_a_graph_with_the_same_bits(rows: int, columns: int, depth: int) -> None:
    """A narrow weight's K split among programs (split_count): every graph replay sums the splits in one order,
    so gives the eager call's bits, and leaves the tile counters at zero for the next."""
    skinny = importlib.import_module("sfllm.kernels.skinny_matmul")
    assert skinny.split_count(32, depth, 256, torch.device("cuda")) > 1
    x = torch.randn(rows, depth, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(columns, depth, device="cuda", dtype=torch.bfloat16) / depth**0.5
    eager = skinny_matmul(x, weight, constant_weight=True)
    assert relative_error(eager, x.float() @ weight.float().t()) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_matmul(x, weight, constant_weight=True)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert not skinny._TICKETS[x.device].any()


@pytest.mark.parametrize("rows", [65, 100, 200, 256])  # the TMA kernel's rows (the last row tile ragged but at 256)
@pytest.mark.parametrize("columns, depth, gated", [(4096, 1024, False), (1024, 2048, False), (6144, 1024, True)])
def test_tma_matmul_at_model_shapes_replays_in_a_graph(rows: int, columns: int, depth: int, gated: bool) -> None:
    """Qwen3-0.6B's qkv, o and gate/up projections past the skinny kernel's rows (layer_ops runs them in the TMA
    kernel up to 256 rows) against fp32, and a graph replay (the descriptors captured) giving the eager call's bits."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernel runs on compute capability 9 and later")
    x = torch.randn(rows, depth, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(columns, depth, device="cuda", dtype=torch.bfloat16) / depth**0.5
    run = tma_gate_up_silu if gated else tma_matmul
    eager = run(x, weight)
    reference = x.float() @ weight.float().t()
    if gated:
        gate, up = reference.chunk(2, dim=-1)
        reference = torch.nn.functional.silu(gate) * up
    assert eager.shape == reference.shape and eager.dtype == torch.bfloat16
    assert relative_error(eager, reference) < 1e-2
    if gated:  # rounded as the projection then the activation
        assert relative_error(eager, silu_and_mul(torch.nn.functional.linear(x, weight))) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(x, weight)
    for _ in range(2):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.parametrize("rows", [300, 1100, 8192])  # below PREFILL_TMA_ROWS and above; ragged row tiles
@pytest.mark.parametrize("intermediate, hidden", [(3072, 1024), (1536, 576)])  # Qwen3-0.6B, SmolLM2
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tma_gate_up_silu_at_prefill_rows(rows: int, intermediate: int, hidden: int, dtype: torch.dtype) -> None:
    """layer_ops runs a small model's gate/up projection in the TMA kernel at a prefill's rows too: against fp32 and
    against the projection then the activation (float32: the shallower tiles fit shared memory)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernel runs on compute capability 9 and later")
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    weight = torch.randn(2 * intermediate, hidden, device="cuda", dtype=dtype) / hidden**0.5
    out = tma_gate_up_silu(x, weight)
    gate, up = (x.double() @ weight.double().t()).chunk(2, dim=-1)
    assert out.shape == (rows, intermediate) and out.dtype == dtype
    assert relative_error(out, torch.nn.functional.silu(gate) * up) < TOLERANCE[dtype]
    assert relative_error(out, silu_and_mul(torch.nn.functional.linear(x, weight))) < TOLERANCE[dtype]


# Each boundary of layer_ops' rules from both sides; the TMA kernel and cuBLAS can give the same bits, so the routes
# are told apart by which kernel was called, not by the output.
@pytest.mark.parametrize("rows", [16, 17, 64, 65, 256, 257, 2047, 2048])
@pytest.mark.parametrize("largest_weight", [3072 * 1024, 12288 * 4096])  # Qwen3-0.6B's layer, -8B's
def test_layer_ops_route_each_projection_by_rows_and_layer(rows: int, largest_weight: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to kernel_rows the skinny kernel; past it, up to tma_rows (a small model's layers only), the TMA kernel;
    the gate/up projection in the TMA kernel again from PREFILL_TMA_ROWS in those layers; cuBLAS otherwise."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernel runs on compute capability 9 and later")
    import sfllm.kernels
    from sfllm.worker import layer_ops

    called: list[str] = []
    for name in ("skinny_matmul", "skinny_gate_up_silu", "tma_matmul", "tma_gate_up_silu"):
        kernel = getattr(sfllm.kernels, name)
        monkeypatch.setattr(sfllm.kernels, name,
                            lambda *args, _kernel=kernel, _name=name, **kwargs: called.append(_name) or
                            _kernel(*args, **kwargs))
    most_rows, most_tma_rows = layer_ops.kernel_rows(largest_weight), layer_ops.tma_rows(largest_weight)
    small_layer = largest_weight <= layer_ops.BATCH_WEIGHT_ELEMENTS
    assert (most_rows, most_tma_rows) == ((64, 256) if small_layer else (16, 0))
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    o_proj = torch.nn.Linear(1024, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.nn.Linear(1024, 2 * 3072, bias=False, device="cuda", dtype=torch.bfloat16)

    projected = layer_ops.linear(x, o_proj, most_rows, most_tma_rows)
    expected = ("skinny_matmul" if rows <= most_rows else "tma_matmul" if rows <= most_tma_rows else None)
    assert called == ([expected] if expected else [])
    assert relative_error(projected, o_proj(x)) < TOLERANCE[torch.bfloat16]

    called.clear()
    activated = layer_ops.gate_up_silu(x, gate_up, most_rows, most_tma_rows)
    by_tma = small_layer and (most_rows < rows <= most_tma_rows or rows >= layer_ops.PREFILL_TMA_ROWS)
    expected = "skinny_gate_up_silu" if rows <= most_rows else "tma_gate_up_silu" if by_tma else None
    assert called == ([expected] if expected else [])
    assert relative_error(activated, silu_and_mul(gate_up(x))) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("intermediate, hidden", [(3072, 1024), (12288, 4096)])  # Qwen3-0.6B, -8B
@pytest.mark.parametrize("rows", [1, 8, 48])
def test_skinny_gate_up_silu_equals_the_projection_then_the_activation(intermediate: int, hidden: int,
                                                                        rows: int) -> None:
    """The fused gate/up projection of a small decode batch against the two kernels it replaces: the same
    roundings, so the same bf16 values but for the rare tie an accumulation order can break."""
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2 * intermediate, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    fused = skinny_gate_up_silu(x, weight)
    unfused = silu_and_mul(skinny_matmul(x, weight))
    assert fused.shape == (rows, intermediate)
    assert (fused != unfused).float().mean().item() < 1e-3
    assert relative_error(fused, unfused) < 1e-3


def test_eager_sampler_draws_on_the_gpu_what_its_torch_path_draws() -> None:
    """The eager sampler's one-kernel draw (CUDA) against its torch path (CPU) at Qwen3's vocabulary, from bf16
    logits: greedy rows under grammar masks, with logit bias and logprobs, take the same tokens with the same
    logprobs; rows at a temperature draw only allowed tokens."""
    from sfllm.sampling_params import SamplingParams
    from sfllm.worker.sampler import Sampler, SamplingInputs

    vocab, rows = 151936, 64
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=generator).to(torch.bfloat16)
    allowed = torch.rand(rows, vocab, generator=generator) < 0.01
    allowed[:, 151935] = True  # the last word's high bit
    allowed[::4, 7] = True  # the biased token, allowed where it is biased
    bits = allowed.view(rows, -1, 32).long() << torch.arange(32)
    bitmask = bits.sum(-1).sub(torch.where(allowed.view(rows, -1, 32)[..., 31], 2**32, 0)).to(torch.int32)
    params = [SamplingParams(temperature=0.0, logit_bias={7: 50.0} if row % 4 == 0 else {},
                             logprobs=2 if row % 3 == 0 else None) for row in range(rows)]
    positions = list(range(rows))
    drawn = {}
    for device in ("cpu", "cuda"):
        inputs = SamplingInputs.build(params, positions, vocab, torch.device(device),
                                      token_bitmask=bitmask.to(device))
        out = Sampler(seed=1)(logits.to(device), inputs)
        drawn[device] = out
    assert drawn["cuda"].token_ids.cpu().tolist() == drawn["cpu"].token_ids.tolist()
    assert allowed.gather(1, drawn["cpu"].token_ids[:, None]).all()
    assert drawn["cpu"].token_ids[::4].tolist() == [7] * (rows // 4)
    torch.testing.assert_close(drawn["cuda"].logprobs.cpu(), drawn["cpu"].logprobs, rtol=1e-4, atol=1e-4)

    warm = [SamplingParams(temperature=1.0) for _ in range(rows)]
    inputs = SamplingInputs.build(warm, positions, vocab, torch.device("cuda"), token_bitmask=bitmask.cuda())
    sampler = Sampler(seed=1)
    draws = [sampler(logits.cuda(), inputs).token_ids.cpu() for _ in range(2)]
    assert all(allowed.gather(1, tokens[:, None]).all() for tokens in draws)
    assert not torch.equal(draws[0], draws[1]), "each draw takes fresh noise"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 8, 64, 256])
def test_top_k_select_at_qwen3s_vocabulary_is_a_stable_sorts_first_256(rows: int, dtype: torch.dtype) -> None:
    """Each row's 256 largest of 151,936 logits in rows padded as a graph's are, compiled: the ids and values of a
    stable sort (equal logits, frequent in bf16, keep the lower id first), and the same for a row alone."""
    from sfllm.kernels import top_k_select

    generator = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, 151936 + 64, generator=generator) * 4).to(dtype).cuda()[:, :151936]
    logits[0, 1000:1400] = logits[0].float().topk(200).values[-1]  # a 400-way tie across rank 256
    if rows > 1:  # a row whose 20,000 top keys share every digit: its later digits by a histogram, not atomics
        logits[-1, 5000:25000] = 11.0
    values, ids = top_k_select(logits, 256)
    expected_values, expected_ids = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
    assert torch.equal(ids, expected_ids[:, :256])
    assert torch.equal(values, expected_values[:, :256])
    assert torch.equal(top_k_select(logits[-1:], 256)[1], ids[-1:])


def test_bounded_rows_draw_on_the_gpu_the_seeded_tokens_the_cpu_draws() -> None:
    """Qwen3's sampling (temperature 0.6, top_k 20, top_p 0.95) and other bounded rows, seeded, at its vocabulary:
    the GPU's radix select and the CPU's torch.topk pick the same columns from distinct float32 logits, so the
    sampler draws the same tokens on both; rows asking for logprobs (float32 keys) and greedy rows among them."""
    from sfllm.sampling_params import SamplingParams
    from sfllm.worker.sampler import Sampler, SamplingInputs

    vocab, rows = 151936, 48
    kinds = [dict(temperature=0.6, top_k=20, top_p=0.95), dict(temperature=1.0, top_k=50, min_p=0.05),
             dict(temperature=0.8, top_k=256), dict(temperature=0.0)]
    params = [SamplingParams(**kinds[row % 4], seed=row, logprobs=1 if row % 5 == 0 else None)
              for row in range(rows)]
    generator = torch.Generator().manual_seed(4)
    for step in range(3):
        logits = torch.randn(rows, vocab, generator=generator) * 3
        positions = [step + row for row in range(rows)]
        drawn = {device: Sampler(seed=2)(logits.to(device), SamplingInputs.build(params, positions, vocab,
                                                                                torch.device(device)))
                 for device in ("cpu", "cuda")}
        assert drawn["cuda"].token_ids.cpu().tolist() == drawn["cpu"].token_ids.tolist()
        assert drawn["cpu"].token_ids[3::4].tolist() == logits[3::4].argmax(-1).tolist()


@pytest.mark.parametrize("batch", [1, 48, 96, 200])  # the skinny kernels' GEMMs (one program's rows, row tiles), the
# TMA kernel's (with cuBLAS's down_proj)
def test_a_decode_step_launched_early_equals_it_launched_after(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3-0.6B's decode step (dummy weights: its norms, skinny or cuBLAS GEMMs, rotary and KV store, decode
    attention) captured with the kernels launched early (programmatic dependent launch) gives, replay after replay
    with new tokens, what the same kernels give launched one after another. A kernel that read what the kernel
    before it writes before that one had finished would likely differ (likelier at batch 1, where every kernel of
    a layer is ours)."""
    import numpy as np

    from decode_step import DecodeStep
    from sfllm.kernels import dependent_launch
    from sfllm.model_source import resolve_model
    from sfllm.worker.weight_loader import load_model

    if not dependent_launch.launches_early(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9 or later")
    source = resolve_model("qwen3-0.6b", "dummy")
    model = load_model(source, torch.bfloat16, torch.device("cuda"), 4096)
    contexts = np.random.default_rng(0).integers(1, 2048, batch)
    decode = DecodeStep.build(model, source.config, contexts, torch.bfloat16)
    ids, positions, meta = decode.rows(0, batch)
    with torch.inference_mode():
        decode.run(ids, positions, meta)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            early = decode.run(ids, positions, meta)
        monkeypatch.setattr(dependent_launch, "ENABLED", False)
        for _ in range(3):
            ids.copy_(torch.randint_like(ids, source.config.vocab_size))
            graph.replay()
            after = decode.run(ids, positions, meta)
            assert torch.equal(early, after)
