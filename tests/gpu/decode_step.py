"""The real model's decode step over a paged KV cache of given context lengths, for the GPU tests and the kernel
bench: each sequence's blocks in one run of the cache, its new token in the last slot of its context."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sfllm.kernels import choose_num_kv_splits
from sfllm.worker.attention.metadata import AttentionMetadata
from sfllm.worker.attention.registry import create_attention_backend
from sfllm.worker.kv_cache import KVCache

BLOCK_SIZE = 16
# the split count the engine chooses for the model's whole context (the graphs' block tables are that wide)
CONTEXT_FOR_SPLITS = 40960


@dataclass
class DecodeStep:
    model: torch.nn.Module
    kv_cache: KVCache
    backend: object
    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    seq_lens: torch.Tensor
    tables: torch.Tensor
    num_kv_heads: int

    @classmethod
    def build(cls, model: torch.nn.Module, config, contexts: np.ndarray, dtype: torch.dtype) -> "DecodeStep":
        device = next(model.parameters()).device
        blocks = -(-contexts // BLOCK_SIZE)
        kv_cache = KVCache(config.num_layers, int(blocks.sum()), BLOCK_SIZE, config.num_kv_heads, config.head_dim,
                           dtype, device)
        backend = create_attention_backend("triton", device, kv_cache, model.shard, quiet=True)
        tables = torch.zeros(contexts.size, int(blocks.max()), dtype=torch.int32)
        starts = np.concatenate([[0], np.cumsum(blocks)[:-1]])
        for b in range(contexts.size):
            tables[b, :blocks[b]] = torch.arange(starts[b], starts[b] + blocks[b])
        tables = tables.to(device)
        seq_lens = torch.from_numpy(contexts.astype(np.int32)).to(device)
        positions = seq_lens.long() - 1
        slots = (tables.gather(1, (positions // BLOCK_SIZE)[:, None])[:, 0].long() * BLOCK_SIZE
                 + positions % BLOCK_SIZE)
        ids = torch.randint(0, config.vocab_size, (contexts.size,), device=device)
        return cls(model, kv_cache, backend, ids, positions, slots, seq_lens, tables, config.num_kv_heads)

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(token ids, positions, attention metadata) of sequences lo..hi-1, in tensors of their own."""
        n, device = hi - lo, self.ids.device
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        meta = AttentionMetadata(
            slot_mapping=self.slots[lo:hi].clone(),
            query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
            seq_lens=self.seq_lens[lo:hi].clone(), block_tables=self.tables[lo:hi].clone(),
            tiles=torch.empty(0, 2, dtype=torch.int32, device=device), decode_only=True,
            num_kv_splits=choose_num_kv_splits(n, self.num_kv_heads, CONTEXT_FOR_SPLITS, num_sms),
            decode_order=torch.argsort(self.seq_lens[lo:hi], descending=True, stable=True).to(torch.int32))
        return self.ids[lo:hi].clone(), self.positions[lo:hi].clone(), meta

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model's hidden states after its last norm (the LM head's input), one row per sequence."""
        return self.model(ids, positions, self.backend, meta)

    def layer_outputs(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Every layer's attention and MLP outputs before their residual adds, in float32, concatenated: where two
        setups' kernels differ, there before the residual stream's rounding can hide it."""
        outputs: list[torch.Tensor] = []
        hooks = [module.register_forward_hook(lambda _m, _i, out: outputs.append(out.float().flatten()))
                 for layer in self.model.layers for module in (layer.self_attn, layer.mlp)]
        try:
            self.run(ids, positions, meta)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat(outputs)
