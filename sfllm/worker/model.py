"""The decoder-only transformer of Llama, Qwen2 and Qwen3, over a paged KV cache.

Differences between the three are configuration: Qwen2 has a QKV bias, Qwen3 normalises
q and k per head, tied or untied embeddings. Projections are fused (QKV, gate+up) so a
layer runs four matrix products. Under tensor parallelism each rank holds its `ModelShard`
and sums the row-parallel products (and the embedding) over the ranks with an all-reduce;
every rank gathers the whole vocabulary's logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sfllm.model_source import ModelConfig
from sfllm.worker.attention.backend import AttentionBackend
from sfllm.worker.attention.metadata import AttentionMetadata
from sfllm.worker.layer_ops import (add_rms_norm, gate_up_silu, kernel_rows, linear, rms_norm, rotary_qk_norm,
                                    tma_rows)
from sfllm.worker.model_shard import ModelShard
from sfllm.worker.rotary_embedding import RotaryEmbedding
from sfllm.worker.tensor_parallel import TensorParallelGroup


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); the first layer passes no residual."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps), x
        return add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, shard: ModelShard, group: TensorParallelGroup,
                 most_kernel_rows: int, most_tma_rows: int) -> None:
        super().__init__()
        self.layer = layer
        self.group = group
        self.most_kernel_rows = most_kernel_rows
        self.most_tma_rows = most_tma_rows
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                backend: AttentionBackend, meta: AttentionMetadata) -> torch.Tensor:
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.q_norm is not None else (None, None, 0.0)
        qkv = linear(x, self.qkv_proj, self.most_kernel_rows, self.most_tma_rows)
        q, k, v = rotary_qk_norm(qkv, positions, rope.cos_sin, self.num_heads, self.num_kv_heads, self.head_dim, *norms,
                                 backend.kv_cache_to_fill(self.layer), meta.slot_mapping)
        attended = backend.forward(self.layer, q, k, v, meta)
        return self.group.all_reduce(linear(attended, self.o_proj, self.most_kernel_rows, self.most_tma_rows))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: ModelShard, group: TensorParallelGroup,
                 most_kernel_rows: int, most_tma_rows: int) -> None:
        super().__init__()
        self.group = group
        self.most_kernel_rows = most_kernel_rows
        self.most_tma_rows = most_tma_rows
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * shard.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shard.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.most_kernel_rows
        activated = gate_up_silu(x, self.gate_up_proj, rows, self.most_tma_rows)
        return self.group.all_reduce(linear(activated, self.down_proj, rows))  # past `rows`: cuBLAS (tma_rows)


class VocabParallelEmbedding(nn.Module):
    """The embedding rows of the rank's token ids; a token of another rank's range embeds as zeros here, so
    the all-reduce over the ranks gives every token its row."""

    def __init__(self, shard: ModelShard, hidden_size: int, group: TensorParallelGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shard.vocab_rows, hidden_size))
        self.first_token = shard.first_token
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.first_token
        elsewhere = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        return self.group.all_reduce(x.masked_fill_(elsewhere[:, None], 0.0))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, shard: ModelShard, group: TensorParallelGroup) -> None:
        super().__init__()
        # a layer's GEMMs all in the skinny kernel up to the same rows, chosen by its largest weight
        largest_weight = 2 * shard.intermediate_size * config.hidden_size
        most_kernel_rows, most_tma_rows = kernel_rows(largest_weight), tma_rows(largest_weight)
        self.self_attn = Attention(config, layer, shard, group, most_kernel_rows, most_tma_rows)
        self.mlp = MLP(config, shard, group, most_kernel_rows, most_tma_rows)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rope: RotaryEmbedding, backend: AttentionBackend,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, rope, backend, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class CausalLM(nn.Module):
    """Parameter names follow transformers' checkpoints, except the fused projections."""

    def __init__(self, config: ModelConfig, shard: ModelShard, group: TensorParallelGroup) -> None:
        super().__init__()
        self.config = config
        self.shard = shard
        self.group = group
        self.embed_tokens = VocabParallelEmbedding(shard, config.hidden_size, group)
        self.layers = nn.ModuleList(DecoderLayer(config, i, shard, group) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, shard.vocab_rows, bias=False)
        self.rope: RotaryEmbedding | None = None

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        c = self.config
        self.rope = RotaryEmbedding(c.head_dim, max_positions, c.rope_theta, c.rope_scaling, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend,
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of all new tokens, after the final norm."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rope, backend, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [N, vocab] of hidden states [N, hidden]; or, in the model's dtype, into `out`
        [N, shard.padded_vocab_size], of which the result is a view."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.group.size == 1:
            return F.linear(hidden, weight).float() if out is None else torch.matmul(hidden, weight.t(), out=out)
        logits = self.group.gather_columns(F.linear(hidden, weight), out)[:, :self.config.vocab_size]
        return logits.float() if out is None else logits
