"""A ForwardBatch as the tensors of one model step.

The host writes the batch into a pinned buffer in one layout (`StepShape`), copies it in one transfer,
and the device completes it: placeholder tokens from `last_tokens`, KV slots and block-table rows from
the worker's `BlockTables`. Eager steps use a shape that fits the batch exactly; a CUDA graph has one
shape of fixed capacities, and a smaller batch fills the rest with padding: tokens of the padding slot
(negative KV slot: nothing stored), sequences of no new tokens (attended by nobody), sampled rows that
write the padding slot's last token, and unused attention tiles (sequence -1).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from sfllm.messages import ForwardBatch
from sfllm.worker.attention.metadata import AttentionMetadata
from sfllm.worker.block_tables import BlockTables
from sfllm.worker.pinned_staging import PinnedStaging


@dataclass
class StepTensors:
    """Views of one staged step (torch tensors on the device, or numpy arrays of the host buffer)."""
    input_ids: torch.Tensor        # [T] int64, -1: the token the slot sampled last
    positions: torch.Tensor        # [T] int64
    token_slots: torch.Tensor      # [T] int64, the slot of each token's sequence
    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor         # [S] int32, tokens in each sequence including the new ones
    seq_slots: torch.Tensor        # [S] int64
    decode_order: torch.Tensor     # [S] int32, the sequences longest first: the order decode attention takes them in
    logits_indices: torch.Tensor   # [L] int64, the token rows sampled, first the batch's sampled rows
    sample_slots: torch.Tensor     # [L] int64, the slot each sampled row's token goes to
    temperatures: torch.Tensor     # [L] float32, 0: greedy
    tiles: torch.Tensor            # [N, 2] int32, extend attention's query tiles (see sfllm.kernels.extend_tiles)


# (field, dtype, rows): rows count tokens ("T"), sequences ("S", "S+1"), sampled rows ("L": a sequence's
# last token, and each of its drafts' positions with speculative decoding) or tiles ("2N": two numbers each)
_LAYOUT = (("input_ids", torch.int64, "T"), ("positions", torch.int64, "T"), ("token_slots", torch.int64, "T"),
           ("query_start_loc", torch.int32, "S+1"), ("seq_lens", torch.int32, "S"), ("seq_slots", torch.int64, "S"),
           ("decode_order", torch.int32, "S"), ("logits_indices", torch.int64, "L"), ("sample_slots", torch.int64, "L"),
           ("temperatures", torch.float32, "L"), ("tiles", torch.int32, "2N"))
assert [name for name, _, _ in _LAYOUT] == [f.name for f in fields(StepTensors)]


@dataclass(frozen=True)
class StepShape:
    """The capacities of a step's inputs, which fix its buffer layout (and a CUDA graph's grid)."""
    num_tokens: int
    num_seqs: int
    num_tiles: int     # extend attention tiles; 0 when every sequence has one new token
    decode_only: bool  # every sequence has one new token: decode attention alone
    num_extra_rows: int = 0  # sampled rows past one per sequence: drafts' positions (speculative decoding)

    @property
    def num_logit_rows(self) -> int:
        return self.num_seqs + self.num_extra_rows

    def _offsets(self) -> list[tuple[int, int]]:
        rows = {"T": self.num_tokens, "S": self.num_seqs, "S+1": self.num_seqs + 1, "L": self.num_logit_rows,
                "2N": 2 * self.num_tiles}
        offset, spans = 0, []
        for _, dtype, kind in _LAYOUT:
            # every field 16-byte aligned: Triton compiles a kernel variant per pointer alignment
            size = rows[kind] * dtype.itemsize
            spans.append((offset, size))
            offset += -(-size // 16) * 16
        return spans

    @property
    def num_bytes(self) -> int:
        offset, size = self._offsets()[-1]
        return offset + -(-size // 16) * 16

    def views(self, buffer: torch.Tensor) -> StepTensors:
        """Typed views of a uint8 buffer of at least `num_bytes`."""
        views = [buffer[offset:offset + size].view(dtype)
                 for (offset, size), (_, dtype, _) in zip(self._offsets(), _LAYOUT)]
        views[-1] = views[-1].view(self.num_tiles, 2)
        return StepTensors(*views)


def exact_shape(batch: ForwardBatch, tile_rows: int | None) -> StepShape:
    """The smallest shape that holds `batch`; `tile_rows` None: no extend tiles (a backend without them)."""
    decode_only = len(batch.input_token_ids) == len(batch.slots)
    num_tiles = 0
    if tile_rows is not None and not decode_only:
        num_tiles = sum(-(-n // tile_rows) for n in batch.num_new_tokens if n > 1)
    return StepShape(len(batch.input_token_ids), len(batch.slots), num_tiles, decode_only,
                     sum(batch.num_draft_tokens))


def stage_step(batch: ForwardBatch, shape: StepShape, host: StepTensors, slot_temperatures: np.ndarray,
               padding_slot: int, tile_rows: int | None) -> int:
    """Writes `batch` and its padding up to `shape` into the host arrays `host`; returns the number of
    sampled rows (the first rows of logits_indices, sample_slots and temperatures)."""
    num_seqs, num_tokens = len(batch.slots), len(batch.input_token_ids)
    slots = np.asarray(batch.slots, dtype=np.int64)
    context_lens = np.asarray(batch.context_lens, dtype=np.int64)
    qsl = host.query_start_loc
    qsl[0] = 0
    if num_tokens == num_seqs:  # every sequence decodes one token: the common step, kept short
        qsl[1:num_seqs + 1] = np.arange(1, num_seqs + 1)
        host.positions[:num_tokens] = context_lens - 1
        host.token_slots[:num_tokens] = slots
        num_new = None
    else:
        num_new = np.asarray(batch.num_new_tokens, dtype=np.int64)
        np.cumsum(num_new, out=qsl[1:num_seqs + 1])
        starts = qsl[:num_seqs].astype(np.int64)
        seq_of_token = np.repeat(np.arange(num_seqs), num_new)
        host.positions[:num_tokens] = np.arange(num_tokens) + (context_lens - num_new - starts)[seq_of_token]
        host.token_slots[:num_tokens] = slots[seq_of_token]
    # padding sequences: of no token in a mixed shape; in a decode shape, one per padding token (the
    # decode kernel then writes zeros for it instead of leaving its row unwritten)
    qsl[num_seqs + 1:] = np.arange(num_seqs + 1, shape.num_seqs + 1) if shape.decode_only else num_tokens
    host.input_ids[:num_tokens] = batch.input_token_ids
    host.input_ids[num_tokens:] = 0
    host.positions[num_tokens:] = 0
    host.token_slots[num_tokens:] = padding_slot
    host.seq_lens[:num_seqs] = context_lens
    host.seq_lens[num_seqs:] = 0
    host.seq_slots[:num_seqs] = slots
    host.seq_slots[num_seqs:] = padding_slot
    # A wave of attention programs ends with its longest sequence: starting the longest first keeps the
    # last wave from waiting on one of them (docs/performance.md, "longest first")
    host.decode_order[:] = np.argsort(-host.seq_lens, kind="stable")

    sampled = np.flatnonzero(np.asarray(batch.sample, dtype=bool))
    num_sampled = len(sampled)
    if batch.num_draft_tokens:
        row_slots = _stage_draft_rows(batch, sampled, qsl, slots, host, padding_slot)
        num_sampled = len(row_slots)
    else:
        host.logits_indices[:num_sampled] = qsl[1:][sampled] - 1
        host.sample_slots[:num_sampled] = row_slots = slots[sampled]
    host.logits_indices[num_sampled:] = 0
    host.sample_slots[num_sampled:] = padding_slot
    host.temperatures[:num_sampled] = slot_temperatures[row_slots]
    host.temperatures[num_sampled:] = 0.0

    if shape.num_tiles:
        from sfllm.kernels.extend_attention import extend_tiles  # only backends with tiles (Triton) get here
        tiles = (extend_tiles(num_new, tile_rows, prefix_lens=context_lens - num_new) if num_new is not None
                 else np.empty((0, 2), np.int32))
        host.tiles[:len(tiles)] = tiles
        host.tiles[len(tiles):] = -1
    return num_sampled


def _stage_draft_rows(batch: ForwardBatch, sampled: np.ndarray, qsl: np.ndarray, slots: np.ndarray,
                      host: StepTensors, padding_slot: int) -> np.ndarray:
    """Sampled rows when sequences carry drafts: a sequence with k drafts samples its last 1 + k positions
    (the token after its decoded one, then after each draft). Only the last row writes the slot's
    `last_tokens` entry (the others the padding slot's): a speculating request's next step is sent after
    its tokens are back, with them, so the entry only has to be some token of the slot's. Returns each row's
    sequence slot."""
    drafts = np.asarray(batch.num_draft_tokens, dtype=np.int64)[sampled]
    rows = drafts + 1
    num_rows = int(rows.sum())
    row_seq = np.repeat(sampled, rows)
    first_row = np.repeat(np.cumsum(rows) - rows, rows)
    offset = np.arange(num_rows) - first_row  # 0..k within the sequence
    host.logits_indices[:num_rows] = qsl[1:][row_seq] - 1 - np.repeat(drafts, rows) + offset
    row_slots = slots[row_seq]
    host.sample_slots[:num_rows] = np.where(offset == np.repeat(drafts, rows), row_slots, padding_slot)
    return row_slots


class StepStaging:
    """Pinned host buffers for staged steps, and the one copy of each to the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # on a CPU device the "copy" returns the buffer itself: a fresh one per step keeps the steps apart
        self._pinned = PinnedStaging(device) if device.type == "cuda" else None
        self._host_views: dict[tuple[int, StepShape], StepTensors] = {}

    def host(self, shape: StepShape) -> tuple[torch.Tensor, StepTensors]:
        """The next host buffer and its views as numpy arrays (cached per buffer and shape)."""
        if self._pinned is None:
            buffer = torch.empty(shape.num_bytes, dtype=torch.uint8)
            return buffer, StepTensors(*(v.numpy() for v in _as_tuple(shape.views(buffer))))
        buffer = self._pinned.take(shape.num_bytes)
        key = (buffer.data_ptr(), shape)
        views = self._host_views.get(key)
        if views is None:
            views = self._host_views[key] = StepTensors(*(v.numpy() for v in _as_tuple(shape.views(buffer))))
        return buffer, views

    def copy(self, host_buffer: torch.Tensor, device_buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Copies the staged bytes into `device_buffer` (a new tensor when None), in stream order."""
        if self._pinned is None:
            if device_buffer is None:
                return host_buffer
            device_buffer[:host_buffer.numel()].copy_(host_buffer)
            return device_buffer
        if device_buffer is None:
            device_buffer = torch.empty_like(host_buffer, device=self.device)
        device_buffer[:host_buffer.numel()].copy_(host_buffer, non_blocking=True)
        self._pinned.copy_launched()
        return device_buffer


def _as_tuple(tensors: StepTensors) -> tuple:
    return tuple(getattr(tensors, f.name) for f in fields(StepTensors))


def device_metadata(tensors: StepTensors, shape: StepShape, tables: BlockTables, last_tokens: torch.Tensor,
                    num_kv_splits: int | None,
                    batch: ForwardBatch | None = None) -> tuple[torch.Tensor, AttentionMetadata]:
    """Completes a staged step on the device without reading anything back: its input ids and attention
    metadata. `batch` gives the host-side lengths that the torch backend reads; a CUDA graph has none."""
    ids = tensors.input_ids
    input_ids = torch.where(ids < 0, last_tokens[tensors.token_slots], ids)
    meta = AttentionMetadata(
        slot_mapping=tables.kv_slots(tensors.token_slots, tensors.positions),
        query_start_loc=tensors.query_start_loc,
        seq_lens=tensors.seq_lens,
        block_tables=tables.rows(tensors.seq_slots),
        tiles=tensors.tiles,
        decode_only=shape.decode_only,
        decode_order=tensors.decode_order,
        num_kv_splits=num_kv_splits,
    )
    if batch is not None:
        meta.query_lens_host = list(batch.num_new_tokens)
        meta.seq_lens_host = list(batch.context_lens)
    return input_ids, meta
