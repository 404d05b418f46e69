"""Time the attention kernels on a GPU at model shapes and print tables for docs/performance.md.

Run: python tests/gpu/bench_kernels.py [sweep | gate_up | gemm | gemm_triton | halves | bandwidth | pdl | ragged |
     layouts | ragged_tiles | extend | sample | top_k | top_k_passes | batch | batch_gemm | batch_steps | split |
     split_steps | tma | tma_steps | tma_down | prefill_gate_up]
Decode is timed replayed in a CUDA graph, as the engine runs it, and eagerly (which adds the Python and
launch overhead of two kernels); its bandwidth is the KV bytes read (2 * batch * seq * kv_heads * head_dim *
dtype bytes) per graph-replay second. Prefill reports TFLOP/s of causal attention (2 * 2 * heads * head_dim *
seq^2 / 2).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sfllm.kernels import (DecodeWorkspace, choose_num_kv_splits, decode_attention, extend_attention,  # noqa: E402
                     extend_tile_config, extend_tiles)
from sfllm.kernels.decode_attention import MAX_KV_SPLITS  # noqa: E402
from sfllm.bench.workload import LengthRange, RandomTokenWorkload  # noqa: E402
from decode_step import DecodeStep  # noqa: E402  (this folder, the script's own)

BLOCK_SIZE = 16
MODEL_SHAPES = {"qwen3-0.6b": (16, 8, 128), "smollm2": (9, 3, 64)}
DTYPE = torch.bfloat16


def paged_cache(batch: int, seq_len: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    blocks_per_seq = seq_len // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, block_tables, seq_lens


def bench_decode() -> None:
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("| model | batch | seq | splits | graph (us) | eager (us) | KV read (GB/s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, (num_heads, num_kv_heads, head_dim) in MODEL_SHAPES.items():
        for seq_len in (1024, 4096):
            for batch in (1, 16, 64, 256):
                k_cache, v_cache, block_tables, seq_lens = paged_cache(batch, seq_len, num_kv_heads, head_dim)
                q = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=DTYPE)
                out = torch.empty_like(q)
                splits = choose_num_kv_splits(batch, num_kv_heads, seq_len, num_sms)
                workspace = DecodeWorkspace.allocate(batch, num_heads, splits, head_dim, "cuda")

                def run() -> None:
                    decode_attention(q, k_cache, v_cache, block_tables, seq_lens, head_dim**-0.5, out, splits, workspace)

                # do_bench_cudagraph first runs on a side stream that does not wait for the inputs' writes.
                torch.cuda.synchronize()
                graph_ms = triton.testing.do_bench_cudagraph(run)
                eager_ms = triton.testing.do_bench(run)
                kv_bytes = 2 * batch * seq_len * num_kv_heads * head_dim * DTYPE.itemsize
                print(
                    f"| {model} | {batch} | {seq_len} | {splits} | {graph_ms * 1e3:.1f} | {eager_ms * 1e3:.1f} "
                    f"| {kv_bytes / graph_ms / 1e6:.0f} |"
                )


def bench_prefill() -> None:
    print("| model | seq | time (ms) | TFLOP/s |")
    print("| --- | --- | --- | --- |")
    for model, (num_heads, num_kv_heads, head_dim) in MODEL_SHAPES.items():
        for seq_len in (1024, 4096, 8192):
            k_cache, v_cache, block_tables, seq_lens = paged_cache(1, seq_len, num_kv_heads, head_dim)
            q = torch.randn(seq_len, num_heads, head_dim, device="cuda", dtype=DTYPE)
            out = torch.empty_like(q)
            query_start_loc = torch.tensor([0, seq_len], dtype=torch.int32, device="cuda")
            block_m = extend_tile_config(head_dim, DTYPE, q.device).block_m
            tiles = torch.from_numpy(extend_tiles([seq_len], block_m)).cuda()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench_cudagraph(
                lambda: extend_attention(
                    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, tiles, head_dim**-0.5, out
                )
            )
            flops = 2 * 2 * num_heads * head_dim * seq_len * seq_len / 2
            print(f"| {model} | {seq_len} | {ms:.3f} | {flops / ms / 1e9:.0f} |")


def _graph_microseconds(run, rep_ms: int = 20) -> float:
    """Mean time of `run` replayed in a CUDA graph (`rep_ms` a repeat: less for sweeps of many tiles); inf when it
    cannot run (a tile over the shared memory)."""
    try:
        run()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(run, rep=rep_ms) * 1e3
    except Exception:  # triton's OutOfResources and the like
        return float("inf")


@contextlib.contextmanager
def _decode_tile(tile: tuple[int, int, int] | None) -> Iterator[None]:
    """Inside: decode_attention runs at `tile` (block_n, warps, stages; None: the engine's choice)."""
    decode_module = sys.modules["sfllm.kernels.decode_attention"]  # `sfllm.kernels.decode_attention` is the function
    from sfllm.kernels.tile_config import TileConfig
    chosen = decode_module.decode_tile_config
    if tile is not None:
        config = TileConfig(block_m=16, block_n=tile[0], num_warps=tile[1], num_stages=tile[2])
        decode_module.decode_tile_config = lambda *args: config
    try:
        yield
    finally:
        decode_module.decode_tile_config = chosen


def sweep_decode() -> None:
    """Decode attention's KV read bandwidth (GB/s, graph replays) for each tile shape and pipeline depth, at
    Qwen3-0.6B shapes: the data behind sfllm.kernels.decode_attention.decode_tile_config."""
    num_heads, num_kv_heads, head_dim = MODEL_SHAPES["qwen3-0.6b"]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [(256, 1024), (64, 4096), (1, 4096)]
    print("| block_n | warps | stages | " + " | ".join(f"{b} x {s}" for b, s in shapes) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in shapes) + " |")
    caches = {shape: paged_cache(shape[0], shape[1], num_kv_heads, head_dim) for shape in shapes}
    for block_n, warps, stages in itertools.product((64, 128), (4, 8), (2, 3, 4)):
        cells = []
        for (batch, seq_len), (k_cache, v_cache, block_tables, seq_lens) in caches.items():
            q = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=DTYPE)
            out = torch.empty_like(q)
            splits = choose_num_kv_splits(batch, num_kv_heads, seq_len, num_sms)
            workspace = DecodeWorkspace.allocate(batch, num_heads, splits, head_dim, "cuda")
            with _decode_tile((block_n, warps, stages)):
                us = _graph_microseconds(lambda: decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                                                  head_dim**-0.5, out, splits, workspace))
            cells.append(f"{2 * batch * seq_len * num_kv_heads * head_dim * DTYPE.itemsize / us / 1e3:.0f}")
        print(f"| {block_n} | {warps} | {stages} | " + " | ".join(cells) + " |", flush=True)


@functools.lru_cache(maxsize=1)
def _standard_workload_lengths() -> tuple[np.ndarray, np.ndarray]:
    """(input lengths, output lengths) of `sfllm bench offline`'s default workload, drawn as it draws them."""
    specs = RandomTokenWorkload(LengthRange(100, 1024), LengthRange(100, 1024), vocab_size=2, seed=0).take(256)
    return np.array([s.input_len for s in specs]), np.array([s.output_len for s in specs])


def _standard_prefill_steps(num_steps: int, budget: int = 8192) -> list[tuple[np.ndarray, np.ndarray]]:
    """(query lengths, sequence lengths) of the standard offline workload's first steps: its prompts in order,
    chunked at the step's token budget (a chunk that continues a prompt attends to the part before it too)."""
    prompts = _standard_workload_lengths()[0].tolist()
    steps, index, done = [], 0, 0
    for _ in range(num_steps):
        query_lens, seq_lens, left = [], [], budget
        while left > 0 and index < len(prompts):
            chunk = min(prompts[index] - done, left)
            query_lens.append(chunk)
            seq_lens.append(done + chunk)
            left -= chunk
            index, done = (index + 1, 0) if done + chunk == prompts[index] else (index, done + chunk)
        steps.append((np.asarray(query_lens), np.asarray(seq_lens)))
    return steps


