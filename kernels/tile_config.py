"""Tile sizes and pipelining depth of the attention kernels, shrunk where a GPU has too little shared memory."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

# The interpreter has no shared memory to run out of.
_UNLIMITED = 1 << 40


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per program
    block_n: int  # cached tokens per loop step
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def _shared_memory_per_program(device: torch.device) -> int:
    if device.type != "cuda":
        return _UNLIMITED
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _shared_memory_needed(config: TileConfig, head_dim: int, element_size: int) -> int:
    # The software pipeline keeps num_stages copies of the K and V tiles; Q stays resident.
    kv_tiles = config.num_stages * 2 * config.block_n * head_dim * element_size
    return kv_tiles + config.block_m * head_dim * element_size


def fit_to_shared_memory(config: TileConfig, head_dim: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """Give up pipelining depth first, then tile length, until the tiles fit the device."""
    limit = _shared_memory_per_program(device)
    while _shared_memory_needed(config, head_dim, dtype.itemsize) > limit:
        if config.num_stages > 2:
            config = dataclasses.replace(config, num_stages=config.num_stages - 1)
        elif config.block_n > 16:
            config = dataclasses.replace(config, block_n=config.block_n // 2)
        else:
            break
    return config
