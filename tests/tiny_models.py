"""Small random checkpoints written by transformers, with a tokenizer, for tests that run the engine."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

from sfllm.model_source.dummy_tokenizer import dummy_tokenizer_folder

if TYPE_CHECKING:
    from sfllm.worker.model_runner import ModelRunner


def write_tiny_qwen3(folder: Path, vocab_size: int, tie_word_embeddings: bool) -> Path:
    """Two layers of 4 attention heads and 2 KV heads (head_dim 16, hidden 64, MLP 128), seed 0, with the dummy
    byte tokenizer (ids past its bytes decode as filler words)."""
    config = transformers.Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, tie_word_embeddings=tie_word_embeddings,
                                      initializer_range=0.2)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder)
    for file in dummy_tokenizer_folder(folder / "tokenizer-cache", vocab_size).iterdir():
        if file.is_file():
            shutil.copy(file, folder / file.name)
    return folder


def tiny_qwen3_runner(folder: Path, vocab_size: int, device: str) -> ModelRunner:
    """A float32 ModelRunner on a tiny tied Qwen3 written to `folder`: 8 requests (slots past them for high
    priority), steps of 64 tokens, a context of 128, 64 KV blocks, the Triton attention backend."""
    from sfllm.config import ServerConfig
    from sfllm.model_source import resolve_model
    from sfllm.worker.model_runner import ModelRunner
    folder = write_tiny_qwen3(folder, vocab_size, tie_word_embeddings=True)
    worker_config = ServerConfig(model=str(folder), device=device, dtype="float32", attention_backend="triton",
                                 max_running_requests=8, max_running_tokens=64, max_context_length=128,
                                 num_kv_blocks=64, cache_dir=str(folder / "cache")).worker()
    return ModelRunner(worker_config, resolve_model(worker_config.model, "auto", worker_config.cache_dir))
