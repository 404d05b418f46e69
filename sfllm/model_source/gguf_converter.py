"""Converting a GGUF file once into a cached HuggingFace-style folder."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sfllm.model_source.atomic_folder import cached_folder

# Bump when the converted folder's content changes, so older cached conversions are not reused.
CONVERTER_VERSION = 1


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """The folder `<cache_dir>/converted/<key>/` holding `gguf_path` as HF files, converted on first use.

    The key covers the file's name, size and modification time, so an edited file converts anew;
    a cache hit only stats the file.
    """
    target = cache_dir / "converted" / conversion_key(gguf_path)
    return cached_folder(target, lambda scratch: _convert_into(gguf_path, scratch))


def conversion_key(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    fingerprint = f"{gguf_path.name}:{stat.st_size}:{stat.st_mtime_ns}:v{CONVERTER_VERSION}"
    return f"{gguf_path.stem}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}"


def _convert_into(gguf_path: Path, folder: Path) -> None:
    # imported only to convert: a cache hit (every start after the first) needs neither torch nor gguf's reader
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from sfllm.model_source.gguf_hf_config import generation_config_from_gguf, hf_config_from_gguf
    from sfllm.model_source.gguf_metadata import GGUFMetadata
    from sfllm.model_source.gguf_tensors import converted_dtype, hf_tensor, hf_tensor_name, weight_tensors
    from sfllm.model_source.gguf_tokenizer import save_gguf_tokenizer

    metadata = GGUFMetadata(gguf_path)
    tensors = weight_tensors(metadata)
    holds_bfloat16 = any(converted_dtype(tensor) == torch.bfloat16 for tensor in tensors)
    hf_config = hf_config_from_gguf(metadata, torch_dtype="bfloat16" if holds_bfloat16 else "float32")
    state_dict = {
        hf_tensor_name(tensor.name): hf_tensor(tensor, metadata)
        for tensor in tqdm(tensors, desc=f"Converting {gguf_path.name}", unit="tensor", disable=None)
    }
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation_config_from_gguf(metadata), indent=2) + "\n")
    save_gguf_tokenizer(metadata, folder)
