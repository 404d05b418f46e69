"""The paged KV cache tensors of one worker, and the CPU swap space beside them."""
from __future__ import annotations

import torch


class KVCache:
    """Per layer, keys and values of shape [num_blocks, block_size, num_kv_heads, head_dim].

    Block b holds the tokens at positions [i*block_size, (i+1)*block_size) of whichever
    sequence has b at index i of its block table; the scheduler owns that mapping.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, num_cpu_blocks: int = 0) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.cpu_tensor = None
        if num_cpu_blocks:
            cpu_shape = (num_layers, 2, num_cpu_blocks, block_size, num_kv_heads, head_dim)
            self.cpu_tensor = torch.zeros(cpu_shape, dtype=dtype, pin_memory=device.type == "cuda")

    def keys(self, layer: int) -> torch.Tensor:
        return self.tensor[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.tensor[layer, 1]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (gpu_block, cpu_block) pairs to the swap space, in stream order."""
        self._copy(pairs, self.tensor, self.cpu_tensor)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (cpu_block, gpu_block) pairs back from the swap space."""
        self._copy(pairs, self.cpu_tensor, self.tensor)

    @staticmethod
    def _copy(pairs: list[tuple[int, int]], source: torch.Tensor | None, target: torch.Tensor | None) -> None:
        if not pairs:
            return
        if source is None or target is None:
            raise RuntimeError("swap requested but the worker has no CPU swap space (cpu_kv_cache_gib is 0)")
        src = torch.tensor([p[0] for p in pairs])
        dst = torch.tensor([p[1] for p in pairs])
        gathered = source.index_select(2, src.to(source.device))
        # to the host, a blocking copy: a non-blocking one lands in pinned memory that index_copy_ would read
        # before the copy is done (a swap-out is a preemption: rare enough to wait for the device)
        to_host = target.device.type == "cpu" and source.device.type != "cpu"
        target.index_copy_(2, dst.to(target.device), gathered.to(target.device, non_blocking=not to_host))
