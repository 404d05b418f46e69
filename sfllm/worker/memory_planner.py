"""Sizes the KV pool from what is left after weights, activations and CUDA graphs, and the decode graphs
from the device's memory."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sfllm.config import WorkerConfig, num_sequence_slots
from sfllm.messages import BlockTableUpdate, ForwardBatch
from sfllm.model_source import ModelConfig
from sfllm.sampling_params import SamplingParams
from sfllm.worker.attention.registry import create_attention_backend
from sfllm.worker.block_tables import BlockTables
from sfllm.worker.eager_step import EagerStep
from sfllm.worker.kv_cache import KVCache
from sfllm.worker.kv_splits import KVSplits
from sfllm.worker.model import CausalLM
from sfllm.worker.sampler import Sampler, SamplingInputs
from sfllm.worker.step_inputs import StepStaging

GIB = 1024**3

# Largest captured decode batch by device memory, as the production engines choose it: 512 on cards of
# 60 GB and more; each graph's own memory is small (the graphs share their activations and outputs).
DECODE_GRAPH_BATCH_BY_MEMORY = ((60 * GIB, 512), (30 * GIB, 256), (16 * GIB, 128), (0, 64))


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
    num_cpu_blocks: int = 0     # swap space
    graph_bytes: int | None = None  # measured once the graphs are captured
    graph_note: str = ""
    kv_note: str = ""
    budget_name: str = "budget (mem_fraction)"

    def agree(self, num_blocks: int, num_cpu_blocks: int) -> None:
        """Takes the tensor-parallel ranks' common pool, the smallest rank's: a block lives on every rank
        (each holds its KV heads of it), so every rank must have as many."""
        if num_blocks < self.num_blocks:
            self.kv_note = f", the smallest rank's (this one had room for {self.num_blocks})"
        self.num_blocks = num_blocks
        self.num_cpu_blocks = num_cpu_blocks

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.kv_block_bytes

    def layout(self) -> str:
        graphs = ("CUDA graphs (reserved)", self.graph_reserve_bytes, "")
        if self.graph_bytes is not None:
            graphs = ("CUDA graphs", self.graph_bytes, f"{self.graph_note} (reserved "
                                                       f"{self.graph_reserve_bytes / GIB:.2f} GiB)")
        rows = [
            *([("device memory", self.total_bytes, "")] if self.total_bytes else []),  # none: a CPU, a set pool
            *([(self.budget_name, self.budget_bytes, "")] if self.budget_bytes else []),
            ("model weights", self.weights_bytes, ""),
            ("KV cache pool", self.kv_bytes, f"{self.num_blocks} blocks x {self.block_size} tokens = "
                                              f"{self.num_blocks * self.block_size} tokens{self.kv_note}"),
            graphs,
            ("activation buffers", self.activation_bytes, ""),
            ("context and other", self.other_bytes, ""),
        ]
        return "\n".join(f"  {name:<24} {size / GIB:8.2f} GiB  {note}" for name, size, note in rows)


def decode_graph_limit(config: WorkerConfig, device: torch.device) -> int:
    """The largest decode batch captured as a graph: --cuda-graph-max-bs, else chosen from the device's
    memory; never more than the sequence slots (the batch limit and high priority's)."""
    slots = num_sequence_slots(config)
    if config.cuda_graph_max_bs is not None:
        return min(config.cuda_graph_max_bs, slots)
    total = torch.cuda.get_device_properties(device).total_memory
    by_memory = next(batch for least, batch in DECODE_GRAPH_BATCH_BY_MEMORY if total >= least)
    return min(by_memory, slots)


def plan_memory(config: WorkerConfig, model_config: ModelConfig, model: CausalLM, device: torch.device,
                dtype: torch.dtype, max_context_length: int, cuda_graphs: bool) -> MemoryPlan:
    """The KV pool and swap space for the loaded `model` (a tensor-parallel rank's part of it: its KV heads);
    on a GPU after a profiling step."""
    c = model_config
    block_size = config.block_size
    block_bytes = KVCache.bytes_per_block(c.num_layers, block_size, model.shard.num_kv_heads, c.head_dim, dtype)
    min_blocks = math.ceil(max_context_length / block_size)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    num_cpu_blocks = int(config.cpu_kv_cache_gib * GIB) // block_bytes if device.type == "cuda" else 0
    if config.num_kv_blocks:
        plan = MemoryPlan(0, 0, weights, 0, 0, 0, block_bytes, max(config.num_kv_blocks, min_blocks), block_size)
    elif device.type == "cpu":
        plan = plan_cpu_memory(config.cpu_kv_cache_gib, block_bytes, block_size, weights, min_blocks)
    else:
        num_tokens = min(config.max_running_tokens, max_context_length)
        activation = profile_activation_bytes(config, c, model, device, num_tokens, max_context_length)
        graph_reserve = graph_reserve_bytes(c, graph_logit_rows(config), activation, num_tokens) if cuda_graphs else 0
        plan = plan_gpu_memory(device, config.mem_fraction, weights, activation, graph_reserve, block_bytes,
                               block_size, min_blocks)
    if config.preemption_mode == "swap" and device.type == "cpu":
        num_cpu_blocks = plan.num_blocks
    plan.num_cpu_blocks = num_cpu_blocks
    return plan


def graph_logit_rows(config: WorkerConfig) -> int:
    """Rows of the graphs' logits buffer: one per sequence, plus the drafts of a verify step's sequences."""
    from sfllm.worker.cuda_graph_runner import speculative_graph_sizes
    drafts, sequences = speculative_graph_sizes(config)
    return num_sequence_slots(config) + drafts * sequences


def graph_reserve_bytes(c: ModelConfig, logit_rows: int, activation_bytes: int, num_tokens: int) -> int:
    """The graphs' shared output buffers (`logit_rows` rows of logits, 16-bit) and their pool, which holds
    about the activations of the largest mixed step (steps of up to 8192 tokens are captured)."""
    from sfllm.worker.cuda_graph_runner import MAX_GRAPH_TOKENS
    outputs = logit_rows * (c.vocab_size * 2 + 8)
    pool = activation_bytes * min(1.0, MAX_GRAPH_TOKENS / num_tokens)
    return int(outputs + pool) + 256 * 1024**2


def profile_activation_bytes(config: WorkerConfig, c: ModelConfig, model: CausalLM, device: torch.device,
                             num_tokens: int, max_context_length: int) -> int:
    """Peak memory of the largest step: a prompt filling the token budget beside as many one-token
    sequences as may run (high priority's slots too), sampled with top-k/p both ways the sampler has (a small top_k
    among the top columns, top-p alone over the sorted vocabulary), measured with a throwaway KV cache."""
    num_seqs = min(num_sequence_slots(config), num_tokens)
    long_tokens = num_tokens - (num_seqs - 1)
    long_blocks = math.ceil(long_tokens / config.block_size)
    shard = model.shard
    scratch = KVCache(c.num_layers, long_blocks + num_seqs, config.block_size, shard.num_kv_heads, c.head_dim,
                      model.embed_tokens.weight.dtype, device)
    backend = create_attention_backend(config.attention_backend, device, scratch, shard, quiet=True)
    tables = BlockTables(num_seqs, math.ceil(max_context_length / config.block_size), config.block_size, device)
    last_tokens = torch.zeros(num_seqs + 1, dtype=torch.int64, device=device)
    eager = EagerStep(model, backend, tables, last_tokens, KVSplits(backend.name, shard.num_kv_heads,
                                                                    max_context_length, device), StepStaging(device))
    updates = [BlockTableUpdate(0, 0, list(range(long_blocks)))]
    updates += [BlockTableUpdate(seq, 0, [long_blocks + seq]) for seq in range(1, num_seqs)]
    batch = ForwardBatch(step_id=-1, slots=list(range(num_seqs)), num_new_tokens=[long_tokens] + [1] * (num_seqs - 1),
                         context_lens=[long_tokens] + [1] * (num_seqs - 1), input_token_ids=[1] * num_tokens,
                         sample=[True] * num_seqs, block_table_updates=updates)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        tables.apply(batch.block_table_updates)
        hidden, _ = eager.forward(batch, np.ones(num_seqs + 1, dtype=np.float32))
        logits = model.compute_logits(hidden)
        params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50 if seq % 2 else -1) for seq in range(num_seqs)]
        Sampler(config.seed)(logits, SamplingInputs.build(params, [0] * num_seqs, c.vocab_size, device))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del scratch, backend, tables, eager, hidden, logits
    torch.cuda.empty_cache()
    return peak


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
            f"one sequence of the maximum context length needs ({min_blocks * kv_block_bytes / GIB:.3f} GiB); "
            "raise --cpu-kv-cache-gib or lower --max-context-length")
    return MemoryPlan(0, budget, weights_bytes, 0, 0, 0, kv_block_bytes, num_blocks, block_size,
                      budget_name="KV budget (cpu_kv_cache_gib)")
