"""Sizes the KV pool from what is left after weights, activations and CUDA graphs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 1024**3


class InsufficientMemory(RuntimeError):
    pass


@dataclass
class MemoryPlan:
    total_bytes: int
    budget_bytes: int
    weights_bytes: int
    activation_bytes: int
    graph_reserve_bytes: int
    other_bytes: int            # CUDA context, other processes
    kv_block_bytes: int
    num_blocks: int
    block_size: int

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.kv_block_bytes

    def layout(self) -> str:
        rows = [
            ("device memory", self.total_bytes, ""),
            ("budget (mem_fraction)", self.budget_bytes, ""),
            ("model weights", self.weights_bytes, ""),
            ("KV cache pool", self.kv_bytes, f"{self.num_blocks} blocks x {self.block_size} tokens = "
                                              f"{self.num_blocks * self.block_size} tokens"),
            ("CUDA graphs (reserved)", self.graph_reserve_bytes, ""),
            ("activation buffers", self.activation_bytes, ""),
            ("context and other", self.other_bytes, ""),
        ]
        return "\n".join(f"  {name:<24} {size / GIB:8.2f} GiB  {note}" for name, size, note in rows)


def plan_gpu_memory(device: torch.device, mem_fraction: float, weights_bytes: int, activation_bytes: int,
                    graph_reserve_bytes: int, kv_block_bytes: int, block_size: int,
                    min_blocks: int) -> MemoryPlan:
    """Call after the weights are loaded and a profiling step ran, with its cache emptied."""
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * mem_fraction)
    used = total - free
    other = max(used - torch.cuda.memory_reserved(device), 0)
    available = budget - used - activation_bytes - graph_reserve_bytes
    num_blocks = max(available, 0) // kv_block_bytes
    plan = MemoryPlan(total, budget, weights_bytes, activation_bytes, graph_reserve_bytes, other,
                      kv_block_bytes, num_blocks, block_size)
    if num_blocks < min_blocks:
        raise InsufficientMemory(
            f"the KV cache needs at least {min_blocks} blocks ({min_blocks * kv_block_bytes / GIB:.2f} GiB) "
            f"for one sequence of the maximum context length, but only {max(available, 0) / GIB:.2f} GiB are "
            f"left of the {budget / GIB:.2f} GiB budget (mem_fraction {mem_fraction}); in use "
            f"{used / GIB:.2f} GiB, activations {activation_bytes / GIB:.2f} GiB, CUDA graphs "
            f"{graph_reserve_bytes / GIB:.2f} GiB. Raise --mem-fraction, lower --max-context-length or "
            f"--max-running-tokens, or lower --cuda-graph-max-bs.\n{plan.layout()}")
    return plan


def plan_cpu_memory(cpu_kv_cache_gib: float, kv_block_bytes: int, block_size: int, weights_bytes: int,
                    min_blocks: int) -> MemoryPlan:
    budget = int(cpu_kv_cache_gib * GIB)
    num_blocks = budget // kv_block_bytes
    if num_blocks < min_blocks:
        raise InsufficientMemory(
            f"--cpu-kv-cache-gib {cpu_kv_cache_gib} holds {num_blocks} KV blocks, fewer than the {min_blocks} "
            f"one sequence of the maximum context length needs ({min_blocks * kv_block_bytes / GIB:.3f} GiB)")
    return MemoryPlan(0, budget, weights_bytes, 0, 0, 0, kv_block_bytes, num_blocks, block_size)