def sweep_extend() -> None:
    """Extend attention's TFLOP/s (causal, graph replays) over the standard workload's first prefill steps, for
    each tile shape and pipeline depth, with the query tiles in the order the step lists them and with the
    tiles that attend to the most keys first: the data behind extend_tile_config on this card."""
    extend_module = sys.modules["sfllm.kernels.extend_attention"]
    from sfllm.kernels.tile_config import TileConfig
    num_heads, num_kv_heads, head_dim = MODEL_SHAPES["qwen3-0.6b"]
    chosen = extend_module.extend_tile_config
    # the workload's first steps, then single prompts of 2k and 8k tokens (where the order changes nothing)
    steps = _standard_prefill_steps(3) + [(np.array([n]), np.array([n])) for n in (2048, 8192)]
    print("| block_m | block_n | warps | stages | " + " | ".join(
        [f"step {i}, listed / most keys first" for i in range(len(steps) - 2)] + ["2k prompt", "8k prompt"])
        + " |  (TFLOP/s)")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in steps) + " |")
    inputs = []
    for query_lens, seq_lens in steps:
        blocks_per_seq = -(-int(seq_lens.max()) // BLOCK_SIZE)
        num_blocks = len(seq_lens) * blocks_per_seq
        shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
        k_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
        v_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
        block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(len(seq_lens), blocks_per_seq)
        query_start_loc = torch.from_numpy(np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)).cuda()
        q = torch.randn(int(query_lens.sum()), num_heads, head_dim, device="cuda", dtype=DTYPE)
        prefix = seq_lens - query_lens
        flops = 4 * head_dim * num_heads * float(np.sum(query_lens * prefix + query_lens * (query_lens + 1) / 2))
        inputs.append((query_lens, prefix, k_cache, v_cache, block_tables, query_start_loc,
                       torch.from_numpy(seq_lens.astype(np.int32)).cuda(), q, flops))
    tiles_tried = list(itertools.product((64, 128), (64, 128), (4, 8), (2, 3)))
    for block_m, block_n, warps, stages in [(None, None, None, None)] + tiles_tried:
        if block_m is None:
            config = chosen(head_dim, DTYPE, torch.device("cuda"))
        else:
            config = TileConfig(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
        extend_module.extend_tile_config = lambda *args, config=config: config
        cells = []
        for query_lens, prefix, k_cache, v_cache, block_tables, query_start_loc, seq_lens, q, flops in inputs:
            listed = extend_tiles(query_lens, config.block_m)
            orders = ((listed, extend_tiles(query_lens, config.block_m, prefix_lens=prefix)) if len(query_lens) > 1
                      else (listed,))
            out = torch.empty_like(q)
            timed = []
            for tiles in orders:
                tiles = torch.from_numpy(np.ascontiguousarray(tiles)).cuda()
                us = _graph_microseconds(lambda t=tiles: extend_attention(
                    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, t, head_dim**-0.5, out))
                timed.append(f"{flops / us / 1e6:.0f}")
            cells.append(" / ".join(timed))
        default = " (default)" if block_m is None else ""
        name = f"{config.block_m}{default} | {config.block_n} | {config.num_warps} | {config.num_stages}"
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    extend_module.extend_tile_config = chosen


PREFILL_GATE_UP_TILES = [(64, 32, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
                         (128, 128, 64, 8, 4), (128, 128, 128, 8, 2)]


def bench_prefill_gate_up() -> None:
    """Microseconds (graph replays) of a small model's gate/up projection with its activation at a prefill's rows:
    cuBLAS then silu_and_mul, against sfllm.kernels.tma_gate_up_silu at tma_tile's choice and other tiles; the
    error of each is its largest difference from cuBLAS's, relative to that output's largest value."""
    from sfllm.kernels import silu_and_mul, tma_gate_up_silu
    from sfllm.kernels.tma_matmul import tma_tile
    for model, (intermediate, hidden) in {"qwen3-0.6b": (3072, 1024), "smollm2": (1536, 576)}.items():
        weight = torch.randn(2 * intermediate, hidden, device="cuda", dtype=DTYPE) / hidden**0.5
        print(f"\n{model} ({2 * intermediate} x {hidden}): microseconds (relative error)\n")
        print("| rows | cuBLAS + silu_and_mul | tma_tile's | tile | " + " | ".join(map(str, PREFILL_GATE_UP_TILES))
              + " | tma_tile's / cuBLAS |")
        print("|---|---|---|---|" + "---|" * len(PREFILL_GATE_UP_TILES) + "---|")
        for rows in (288, 384, 512, 768, 1024, 2048, 4096, 8192):
            x = torch.randn(rows, hidden, device="cuda", dtype=DTYPE)
            cublas = _graph_microseconds(lambda: silu_and_mul(torch.nn.functional.linear(x, weight)))
            expected = silu_and_mul(torch.nn.functional.linear(x, weight)).float()

            def timed(tile) -> tuple[float, str]:
                us = _graph_microseconds(lambda: tma_gate_up_silu(x, weight, tile=tile))
                if us == float("inf"):
                    return us, "fails"
                error = (tma_gate_up_silu(x, weight, tile=tile).float() - expected).abs().max() / expected.abs().max()
                return us, f"{us:.1f} ({error.item():.0e})"

            chosen_us, chosen = timed(None)
            cells = [timed(tile)[1] for tile in PREFILL_GATE_UP_TILES]
            print(f"| {rows} | {cublas:.1f} | {chosen} | {tma_tile(rows, intermediate, True)} | "
                  + " | ".join(cells) + f" | {chosen_us / cublas:.3f} |", flush=True)


SKINNY_TILES = list(itertools.product((16, 32, 64), (128, 256, 512), (4,), (2, 3, 4)))


def _microseconds_over_weights(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """Graph-replayed microseconds of fn(x, w), averaged over weights read in turn (together more than L2)."""
    def run() -> None:
        for w in weights:
            fn(x, w)
    return _graph_microseconds(run) / len(weights)


def sweep_skinny_matmul() -> None:
    """Microseconds per call of F.linear (cuBLAS) and of sfllm.kernels.skinny_matmul (its current tile, and the best
    of a sweep for one row), at the linear layers of Qwen3-0.6B and -8B."""
    import torch.nn.functional as F

    from sfllm.kernels import skinny_matmul
    shapes = {"0.6b qkv": (4096, 1024), "0.6b o": (1024, 2048), "0.6b gate_up": (6144, 1024),
              "0.6b down": (1024, 3072), "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (24576, 4096),
              "8b down": (4096, 12288)}
    tiles = SKINNY_TILES
    print("| layer | weight MB | cuBLAS 1 row | skinny 1 row | best tile, 1 row | best us | best GB/s "
          "| cuBLAS 16 rows | skinny 16 rows | best tile, 16 rows |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (n, k) in shapes.items():
        weights = [torch.randn(n, k, device="cuda", dtype=DTYPE) for _ in range(4)]  # rotated: more than L2
        timed = functools.partial(_microseconds_over_weights, weights=weights)

        cells = []
        for rows in (1, 16):
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            expected = F.linear(x, weights[0]).float()
            assert (skinny_matmul(x, weights[0]).float() - expected).norm() / expected.norm() < 1e-2
            best = min((timed(lambda a, w, t=t: skinny_matmul(a, w, tile=t), x), t) for t in tiles)
            cells += [f"{timed(F.linear, x):.1f}", f"{timed(skinny_matmul, x):.1f}", f"{best[1]}"]
            if rows == 1:
                cells += [f"{best[0]:.1f}", f"{n * k * 2 / best[0] / 1e3:.0f}"]
        print(f"| {name} | {n * k * 2 / 1e6:.1f} | " + " | ".join(cells) + " |", flush=True)
        del weights


# (N, K) of a decoder layer's four GEMMs (x [rows, K] @ W^T, W [N, K]), fused as the engine runs them
LAYER_GEMMS = {"0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)},
               "8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}}


def _rotated_weights(shapes: dict[str, tuple[int, int]]) -> dict[str, list[torch.Tensor]]:
    """Four copies of each GEMM's weight, read in turn by _microseconds_over_weights (together past L2)."""
    return {name: [torch.randn(n, k, device="cuda", dtype=DTYPE) for _ in range(4)] for name, (n, k) in shapes.items()}


def sweep_gemm_backends() -> None:
    """Microseconds per graph-replayed F.linear at the decode batches of the standard workload (a layer's four
    GEMMs of Qwen3-0.6B and -8B, four copies of each weight read in turn: past an H200's 50 MB L2 for the 8B, not
    all of it for the 0.6B, whose times are therefore a floor), with torch's cuBLAS and its cuBLASLt backend."""
    import torch.nn.functional as F
    print("| model | rows | GEMM | cuBLAS us | cuBLASLt us | cuBLAS TFLOP/s | cuBLASLt TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, shapes in LAYER_GEMMS.items():
        weights = _rotated_weights(shapes)
        for rows in (16, 32, 64, 128, 200, 256):
            totals = [0.0, 0.0]
            for name, (n, k) in shapes.items():
                x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
                times = []
                for backend in ("cublas", "cublaslt"):
                    torch.backends.cuda.preferred_blas_library(backend)
                    times.append(_microseconds_over_weights(F.linear, x, weights[name]))
                torch.backends.cuda.preferred_blas_library("cublas")
                totals = [t + u for t, u in zip(totals, times)]
                flops = 2 * rows * n * k
                print(f"| {model} | {rows} | {name} | {times[0]:.1f} | {times[1]:.1f} | {flops / times[0] / 1e6:.0f} "
                      f"| {flops / times[1] / 1e6:.0f} |", flush=True)
            print(f"| {model} | {rows} | **layer** | **{totals[0]:.1f}** | **{totals[1]:.1f}** | | |", flush=True)
        del weights


def sweep_gate_up_silu() -> None:
    """Microseconds per graph-replayed call of a gate/up projection then its activation (skinny_matmul and
    silu_and_mul, two launches) against skinny_gate_up_silu (one), at 1 and 8 rows, its default tile and the best
    of a sweep; then the LM head's GEMM, cuBLAS against skinny_matmul."""
    from sfllm.kernels import silu_and_mul, skinny_gate_up_silu, skinny_matmul
    shapes = {"0.6b gate_up": (6144, 1024), "8b gate_up": (24576, 4096)}
    tiles = SKINNY_TILES
    print("| layer | rows | projection + activation | fused, default tile | fused, best tile | best us |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (n, k) in shapes.items():
        weights = [torch.randn(n, k, device="cuda", dtype=DTYPE) for _ in range(4)]  # rotated: more than L2
        timed = functools.partial(_microseconds_over_weights, weights=weights)
        for rows in (1, 8):
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            best = min((timed(lambda a, w, t=t: skinny_gate_up_silu(a, w, tile=t), x), t) for t in tiles)
            print(f"| {name} | {rows} | {timed(lambda a, w: silu_and_mul(skinny_matmul(a, w)), x):.1f} | "
                  f"{timed(skinny_gate_up_silu, x):.1f} | {best[1]} | {best[0]:.1f} |", flush=True)
        del weights
    print("\n| LM head | rows | cuBLAS | skinny_matmul, default tile | best tile | best us |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (n, k) in {"0.6b lm_head": (151936, 1024), "8b lm_head": (151936, 4096)}.items():
        weight = torch.randn(n, k, device="cuda", dtype=DTYPE)  # more than L2 alone
        for rows in (1, 8):
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            best = min((_graph_microseconds(lambda t=t: skinny_matmul(x, weight, tile=t)), t) for t in tiles)
            print(f"| {name} | {rows} | {_graph_microseconds(lambda: torch.matmul(x, weight.t())):.1f} | "
                  f"{_graph_microseconds(lambda: skinny_matmul(x, weight)):.1f} | {best[1]} | {best[0]:.1f} |",
                  flush=True)
        del weight


def _standard_workload_contexts(step: int) -> np.ndarray:
    """Context lengths of the sequences decoding at `step` of the standard offline workload (256 requests, input
    and output lengths uniform in [100, 1024]), in request order, as if every request decoded from step 0."""
    inputs, outputs = _standard_workload_lengths()
    return (inputs + step)[outputs > step]


def _load_base_decode_attention():
    """$BASE_DECODE_KERNEL (another tree's kernels/decode_attention.py) as a module, or None."""
    path = os.environ.get("BASE_DECODE_KERNEL")
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("base_decode_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ragged_caches(block_size: int = BLOCK_SIZE, heads_inside: bool = False) -> tuple[torch.Tensor, ...]:
    """(k_cache, v_cache, block_tables): 2,048 tokens for each sequence of the standard workload's largest decode
    batch, its blocks in random order; with `heads_inside` the cache is [blocks, kv_heads, block_size, head_dim]
    (HND), seen through the engine's [blocks, block_size, kv_heads, head_dim] (NHD) view."""
    _, num_kv_heads, head_dim = MODEL_SHAPES["qwen3-0.6b"]
    largest = _standard_workload_contexts(0).size
    blocks_per_seq = 2048 // block_size
    num_blocks = largest * blocks_per_seq
    if heads_inside:
        shape, view = (num_blocks, num_kv_heads, block_size, head_dim), lambda t: t.transpose(1, 2)
    else:
        shape, view = (num_blocks, block_size, num_kv_heads, head_dim), lambda t: t
    k_cache = view(torch.randn(shape, device="cuda", dtype=DTYPE))
    v_cache = view(torch.randn(shape, device="cuda", dtype=DTYPE))
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(largest, blocks_per_seq)
    return k_cache, v_cache, tables


def _ragged_step(step: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(contexts, seq_lens, the longest-first order, q, out) of the standard workload's decode batch at `step`."""
    num_heads, _, head_dim = MODEL_SHAPES["qwen3-0.6b"]
    contexts = _standard_workload_contexts(step)
    seq_lens = torch.from_numpy(contexts.astype(np.int32)).cuda()
    order = torch.from_numpy(np.argsort(-contexts, kind="stable").astype(np.int32)).cuda()
    q = torch.randn(contexts.size, num_heads, head_dim, device="cuda", dtype=DTYPE)
    return contexts, seq_lens, order, q, torch.empty_like(q)


def _kv_read_gb_s(contexts: np.ndarray, us: float) -> float:
    _, num_kv_heads, head_dim = MODEL_SHAPES["qwen3-0.6b"]
    return 2 * int(contexts.sum()) * num_kv_heads * head_dim * DTYPE.itemsize / us / 1e3


def _workload_attention_s(steps: list[int], seconds: list[float]) -> float:
    """Decode attention over the whole standard workload: 28 layers, every step interpolated from `steps`."""
    return 28 * np.interp(np.arange(1024), steps, seconds).sum()


# the split rule's programs an SM that `ragged` also times (the engine's: PROGRAMS_PER_SM)
RULE_PROGRAMS_PER_SM = (5, 6, 8)


def bench_ragged_decode() -> None:
    """Decode attention over the batches of the standard offline workload, whose sequences differ in length:
    KV read GB/s (graph replays) at steps of the workload, for the split count the engine chooses, for fixed
    ones and for the rule at other programs an SM, with the sequences in request order and longest first; then
    the attention time of the whole workload (28 layers, every step, interpolated), the figure that moves its
    fraction of roofline."""
    num_heads, num_kv_heads, head_dim = MODEL_SHAPES["qwen3-0.6b"]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    max_context = 40960  # the model's, which sizes the engine's split choice
    base = _load_base_decode_attention()
    # every 128th step, and the tail's, where batches shrink past the split rule's thresholds, every 32nd
    steps = list(range(0, 640, 128)) + list(range(640, 1024, 32)) + [1008]
    k_cache, v_cache, tables = _ragged_caches()
    variants = ["base", "base, longest first", "chosen"] if base is not None else ["chosen"]
    variants += ["chosen, longest first", "1 split, longest first", "2 splits, longest first",
                 "4 splits, longest first", "8 splits, longest first"]
    variants += [f"{n} programs an SM, longest first" for n in RULE_PROGRAMS_PER_SM]
    print("| step | batch | mean context | chosen splits | " + " | ".join(variants) + " |  (GB/s of KV read)")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in variants) + " |")
    seconds = {v: [] for v in variants}
    for step in steps:
        contexts, seq_lens, order, q, out = _ragged_step(step)
        batch = contexts.size
        block_tables = tables[:batch]
        chosen = choose_num_kv_splits(batch, num_kv_heads, max_context, num_sms)
        workspace = DecodeWorkspace.allocate(batch, num_heads, MAX_KV_SPLITS, head_dim, "cuda")
        runs = {
            "chosen": lambda: decode_attention(q, k_cache, v_cache, block_tables, seq_lens, head_dim**-0.5, out,
                                               chosen, workspace),
            "chosen, longest first": lambda: decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                                              head_dim**-0.5, out, chosen, workspace,
                                                              batch_order=order),
        }
        counts = {f"{n} split{'s' if n > 1 else ''}, longest first": n for n in (1, 2, 4, 8)}
        counts |= {f"{n} programs an SM, longest first":
                   choose_num_kv_splits(batch, num_kv_heads, max_context, num_sms, programs_per_sm=n)
                   for n in RULE_PROGRAMS_PER_SM}
        for name, splits in counts.items():
            runs[name] = (lambda s=splits: decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                                            head_dim**-0.5, out, s, workspace, batch_order=order))
        if base is not None:
            base_workspace = base.DecodeWorkspace.allocate(batch, num_heads, 4 * chosen, head_dim, "cuda")
            runs["base"] = lambda: base.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, head_dim**-0.5,
                                                         out, chosen, base_workspace)
            runs["base, longest first"] = lambda: base.decode_attention(
                q, k_cache, v_cache, block_tables, seq_lens, head_dim**-0.5, out, chosen, base_workspace,
                batch_order=order)
        cells = []
        runs["chosen"]()
        expected = out.float().clone()
        for name in variants:
            runs[name]()  # outside the timing, whose failures read as "inf": an error here is the bench's
            # the order changes no number; another split count only the rounding of the merge
            assert (out.float() - expected).abs().max().item() < 2e-2, f"{name} at step {step} differs"
            us = _graph_microseconds(runs[name])
            seconds[name].append(us * 1e-6)
            cells.append(f"{_kv_read_gb_s(contexts, us):.0f}")
        print(f"| {step} | {batch} | {contexts.mean():.0f} | {chosen} | " + " | ".join(cells) + " |", flush=True)
    print("\nattention of the whole workload (28 layers, each step interpolated from the table):")
    for name in variants:
        print(f"  {name}: {_workload_attention_s(steps, seconds[name]):.3f} s")


def sweep_ragged_layouts() -> None:
    """Decode attention over the standard workload's batches (as `ragged`, longest first, the engine's split
    choice) for two KV cache layouts, block sizes and tiles: per layer the cache is [blocks, block_size, kv_heads,
    head_dim] (NHD, the engine's) or [blocks, kv_heads, block_size, head_dim] (HND: a head's tokens of a block
    contiguous), the kernel reading either through the same strides. Prints KV read GB/s per step and the whole
    workload's attention time (28 layers, interpolated), the figure that moves its fraction of roofline."""
    num_heads, num_kv_heads, head_dim = MODEL_SHAPES["qwen3-0.6b"]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    steps = [0, 128, 256, 512, 768, 896]
    tiles = [None, (64, 4, 2), (64, 4, 4), (32, 4, 4), (128, 4, 2), (128, 8, 2), (32, 2, 3)]
    variants = [("NHD", 16, t) for t in tiles] + [("HND", 16, t) for t in tiles]
    variants += [(layout, size, None) for layout in ("NHD", "HND") for size in (32, 64)]
    print("| layout | block size | tile (block_n, warps, stages) | " + " | ".join(f"step {s}" for s in steps)
          + " | workload attention (s) |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in steps) + " | --- |")
    caches = {}
    for layout, block_size, tile in variants:
        if (layout, block_size) not in caches:
            caches.clear()
            torch.cuda.empty_cache()
            caches[(layout, block_size)] = _ragged_caches(block_size, heads_inside=layout == "HND")
        k_cache, v_cache, tables = caches[(layout, block_size)]
        seconds, cells = [], []
        for step in steps:
            contexts, seq_lens, order, q, out = _ragged_step(step)
            batch = contexts.size
            splits = choose_num_kv_splits(batch, num_kv_heads, 40960, num_sms)
            workspace = DecodeWorkspace.allocate(batch, num_heads, splits, head_dim, "cuda")
            with _decode_tile(tile):
                us = _graph_microseconds(lambda: decode_attention(q, k_cache, v_cache, tables[:batch], seq_lens,
                                                                  head_dim**-0.5, out, splits, workspace,
                                                                  batch_order=order))
            seconds.append(us * 1e-6)
            cells.append(f"{_kv_read_gb_s(contexts, us):.0f}")
        print(f"| {layout} | {block_size} | {tile or 'chosen'} | " + " | ".join(cells)
              + f" | {_workload_attention_s(steps, seconds):.3f} |", flush=True)


def sweep_ragged_tiles() -> None:
    """Decode attention over the standard workload's batches (longest first) for each tile and split count:
    KV read GB/s per step, the best per step, and the workload's attention time (28 layers, interpolated) for
    each fixed choice and for the best per step: the data behind decode_tile_config's choice by batch."""
    num_heads, num_kv_heads, head_dim = MODEL_SHAPES["qwen3-0.6b"]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    steps = list(range(0, 1024, 64)) + [992, 1008]
    k_cache, v_cache, tables = _ragged_caches()
    tiles = [None, (64, 4, 2), (128, 4, 2), (128, 4, 3), (64, 4, 3), (128, 8, 2)]
    variants = [(tile, factor) for factor in (1, 2) for tile in tiles]
    seconds = {v: [] for v in variants}
    print("| step | batch | mean context | chosen splits | " + " | ".join(
        f"{t or 'chosen'} x{f}" for t, f in variants) + " |  (GB/s of KV read; xF: F times the chosen splits)")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in variants) + " |")
    for step in steps:
        contexts, seq_lens, order, q, out = _ragged_step(step)
        batch = contexts.size
        chosen = choose_num_kv_splits(batch, num_kv_heads, 40960, num_sms)
        workspace = DecodeWorkspace.allocate(batch, num_heads, 2 * chosen, head_dim, "cuda")
        cells = []
        for tile, factor in variants:
            with _decode_tile(tile):
                us = _graph_microseconds(lambda: decode_attention(q, k_cache, v_cache, tables[:batch], seq_lens,
                                                                  head_dim**-0.5, out, factor * chosen, workspace,
                                                                  batch_order=order))
            seconds[(tile, factor)].append(us * 1e-6)
            cells.append(f"{_kv_read_gb_s(contexts, us):.0f}")
        print(f"| {step} | {batch} | {contexts.mean():.0f} | {chosen} | " + " | ".join(cells) + " |", flush=True)
    print("\nattention of the whole workload (28 layers, each step interpolated from the table):")
    for (tile, factor), timed in seconds.items():
        print(f"  {tile or 'chosen'} x{factor}: {_workload_attention_s(steps, timed):.3f} s")
    best = np.min(np.array(list(seconds.values())), axis=0)
    print(f"  the best per step: {_workload_attention_s(steps, best):.3f} s")


class _TakingTurns:
    """An attention backend whose kernels wait for the other half's attention of the layer before (A) or of the
    same layer (B): the two halves' attention kernels run one after another, each half's other work beside them."""

    def __init__(self, inner, done: list, wait_for: list | None, offset: int) -> None:
        self.inner, self.done, self.wait_for, self.offset = inner, done, wait_for, offset

    def kv_cache_to_fill(self, layer: int):
        return self.inner.kv_cache_to_fill(layer)

    def forward(self, layer: int, q, k, v, meta):
        waited = layer - self.offset
        if self.wait_for is not None and waited >= 0:
            torch.cuda.current_stream().wait_event(self.wait_for[waited])
        out = self.inner.forward(layer, q, k, v, meta)
        self.done[layer].record()
        return out


@contextlib.contextmanager
def _gemms_unsplit() -> Iterator[None]:
    """Inside: the skinny GEMMs do not split K, whose tile counters serve one stream at a time (the halves run on
    two)."""
    skinny = sys.modules["sfllm.kernels.skinny_matmul"]  # `sfllm.kernels.skinny_matmul` is the function
    split_count = skinny.split_count
    skinny.split_count = lambda *args: 1
    try:
        yield
    finally:
        skinny.split_count = split_count


def bench_two_halves() -> None:
    """A decode step's layers (the real model, dummy weights) at batches of the standard offline workload, in one
    CUDA graph, microseconds per step: the whole batch on one stream; two halves one after another on one
    stream; two halves on two streams, free and with their attention kernels taking turns (so that one half's
    GEMMs and norms run beside the other's attention). The question: how much of a step's non-attention time
    two halves can hide behind attention."""
    from sfllm.model_source import resolve_model
    from sfllm.worker.weight_loader import load_model
    device = torch.device("cuda")
    print("| model | step | batch | mean context | one stream | halves, one stream | halves, two streams "
          "| halves, taking turns | turns vs one stream |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in ("qwen3-0.6b", "qwen3-8b"):
        source = resolve_model(name, "dummy")
        config = source.config
        model = load_model(source, DTYPE, device, 4096)
        for step in (128, 384, 640):
            contexts = _standard_workload_contexts(step)
            batch = contexts.size
            decode = DecodeStep.build(model, config, contexts, DTYPE)
            backend = decode.backend
            part = decode.rows
            whole = part(0, batch)
            halves = [part(0, batch // 2), part(batch // 2, batch)]
            side = torch.cuda.Stream()
            done = [[torch.cuda.Event() for _ in range(config.num_layers)] for _ in range(2)]
            turns = [_TakingTurns(backend, done[0], done[1], 1), _TakingTurns(backend, done[1], done[0], 0)]

            def one_stream():
                return model(whole[0], whole[1], backend, whole[2])

            def in_halves(two_streams: bool, backends):
                main = torch.cuda.current_stream()  # the capturing stream under a graph
                streams = [main, side if two_streams else main]
                side.wait_stream(main)
                xs, residuals = [None, None], [None, None]
                for h, (ids_h, _, _) in enumerate(halves):
                    with torch.cuda.stream(streams[h]):
                        xs[h] = model.embed_tokens(ids_h)
                for layer in model.layers:
                    for h, (_, positions, meta) in enumerate(halves):
                        with torch.cuda.stream(streams[h]):
                            xs[h], residuals[h] = layer(xs[h], residuals[h], positions, model.rope, backends[h], meta)
                outs = []
                for h in range(2):
                    with torch.cuda.stream(streams[h]):
                        outs.append(model.norm(xs[h], residuals[h])[0])
                main.wait_stream(side)
                return torch.cat(outs)

            runs = {"one stream": one_stream,
                    "halves, one stream": lambda: in_halves(False, [backend, backend]),
                    "halves, two streams": lambda: in_halves(True, [backend, backend]),
                    "halves, taking turns": lambda: in_halves(True, turns)}
            with torch.inference_mode(), _gemms_unsplit():
                expected = one_stream().float()
                cells = []
                for label, run in runs.items():
                    got = run().float()
                    torch.cuda.synchronize()
                    error = ((got - expected).norm() / expected.norm()).item()
                    assert error < 5e-2, f"{label} differs from one stream: relative error {error:.3g}"
                    try:
                        cells.append(triton.testing.do_bench_cudagraph(run) * 1e3)
                    except Exception as error:  # a capture that fails is this bench's finding: say which
                        print(f"{name} step {step} {label}: {type(error).__name__}: {error}", flush=True)
                        cells.append(float("inf"))
            print(f"| {name} | {step} | {batch} | {contexts.mean():.0f} | " + " | ".join(f"{c:.0f}" for c in cells)
                  + f" | {cells[3] / cells[0]:.3f} |", flush=True)
            del decode, backend, turns, runs  # the events' backends and the runs hold the cache too
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


def _weights_after_the_wait(function):
    """`function` (a skinny GEMM) told that its weight is not constant, whatever its caller says."""
    return lambda *args, **keywords: function(*args, **{**keywords, "constant_weight": False})


def bench_dependent_launch() -> None:
    """A decode step's layers (the real model, dummy weights) in one CUDA graph, microseconds per replay, with this
    package's kernels launched after the kernel before them has finished, launched early but reading nothing
    before it has (the skinny GEMMs' weights included), and launched early (programmatic dependent launch,
    sfllm.kernels.dependent_launch): batch 1 and 8 at a context of 640 (a 512-token prompt, 128 tokens out), then
    the standard offline workload's batches. The launches' outputs must be equal to the bit."""
    import sfllm.kernels
    from sfllm.kernels import dependent_launch
    skinny = {name: getattr(sfllm.kernels, name) for name in ("skinny_matmul", "skinny_gate_up_silu")}
    from sfllm.model_source import resolve_model
    from sfllm.worker.weight_loader import load_model
    device = torch.device("cuda")
    if not dependent_launch.launches_early(device):
        print("this GPU has no programmatic dependent launch (compute capability 9 or later)")
        return
    print("| model | batch | mean context | launched after | early, weights after the wait | launched early "
          "| early / after |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    cases = [("batch 1", np.array([640])), ("batch 8", np.full(8, 640))]
    cases += [(f"step {step}", _standard_workload_contexts(step)) for step in (128, 384, 640)]
    for name in ("qwen3-0.6b", "qwen3-8b"):
        source = resolve_model(name, "dummy")
        model = load_model(source, DTYPE, device, 4096)
        for _, contexts in cases:
            decode = DecodeStep.build(model, source.config, contexts, DTYPE)
            inputs = decode.rows(0, contexts.size)
            times, outputs = [], []
            try:
                with torch.inference_mode():
                    for early, weights_early in ((False, False), (True, False), (True, True)):
                        dependent_launch.ENABLED = early
                        for function_name, function in skinny.items():  # layer_ops imports them at each call
                            setattr(sfllm.kernels, function_name,
                                    function if weights_early else _weights_after_the_wait(function))
                        outputs.append(decode.run(*inputs).clone())
                        times.append(triton.testing.do_bench_cudagraph(lambda: decode.run(*inputs)) * 1e3)
            finally:
                dependent_launch.ENABLED = True
                for function_name, function in skinny.items():
                    setattr(sfllm.kernels, function_name, function)
            assert all(torch.equal(outputs[0], out) for out in outputs), \
                f"{name} batch {contexts.size}: the launches' outputs differ"
            print(f"| {name} | {contexts.size} | {contexts.mean():.0f} | {times[0]:.0f} | {times[1]:.0f} | "
                  f"{times[2]:.0f} | {times[2] / times[0]:.3f} |", flush=True)
            del decode, inputs
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    _skinny_rows_launched_early()


def _kernel_up_to(rows: int):
    """A stand-in for layer_ops._by_kernel: every linear layer of up to `rows` rows in the skinny kernel."""
    from sfllm.worker import layer_ops
    return lambda x, weight, most_rows: layer_ops._use_kernels(x) and x.shape[0] <= rows


def _skinny_rows_launched_early() -> None:
    """Launched early, the skinny GEMMs beat cuBLAS past 8 rows (at 16 rows they were even launched after,
    `sweep`), the reason layer_ops.SKINNY_ROWS is 16: a decode step's layers at 12 and 16 sequences with the layers'
    GEMMs by cuBLAS and by the skinny kernels (to 8 and to 16 rows), microseconds per graph replay."""
    from sfllm.model_source import resolve_model
    from sfllm.worker import layer_ops
    from sfllm.worker.weight_loader import load_model
    print("\n| model | batch | cuBLAS GEMMs | skinny GEMMs | skinny / cuBLAS |")
    print("| --- | --- | --- | --- | --- |")
    chosen = layer_ops._by_kernel
    for name in ("qwen3-0.6b", "qwen3-8b"):
        source = resolve_model(name, "dummy")
        model = load_model(source, DTYPE, torch.device("cuda"), 4096)
        for batch in (12, 16):
            decode = DecodeStep.build(model, source.config, np.full(batch, 640), DTYPE)
            inputs = decode.rows(0, batch)
            times, outputs = [], []
            try:
                with torch.inference_mode():
                    for rows in (8, 16):
                        layer_ops._by_kernel = _kernel_up_to(rows)
                        outputs.append(decode.layer_outputs(*inputs))
                        times.append(triton.testing.do_bench_cudagraph(lambda: decode.run(*inputs)) * 1e3)
            finally:
                layer_ops._by_kernel = chosen
            error = ((outputs[1] - outputs[0]).norm() / outputs[0].norm()).item()
            assert error < 5e-2, f"{name} batch {batch}: the skinny GEMMs' step differs by {error:.3g}"
            print(f"| {name} | {batch} | {times[0]:.0f} | {times[1]:.0f} | {times[1] / times[0]:.3f} |", flush=True)
            del decode, inputs
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


def bench_bandwidth() -> None:
    """The card's memory bandwidth two ways, GB/s over 4 GiB (far past L2): a copy (bytes read + written, the
    roofline's figure) and reads alone (a row sum, whose output is 1/4096 of its input): whether a kernel that
    only reads, like decode attention, has room above the copy figure."""
    x = torch.randn(2**31 // DTYPE.itemsize * 2, device="cuda", dtype=DTYPE)  # 4 GiB
    y = torch.empty_like(x)
    rows = x.view(-1, 4096)
    out = torch.empty(rows.shape[0], device="cuda", dtype=torch.float32)
    nbytes = x.numel() * x.element_size()
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=500)
    read_ms = triton.testing.do_bench(lambda: torch.sum(rows, dim=1, dtype=torch.float32, out=out), warmup=50, rep=500)
    print("| measure | GB/s |")
    print("| --- | --- |")
    print(f"| copy (read + write) | {2 * nbytes / copy_ms / 1e6:.0f} |")
    print(f"| read (row sums) | {nbytes / read_ms / 1e6:.0f} |")


def bench_by_batch() -> None:
    """Qwen3-0.6B's fixed costs by decode batch, every size the decode graphs capture from 16 to 256: a layer's four
    cuBLAS GEMMs (graph replays, four copies of each weight read in turn), and a whole decode step (the layers, the
    LM head and greedy sampling) at a context of 64 tokens, where attention is a small part. Then whether running a
    batch at the fastest larger size would pay: the mean over the sizes as they are and at the best size >= each."""
    import torch.nn.functional as F

    from sfllm.kernels import sample_tokens
    from sfllm.model_source import resolve_model
    from sfllm.worker.cuda_graph_runner import decode_batch_sizes
    from sfllm.worker.weight_loader import load_model
    sizes = [b for b in decode_batch_sizes(256) if b >= 16]
    shapes = LAYER_GEMMS["0.6b"]
    weights = _rotated_weights(shapes)
    gemms = {}
    print("| rows | layer's GEMMs (us) | " + " | ".join(shapes) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in shapes) + " |")
    for rows in sizes:
        each = [_microseconds_over_weights(F.linear, torch.randn(rows, k, device="cuda", dtype=DTYPE), weights[name])
                for name, (_, k) in shapes.items()]
        gemms[rows] = sum(each)
        print(f"| {rows} | {gemms[rows]:.1f} | " + " | ".join(f"{us:.1f}" for us in each) + " |", flush=True)
    del weights
    source = resolve_model("qwen3-0.6b", "dummy")
    model = load_model(source, DTYPE, torch.device("cuda"), 4096)
    vocab = source.config.vocab_size
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    steps = {}
    print("\n| batch | decode step at a context of 64 (us) |")
    print("| --- | --- |")
    with torch.inference_mode():
        for batch in sizes:
            decode = DecodeStep.build(model, source.config, np.full(batch, 64), DTYPE)
            inputs = decode.rows(0, batch)
            logits = torch.empty(batch, model.shard.padded_vocab_size, device="cuda", dtype=DTYPE)
            tokens = torch.empty(batch, dtype=torch.int64, device="cuda")

            def step() -> None:
                sample_tokens(model.compute_logits(decode.run(*inputs), logits)[:, :vocab], None, seed, tokens)
            steps[batch] = _graph_microseconds(step)
            print(f"| {batch} | {steps[batch]:.0f} |", flush=True)
            del decode, inputs
    for name, times in (("a layer's GEMMs", gemms), ("a decode step", steps)):
        best = [min(times[s] for s in sizes if s >= b) for b in sizes]
        print(f"{name}, mean over the sizes: {np.mean([times[b] for b in sizes]):.1f} us as they are, "
              f"{np.mean(best):.1f} us at the fastest size >= each")

def sweep_sample_programs() -> None:
    """Greedy sampling over Qwen3's vocabulary (bf16 logits in rows padded as the decode graphs' are), microseconds
    per graph replay by sfllm.kernels.sample_tokens with TARGET_PROGRAMS (programs for the whole batch) at several
    values: the data behind its choice. The last column is the logits' read time at 4.2 TB/s."""
    module = sys.modules["sfllm.kernels.sample_tokens"]  # `sfllm.kernels.sample_tokens` is the function
    vocab, targets, chosen = 151936, (128, 512, 1024, 2048, 4096), module.TARGET_PROGRAMS
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    print("| rows | " + " | ".join(f"{t} programs" for t in targets) + " | bytes at 4.2 TB/s |")
    print("| --- | " + " | ".join("---" for _ in targets) + " | --- |")
    try:
        for rows in (16, 32, 64, 128, 200, 256):
            logits = torch.randn(rows, vocab + 64, device="cuda", dtype=DTYPE)[:, :vocab]
            out = torch.empty(rows, dtype=torch.int64, device="cuda")
            cells = []
            for target in targets:
                module.TARGET_PROGRAMS = target
                module.sample_tokens(logits, None, seed, out)
                assert torch.equal(out, logits.float().argmax(-1)), f"{target} programs at {rows} rows"
                cells.append(f"{_graph_microseconds(lambda: module.sample_tokens(logits, None, seed, out)):.1f}")
            print(f"| {rows} | " + " | ".join(cells) + f" | {rows * vocab * DTYPE.itemsize / 4.2e6:.1f} |", flush=True)
    finally:
        module.TARGET_PROGRAMS = chosen


def sweep_top_k_select() -> None:
    """The top 256 of Qwen3's vocabulary a row (the sampler's bounded rows): torch.topk against
    sfllm.kernels.top_k_select at several TARGET_PROGRAMS and BLOCKs, microseconds per graph replay (GPU time), and
    eagerly per call as the sampler launches them (host and GPU; synchronised). Each result is checked against a
    stable sort: the same ids in the same order."""
    module = sys.modules["sfllm.kernels.top_k_select"]
    vocab, k, chosen = 151936, 256, (module.TARGET_PROGRAMS, module.BLOCK)
    settings = [(512, 2048), (2048, 1024), (2048, 2048), (2048, 4096), (4096, 2048), (8192, 1024)]
    print("| logits | rows | torch.topk | " + " | ".join(f"{t} programs, block {b}" for t, b in settings)
          + " | eager: topk / top_k_select (chosen) |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in settings) + " | --- |")

    def eager_microseconds(run) -> float:
        run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / 50

    try:
        for dtype in (torch.bfloat16, torch.float32):
            for rows in (1, 8, 64, 256):
                logits = (torch.randn(rows, vocab + 64, device="cuda") * 4).to(dtype)[:, :vocab]
                expected = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :k]
                cells = [f"{_graph_microseconds(lambda: torch.topk(logits, k)):.1f}"]
                for target, block in settings:
                    module.TARGET_PROGRAMS, module.BLOCK = target, block
                    ids = module.top_k_select(logits, k)[1]
                    assert torch.equal(ids, expected), f"{target} programs, block {block}, {rows} rows"
                    cells.append(f"{_graph_microseconds(lambda: module.top_k_select(logits, k)):.1f}")
                module.TARGET_PROGRAMS, module.BLOCK = chosen
                eager = (f"{eager_microseconds(lambda: torch.topk(logits, k)):.1f} / "
                         f"{eager_microseconds(lambda: module.top_k_select(logits, k)):.1f}")
                print(f"| {str(dtype)[6:]} | {rows} | " + " | ".join(cells) + f" | {eager} |", flush=True)
    finally:
        module.TARGET_PROGRAMS, module.BLOCK = chosen



def time_top_k_select_kernels() -> None:
    """Where top_k_select's time goes: each of its kernels replayed alone in a CUDA graph (microseconds), bf16 logits
    of Qwen3's vocabulary in rows padded as the decode graphs' are, at the default programs and block."""
    module = sys.modules["sfllm.kernels.top_k_select"]
    vocab, k, inf_bits = 151936, 256, 0x7F80
    print("| rows | zero + first histogram | second histogram | count | gather | sort | top_k_select |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rows in (1, 8, 64, 256):
        logits = (torch.randn(rows, vocab + 64, device="cuda") * 4).to(DTYPE)[:, :vocab]
        blocks = triton.cdiv(vocab, module.BLOCK)
        num_chunks = max(1, min(blocks, module.TARGET_PROGRAMS // rows))
        chunk_size = triton.cdiv(blocks, num_chunks) * module.BLOCK
        num_chunks = triton.cdiv(vocab, chunk_size)
        hist = torch.zeros(2, rows, 256, dtype=torch.int32, device="cuda")
        above, ties = (torch.empty(rows, num_chunks, dtype=torch.int32, device="cuda") for _ in range(2))
        selected = torch.empty(rows, k, dtype=torch.int64, device="cuda")
        values = torch.empty(rows, k, dtype=torch.float32, device="cuda")
        ids = torch.empty(rows, k, dtype=torch.int64, device="cuda")
        grid, common = (rows, num_chunks), dict(KEY_BITS=16, INF_BITS=inf_bits, BLOCK=module.BLOCK,
                                                num_warps=module.NUM_WARPS)

        def histogram(digit: int) -> None:
            if digit == 0:
                hist.zero_()
            module._digit_histogram_kernel[grid](logits, logits.stride(0), hist, rows, vocab, chunk_size, k,
                                                 module.FEW_KEYS, DIGIT=digit, **common)

        def count() -> None:
            module._count_kernel[grid](logits, logits.stride(0), hist, above, ties, rows, vocab, chunk_size,
                                       num_chunks, k, **common)

        def gather() -> None:
            module._gather_kernel[grid](logits, logits.stride(0), hist, above, ties, selected, rows, vocab,
                                        chunk_size, num_chunks, k, BLOCK_CHUNKS=triton.next_power_of_2(blocks),
                                        **common)

        def sort() -> None:
            module._sort_kernel[(rows,)](logits, logits.stride(0), selected, values, ids, k, BLOCK_K=k, num_warps=4)

        stages = [lambda: histogram(0), lambda: histogram(1), count, gather, sort]
        for stage in stages:  # once in order, so that each replay below reads what the one before it wrote
            stage()
        assert torch.equal(ids, module.top_k_select(logits, k)[1])
        cells = [f"{_graph_microseconds(stage):.1f}" for stage in stages]
        cells.append(f"{_graph_microseconds(lambda: module.top_k_select(logits, k)):.1f}")
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


@triton.jit
def _tiled_matmul_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_out,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = x @ w^T, one BLOCK_M x BLOCK_N tile per program (a plain tiled GEMM, for the gemm_triton sweep)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    depth = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + (start + depth)[None, :], mask=rows[:, None] < M,
                    other=0.0)
        b = tl.load(w_ptr + columns[:, None].to(tl.int64) * stride_w + (start + depth)[None, :],
                    mask=columns[:, None] < N, other=0.0)
        acc += tl.dot(a, tl.trans(b))
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + columns[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (columns[None, :] < N))


TILED_MATMUL_CONFIGS = list(itertools.product((32, 64, 128), (64, 128), (64, 128), ((4, 3), (4, 4), (8, 3))))


def _tiled_matmul(x: torch.Tensor, w: torch.Tensor, config, out: torch.Tensor) -> torch.Tensor:
    block_m, block_n, block_k, (warps, stages) = config
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _tiled_matmul_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


def sweep_gemm_triton() -> None:
    """Whether a plain Triton GEMM, its tile swept per shape, beats cuBLAS on a layer's four GEMMs at the decode
    batches of the standard workload: microseconds per graph-replayed call (four copies of each weight read in
    turn), cuBLAS against the best tile of TILED_MATMUL_CONFIGS."""
    import torch.nn.functional as F
    print("| model | rows | GEMM | cuBLAS us | best Triton us | best tile (M, N, K, (warps, stages)) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, shapes in LAYER_GEMMS.items():
        weights = _rotated_weights(shapes)
        for rows in (64, 128, 200, 256) if model == "0.6b" else (128, 256):
            totals = [0.0, 0.0]
            for name, (n, k) in shapes.items():
                x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
                out = torch.empty(rows, n, device="cuda", dtype=DTYPE)
                expected = F.linear(x, weights[name][0]).float()
                cublas = _microseconds_over_weights(F.linear, x, weights[name])
                best = (float("inf"), None)
                for config in TILED_MATMUL_CONFIGS:
                    try:
                        got = _tiled_matmul(x, weights[name][0], config, out).float()
                    except Exception:  # a tile over the shared memory
                        continue
                    if (got - expected).norm() / expected.norm() > 1e-2:
                        raise AssertionError(f"tile {config} computes another product at {name}, {rows} rows")
                    us = _microseconds_over_weights(lambda a, w, c=config: _tiled_matmul(a, w, c, out), x,
                                                    weights[name])
                    best = min(best, (us, config), key=lambda t: t[0])
                totals = [totals[0] + cublas, totals[1] + best[0]]
                print(f"| {model} | {rows} | {name} | {cublas:.1f} | {best[0]:.1f} | {best[1]} |", flush=True)
            print(f"| {model} | {rows} | **layer** | **{totals[0]:.1f}** | **{totals[1]:.1f}** | |", flush=True)
        del weights


BATCH_TILES = list(itertools.product((64, 128), (32, 64, 128), (64, 128), ((4, 3), (4, 4), (8, 3))))
BATCH_TILES_8B = list(itertools.product((64, 128), (64, 128), (64,), ((4, 3), (8, 3))))


def _batch_gemm(name: str, tile):
    """The engine's function for a layer's GEMM `name` by the batch kernel at `tile` (None: cuBLAS, and for gate_up
    the activation's own kernel after it)."""
    import torch.nn.functional as F

    from sfllm.kernels import silu_and_mul, skinny_gate_up_silu, skinny_matmul
    if name == "gate_up":
        if tile is None:
            return lambda x, w: silu_and_mul(F.linear(x, w))
        return lambda x, w: skinny_gate_up_silu(x, w, tile=tile, constant_weight=True)
    if tile is None:
        return F.linear
    return lambda x, w: skinny_matmul(x, w, tile=tile, constant_weight=True)


def sweep_batch_matmul() -> None:
    """The skinny kernel past 16 rows, launched early with its weight's first tile read before the wait, against
    cuBLAS at a layer's four GEMMs (gate_up with its activation: cuBLAS then silu_and_mul, or skinny_gate_up_silu):
    microseconds per graph-replayed call, four copies of each weight read in turn, the best of BATCH_TILES (block_m,
    block_n, block_k, (warps, stages)): the data behind sfllm.kernels.skinny_matmul.BATCH_TILE."""
    print("| model | rows | GEMM | cuBLAS us | batch kernel, best tile us | best tile | relative error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, shapes in LAYER_GEMMS.items():
        weights = _rotated_weights(shapes)
        tiles = BATCH_TILES if model == "0.6b" else BATCH_TILES_8B
        for rows in (32, 64, 128, 192, 256) if model == "0.6b" else (64, 128, 256):
            totals = [0.0, 0.0]
            for name, (n, k) in shapes.items():
                x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
                expected = _batch_gemm(name, None)(x, weights[name][0]).float()
                cublas = _graph_microseconds(lambda: [_batch_gemm(name, None)(x, w) for w in weights[name]], 5) / 4
                best = (float("inf"), None)
                for block_m, block_n, block_k, (warps, stages) in tiles:
                    tile = (block_m, block_n // 2 if name == "gate_up" else block_n, block_k, warps, stages)
                    if tile[1] < 16:
                        continue
                    fn = _batch_gemm(name, tile)
                    us = _graph_microseconds(lambda: [fn(x, w) for w in weights[name]], 5) / 4
                    best = min(best, (us, tile), key=lambda t: t[0])
                got = _batch_gemm(name, best[1])(x, weights[name][0]).float()
                error = ((got - expected).norm() / expected.norm()).item()
                assert error < 2e-2, f"{model} {name} at {rows} rows, tile {best[1]}: relative error {error:.3g}"
                totals = [totals[0] + cublas, totals[1] + best[0]]
                print(f"| {model} | {rows} | {name} | {cublas:.1f} | {best[0]:.1f} | {best[1]} | {error:.1e} |",
                      flush=True)
            print(f"| {model} | {rows} | **layer** | **{totals[0]:.1f}** | **{totals[1]:.1f}** | | |", flush=True)
        del weights
        torch.cuda.empty_cache()


def _step_under_setups(model, config, contexts: np.ndarray, setups: list, restore) -> tuple[list[float], float]:
    """A decode step's layers at `contexts` in one CUDA graph, microseconds per replay after each of `setups` (calls
    that choose the kernels; `restore` after the last), and the largest relative difference of the setups' layer
    outputs (each attention's and MLP's, before the residual add) from the first's."""
    decode = DecodeStep.build(model, config, contexts, DTYPE)
    inputs = decode.rows(0, contexts.size)
    times, outputs = [], []
    try:
        with torch.inference_mode():
            for setup in setups:
                setup()
                outputs.append(decode.layer_outputs(*inputs))
                times.append(_graph_microseconds(lambda: decode.run(*inputs)))
    finally:
        restore()
    error = max(((out - outputs[0]).norm() / outputs[0].norm()).item() for out in outputs)
    del decode, inputs
    torch.cuda.empty_cache()
    return times, error


def bench_batch_steps() -> None:
    """A decode step's layers (the real model, dummy weights) in one CUDA graph, microseconds per replay, with the
    layers' GEMMs past 16 rows by cuBLAS, and by the skinny kernel's row tiles (BATCH_TILE) as layer_ops chooses
    them (to 64 rows, small weights), at every weight to 128 rows, and as layer_ops chooses but for qkv and gate_up
    only: at contexts of 64 and 640 and at the standard workload's late steps (Qwen3-0.6B), and at a context of 640
    (Qwen3-1.7B, -8B). The first column is the engine's choice before the row tiles."""
    from sfllm.model_source import resolve_model
    from sfllm.worker import layer_ops
    from sfllm.worker.weight_loader import load_model
    chosen = layer_ops._by_kernel
    variants = {"cuBLAS past 16 rows": _kernel_up_to(layer_ops.SKINNY_ROWS), "the engine's": chosen,
                "kernel to 128 rows": _kernel_up_to(128),
                "qkv, gate_up to 64": lambda x, weight, most: chosen(x, weight, most) and (
                    x.shape[0] <= layer_ops.SKINNY_ROWS or weight.shape[0] > weight.shape[1])}
    print("| model | batch | mean context | " + " | ".join(variants) + " | engine's / cuBLAS | relative error |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in variants) + " | --- | --- |")
    for name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-8b"):
        source = resolve_model(name, "dummy")
        model = load_model(source, DTYPE, torch.device("cuda"), 4096)
        if name == "qwen3-0.6b":
            cases = [np.full(b, 64) for b in (24, 48, 64, 96, 128)] + [np.full(b, 640) for b in (32, 48, 64)]
            cases += [_standard_workload_contexts(step) for step in (640, 704, 768, 832, 896, 960)]
        else:  # layers the engine leaves to cuBLAS (their gate/up weights are past BATCH_WEIGHT_ELEMENTS)
            cases = [np.full(b, 640) for b in (24, 48, 64)]
        setups = [functools.partial(setattr, layer_ops, "_by_kernel", by_kernel) for by_kernel in variants.values()]
        for contexts in cases:
            times, error = _step_under_setups(model, source.config, contexts, setups,
                                              functools.partial(setattr, layer_ops, "_by_kernel", chosen))
            assert error < 5e-2, f"{name} batch {contexts.size}: the steps differ by {error:.3g}"
            print(f"| {name} | {contexts.size} | {contexts.mean():.0f} | " + " | ".join(f"{t:.0f}" for t in times)
                  + f" | {times[1] / times[0]:.3f} | {error:.1e} |", flush=True)
        del model
        torch.cuda.empty_cache()



SPLIT_ROWS = (1, 8, 16, 32, 64, 96, 128, 192, 256)
SPLIT_TILES = {"rows": [(16, 512, 4, 3), (32, 256, 4, 4), (64, 128, 4, 4)],  # (BLOCK_N, BLOCK_K, ...) to 16 rows
               "tiles": [(64, 16, 128, 4, 4), (64, 32, 128, 4, 4), (64, 32, 64, 4, 4), (64, 64, 64, 4, 3)]}
SPLITS = (1, 2, 3, 4, 6, 8)
UNSPLIT_NARROW_TILE = (16, 512, 4, 3)  # skinny_tile's for at most 2,048 columns before K was split


def _split_gemm(name: str, tile, split: int | None):
    """The engine's function for a layer's GEMM `name` by the skinny kernel at `tile` in `split` splits of K (None:
    the kernel's choices), launched early with its weight's first tile read before the wait."""
    from sfllm.kernels import skinny_gate_up_silu, skinny_matmul
    kernel = skinny_gate_up_silu if name == "gate_up" else skinny_matmul
    return lambda x, w: kernel(x, w, tile=tile, constant_weight=True, split_k=split)


def sweep_split_gemm() -> dict:
    """A Qwen3-0.6B layer's four GEMMs (gate/up with its activation) by cuBLAS and by the skinny kernel: at its tile
    unsplit, as it chooses (tile and split_count), and the best of its tiles (SPLIT_TILES, BLOCK_N counting one
    half's columns for gate/up) and splits of K (SPLITS); microseconds per graph-replayed call over four copies of
    each weight read in turn. Returns the best (us, tile, split) by (GEMM, rows), and cuBLAS's us."""
    shapes = LAYER_GEMMS["0.6b"]
    weights = _rotated_weights(shapes)
    found = {}
    print("| rows | GEMM | cuBLAS | kernel unsplit | kernel as it chooses | best | best tile, split | relative error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rows in SPLIT_ROWS:
        totals = [0.0, 0.0, 0.0, 0.0]
        for name, (n, k) in shapes.items():
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            timed = [_graph_microseconds(lambda: [fn(x, w) for w in weights[name]], 5) / 4 for fn in
                     (_batch_gemm(name, None), _split_gemm(name, None, 1), _split_gemm(name, None, None))]
            best = (timed[2], None, None)
            for tile in SPLIT_TILES["rows" if rows <= 16 else "tiles"]:
                if name == "gate_up":
                    tile = tile[:-4] + (max(16, tile[-4] // 2),) + tile[-3:]
                for split in SPLITS:
                    fn = _split_gemm(name, tile, split)
                    us = _graph_microseconds(lambda: [fn(x, w) for w in weights[name]], 5) / 4
                    if us < best[0]:
                        best = (us, tile, split)
            expected = _batch_gemm(name, None)(x, weights[name][0]).float()
            error = max(((_split_gemm(name, *config)(x, weights[name][0]).float() - expected).norm()
                         / expected.norm()).item() for config in ((None, None), best[1:]))
            assert error < 2e-2, f"{name} at {rows} rows, {best[1:]}: relative error {error:.3g}"
            found[name, rows] = best
            found["cublas", name, rows] = timed[0]
            totals = [total + us for total, us in zip(totals, timed + [best[0]])]
            print(f"| {rows} | {name} | " + " | ".join(f"{us:.1f}" for us in timed + [best[0]])
                  + f" | {best[1]}, {best[2]} | {error:.1e} |", flush=True)
        print(f"| {rows} | **layer** | " + " | ".join(f"**{us:.1f}**" for us in totals) + " | | |", flush=True)
    del weights
    torch.cuda.empty_cache()
    return found


def _unsplit(function):
    """`function` (a skinny GEMM) as it ran before K was split: one program per output tile, and a narrow weight's
    tile at up to 16 rows the one of more programs (UNSPLIT_NARROW_TILE)."""
    from sfllm.kernels.skinny_matmul import SKINNY_ROWS

    def call(x, weight, bias=None, constant_weight=False):
        narrow = x.shape[0] <= SKINNY_ROWS and weight.shape[0] <= 1024
        return function(x, weight, bias, tile=UNSPLIT_NARROW_TILE if narrow else None,
                        constant_weight=constant_weight, split_k=1)
    return call


def bench_split_steps(sweep: bool = True) -> None:
    """A Qwen3-0.6B decode step's layers (dummy weights, one CUDA graph, microseconds per replay) with the skinny
    GEMMs unsplit (as before), as the engine runs them, and (`sweep`) with `sweep_split_gemm`'s best tile and split
    for each GEMM where the engine runs the kernel, then also past the engine's rows wherever it beat cuBLAS alone.
    At a context of 640 and at the standard workload's steps."""
    import sfllm.kernels
    from sfllm.model_source import resolve_model
    from sfllm.worker import layer_ops
    from sfllm.worker.weight_loader import load_model
    found = sweep_split_gemm() if sweep else {}
    names = {shape: name for name, shape in LAYER_GEMMS["0.6b"].items()}

    def best_for(weight: torch.Tensor, rows: int):
        name = names[tuple(weight.shape)]
        swept = next((r for r in SPLIT_ROWS if r >= rows), SPLIT_ROWS[-1])
        return name, swept, found[name, swept]
    kernels = {name: getattr(sfllm.kernels, name) for name in ("skinny_matmul", "skinny_gate_up_silu")}

    def tuned(function):
        def call(x, weight, bias=None, constant_weight=False):
            _, _, (_, tile, split) = best_for(weight, x.shape[0])
            return function(x, weight, bias, tile=tile, constant_weight=constant_weight, split_k=split)
        return call

    chosen = layer_ops._by_kernel

    def past_the_rows(x, weight, most_rows):
        if chosen(x, weight, most_rows):
            return True
        name, swept, (us, _, _) = best_for(weight, x.shape[0])
        return layer_ops._use_kernels(x) and us < found["cublas", name, swept]
    variants = {"unsplit (before)": (chosen, _unsplit), "the engine's": (chosen, None)}
    if sweep:
        variants |= {"best of the sweep": (chosen, tuned),
                     "and past its rows where faster alone": (past_the_rows, tuned)}
    source = resolve_model("qwen3-0.6b", "dummy")
    model = load_model(source, DTYPE, torch.device("cuda"), 4096)
    print("\n| batch | mean context | " + " | ".join(variants) + " | engine's / before | relative error |")
    print("| --- | --- | " + " | ".join("---" for _ in variants) + " | --- | --- |")
    cases = [np.full(b, 640) for b in (1, 4, 8, 16, 32, 48, 64)]
    cases += [_standard_workload_contexts(step) for step in (128, 384, 512, 640, 768, 832, 896, 960)]

    def setup(by_kernel, wrap) -> None:
        layer_ops._by_kernel = by_kernel
        for name, function in kernels.items():
            setattr(sfllm.kernels, name, wrap(function) if wrap else function)
    setups = [functools.partial(setup, *variant) for variant in variants.values()]
    for contexts in cases:
        times, error = _step_under_setups(model, source.config, contexts, setups,
                                          functools.partial(setup, chosen, None))
        assert error < 5e-2, f"batch {contexts.size}: the steps differ by {error:.3g}"
        print(f"| {contexts.size} | {contexts.mean():.0f} | " + " | ".join(f"{t:.0f}" for t in times)
              + f" | {times[1] / times[0]:.3f} | {error:.1e} |", flush=True)


TMA_ROWS_SWEPT = (96, 128, 192, 256)


def _tma_tiles(gated: bool) -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the `tma` sweep, BLOCK_N one half's when gated."""
    tiles = itertools.product((64, 128), (32, 64, 128) if gated else (64, 128), (64, 128), ((4, 3), (4, 4), (8, 3)))
    return [(m, n, k, w, s) for m, n, k, (w, s) in tiles if not (gated and m == n == k == 128)]


def sweep_tma_matmul() -> None:
    """sfllm.kernels.tma_matmul (and its gated form against cuBLAS then silu_and_mul) at a Qwen3-0.6B layer's GEMMs
    past the skinny kernel's rows: microseconds per graph-replayed call, four copies of each weight read in turn,
    cuBLAS, the engine's tile (tma_tile) and the best of _tma_tiles: the data behind tma_tile."""
    import torch.nn.functional as F

    from sfllm.kernels import silu_and_mul, tma_gate_up_silu, tma_matmul
    from sfllm.kernels.tma_matmul import tma_tile
    print("| rows | GEMM | cuBLAS us | TMA kernel, engine's tile us | best tile us | best tile | relative error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (n, k) in LAYER_GEMMS["0.6b"].items():
        gated = name == "gate_up"
        weights = [w / 32 for w in _rotated_weights({name: (n, k)})[name]]
        reference = (lambda x, w: silu_and_mul(F.linear(x, w))) if gated else F.linear
        kernel = tma_gate_up_silu if gated else tma_matmul
        for rows in TMA_ROWS_SWEPT:
            x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
            timed = [_graph_microseconds(lambda: [reference(x, w) for w in weights], 5) / 4]
            timed.append(_graph_microseconds(lambda: [kernel(x, w) for w in weights], 5) / 4)
            best = min((_graph_microseconds(lambda: [kernel(x, w, tile=t) for w in weights], 5) / 4, t)
                       for t in _tma_tiles(gated))
            expected = reference(x, weights[0]).float()
            error = ((kernel(x, weights[0]).float() - expected).norm() / expected.norm()).item()
            assert error < 2e-2, f"{name} at {rows} rows: relative error {error:.3g}"
            engine_tile = tma_tile(rows, n // (1 + gated), gated)
            print(f"| {rows} | {name} | {timed[0]:.1f} | {timed[1]:.1f} (tile {engine_tile}) | {best[0]:.1f} "
                  f"| {best[1]} | {error:.1e} |", flush=True)
        del weights


def bench_tma_steps() -> None:
    """A Qwen3-0.6B decode step's layers in one CUDA graph, microseconds per replay, with the qkv, o and gate/up
    projections past 64 rows by cuBLAS and by the TMA kernel (the engine's), twice each in turn: at contexts of 640
    and at the standard workload's steps."""
    from sfllm.model_source import resolve_model
    from sfllm.worker import layer_ops
    from sfllm.worker.weight_loader import load_model
    chosen = layer_ops._by_tma
    source = resolve_model("qwen3-0.6b", "dummy")
    model = load_model(source, DTYPE, torch.device("cuda"), 4096)

    def setup(by_tma) -> None:
        layer_ops._by_tma = by_tma
    setups = [functools.partial(setup, by_tma) for by_tma in (lambda *args: False, chosen) * 2]
    print("| batch | mean context | cuBLAS | TMA kernel | cuBLAS | TMA kernel | TMA / cuBLAS (best of each) | "
          "relative error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    cases = [np.full(b, 640) for b in (68, 80, 96, 128, 192, 256)]
    cases += [_standard_workload_contexts(step) for step in (0, 128, 384, 640, 704)]
    for contexts in cases:
        times, error = _step_under_setups(model, source.config, contexts, setups, functools.partial(setup, chosen))
        assert error < 5e-2, f"batch {contexts.size}: the steps differ by {error:.3g}"
        ratio = min(times[1], times[3]) / min(times[0], times[2])
        print(f"| {contexts.size} | {contexts.mean():.0f} | " + " | ".join(f"{t:.0f}" for t in times)
              + f" | {ratio:.3f} | {error:.1e} |", flush=True)


DOWN_TILES = ((64, 32, 128, 4, 4), (64, 16, 128, 4, 4))  # narrower than tma_tile's: more programs over N = 1,024


def bench_tma_down_steps() -> None:
    """A Qwen3-0.6B decode step's layers in one CUDA graph, microseconds per replay, the qkv, o and gate/up projections
    past 64 rows in the TMA kernel as the engine runs them and down_proj by cuBLAS (the engine's), by the TMA kernel
    at its tile (tma_tile), at each of DOWN_TILES, and o and down both at the first of them: three replays of each
    in turn, the best of each; at contexts of 640 and at the standard workload's steps. The data behind leaving
    down_proj to cuBLAS (docs/performance.md, twenty-third session)."""
    from sfllm.model_source import resolve_model
    from sfllm.worker import layer_ops
    from sfllm.worker.weight_loader import load_model
    tma_module = importlib.import_module("sfllm.kernels.tma_matmul")
    chosen, launch = layer_ops._by_tma, tma_module._launch
    source = resolve_model("qwen3-0.6b", "dummy")
    config = source.config
    down = (config.hidden_size, config.intermediate_size)
    model = load_model(source, DTYPE, torch.device("cuda"), 4096)

    def setup(down_by_tma: bool, tile=None, shapes=(down,)) -> None:
        # the engine leaves down_proj to cuBLAS (it asks with 0 rows): asked for it, the TMA rows are TMA_ROWS
        layer_ops._by_tma = lambda x, weight, rows: (
            down_by_tma and chosen(x, weight, layer_ops.TMA_ROWS) if tuple(weight.shape) == down
            else chosen(x, weight, rows))
        tma_module._launch = lambda x, weight, bias, given, gated: launch(
            x, weight, bias, given or (tile if tuple(weight.shape) in shapes else None), gated)

    def restore() -> None:
        layer_ops._by_tma, tma_module._launch = chosen, launch
    variants = {"down by cuBLAS": functools.partial(setup, False), "down by TMA": functools.partial(setup, True)}
    variants |= {f"down at {tile[1]}-column tiles": functools.partial(setup, True, tile) for tile in DOWN_TILES}
    o_shape = (config.hidden_size, config.num_heads * config.head_dim)
    variants[f"o and down at {DOWN_TILES[0][1]}"] = functools.partial(setup, True, DOWN_TILES[0], (down, o_shape))
    print("| batch | mean context | " + " | ".join(variants) + " | best / cuBLAS | relative error |")
    print("| --- | --- | " + " | ".join("---" for _ in variants) + " | --- | --- |")
    cases = [np.full(b, 640) for b in (96, 128, 192, 256)]
    cases += [_standard_workload_contexts(step) for step in (0, 128, 384, 640, 704)]
    for contexts in cases:
        times, error = _step_under_setups(model, config, contexts, list(variants.values()) * 3, restore)
        assert error < 5e-2, f"batch {contexts.size}: the steps differ by {error:.3g}"
        best = [min(times[i::len(variants)]) for i in range(len(variants))]
        print(f"| {contexts.size} | {contexts.mean():.0f} | " + " | ".join(f"{t:.0f}" for t in best)
              + f" | {min(best[1:]) / best[0]:.3f} | {error:.1e} |", flush=True)


# each mode's benches, run in turn and printed apart; no mode (or another word): decode and prefill
MODES = {"extend": [sweep_extend], "ragged": [bench_ragged_decode], "layouts": [sweep_ragged_layouts],
         "ragged_tiles": [sweep_ragged_tiles], "gemm": [sweep_gemm_backends],
         "halves": [bench_two_halves], "bandwidth": [bench_bandwidth], "pdl": [bench_dependent_launch],
         "gemm_triton": [sweep_gemm_triton], "sample": [sweep_sample_programs], "top_k": [sweep_top_k_select],
         "top_k_passes": [time_top_k_select_kernels],
         "batch": [bench_by_batch],
         "gate_up": [sweep_gate_up_silu], "batch_gemm": [sweep_batch_matmul],
         "batch_steps": [bench_batch_steps], "split": [bench_split_steps],
         "split_steps": [functools.partial(bench_split_steps, sweep=False)],
         "tma": [sweep_tma_matmul, bench_tma_steps], "tma_steps": [bench_tma_steps],
         "tma_down": [bench_tma_down_steps],
         "prefill_gate_up": [bench_prefill_gate_up],
         "sweep": [sweep_skinny_matmul, sweep_decode],
         "": [bench_decode, bench_prefill]}

if __name__ == "__main__":
    print(f"# {torch.cuda.get_device_name()}, {DTYPE}, block_size {BLOCK_SIZE}\n")
    for index, bench in enumerate(MODES.get(" ".join(sys.argv[1:]), MODES[""])):
        if index:
            print()
        bench()
