"""The model hyper-parameters sfllm needs, parsed from a HuggingFace config.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sfllm.model_source.end_of_turn import end_of_turn_token_ids

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# Configs written by `transformers.XConfig().to_dict()` carry `architectures: None`.
ARCHITECTURE_OF_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
TORCH_DTYPES = ("bfloat16", "float16", "float32")


class UnsupportedArchitecture(ValueError):
    def __init__(self, architecture: str) -> None:
        super().__init__(
            f"model architecture {architecture!r} is not supported; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
        self.architecture = architecture


class InvalidModelConfig(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    torch_dtype: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @classmethod
    def from_dict(cls, hf_config: dict, generation_config: dict | None = None) -> ModelConfig:
        # Keys present with value None (as `to_dict()` writes them) count as absent.
        config = {key: value for key, value in hf_config.items() if value is not None}
        generation = {key: value for key, value in (generation_config or {}).items() if value is not None}

        architecture = _architecture(config)
        num_heads = _required(config, "num_attention_heads")
        hidden_size = _required(config, "hidden_size")
        rope_parameters = config.get("rope_parameters", {})
        if architecture == "Qwen2ForCausalLM":
            qkv_bias = True  # Qwen2 always has q/k/v biases; its config has no switch for them
        else:
            qkv_bias = bool(config.get("attention_bias", False))
        return cls(
            architecture=architecture,
            vocab_size=_required(config, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_required(config, "intermediate_size"),
            num_layers=_required(config, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads", num_heads),
            head_dim=config.get("head_dim", hidden_size // num_heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(config),
            max_position_embeddings=_required(config, "max_position_embeddings"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=architecture == "Qwen3ForCausalLM",
            torch_dtype=_torch_dtype(config),
            eos_token_ids=_unique_ids(config.get("eos_token_id"), generation.get("eos_token_id")),
            bos_token_id=generation.get("bos_token_id", config.get("bos_token_id")),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        """Reads config.json, generation_config.json and the chat template's end-of-turn token."""
        hf_config = json.loads((folder / "config.json").read_text())
        generation_path = folder / "generation_config.json"
        generation_config = json.loads(generation_path.read_text()) if generation_path.is_file() else None
        config = cls.from_dict(hf_config, generation_config)
        eos_token_ids = _unique_ids(list(config.eos_token_ids), end_of_turn_token_ids(folder))
        return dataclasses.replace(config, eos_token_ids=eos_token_ids)


def _architecture(config: dict[str, Any]) -> str:
    architectures = config.get("architectures")
    if architectures:
        architecture = architectures[0]
    elif "model_type" in config:
        architecture = ARCHITECTURE_OF_MODEL_TYPE.get(config["model_type"], f"model_type={config['model_type']}")
    else:
        raise InvalidModelConfig("model config has neither 'architectures' nor 'model_type'")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(architecture)
    return architecture


def _required(config: dict[str, Any], key: str) -> Any:
    if key not in config:
        raise InvalidModelConfig(f"model config lacks the required key {key!r}")
    return config[key]


def _rope_scaling(config: dict[str, Any]) -> dict | None:
    """The raw scaling dict, or None for plain RoPE.

    Older configs hold it in `rope_scaling`; transformers 5 writes `rope_parameters`, which also
    carries rope_theta and names plain RoPE "default".
    """
    if "rope_scaling" in config:
        scaling = dict(config["rope_scaling"])
    else:
        scaling = {key: value for key, value in config.get("rope_parameters", {}).items() if key != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling


def _torch_dtype(config: dict[str, Any]) -> str:
    dtype = str(config.get("torch_dtype", config.get("dtype", "float32"))).removeprefix("torch.")
    if dtype not in TORCH_DTYPES:
        raise InvalidModelConfig(f"model config dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    return dtype


def _unique_ids(*sources: int | list[int] | None) -> tuple[int, ...]:
    ids: list[int] = []
    for source in sources:
        for token_id in [source] if isinstance(source, int) else source or []:
            if token_id not in ids:
                ids.append(token_id)
    return tuple(ids)
