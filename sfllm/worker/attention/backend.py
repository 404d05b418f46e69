"""The interface every attention backend implements, and the registry that names them."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from sfllm.worker.attention.metadata import AttentionMetadata
from sfllm.worker.kv_cache import KVCache


class AttentionBackend(ABC):
    """Stores a layer's new K/V in the paged cache and attends over it."""

    name: str = ""
    supports_cuda_graphs: bool = False

    def __init__(self, kv_cache: KVCache, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D], or None when already in the cache -> [T, H * D]."""

    def kv_cache_to_fill(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's (k_cache, v_cache) if the layer's fused kernels may write its new K/V there
        themselves (then `forward` gets None for them); None: `forward` stores them."""
        return None

    def prepare(self, meta: AttentionMetadata) -> None:
        """Called once per step before the layers run (workspace sizing and the like)."""

    def extend_tile_rows(self, dtype: torch.dtype, device: torch.device) -> int | None:
        """Query rows per tile of multi-token sequences, if the backend attends them by a tile list
        (`AttentionMetadata.tiles`); None: it reads the host lengths instead."""
        return None


BACKENDS: dict[str, Callable[..., AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def register(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        BACKENDS[name] = cls
        return cls
    return register
