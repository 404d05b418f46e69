"""Captures the decode step as CUDA graphs, one per batch size, and replays them.

A batch is padded to the next captured size: padding rows have slot -1 (their K/V is not
stored) and sequence length 0 (their attention output is zero and ignored).
"""
from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from sfllm.worker.attention.backend import AttentionBackend
from sfllm.worker.attention.metadata import AttentionMetadata
from sfllm.worker.model import CausalLM
from sfllm.worker.step_inputs import StepInputs

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_batch_size: int) -> list[int]:
    """The performance guide's sizes, up to the configured maximum."""
    sizes = [1, 2, 3, 4, 6, 8, 10, 12, 14, 16] + list(range(20, 2048 + 1, 4))
    chosen = [s for s in sizes if s <= max_batch_size]
    return chosen or [1]


class DecodeGraphRunner:
    def __init__(self, model: CausalLM, backend: AttentionBackend, device: torch.device, max_batch_size: int,
                 max_context_length: int, block_size: int, kv_splits: Callable[[int], int | None]) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.batch_sizes = capture_batch_sizes(max_batch_size)
        self.max_batch_size = self.batch_sizes[-1]
        self.max_context_length = max_context_length
        self.kv_splits = kv_splits
        n = self.max_batch_size
        max_blocks = math.ceil(max_context_length / block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0

    def _meta(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[:batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            max_query_len=1,
            max_seq_len=self.max_context_length,
            query_lens_host=[1] * batch_size,
            seq_lens_host=[self.max_context_length] * batch_size,
            num_kv_splits=self.kv_splits(batch_size),
        )

    def _run_model(self, batch_size: int) -> torch.Tensor:
        meta = self._meta(batch_size)
        self.backend.prepare(meta)
        return self.model(self.input_ids[:batch_size], self.positions[:batch_size], self.backend, meta)

    @torch.inference_mode()
    def capture(self) -> None:
        torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle()
        # capture the largest first so the smaller graphs reuse its pool memory
        for batch_size in tqdm(sorted(self.batch_sizes, reverse=True), desc="capturing CUDA graphs", leave=False):
            self._run_model(batch_size)  # warm-up outside the graph (kernel compilation, workspaces)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch_size] = self._run_model(batch_size)
            self.graphs[batch_size] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        self.capture_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info("captured %d CUDA graphs (batch sizes 1..%d) in %.1f s using %.2f GiB",
                    len(self.graphs), self.max_batch_size, self.capture_seconds, self.capture_bytes / 1024**3)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.is_decode and meta.batch_size <= self.max_batch_size

    def padded_size(self, batch_size: int) -> int:
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch_size)]

    def run(self, inputs: StepInputs) -> torch.Tensor:
        meta = inputs.meta
        n = meta.batch_size
        padded = self.padded_size(n)
        self.input_ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if padded > n:
            self.slot_mapping[n:padded].fill_(-1)
            self.seq_lens[n:padded].fill_(0)
        self.graphs[padded].replay()
        return self.outputs[padded][:n]
