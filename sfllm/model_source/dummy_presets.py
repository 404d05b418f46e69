"""The published Qwen3 configs, for serving random weights of a real model's shape."""
from __future__ import annotations

from typing import TYPE_CHECKING

from sfllm.model_source.model_config import ARCHITECTURE_OF_MODEL_TYPE, ModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

QWEN3_GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}


def _qwen3_config(
    hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, tie_word_embeddings: bool
) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }


DUMMY_PRESET_HF_CONFIGS = {
    "qwen3-0.6b": _qwen3_config(1024, 3072, 28, 16, tie_word_embeddings=True),
    "qwen3-1.7b": _qwen3_config(2048, 6144, 28, 16, tie_word_embeddings=True),
    "qwen3-4b": _qwen3_config(2560, 9728, 36, 32, tie_word_embeddings=True),
    "qwen3-8b": _qwen3_config(4096, 12288, 36, 32, tie_word_embeddings=False),
    "qwen3-32b": _qwen3_config(5120, 25600, 64, 64, tie_word_embeddings=False),  # 65 GB in bf16: two cards
}


def dummy_preset_config(name: str) -> ModelConfig:
    return ModelConfig.from_dict(DUMMY_PRESET_HF_CONFIGS[name], QWEN3_GENERATION_CONFIG)


def transformers_config(config: ModelConfig) -> PretrainedConfig:
    """A transformers config of `config`'s shape, to build a randomly initialized reference model."""
    from transformers import AutoConfig  # here: a worker or engine that serves the preset never imports it
    model_type = next(name for name, arch in ARCHITECTURE_OF_MODEL_TYPE.items() if arch == config.architecture)
    return AutoConfig.for_model(
        model_type,
        architectures=[config.architecture],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        # A copy: transformers adds rope_theta to the dict it is given.
        rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.qkv_bias,
        dtype=config.torch_dtype,
        eos_token_id=list(config.eos_token_ids),
        bos_token_id=config.bos_token_id,
    )
