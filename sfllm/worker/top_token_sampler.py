"""Top-k rows of a captured step, drawn by a second captured graph instead of the eager sampler.

A request with a top_k of at most TOP_K_BOUND (what a model's generation_config.json recommends: Qwen3's 20,
transformers' 50), with top-p, min-p or a seed besides, draws among its likeliest tokens. The step's graph
samples every row by temperature; right after it, a graph of this module, captured per count of rows, takes
the step's logits, draws each such row again as the eager sampler would (`draw_among_top_tokens`: the same
tokens for a seeded row) and writes its token over the graph's. Without it those rows went to the eager
sampler every step: a dozen launches and a few host-to-device copies of the rows' settings, on the host's
critical path at small batches. Rows that need more (penalties, logprobs, grammars...) still do.

Each slot's settings live in host arrays, written when a request takes the slot; a step stages its rows'
into a pinned buffer and copies them in one transfer, in stream order with the step's own inputs.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, fields

import numpy as np
import torch

from sfllm.sampling_params import SamplingParams
from sfllm.worker.pinned_staging import PinnedStaging
from sfllm.worker.sampler import TOP_K_BOUND, draw_among_top_tokens, top_tokens_only

# An unseeded row's noise is keyed by the step's noise counter and its row: the row in bits the counter's
# engine seed shares (bits 32-62), well below bit 63, so that every key stays a non-negative int64
_ROW_KEY_SHIFT = 40


@dataclass
class TopTokenRows:
    """One staged step's rows, as numpy views of the pinned buffer or tensors on the device."""
    slots: torch.Tensor         # [R] int64: where each row's token goes in `last_tokens` (padding rows: the spare)
    positions: torch.Tensor     # [R] int64: the position of the token drawn (what a seed's noise hashes)
    seeds: torch.Tensor         # [R] int64, -1: unseeded
    top_ks: torch.Tensor        # [R] int64
    temperatures: torch.Tensor  # [R] float32
    top_ps: torch.Tensor        # [R] float32
    min_ps: torch.Tensor        # [R] float32
    drawn: torch.Tensor         # [R] bool: the rows this sampler draws (others keep the step graph's token)


_DTYPES = (torch.int64, torch.int64, torch.int64, torch.int64, torch.float32, torch.float32, torch.float32,
           torch.bool)
assert len(_DTYPES) == len(fields(TopTokenRows))


