"""Captures whole model steps as CUDA graphs, one per step shape, and replays them.

Two families of shapes. Decode steps of B sequences of one new token each, at the performance guide's
batch sizes up to the decode limit. Mixed steps (prefill chunks, with or without decodes, and decode
batches past the decode limit) of up to T tokens and up to the running-request limit of sequences, at
token counts up to the step's token budget (MAX_GRAPH_TOKENS at most: past it the GPU's own time hides
an eager step's launches). Attention of mixed steps goes by a tile list of fixed capacity
(sfllm.kernels.extend_tiles), so no launch grid depends on the batch.

A graph runs from the staged inputs to the sampled tokens: it takes each placeholder input token from
`last_tokens`, reads KV slots and block tables from the worker's `BlockTables`, runs the model (a
tensor-parallel rank's all-reduces and logits gather captured with it) and the LM head on the sampled
rows (with speculative decoding, every draft position of a verifying sequence too: small sizes of (1 + K)
tokens per sequence are captured for verify steps), samples (argmax or temperature, by
`sfllm.kernels.sample_tokens`, whose noise seed is a device counter the graph advances: every rank draws the same
tokens), and writes the tokens back to `last_tokens`. A step then
costs the host one staging, one copy in, one replay and one copy out. Rows that need more than
temperature (top-k/p, penalties, logprobs, seeds) are redrawn by the eager sampler from the logits the
graph leaves behind.
"""
from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from sfllm.config import WorkerConfig, num_sequence_slots
from sfllm.messages import ForwardBatch
from sfllm.worker.attention.backend import AttentionBackend
from sfllm.worker.block_tables import BlockTables
from sfllm.worker.kv_splits import KVSplits
from sfllm.worker.model import CausalLM
from sfllm.worker.step_inputs import StepShape, StepStaging, device_metadata, stage_step

logger = logging.getLogger(__name__)

MAX_GRAPH_TOKENS = 8192
_EMPTY_BATCH = ForwardBatch(step_id=-1, slots=[], num_new_tokens=[], context_lens=[], input_token_ids=[], sample=[])


def decode_batch_sizes(max_batch_size: int) -> list[int]:
    """The performance guide's sizes, up to the maximum."""
    sizes = [1, 2, 3, 4, 6, 8, 10, 12, 14, 16] + list(range(20, 2048 + 1, 4))
    chosen = [s for s in sizes if s <= max_batch_size]
    return chosen or [1]


def mixed_token_sizes(max_tokens: int) -> list[int]:
    """Multiples of 64 up to 512, then eight sizes per doubling (a step pads by 12.5% at most), up to
    `max_tokens`, which is always one of them."""
    sizes = list(range(64, 512 + 1, 64))
    while sizes[-1] < max_tokens:
        # from 2^p up to 2^(p+1) in steps of 2^(p-3)
        sizes.append(sizes[-1] + (1 << (sizes[-1].bit_length() - 4)))
    return [s for s in sizes if s < max_tokens] + [max_tokens]


