"""From the user's `model` string to a local HuggingFace-style folder and a parsed config."""
from sfllm.model_source.gguf_metadata import UnsupportedGGUF
from sfllm.model_source.model_config import (
    SUPPORTED_ARCHITECTURES,
    InvalidModelConfig,
    ModelConfig,
    UnsupportedArchitecture,
)
from sfllm.model_source.resolve import LoadFormatMismatch, ModelNotFound, ModelSource, resolve_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "InvalidModelConfig",
    "LoadFormatMismatch",
    "ModelConfig",
    "ModelNotFound",
    "ModelSource",
    "UnsupportedArchitecture",
    "UnsupportedGGUF",
    "resolve_model",
]