def _views(buffer: torch.Tensor, max_rows: int, rows: int) -> TopTokenRows:
    """The first `rows` of each field of a uint8 buffer laid out for `max_rows` (each field 16-byte aligned)."""
    views, offset = [], 0
    for dtype in _DTYPES:
        views.append(buffer[offset:offset + rows * dtype.itemsize].view(dtype))
        offset += -(-max_rows * dtype.itemsize // 16) * 16
    return TopTokenRows(*views)


def _num_bytes(max_rows: int) -> int:
    return sum(-(-max_rows * dtype.itemsize // 16) * 16 for dtype in _DTYPES)


class SlotTopK:
    """Each sequence slot's top-k settings on the host (one spare slot for padding rows)."""

    def __init__(self, num_slots: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.drawn = np.zeros(num_slots, dtype=bool)
        self.top_k = np.full(num_slots, TOP_K_BOUND, dtype=np.int64)
        self.top_p = np.ones(num_slots, dtype=np.float32)
        self.min_p = np.zeros(num_slots, dtype=np.float32)
        self.seed = np.full(num_slots, -1, dtype=np.int64)
        self.num_drawn = 0  # slots of `drawn`: while none, a step stages nothing

    def set(self, slot: int, params: SamplingParams) -> None:
        drawn = top_tokens_only(params, self.vocab_size)
        self.num_drawn += int(drawn) - int(self.drawn[slot])
        self.drawn[slot] = drawn
        if drawn:
            self.top_k[slot] = params.top_k
            self.top_p[slot] = params.top_p
            self.min_p[slot] = params.min_p
            self.seed[slot] = -1 if params.seed is None else params.seed


class TopTokenSampler:
    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor, last_tokens: torch.Tensor,
                 noise_seed: torch.Tensor, vocab_size: int, row_sizes: list[int], device: torch.device) -> None:
        """`logits` [rows, padded vocab] and `tokens` [rows]: the step graphs' outputs, which this draws over;
        `noise_seed`: their noise counter (one step on per step); `row_sizes`: the row counts captured."""
        self.logits = logits
        self.tokens = tokens
        self.last_tokens = last_tokens
        self.noise_seed = noise_seed
        self.vocab_size = vocab_size
        self.sizes = row_sizes
        self.max_rows = row_sizes[-1]
        self.settings = SlotTopK(last_tokens.shape[0], vocab_size)
        self.padding_slot = last_tokens.shape[0] - 1
        self.staging = PinnedStaging(device)
        self.inputs = torch.zeros(_num_bytes(self.max_rows), dtype=torch.uint8, device=device)
        self.row_keys = torch.arange(self.max_rows, dtype=torch.int64, device=device) << _ROW_KEY_SHIFT
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._host: dict[tuple[int, int], TopTokenRows] = {}

    def stage(self, sample_slots: np.ndarray, positions: np.ndarray, logits_indices: np.ndarray,
              slot_temperatures: np.ndarray) -> int:
        """Stages a step's sampled rows (`sample_slots`: each one's slot; `logits_indices`: its token among the
        step's, whose `positions` are given) if any is one this draws; returns the rows of the graph to replay,
        0 for none."""
        num_rows = len(sample_slots)
        if self.settings.num_drawn == 0 or not 0 < num_rows <= self.max_rows:
            return 0
        drawn = self.settings.drawn[sample_slots]
        if not drawn.any():
            return 0
        rows = self.sizes[bisect.bisect_left(self.sizes, num_rows)]
        buffer = self.staging.take(self.inputs.numel())
        host = self._host_views(buffer, rows)
        settings = self.settings
        host.slots[:num_rows] = sample_slots
        host.positions[:num_rows] = positions[logits_indices[:num_rows]] + 1  # the token drawn: after it
        host.drawn[:num_rows] = drawn
        host.seeds[:num_rows] = settings.seed[sample_slots]
        host.top_ks[:num_rows] = settings.top_k[sample_slots]
        host.top_ps[:num_rows] = settings.top_p[sample_slots]
        host.min_ps[:num_rows] = settings.min_p[sample_slots]
        # 1 where the row is not drawn here (a greedy one's 0 would divide by zero)
        host.temperatures[:num_rows] = np.where(drawn, slot_temperatures[sample_slots], 1.0)
        _pad(host, num_rows, self.padding_slot)
        self.inputs.copy_(buffer, non_blocking=True)
        self.staging.copy_launched()
        return rows

    def _host_views(self, buffer: torch.Tensor, rows: int) -> TopTokenRows:
        """A host buffer's fields as numpy arrays (cached per buffer and row count)."""
        key = (buffer.data_ptr(), rows)
        views = self._host.get(key)
        if views is None:
            views = self._host[key] = _numpy(_views(buffer, self.max_rows, rows))
        return views

    def run(self, rows: int) -> None:
        """What a graph of `rows` captures, on the staged rows."""
        t = _views(self.inputs, self.max_rows, rows)
        logits = self.logits[:rows, :self.vocab_size].float()
        seeds = torch.where(t.seeds >= 0, t.seeds, self.noise_seed ^ self.row_keys[:rows])
        drawn = draw_among_top_tokens(logits, t.temperatures, t.top_ks, t.top_ps, t.min_ps, seeds, t.positions)
        tokens = self.tokens[:rows]
        tokens.copy_(torch.where(t.drawn, drawn, tokens))
        self.last_tokens.index_copy_(0, t.slots, tokens)

    def capture(self, pool: tuple) -> None:
        """One graph per row count, the largest first (the smaller reuse its pool memory)."""
        buffer = torch.zeros(self.inputs.numel(), dtype=torch.uint8)
        _pad(_numpy(_views(buffer, self.max_rows, self.max_rows)), 0, self.padding_slot)
        self.inputs.copy_(buffer)
        for rows in reversed(self.sizes):
            self.run(rows)  # warm-up outside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.run(rows)
            self.graphs[rows] = graph

    def replay(self, rows: int) -> None:
        self.graphs[rows].replay()


def _numpy(rows: TopTokenRows) -> TopTokenRows:
    return TopTokenRows(*(getattr(rows, f.name).numpy() for f in fields(TopTokenRows)))


def _pad(host: TopTokenRows, num_rows: int, padding_slot: int) -> None:
    """Rows past the step's: drawn by nobody, valid settings, their token to the spare slot."""
    host.slots[num_rows:] = padding_slot
    host.positions[num_rows:] = 0
    host.drawn[num_rows:] = False
    host.seeds[num_rows:] = 0
    host.top_ks[num_rows:] = TOP_K_BOUND
    host.top_ps[num_rows:] = 1.0
    host.min_ps[num_rows:] = 0.0
    host.temperatures[num_rows:] = 1.0
