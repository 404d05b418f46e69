"""What a GGUF file says about its model, and which of its architectures sfllm can convert."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfllm.model_source.model_config import UnsupportedArchitecture

if TYPE_CHECKING:
    from gguf import ReaderTensor


class UnsupportedGGUF(ValueError):
    pass


@dataclass(frozen=True)
class GGUFArchitecture:
    hf_architecture: str
    model_type: str
    # llama.cpp's converter reorders the rows of q_proj/k_proj of these models for its RoPE kernel.
    permutes_qk_rows: bool


GGUF_ARCHITECTURES = {
    "llama": GGUFArchitecture("LlamaForCausalLM", "llama", permutes_qk_rows=True),
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM", "qwen2", permutes_qk_rows=False),
    "qwen3": GGUFArchitecture("Qwen3ForCausalLM", "qwen3", permutes_qk_rows=False),
}

_REQUIRED = object()


class GGUFMetadata:
    """The key-value metadata and tensor directory of one GGUF file (tensor data stays on disk)."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader  # imported to read a file: a cached conversion needs no gguf (nor numpy)

        self.path = path
        self.reader = GGUFReader(path)
        self.architecture_name: str = self.get("general.architecture")
        if self.architecture_name not in GGUF_ARCHITECTURES:
            raise UnsupportedArchitecture(f"{self.architecture_name} (GGUF {path.name})")
        self.architecture = GGUF_ARCHITECTURES[self.architecture_name]

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self.reader.get_field(key)
        if field is not None:
            return field.contents()
        if default is _REQUIRED:
            raise UnsupportedGGUF(f"GGUF {self.path.name} lacks the metadata key {key!r}")
        return default

    def get_model(self, key: str, default: Any = _REQUIRED) -> Any:
        """A key of the `<architecture>.` namespace, e.g. `llama.block_count`."""
        return self.get(f"{self.architecture_name}.{key}", default)

    def token_count(self) -> int:
        field = self.reader.get_field("tokenizer.ggml.tokens")
        if field is None:
            raise UnsupportedGGUF(f"GGUF {self.path.name} holds no tokenizer (no 'tokenizer.ggml.tokens')")
        return len(field.data)

    @property
    def tensors(self) -> list[ReaderTensor]:
        return self.reader.tensors

    def has_tensor(self, name: str) -> bool:
        return any(tensor.name == name for tensor in self.reader.tensors)
