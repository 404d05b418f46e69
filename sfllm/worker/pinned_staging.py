"""Host buffers for a step's host-to-device copies, reused in turn.

Pinned once, so that the copies run asynchronously without pinning (and checking for pinned memory)
on every step; a buffer is handed out again only after the copy from it has run.
"""
from __future__ import annotations

import torch

NUM_BUFFERS = 4


class PinnedStaging:
    def __init__(self, device: torch.device, num_buffers: int = NUM_BUFFERS) -> None:
        self._cuda = device.type == "cuda"  # on a CPU device: plain memory, nothing to wait for
        self._buffers = [torch.empty(0, dtype=torch.uint8) for _ in range(num_buffers)]
        self._copied: list[torch.cuda.Event | None] = [None] * num_buffers
        self._next = 0
        self._current = 0

    def take(self, num_bytes: int) -> torch.Tensor:
        """The next buffer, as uint8 [num_bytes] (grown if needed), once its last copy has run."""
        index = self._current = self._next
        self._next = (index + 1) % len(self._buffers)
        if self._copied[index] is not None:
            self._copied[index].synchronize()
            self._copied[index] = None
        if self._buffers[index].numel() < num_bytes:
            buffer = torch.empty(max(num_bytes, 2 * self._buffers[index].numel()), dtype=torch.uint8)
            self._buffers[index] = buffer.pin_memory() if self._cuda else buffer
        return self._buffers[index][:num_bytes]

    def copy_launched(self) -> None:
        """Marks the copy from the buffer last taken as launched on the current stream."""
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
            self._copied[self._current] = event