def mixed_shape(num_tokens: int, max_seqs: int, tile_rows: int, max_draft_rows: int = 0) -> StepShape:
    """`max_draft_rows`: sampled rows a step may have past one per sequence (speculative decoding's drafts);
    rows are tokens, so a shape never needs more than its tokens."""
    num_seqs = min(num_tokens, max_seqs)
    # every sequence of 2+ tokens rounds its tiles up once: tokens / rows, plus one per such sequence
    num_tiles = -(-num_tokens // tile_rows) + min(num_seqs, num_tokens // 2)
    return StepShape(num_tokens, num_seqs, num_tiles, decode_only=False,
                     num_extra_rows=min(num_tokens - num_seqs, max_draft_rows))


def speculative_graph_sizes(config: WorkerConfig) -> tuple[int, int]:
    """(draft tokens per sequence, sequences) a verify step may have: what the graphs make room for."""
    if config.speculative_method is None:
        return 0, 0
    return config.num_speculative_tokens, min(config.speculative_max_batch_size, num_sequence_slots(config))


def verify_token_sizes(num_speculative_tokens: int, max_batch_size: int, smallest_mixed: int) -> list[int]:
    """Token counts of small verify steps, (1 + K) per speculating sequence, below the smallest mixed size
    (a batch-1 verify step of 1 + K tokens would otherwise pad to 64)."""
    if num_speculative_tokens <= 0:
        return []
    row = 1 + num_speculative_tokens
    return [row * b for b in decode_batch_sizes(max_batch_size) if row * b < smallest_mixed]


class CudaGraphRunner:
    def __init__(self, model: CausalLM, backend: AttentionBackend, tables: BlockTables, last_tokens: torch.Tensor,
                 kv_splits: KVSplits, device: torch.device, max_decode_batch: int, max_mixed_tokens: int,
                 max_seqs: int, seed: int, num_speculative_tokens: int = 0, max_speculative_batch: int = 0) -> None:
        """`num_speculative_tokens` K > 0: mixed steps also verify drafts, of up to `max_speculative_batch`
        sequences of K each (their logits at every draft position come out of the graph)."""
        from sfllm.kernels import sample_tokens  # Triton: imported only where graphs are captured (CUDA)
        self._sample_tokens = sample_tokens
        self.model = model
        self.backend = backend
        self.tables = tables
        self.last_tokens = last_tokens
        self.kv_splits = kv_splits
        self.device = device
        self.tile_rows = backend.extend_tile_rows(model.embed_tokens.weight.dtype, device)
        self.decode_sizes = decode_batch_sizes(max_decode_batch)
        self.decode_shapes = {b: StepShape(b, b, 0, decode_only=True) for b in self.decode_sizes}
        mixed_sizes = mixed_token_sizes(min(max_mixed_tokens, MAX_GRAPH_TOKENS))
        verify_sizes = verify_token_sizes(num_speculative_tokens, max_speculative_batch, mixed_sizes[0])
        self.mixed_sizes = verify_sizes + mixed_sizes
        max_draft_rows = num_speculative_tokens * max_speculative_batch
        self.mixed_shapes = [mixed_shape(t, max_seqs, self.tile_rows, max_draft_rows) for t in self.mixed_sizes]
        shapes = self.shapes
        self.staging = StepStaging(device)
        self.inputs = torch.zeros(max(s.num_bytes for s in shapes), dtype=torch.uint8, device=device)
        self.tensors = {shape: shape.views(self.inputs) for shape in shapes}
        rows = max(s.num_logit_rows for s in shapes)
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        # in the model's dtype: the sampling kernel reads them so, and the eager sampler converts the rows it redraws;
        # as wide as the ranks' padded vocabulary, of which the model's is a view
        self.logits = torch.zeros(rows, model.shard.padded_vocab_size, dtype=model.embed_tokens.weight.dtype,
                                  device=device)
        # Philox key of the sampling noise: the engine's seed in the high bits, the step count in the low
        self.noise_seed = torch.tensor([(seed & 0x7FFFFFFF) << 32], dtype=torch.int64, device=device)
        self.graphs: dict[StepShape, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0

    @property
    def shapes(self) -> list[StepShape]:
        return list(self.decode_shapes.values()) + self.mixed_shapes

    @property
    def max_decode_batch(self) -> int:
        return self.decode_sizes[-1]

    def shape_for(self, batch: ForwardBatch) -> StepShape | None:
        """The smallest captured shape that holds the batch, or None (run it eagerly)."""
        num_seqs, num_tokens = len(batch.slots), len(batch.input_token_ids)
        if num_seqs == 0:
            return None
        if num_tokens == num_seqs and num_seqs <= self.max_decode_batch:
            return self.decode_shapes[self.decode_sizes[bisect.bisect_left(self.decode_sizes, num_seqs)]]
        index = bisect.bisect_left(self.mixed_sizes, num_tokens)
        if index == len(self.mixed_sizes) or num_seqs > self.mixed_shapes[index].num_seqs:
            return None
        shape = self.mixed_shapes[index]
        if batch.num_draft_tokens and sum(batch.sampled_rows()) > shape.num_logit_rows:
            return None
        return shape

    def stage(self, batch: ForwardBatch, shape: StepShape, slot_temperatures: np.ndarray) -> int:
        """Copies the step's inputs and padding into the graph's input buffer; returns the sampled rows."""
        host_buffer, host = self.staging.host(shape)
        num_sampled = stage_step(batch, shape, host, slot_temperatures, self.tables.padding_slot, self.tile_rows)
        self.staging.copy(host_buffer, self.inputs)
        return num_sampled

    def run_step(self, shape: StepShape) -> None:
        """The work a graph of `shape` captures, on the staged inputs (capture runs it once outside the
        graph to warm up)."""
        t = self.tensors[shape]
        input_ids, meta = device_metadata(t, shape, self.tables, self.last_tokens, self.kv_splits(shape.num_seqs))
        self.backend.prepare(meta)
        hidden = self.model(input_ids, t.positions, self.backend, meta)
        rows = shape.num_logit_rows
        logits = self.model.compute_logits(hidden.index_select(0, t.logits_indices), out=self.logits[:rows])
        tokens = self._sample_tokens(logits, t.temperatures, self.noise_seed, out=self.tokens[:rows])
        self.last_tokens.index_copy_(0, t.sample_slots, tokens)  # unsampled rows all write the padding slot
        self.noise_seed.add_(1)

    @torch.inference_mode()
    def capture(self) -> None:
        torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle()
        # the largest first, so that the smaller graphs reuse its pool memory
        shapes = sorted(self.shapes, key=lambda s: (s.num_tokens, s.num_seqs), reverse=True)
        for shape in tqdm(shapes, desc="capturing CUDA graphs", leave=False, disable=None):
            self.stage(_EMPTY_BATCH, shape, np.zeros(0, dtype=np.float32))
            self.run_step(shape)  # warm-up outside the graph (kernel compilation, workspaces)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.run_step(shape)
            self.graphs[shape] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        self.capture_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info("captured %d CUDA graphs in %.1f s using %.2f GiB: decode steps of 1..%d sequences, mixed "
                    "steps of %d..%d tokens", len(self.graphs), self.capture_seconds, self.capture_bytes / 1024**3,
                    self.max_decode_batch, self.mixed_sizes[0], self.mixed_sizes[-1])

    def replay(self, shape: StepShape, num_sampled: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the staged step; returns the sampled rows' tokens, logits (in the model's dtype) and slots:
        views of the graphs' buffers that the next step overwrites (use them before it, in stream order)."""
        self.graphs[shape].replay()
        return self.outputs(shape, num_sampled)

    def outputs(self, shape: StepShape, num_sampled: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `replay` returns, of the step of `shape` run last."""
        return (self.tokens[:num_sampled], self.logits[:num_sampled, :self.model.config.vocab_size],
                self.tensors[shape].sample_slots[:num_sampled])
