"""HuggingFace config.json and generation_config.json rebuilt from GGUF metadata."""
from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType, dequantize

from sfllm.model_source.gguf_metadata import GGUFMetadata, UnsupportedGGUF

ROPE_FREQS_TENSOR = "rope_freqs.weight"
# llama.cpp bakes Llama 3 RoPE scaling into per-frequency divisors (rope_freqs) computed with
# these values; only `factor` varies between Llama 3.x models.
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_config_from_gguf(metadata: GGUFMetadata, torch_dtype: str) -> dict:
    num_heads = metadata.get_model("attention.head_count")
    hidden_size = metadata.get_model("embedding_length")
    head_dim = metadata.get_model("attention.key_length", hidden_size // num_heads)
    rope_theta = _float32_value(metadata.get_model("rope.freq_base", 10000.0))
    return {
        "architectures": [metadata.architecture.hf_architecture],
        "model_type": metadata.architecture.model_type,
        "vocab_size": metadata.get_model("vocab_size", metadata.token_count()),
        "hidden_size": hidden_size,
        "intermediate_size": metadata.get_model("feed_forward_length"),
        "num_hidden_layers": metadata.get_model("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": metadata.get_model("attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": metadata.has_tensor("blk.0.attn_q.bias"),
        "rms_norm_eps": _float32_value(metadata.get_model("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(metadata, rope_theta, head_dim),
        "max_position_embeddings": metadata.get_model("context_length"),
        # llama.cpp stores no output matrix when the model ties it to the embedding.
        "tie_word_embeddings": not metadata.has_tensor("output.weight"),
        "torch_dtype": torch_dtype,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id", None),
    }


def generation_config_from_gguf(metadata: GGUFMetadata) -> dict:
    """EOS plus the end-of-turn/end-of-message tokens llama.cpp also stops at."""
    stop_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    stop_ids = [metadata.get(key, None) for key in stop_keys]
    eos_token_ids = list(dict.fromkeys(token_id for token_id in stop_ids if token_id is not None))
    return {"bos_token_id": metadata.get("tokenizer.ggml.bos_token_id", None), "eos_token_id": eos_token_ids}


def _float32_value(value: float) -> float:
    # GGUF stores float32; its shortest decimal (1e-05, not 9.999999747378752e-06) is the config's value.
    return float(str(np.float32(value)))


def _rope_scaling(metadata: GGUFMetadata, rope_theta: float, head_dim: int) -> dict | None:
    if metadata.has_tensor(ROPE_FREQS_TENSOR):
        return _llama3_rope_scaling(metadata, rope_theta, head_dim)
    scaling_type = metadata.get_model("rope.scaling.type", "none")
    if scaling_type == "none":
        return None
    scaling = {"rope_type": scaling_type, "factor": _float32_value(metadata.get_model("rope.scaling.factor"))}
    original_context = metadata.get_model("rope.scaling.original_context_length", None)
    if original_context is not None:
        scaling["original_max_position_embeddings"] = original_context
    return scaling


def _llama3_rope_scaling(metadata: GGUFMetadata, rope_theta: float, head_dim: int) -> dict:
    tensor = next(tensor for tensor in metadata.tensors if tensor.name == ROPE_FREQS_TENSOR)
    if tensor.tensor_type != GGMLQuantizationType.F32:
        raise UnsupportedGGUF(f"{ROPE_FREQS_TENSOR} is stored as {tensor.tensor_type.name}, expected F32")
    stored = dequantize(tensor.data, tensor.tensor_type).reshape(-1)
    scaling = {"rope_type": "llama3", "factor": float(stored.max()), **LLAMA3_ROPE_DEFAULTS}
    expected = llama3_rope_divisors(scaling, rope_theta, head_dim)
    if not np.allclose(stored, expected, rtol=1e-5):
        raise UnsupportedGGUF(
            f"GGUF {metadata.path.name}: {ROPE_FREQS_TENSOR} (max {scaling['factor']}) does not match Llama 3 "
            f"RoPE scaling with {LLAMA3_ROPE_DEFAULTS}; largest difference {np.abs(stored - expected).max():.3g}"
        )
    return scaling


def llama3_rope_divisors(scaling: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """The divisor of each rotary frequency that Llama 3 scaling applies, as llama.cpp stores it."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original_context = scaling["original_max_position_embeddings"]
    frequencies = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    divisors = []
    for frequency in frequencies:
        wavelength = 2 * math.pi / frequency
        if wavelength < original_context / high:
            divisors.append(1.0)
        elif wavelength > original_context / low:
            divisors.append(factor)
        else:
            smooth = (original_context / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)
