"""The ranks that split one model, in one torch.distributed group: NCCL on CUDA, gloo on CPU.

A group of one is the single-device engine: every operation is the identity and torch.distributed is
never initialised. Collectives time out after COLLECTIVE_TIMEOUT_S, so a rank that hangs ends the others'
steps with an error instead of a wait without end (the ranks run the same steps, so within a step they
drift apart by a kernel's compilation at most). Startup stages of unequal length (loading weights) are
joined by `wait_for_all` on the rendezvous store instead, which has no such limit but checks that the
other ranks live.
"""
from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 30.0
_STORE_POLL_S = 0.05
# torch 2.13 renamed all_gather_into_tensor (which still works there, with a warning); the GPU hosts run 2.11
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _nothing_to_check() -> None:
    pass


class TensorParallelGroup:
    def __init__(self, rank: int, size: int, device: torch.device, rendezvous: Path | None = None,
                 check_peers: Callable[[], None] = _nothing_to_check) -> None:
        """Joins the group of `size` ranks that meet at the file `rendezvous` (blocks until all have come).
        `check_peers` raises if a rank is known to be gone (rank 0 watches the others' processes)."""
        self.rank = rank
        self.size = size
        self.device = device
        self._check_peers = check_peers
        self._store: dist.Store | None = None
        if size == 1:
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self._store = dist.FileStore(str(rendezvous), size)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=self._store, rank=rank,
                                world_size=size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                                device_id=device if device.type == "cuda" else None)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_columns(self, local: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[B, size * C] from every rank's [B, C], rank after rank (into `out` when given); a group of two or more."""
        rows, columns = local.shape
        gathered = torch.empty(self.size * rows, columns, dtype=local.dtype, device=local.device)
        _all_gather_into(gathered, local.contiguous())
        return torch.cat(gathered.view(self.size, rows, columns).unbind(0), dim=1, out=out)

    def min(self, value: int) -> int:
        """The smallest `value` of all ranks: one plan all ranks can follow (each sized its own memory)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def wait_for_all(self, stage: str) -> None:
        """Returns once every rank has reached `stage` (each rank names each stage once)."""
        if self._store is None:
            return
        self._store.add(stage, 1)
        while self._store.add(stage, 0) < self.size:
            self._check_peers()
            time.sleep(_STORE_POLL_S)

    def close(self) -> None:
        if self._store is not None and dist.is_initialized():
            dist.destroy_process_group()
        self._store = None
