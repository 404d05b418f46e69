"""Chooses and builds the attention backend named by --attention-backend."""
from __future__ import annotations

import importlib
import logging
import os

import torch

from sfllm.worker.attention.backend import BACKENDS, AttentionBackend
from sfllm.worker.kv_cache import KVCache
from sfllm.worker.model_shard import ModelShard

logger = logging.getLogger(__name__)

_MODULES = {
    "torch": "sfllm.worker.attention.torch_backend",
    "triton": "sfllm.worker.attention.triton_backend",
}


class BackendUnavailable(RuntimeError):
    pass


def resolve_backend_name(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        raise BackendUnavailable("--attention-backend triton needs a CUDA device; on CPU use the torch backend "
                                 "(or set TRITON_INTERPRET=1 to interpret the kernels, slowly, for tests)")
    return name


def create_attention_backend(name: str, device: torch.device, kv_cache: KVCache, shard: ModelShard,
                             quiet: bool = False) -> AttentionBackend:
    """The backend for the heads of `shard` (the whole model's, or a tensor-parallel rank's)."""
    resolved = resolve_backend_name(name, device)
    importlib.import_module(_MODULES[resolved])
    if not quiet:
        logger.info("attention backend: %s (asked for %s, device %s)", resolved, name, device.type)
    return BACKENDS[resolved](kv_cache, shard.num_heads, shard.num_kv_heads, shard.head_dim)
