"""The inputs of a captured decode step, at fixed device addresses, filled by one copy per step.

The host writes a decode batch straight into a pinned buffer laid out like the device buffer
(padding rows included) and copies the used part in one transfer: no per-field copies or dtype
conversions are launched, which at small batches cost more host time than the GPU spends on the step.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from sfllm.messages import ForwardBatch
from sfllm.worker.pinned_staging import PinnedStaging


@dataclass
class _Field:
    name: str
    dtype: torch.dtype
    columns: int
    offset: int = 0


class DecodeInputs:
    """`device_views` (each 16-byte aligned, rows = the largest graph batch):
    input_ids int64, -1 where the token is the one the slot sampled last; positions int64;
    slot_mapping int64, -1 for padding rows; slots int64, `padding_slot` for padding rows;
    seq_lens int32, 0 for padding rows; temperatures float32, 0 for greedy rows;
    block_tables int32 [rows, max_blocks], last so that a small batch copies only its rows."""

    def __init__(self, max_rows: int, max_blocks: int, block_size: int, padding_slot: int,
                 device: torch.device) -> None:
        self.max_rows = max_rows
        self.block_size = block_size
        self.padding_slot = padding_slot
        self.fields = [_Field("input_ids", torch.int64, 1), _Field("positions", torch.int64, 1),
                       _Field("slot_mapping", torch.int64, 1), _Field("slots", torch.int64, 1),
                       _Field("seq_lens", torch.int32, 1), _Field("temperatures", torch.float32, 1),
                       _Field("block_tables", torch.int32, max_blocks)]
        offset = 0
        for field in self.fields:
            field.offset = offset
            offset += -(-max_rows * field.columns * field.dtype.itemsize // 16) * 16
        self.num_bytes = offset
        self.device_bytes = torch.zeros(offset, dtype=torch.uint8, device=device)
        self.device_views = self._views(self.device_bytes)
        self.device_views["slot_mapping"].fill_(-1)
        self.device_views["slots"].fill_(padding_slot)
        self._cuda = device.type == "cuda"
        self._staging = PinnedStaging(device)
        self._host_views: dict[int, dict[str, np.ndarray]] = {}  # by buffer address: the staging reuses them

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        views = {}
        for f in self.fields:
            size = self.max_rows * f.columns * f.dtype.itemsize
            view = buffer[f.offset:f.offset + size].view(f.dtype)
            views[f.name] = view.view(self.max_rows, f.columns) if f.columns > 1 else view
        return views

    def stage(self, batch: ForwardBatch, temperatures: np.ndarray, padded: int) -> None:
        """Writes the decode batch (one new token per sequence) and `padded - len(batch.slots)` padding
        rows, then copies them to the device on the current stream."""
        host_bytes = self._staging.take(self.num_bytes)
        host = self._host_views.get(host_bytes.data_ptr())
        if host is None:
            host_bytes.zero_()
            host = self._host_views[host_bytes.data_ptr()] = {k: v.numpy() for k, v in self._views(host_bytes).items()}
        n = len(batch.slots)
        context_lens = np.asarray(batch.context_lens, dtype=np.int64)
        positions = context_lens - 1
        block_size = self.block_size
        last_blocks = [table[p // block_size] for table, p in zip(batch.block_tables, positions.tolist())]
        host["input_ids"][:n] = batch.input_token_ids
        host["positions"][:n] = positions
        host["slot_mapping"][:n] = np.asarray(last_blocks, dtype=np.int64) * block_size + positions % block_size
        host["slot_mapping"][n:padded] = -1
        host["slots"][:n] = batch.slots
        host["slots"][n:padded] = self.padding_slot
        host["seq_lens"][:n] = context_lens
        host["seq_lens"][n:padded] = 0
        host["temperatures"][:n] = temperatures
        host["temperatures"][n:padded] = 0.0
        table_lens = np.fromiter(map(len, batch.block_tables), dtype=np.int64, count=n)
        tables = host["block_tables"][:n]
        flat = np.fromiter(itertools.chain.from_iterable(batch.block_tables), dtype=np.int32,
                           count=int(table_lens.sum()))
        tables[np.arange(tables.shape[1])[None, :] < table_lens[:, None]] = flat
        # Entries past a row's table are stale, never read: the kernels stop at seq_lens.
        tables_field = self.fields[-1]
        used = tables_field.offset + padded * tables_field.columns * tables_field.dtype.itemsize
        self.device_bytes[:used].copy_(host_bytes[:used], non_blocking=self._cuda)
        self._staging.copy_launched()
