"""Captures the whole decode step as CUDA graphs, one per batch size, and replays them.

A graph runs from the staged inputs to the sampled tokens: it takes each placeholder input
token from `last_tokens`, runs the model and the LM head, samples (argmax or temperature, by
`kernels.sample_tokens`, whose noise seed is a device counter the graph advances), and writes the
tokens back to `last_tokens`. A step then costs the host one copy in, one replay and one copy out.
Rows that need more than temperature (top-k/p, penalties, logprobs, seeds) are sampled by the
eager sampler from the logits the graph leaves behind.

A batch is padded to the next captured size: padding rows have slot `padding_slot` (a spare row
of `last_tokens`), KV slot -1 (nothing stored) and sequence length 0 (attention output zero).
"""
from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from sfllm.messages import ForwardBatch
from sfllm.worker.attention.backend import AttentionBackend
from sfllm.worker.attention.metadata import AttentionMetadata
from sfllm.worker.decode_inputs import DecodeInputs
from sfllm.worker.model import CausalLM

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_batch_size: int) -> list[int]:
    """The performance guide's sizes, up to the configured maximum."""
    sizes = [1, 2, 3, 4, 6, 8, 10, 12, 14, 16] + list(range(20, 2048 + 1, 4))
    chosen = [s for s in sizes if s <= max_batch_size]
    return chosen or [1]


class DecodeGraphRunner:
    def __init__(self, model: CausalLM, backend: AttentionBackend, device: torch.device, max_batch_size: int,
                 max_context_length: int, block_size: int, kv_splits: Callable[[int], int | None],
                 last_tokens: torch.Tensor, padding_slot: int, seed: int) -> None:
        from kernels import sample_tokens  # Triton: imported only where graphs are captured (CUDA)
        self._sample_tokens = sample_tokens
        self.model = model
        self.backend = backend
        self.device = device
        self.batch_sizes = capture_batch_sizes(max_batch_size)
        self.max_batch_size = self.batch_sizes[-1]
        self.max_context_length = max_context_length
        self.kv_splits = kv_splits
        self.last_tokens = last_tokens
        n = self.max_batch_size
        self.inputs = DecodeInputs(n, math.ceil(max_context_length / block_size), block_size, padding_slot, device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.tokens = torch.zeros(n, dtype=torch.int64, device=device)
        # Philox key of the sampling noise: the engine's seed in the high bits, the step count in the low
        self.noise_seed = torch.tensor([(seed & 0x7FFFFFFF) << 32], dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0

    def _meta(self, batch_size: int) -> AttentionMetadata:
        views = self.inputs.device_views
        return AttentionMetadata(
            slot_mapping=views["slot_mapping"][:batch_size],
            query_start_loc=self.query_start_loc[:batch_size + 1],
            seq_lens=views["seq_lens"][:batch_size],
            block_tables=views["block_tables"][:batch_size],
            max_query_len=1,
            max_seq_len=self.max_context_length,
            query_lens_host=[1] * batch_size,
            seq_lens_host=[self.max_context_length] * batch_size,
            num_kv_splits=self.kv_splits(batch_size),
        )

    def _run_step(self, batch_size: int) -> torch.Tensor:
        views = self.inputs.device_views
        slots = views["slots"][:batch_size]
        staged_ids = views["input_ids"][:batch_size]
        input_ids = torch.where(staged_ids < 0, self.last_tokens[slots], staged_ids)
        meta = self._meta(batch_size)
        self.backend.prepare(meta)
        hidden = self.model(input_ids, views["positions"][:batch_size], self.backend, meta)
        logits = self.model.compute_logits(hidden)
        tokens = self._sample_tokens(logits, views["temperatures"][:batch_size], self.noise_seed,
                                     out=self.tokens[:batch_size])
        self.last_tokens.index_copy_(0, slots, tokens)  # padding rows all write the spare row
        self.noise_seed.add_(1)
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle()
        # capture the largest first so the smaller graphs reuse its pool memory
        for batch_size in tqdm(sorted(self.batch_sizes, reverse=True), desc="capturing CUDA graphs", leave=False):
            self._run_step(batch_size)  # warm-up outside the graph (kernel compilation, workspaces)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch_size] = self._run_step(batch_size)
            self.graphs[batch_size] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        self.capture_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info("captured %d CUDA graphs (batch sizes 1..%d) in %.1f s using %.2f GiB",
                    len(self.graphs), self.max_batch_size, self.capture_seconds, self.capture_bytes / 1024**3)

    def can_run(self, batch: ForwardBatch) -> bool:
        """A decode step that samples every sequence, within the captured sizes."""
        return (0 < len(batch.slots) <= self.max_batch_size and len(batch.input_token_ids) == len(batch.slots)
                and all(batch.sample))

    def padded_size(self, batch_size: int) -> int:
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch_size)]

    def stage(self, batch: ForwardBatch, temperatures: np.ndarray) -> None:
        """Copies the step's inputs (and its padding rows) into the graphs' input buffers."""
        self.inputs.stage(batch, temperatures, self.padded_size(len(batch.slots)))

    def replay(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the staged step; returns its tokens and logits, each [batch_size], views of the graph's
        buffers that the next replay overwrites (read them before it, in stream order)."""
        padded = self.padded_size(batch_size)
        self.graphs[padded].replay()
        return self.tokens[:batch_size], self.logits[padded][:batch_size]
