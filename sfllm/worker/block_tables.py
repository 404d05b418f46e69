"""The block table of every slot, kept on the device and changed by the scheduler's updates.

The scheduler sends a slot's whole table when a request takes the slot and only the new entries after
that, so a step's message and its host-to-device copy stay small however long the contexts are. A
step reads its sequences' rows by slot, inside the CUDA graph when it runs as one.

The last row belongs to the padding slot of graph batches: all -1, so a padding token's KV slot is
negative and nothing is stored for it.
"""
from __future__ import annotations

import numpy as np
import torch

from sfllm.messages import BlockTableUpdate
from sfllm.worker.pinned_staging import PinnedStaging


class BlockTables:
    def __init__(self, num_slots: int, max_blocks: int, block_size: int, device: torch.device) -> None:
        """`num_slots` request slots plus the padding slot, which is `num_slots`."""
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.padding_slot = num_slots
        self.table = torch.zeros(num_slots + 1, max_blocks, dtype=torch.int32, device=device)
        self.table[self.padding_slot] = -1
        self._staging = PinnedStaging(device) if device.type == "cuda" else None

    def apply(self, updates: list[BlockTableUpdate]) -> None:
        """Writes the updates' entries, in stream order before the steps launched after this call."""
        if not updates:
            return
        count = len(updates)
        lengths = np.fromiter((len(u.block_ids) for u in updates), dtype=np.int64, count=count)
        starts = np.fromiter((u.start for u in updates), dtype=np.int64, count=count)
        if int((starts + lengths).max()) > self.max_blocks:
            raise ValueError(f"a block table update reaches past the {self.max_blocks} entries of a table")
        slots = np.fromiter((u.slot for u in updates), dtype=np.int64, count=count)
        total = int(lengths.sum())
        # the flat index (int64) and the value (int32) of every entry, packed for one copy
        index_bytes = 8 * total
        size = index_bytes + 4 * total
        packed = self._staging.take(size) if self._staging else torch.empty(size, dtype=torch.uint8)
        within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        packed[:index_bytes].view(torch.int64).numpy()[:] = np.repeat(slots * self.max_blocks + starts, lengths) + within
        packed[index_bytes:].view(torch.int32).numpy()[:] = np.fromiter(
            (b for u in updates for b in u.block_ids), dtype=np.int32, count=total)
        if self._staging:
            packed = packed.to(self.table.device, non_blocking=True)
            self._staging.copy_launched()
        self.table.view(-1).index_copy_(0, packed[:index_bytes].view(torch.int64), packed[index_bytes:].view(torch.int32))

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """[len(slots), max_blocks] int32: the tables of these slots."""
        return self.table.index_select(0, slots)

    def kv_slots(self, token_slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[T] int64: the flat KV cache slot of each token (negative for tokens of the padding slot)."""
        blocks = self.table[token_slots, torch.div(positions, self.block_size, rounding_mode="floor")]
        return blocks.long() * self.block_size + positions % self.block_size
